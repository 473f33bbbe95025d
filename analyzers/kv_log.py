"""KV figures from kvtrace's own KV event log: exact, per layer, per step.

Replays the log as the allocator would see it: a storage is live from the event that first shows its
address until its `freed` event. A reallocation logs the new storage before the old one's free, so the
replay shows the transient copy exactly as it happened.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any

from analyzers.kv_capacity import BufferStorage, preallocated_capacity, static_capacity
from analyzers.kv_cut_step import cut_last_step
from analyzers.kv_events import (
    BEAMS_REASON,
    BUFFER_PARTS,
    EVICTION_REASONS,
    buffer_shape,
    event_rows,
    eviction_reason,
    holds_tokens,
    is_kv_data,
)
from analyzers.kv_log_figures import CacheFigures, KvLogAnalysis, LayerFigures
from analyzers.kv_views import (
    TRACKED_PARTS,
    SharedStorages,
    Slot,
    held_by_slot,
    layer_shares,
    tracked_capacity,
    tracked_rows,
)
from analyzers.readers.sources import STAGE_STEP
from kvtrace.format import CALLER_REASON, NO_BEAMS_REASON, TRACK_CACHE_ID, KvEvent, Run

_NO_NEW_STORAGE = ("freed", "written")


def analyze_kv_log(
    events: list[KvEvent],
    prompt_ends: dict[int, int] | None = None,
    unfinished: bool = False,
    raised: Collection[int] = (),
    block_raised: bool = False,
    step_ends: dict[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KvLogAnalysis:
    """`progress(done, total)`: the events replayed so far, every 65,536 and at the end.

    `prompt_ends`: prefill step -> the cache positions its generate() call's prompt ends at (the step's
    memory sample says, since kvtrace 0.1's round 3): what the step's cache holds beyond it are draft
    tokens its forward verified and kept (assisted decoding), yielded besides the prefill's own token.
    `unfinished`: the run never ended (its manifest still says running): a last step the log holds only
    part of is left out of the figures of the end (`KvLogAnalysis.cut`). `raised`: the steps whose forward
    raised (their memory samples say): they yielded no token, and the last, where it is the log's, is a
    raised cut. `block_raised`: the block raised or was interrupted (its manifest says), in a run whose
    samples may not say where: a last step whose layers show it cut is one too. `step_ends`: step -> its
    end sample's `t_ns` (memory_samples.jsonl): a line after it, though it carries that step's number (a
    crop or reorder between two generate() calls), came in the gap before the next step, so the step's end
    figures (`step_live`, `step_tokens`, ...) are taken before it. Its generated tokens count such a crop
    only where it is a draft rejection (assisted decoding and prompt lookup crop the drafts their forward
    verified there, inside their generate() call). A crop the recorder saw made outside the model's calls
    (`reason` `CALLER_REASON`: a chat's "regenerate" cropping the answer between two calls) never is, with
    or without an end sample, however few tokens it takes. Of the rest (made inside a call, or in a run
    that does not say: recorded without the model, or before that reason), the slot's first crop after the
    end sample, taking back no more than the forward wrote beyond its own token, is taken for one. Any
    other took tokens the step had generated: they stay generated."""
    raised_steps = frozenset(raised)
    if unfinished:
        cut = cut_last_step(events)
    elif raised_steps or block_raised:
        last_raised = max(raised_steps, default=None)
        cut = cut_last_step(events, last_raised, block_raised=block_raised and last_raised is None)
    else:
        cut = None
    # Steps whose forward never finished: no token came of them, whatever their layers appended
    no_yield = raised_steps | {cut.step} if cut is not None and cut.raised else raised_steps
    cut_from = (
        next((i for i, ev in enumerate(events) if ev.step == cut.step), -1) if cut and not cut.raised else -1
    )
    whole_end: tuple[Any, ...] = ()  # the state when the cut step began: the last whole step's end
    live: dict[int, tuple[int, int, str, int]] = {}  # addr -> (bytes, layer, kv, cache)
    open_storage: dict[int, int] = {}  # addr -> index in storages
    storages: list[tuple[int, int, int, int, int, str, int]] = []
    storage_devices: list[str] = []
    series_frees: dict[int, int] = {}  # series point of a `freed` line -> the index in storages it frees
    scanned_after: dict[int, int] = {}  # storage index -> the last line's t_ns before its step
    found: set[int] = set()  # storage indices first logged as found
    tracked: set[int] = set()  # storage indices first logged by kvtrace.track()
    storage_shares: dict[int, dict[tuple[int, int], int]] = {}
    buffer_storages: dict[int, BufferStorage] = {}
    last_ns = 0  # the latest line's t_ns so far
    step_after: tuple[int, int] = (0, 0)  # (step, the latest t_ns before that step's first line)
    live_total = 0
    peak = 0
    peak_t = 0
    allocated_total = 0
    layer_live: dict[int, int] = defaultdict(int)
    cache_layer_live: dict[tuple[int, int], int] = defaultdict(int)
    layer_series: dict[int, list[int]] = defaultdict(list)
    series_t: list[int] = []
    series_b: list[int] = []
    step_live: dict[int, dict[int, int]] = {}
    step_cache_live: dict[int, dict[tuple[int, int], int]] = {}
    step_phase: dict[int, str] = {}
    step_start: dict[int, int] = {}
    evicted_by_layer: dict[tuple[int, int], int] = defaultdict(int)  # (cache, layer) -> tokens, all rows
    evicted_by_layer_reason: dict[tuple[int, int], dict[str, int]] = defaultdict(dict)
    tokens_by_layer: dict[tuple[int, int], int] = {}
    # K's and V's own: a run cut between a layer's K and V updates (an OOM in V's torch.cat) holds more
    # tokens in K than in V, and each storage's bytes are over its own tokens
    tokens_by_kv: dict[tuple[int, int, str], int] = {}
    rows_by_cache: dict[int, int] = {}
    last_seq_by_cache: dict[int, int] = {}
    last_step_by_cache: dict[int, int] = {}  # the step of that event: caches written in one step are peers
    evictions: list[KvEvent] = []
    evicting: set[tuple[int, int, int]] = set()  # (cache, layer, step) whose K lost tokens: its V line next
    evicted_by_step: dict[int, dict[int, dict[str, int]]] = {}  # step -> layer -> kind -> tokens, all rows
    final_state: dict[int, tuple[int, int, str, int]] | None = None
    final_point = -1  # the series point whose level is the final state's
    # storages several slots are views of, split by view in the per-layer figures (the totals count each once)
    shared = SharedStorages()
    final_shares: dict[int, dict[Slot, int]] = {}
    final_total = 0
    open_step: int | None = None  # the step whose end state is not recorded yet
    ends = step_ends or {}
    ended: int | None = None  # the open step, once its end sample's time is past: its end state is taken
    gap_evicted: dict[int, dict[str, int]] = {}  # layer -> kind -> tokens evicted since then, all rows
    step_tokens: dict[int, dict[int, int]] = {}
    step_rows: dict[int, dict[int, int]] = {}
    written: set[tuple[int, int]] = set()  # (cache, layer) slots written in the open step
    step_evicted: dict[tuple[int, int], int] = defaultdict(int)  # per row, crops left out
    closed_tokens: dict[tuple[int, int], int] = {}  # a slot's tokens at the end of the last step writing it
    draft_room: dict[tuple[int, int], int] = {}  # per row, drafts its forward wrote
    gap_cropped: dict[tuple[int, int], int] = defaultdict(int)  # per row, cropped past its end, not drafts
    generated: dict[int, int] = defaultdict(int)
    generated_rows: dict[int, int] = defaultdict(int)
    call_step: dict[int, int] = {}  # cache -> its last prefill's step
    call_generated: dict[int, int] = defaultdict(int)  # cache -> tokens yielded per row since then
    reordered: set[int] = set()
    beams: dict[int, int] = {}
    # Per cache: its last module buffer's shape, positions at dim 1 (None once any other part held its KV),
    # and whether a buffer was written in place: what `preallocated_capacity` decides on
    buffer_shapes: dict[int, list[int] | None] = {}
    buffer_in_place: set[int] = set()
    # per cache: {layer: positions of its last K/V data tensor [b, h, t, d]}, and the layers seen with room
    data_positions: dict[int, dict[int, int]] = defaultdict(dict)
    data_spare: dict[int, set[int]] = defaultdict(set)
    # per cache: {(layer, kv): its K/V data storage}, the caches where one was replaced (grown), and those
    # where one was written in place
    data_storage: dict[int, dict[tuple[int, str], int]] = defaultdict(dict)
    data_moved: set[int] = set()
    data_in_place: set[int] = set()

    def _add_shares(changes: dict[Slot, int]) -> None:
        for (cache, layer, _), change in changes.items():
            layer_live[layer] += change
            slot = (cache, layer)
            cache_layer_live[slot] += change
            if not cache_layer_live[slot]:  # only live slots: a long run's dropped caches cost no step
                del cache_layer_live[slot]

    def _end_state(step: int) -> None:
        step_live[step] = dict(layer_live)
        step_cache_live[step] = dict(cache_layer_live)
        tokens: dict[int, int] = {}
        for slot in cache_layer_live:  # the slots holding KV now
            tokens[slot[0]] = max(tokens.get(slot[0], 0), tokens_by_layer.get(slot, 0))
        step_tokens[step] = tokens
        step_rows[step] = {cache: rows for cache, rows in rows_by_cache.items() if cache in tokens}
        prefill = step_phase.get(step) == "prefill"
        prompt_end = prompt_ends.get(step) if prompt_ends and prefill else None
        for slot in written:  # the most a draft rejection may crop: what the forward wrote beyond its token
            before = closed_tokens.get(slot)
            drafts_from = prompt_end if prefill else before + 1 if before is not None else None
            held = tokens_by_layer.get(slot, 0)
            draft_room[slot] = max(held - drafts_from, 0) if drafts_from is not None else 0

    def _close_step(step: int) -> None:
        if ended != step:
            _end_state(step)
        phase = step_phase.get(step, "")
        if phase in ("prefill", "decode") and step not in no_yield:  # a model forward; step 0 is outside any
            yields: dict[int, int] = {}
            for slot in written:
                before = closed_tokens.get(slot)
                held = tokens_by_layer.get(slot, 0) + gap_cropped.get(slot, 0)
                if not held:  # none held, or unknown (a module cache whose forward does not say where)
                    appended = 0
                elif phase == "prefill" or before is None:
                    end = prompt_ends.get(step) if prompt_ends and phase == "prefill" else None
                    appended = 1 + (held - end if end is not None and held > end else 0)
                else:
                    appended = held - before + step_evicted.get(slot, 0)
                yields[slot[0]] = max(yields.get(slot[0], 0), appended)
            for cache, count in yields.items():
                if phase == "prefill":
                    call_step[cache], call_generated[cache] = step, 0
                call_generated[cache] += max(count, 0)
                generated[cache] += max(count, 0)
                generated_rows[cache] += max(count, 0) * rows_by_cache.get(cache, 1)
        for slot in written:
            closed_tokens[slot] = tokens_by_layer.get(slot, 0)
        written.clear()
        step_evicted.clear()
        draft_room.clear()
        gap_cropped.clear()

    for index, ev in enumerate(events):
        if progress is not None and not index % STAGE_STEP:
            progress(index, len(events))
        if ev.step != step_after[0]:
            step_after = (ev.step, last_ns)
        last_ns = max(last_ns, ev.t_ns)
        ending = ev.phase == "end"
        if open_step is not None and (ending or ev.step != open_step):
            # Steps never go back: the state before this event is the open step's end state.
            _close_step(open_step)
            # What the gap evicted counts in the step after it, whose figures show it gone (after the last
            # step, in the step it follows)
            _merge_evicted(evicted_by_step, open_step if ending else ev.step, gap_evicted)
            open_step = ended = None
        elif (
            open_step is not None
            and ended != open_step
            and ev.t_ns > ends.get(open_step, ev.t_ns)
            and ev.part not in TRACKED_PARTS
        ):
            # Past the step's end sample: the state before this line is the one its forward ended with. Not
            # a `kvtrace.track` line: the user's code tracks what a forward wrote after it returns (the
            # README's advice), so it is that forward's end state, not a change made in the gap after it.
            _end_state(open_step)
            ended = open_step
        if index == cut_from:
            whole_end = copy.deepcopy(
                (live, live_total, tokens_by_layer, tokens_by_kv, rows_by_cache, last_seq_by_cache,
                 evicted_by_layer, evicted_by_layer_reason, generated, generated_rows, call_step,
                 call_generated, reordered, beams, buffer_shapes, buffer_in_place, shared.shares,
                 last_step_by_cache)
            )  # fmt: skip
        if ending and final_state is None:
            final_state = dict(live)
            final_shares = copy.deepcopy(shared.shares)
            final_total = live_total
            final_point = len(series_t) - 1
        if not ending:
            step_phase.setdefault(ev.step, ev.phase)
            step_start.setdefault(ev.step, ev.t_ns)
        if ev.event == "freed":
            entry = live.pop(ev.addr, None)
            if entry is not None:
                live_total -= entry[0]
                _add_shares({slot: -nbytes for slot, nbytes in shared.release(ev.addr, entry).items()})
                storage = open_storage.pop(ev.addr)
                addr, nbytes, first, _, layer, kv, cache = storages[storage]
                storages[storage] = (addr, nbytes, first, ev.t_ns, layer, kv, cache)
                series_frees[len(series_t)] = storage
        elif ev.addr and ev.addr not in live and ev.event not in _NO_NEW_STORAGE:
            live[ev.addr] = (ev.storage_bytes, ev.layer, ev.kv, ev.cache)
            live_total += ev.storage_bytes
            layer_live[ev.layer] += ev.storage_bytes
            cache_layer_live[(ev.cache, ev.layer)] += ev.storage_bytes
            allocated_total += ev.storage_bytes
            open_storage[ev.addr] = len(storages)
            if ev.source == "module":
                scanned_after[len(storages)] = step_after[1]
            if ev.reason == "found":
                found.add(len(storages))
            if ev.source == "track":
                tracked.add(len(storages))
            storages.append((ev.addr, ev.storage_bytes, ev.t_ns, -1, ev.layer, ev.kv, ev.cache))
            storage_devices.append(ev.device)
        if ev.event != "freed" and ev.logical_bytes and ev.addr in live:
            changes = shared.see(
                ev.addr, live[ev.addr], (ev.cache, ev.layer, ev.kv), ev.part, ev.logical_bytes
            )
            if changes:
                _add_shares(changes)
                split = shared.shares.get(ev.addr)
                if split is not None:
                    storage_shares[open_storage[ev.addr]] = layer_shares(split)
        if ev.event != "freed" and holds_tokens(ev):
            tokens_by_layer[(ev.cache, ev.layer)] = ev.tokens
            tokens_by_kv[(ev.cache, ev.layer, ev.kv)] = ev.tokens
            last_seq_by_cache[ev.cache] = ev.seq
            last_step_by_cache[ev.cache] = ev.step
            written.add((ev.cache, ev.layer))
        if ev.event != "freed" and is_kv_data(ev):
            if ev.shape:
                rows_by_cache[ev.cache] = event_rows(ev)
                if ev.part in BUFFER_PARTS and buffer_shapes.get(ev.cache, ev.shape) is not None:
                    buffer_shapes[ev.cache] = buffer_shape(ev)
                    if ev.event == "written":
                        buffer_in_place.add(ev.cache)
                if ev.part in BUFFER_PARTS and len(ev.shape) == 4 and ev.addr in open_storage:
                    _see_buffer(buffer_storages, open_storage[ev.addr], ev)
                else:
                    buffer_shapes[ev.cache] = None
                if ev.part == "data" and len(ev.shape) == 4:
                    data_positions[ev.cache][ev.layer] = ev.shape[2]
                    if ev.shape[2] > ev.tokens:
                        data_spare[ev.cache].add(ev.layer)
                    if data_storage[ev.cache].setdefault((ev.layer, ev.kv), ev.addr) != ev.addr:
                        data_moved.add(ev.cache)
                    if ev.event == "written":
                        data_in_place.add(ev.cache)
            if ev.event == "reordered" and ev.reason != NO_BEAMS_REASON:
                reordered.add(ev.cache)
                count = ev.reason.removeprefix(BEAMS_REASON)
                if (
                    ev.reason.startswith(BEAMS_REASON)
                    and count.isascii()
                    and count.isdigit()
                    and int(count) > 1
                ):
                    beams[ev.cache] = int(count)
        if ev.evicted_tokens:
            rows = event_rows(ev) or 1
            slot = (ev.cache, ev.layer)
            evicted_by_layer[slot] += ev.evicted_tokens * rows
            by_reason = evicted_by_layer_reason[slot]
            reason = eviction_reason(ev)
            by_reason[reason] = by_reason.get(reason, 0) + ev.evicted_tokens * rows
            by_layer = gap_evicted if ended is not None else evicted_by_step.setdefault(ev.step, {})
            in_step = by_layer.setdefault(ev.layer, {})
            in_step[reason] = in_step.get(reason, 0) + ev.evicted_tokens * rows
            if reason != "crop":
                step_evicted[slot] += ev.evicted_tokens
            elif ev.reason == CALLER_REASON:  # made outside the model's generate() calls: never a rejection
                draft_room.pop(slot, None)
                gap_cropped[slot] += ev.evicted_tokens
            elif ended is not None and ev.evicted_tokens > draft_room.pop(slot, 0):  # drafts are cropped once
                gap_cropped[slot] += ev.evicted_tokens
        if ev.kv == "k" and (ev.event in ("evicted", "cropped") or ev.evicted_tokens):
            evictions.append(ev)
            evicting.add((ev.cache, ev.layer, ev.step))
        elif ev.kv == "v" and is_kv_data(ev) and (ev.cache, ev.layer, ev.step) in evicting:
            evictions.append(ev)  # the same tokens left V: its line gives V's bytes a token
            evicting.discard((ev.cache, ev.layer, ev.step))
        if live_total > peak:
            peak, peak_t = live_total, ev.t_ns
        series_t.append(ev.t_ns)
        series_b.append(live_total)
        if not ending:
            open_step = ev.step
        layer_series[ev.layer].append(layer_live[ev.layer])
    if progress is not None:
        progress(len(events), len(events))
    if whole_end:
        # The cut step never ended: the end is the last whole step's (its updates stay in the series)
        (final_state, final_total, tokens_by_layer, tokens_by_kv, rows_by_cache, last_seq_by_cache,
         evicted_by_layer, evicted_by_layer_reason, generated, generated_rows, call_step, call_generated,
         reordered, beams, buffer_shapes, buffer_in_place, final_shares,
         last_step_by_cache) = whole_end  # fmt: skip
        final_point = cut_from - 1
    elif open_step is not None:
        _close_step(open_step)
        _merge_evicted(evicted_by_step, open_step, gap_evicted)
    if final_state is None:
        final_state, final_total, final_shares = dict(live), live_total, shared.shares
        final_point = len(series_t) - 1

    final_by_cache: dict[int, int] = defaultdict(int)
    for nbytes, _, _, cache in held_by_slot(final_state, final_shares):
        final_by_cache[cache] += nbytes
    by_tokens: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))  # cache -> tokens -> bytes
    for nbytes, layer, kv, cache in held_by_slot(final_state, final_shares):
        by_tokens[cache][_kv_tokens(tokens_by_kv, tokens_by_layer, cache, layer, kv)] += nbytes
    caches = []
    for cache, last_seq in sorted(last_seq_by_cache.items()):
        tokens = max(tokens for (c, _), tokens in tokens_by_layer.items() if c == cache)
        rows = rows_by_cache.get(cache, 0)
        room = preallocated_capacity(buffer_shapes.get(cache), cache in buffer_in_place, tokens, rows)
        room_of = "buffers" if room[0] else ""
        if not room[0] and cache in data_positions:
            room = static_capacity(data_positions[cache], data_spare.get(cache, set()), rows)
            room_of = "static_cache" if room[0] else ""
        if not room[0] and cache == TRACK_CACHE_ID and rows:
            # kvtrace.track()'s tensors: views of one preallocated tensor say its max_seq (`capacity_tokens`)
            views = [ev for ev in events if ev.cache == cache and ev.shape and ev.event != "freed"]
            positions = tracked_capacity(views, tokens)
            # ... and its max_batch behind views cut to the rows in use (`capacity_rows`)
            room_rows = tracked_rows(views, rows)
            room, room_of = ((room_rows, positions), "tracked") if positions else (room, room_of)
        # Room to spare, or a decode step written in place (a window's layers all full: no room left)
        in_place = cache in data_positions and cache not in data_moved
        in_place = in_place and (bool(data_spare.get(cache)) or cache in data_in_place)
        caches.append(
            CacheFigures(
                cache=cache,
                layers=len({layer for c, layer in tokens_by_layer if c == cache}),
                final_bytes=final_by_cache.get(cache, 0),
                tokens=tokens,
                rows=rows,
                last_seq=last_seq,
                last_step=last_step_by_cache.get(cache, 0),
                generated_tokens=generated.get(cache, 0),
                generated_row_tokens=generated_rows.get(cache, 0),
                call_step=call_step.get(cache, 0),
                call_generated_tokens=call_generated.get(cache, 0),
                reordered=cache in reordered,
                beams=beams.get(cache, 0),
                capacity_rows=room[0],
                capacity_tokens=room[1],
                capacity_of=room_of,
                static_positions=max(data_positions[cache].values()) if in_place else 0,
                bytes_by_tokens=dict(by_tokens.get(cache, {})),
            )
        )
    # The table's rows: the caches held at the end, and any other whose tokens were evicted (their counts
    # make up the totals); when nothing is held any more, every cache, as last seen.
    slots = set(tokens_by_layer) | {(entry[3], entry[1]) for entry in held_by_slot(final_state, final_shares)}
    held = {cache for cache, nbytes in final_by_cache.items() if nbytes}
    shown = (held or {cache for cache, _ in slots}) | {cache for cache, _ in evicted_by_layer}
    per_layer: dict[tuple[int, int], LayerFigures] = {}
    for cache, layer in sorted(slot for slot in slots if slot[0] in shown):
        per_layer[(cache, layer)] = LayerFigures(
            layer=layer,
            evicted_tokens=evicted_by_layer.get((cache, layer), 0),
            tokens=tokens_by_layer.get((cache, layer), 0),
            k_tokens=_kv_tokens(tokens_by_kv, tokens_by_layer, cache, layer, "k"),
            v_tokens=_kv_tokens(tokens_by_kv, tokens_by_layer, cache, layer, "v"),
            evicted_by_reason=dict(evicted_by_layer_reason.get((cache, layer), {})),
            cache=cache,
        )
    for nbytes, layer, kv, cache in held_by_slot(final_state, final_shares):
        figures = per_layer.setdefault((cache, layer), LayerFigures(layer=layer, cache=cache))
        if kv == "k":
            figures.k_bytes += nbytes
        else:
            figures.v_bytes += nbytes
    return KvLogAnalysis(
        final_bytes=final_total,
        peak_bytes=peak,
        peak_t_ns=peak_t,
        allocated_bytes_total=allocated_total,
        evicted_tokens=sum(evicted_by_layer.values()),
        per_layer=[per_layer[k] for k in sorted(per_layer)],
        evicted_by_reason=_total_by_reason(evicted_by_layer_reason),
        series_t_ns=series_t,
        series_bytes=series_b,
        series_frees=series_frees,
        final_point=final_point,
        layer_series=dict(layer_series),
        step_live=step_live,
        step_phase=step_phase,
        step_start_ns=step_start,
        evictions=evictions,
        evicted_by_step=evicted_by_step,
        storages=storages,
        storage_devices=storage_devices,
        scanned_after_ns=scanned_after,
        found_storages=found,
        tracked_storages=tracked,
        storage_shares=storage_shares,
        buffer_storages=buffer_storages,
        caches=caches,
        step_cache_live=step_cache_live,
        step_tokens=step_tokens,
        step_rows=step_rows,
        cut=cut,
    )


def _kv_tokens(
    by_kv: dict[tuple[int, int, str], int],
    by_layer: dict[tuple[int, int], int],
    cache: int,
    layer: int,
    kv: str,
) -> int:
    """Tokens per row K (or V) of a cache's layer holds as last written; where no event told its own (a
    storage of a part that holds no tokens, as a scale, in a slot none did), the layer's; 0: unknown."""
    return by_kv.get((cache, layer, kv), by_layer.get((cache, layer), 0))


def _see_buffer(buffers: dict[int, BufferStorage], index: int, ev: KvEvent) -> None:
    """Note a module buffer event of storage `index`: its shape and dtype, in a forward what it wrote."""
    shape = buffer_shape(ev)
    entry = buffers.get(index)
    if entry is None:
        entry = buffers[index] = BufferStorage(shape[0], shape[1], ev.dtype)
    entry.rows, entry.positions, entry.dtype = shape[0], shape[1], ev.dtype or entry.dtype
    if ev.phase in ("prefill", "decode"):
        entry.rows_written = max(entry.rows_written, event_rows(ev))
        entry.tokens_written = max(entry.tokens_written, ev.tokens)


def analyze_run_kv_log(run: Run, progress: Callable[[int, int], None] | None = None) -> KvLogAnalysis:
    """A run's KV log with what its memory samples and manifest say of it: its prefills' prompts, the steps
    whose forward raised, when each step ended, and how the block ended (a run that never ended, one that
    raised)."""
    prompt_ends: dict[int, int] = {}
    raised: set[int] = set()
    step_ends: dict[int, int] = {}
    for sample in run.memory_samples:
        step, phase = sample.get("step"), sample.get("phase")
        if type(step) is not int or phase not in ("prefill", "decode"):
            continue
        if type(sample.get("t_ns")) is int:
            step_ends[step] = max(step_ends.get(step, 0), sample["t_ns"])
        if phase == "prefill" and isinstance(sample.get("prompt_end"), int):
            prompt_ends[step] = sample["prompt_end"]
        if sample.get("raised") is True:  # the forward raised (runs recorded since 2026-12-03)
            raised.add(step)
    status = (run.manifest.get("ended") or {}).get("status")
    # A run whose manifest still says running (its process died, or it is being recorded) may end inside a
    # step, some of its layers' updates logged and the rest not; one whose block raised ended inside one
    return analyze_kv_log(
        run.kv_events,
        prompt_ends,
        unfinished=status == "running",
        raised=raised,
        block_raised=status in ("exception", "interrupted"),
        step_ends=step_ends,
        progress=progress,
    )


def _merge_evicted(
    evicted_by_step: dict[int, dict[int, dict[str, int]]], step: int, gap: dict[int, dict[str, int]]
) -> None:
    """Add the tokens a gap between two steps evicted (`gap`, emptied) to `step`'s."""
    for layer, by_reason in gap.items():
        into = evicted_by_step.setdefault(step, {}).setdefault(layer, {})
        for reason, count in by_reason.items():
            into[reason] = into.get(reason, 0) + count
    gap.clear()


def _total_by_reason(by_layer: dict[tuple[int, int], dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for by_reason in by_layer.values():
        for reason, count in by_reason.items():
            totals[reason] = totals.get(reason, 0) + count
    return {reason: totals[reason] for reason in EVICTION_REASONS if reason in totals}
