"""KV figures from kvtrace's own KV event log: exact, per layer, per step.

Replays the log as the allocator would see it: a storage is live from the event that first shows its
address until its `freed` event. A reallocation logs the new storage before the old one's free, so the
replay shows the transient copy exactly as it happened.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from analyzers.kv_views import SharedStorages, Slot, held_by_slot, layer_shares
from kvtrace.format import KvEvent, Run

_NO_NEW_STORAGE = ("freed", "written")

# Why tokens left a cache: its own sliding window, a crop (assisted decoding), or an eviction library
# (kvpress) or other code rebinding keys/values, which the recorder sees as `evicted` events.
EVICTION_REASONS = ("window", "press", "crop")

# A beam search's first `reordered` events say how many rows each prompt has: `reason` "beams:3".
BEAMS_REASON = "beams:"


# Parts whose tensor is the KV itself, shaped [batch, kv_heads, tokens, head_dim] (or Meta's [batch, tokens,
# heads, dim]: SEQ_MAJOR_PARTS): full-precision data, module buffers, tracked tensors, and the quantized data
# of fp8 (`q.0`, next to its scale `q.1`) and quanto (`q._data`). Their dtype is the cache's, their first
# dimension the batch. hqq's packed `q.0` is 2-D, so the shape test leaves it out.
_WHOLE_PARTS = ("data", "buffer", "buffer_bhsd", "tracked", "tracked_bshd")
_KV_DATA_PARTS = (*_WHOLE_PARTS, "q.0", "q._data")

# Parts laid out [batch, tokens, kv_heads, head_dim]: module buffers (Meta's reference code) and tensors
# given to `kvtrace.track(..., layout="bshd")`. Logs before the layout keyword have only `tracked`; logs
# before module caches had a layout have only `buffer`.
SEQ_MAJOR_PARTS = ("buffer", "tracked_bshd")

# Module buffers by the dim of their positions: Meta's [batch, tokens, kv_heads, head_dim] (`buffer`),
# gpt-fast's [batch, kv_heads, tokens, head_dim] (`buffer_bhsd`).
BUFFER_PARTS = {"buffer": 1, "buffer_bhsd": 2}


def preallocated_capacity(shape: list[int] | None, in_place: bool, tokens: int, rows: int) -> tuple[int, int]:
    """(rows, positions) a module cache's buffers have room for where they are preallocated (Meta's
    cache_k/cache_v: [max_batch_size, max_seq_len, kv_heads, head_dim], allocated once and written in
    place), else (0, 0). `shape`: its last buffer's as [batch, seq, ...] (`buffer_shape`; None: a cache not
    made of module buffers alone);
    `in_place`: a buffer was written in place; `tokens`, `rows`: what it held. A buffer rebound to a grown
    tensor at every step (torch.cat) is as large as what it holds and never written in place: it follows
    the tokens, as a dynamic cache does."""
    if shape is None or len(shape) != 4:
        return 0, 0
    if in_place or shape[1] > tokens or shape[0] > rows:
        return shape[0], shape[1]
    return 0, 0


def static_capacity(positions: dict[int, int], spare: set[int], rows: int) -> tuple[int, int]:
    """(rows, positions) of a transformers StaticCache's storages ([batch, kv_heads, max_cache_len,
    head_dim], allocated at its first update for the batch it is given and written in place), else (0, 0).
    `positions`: each of its layers' last K/V data tensor's third dimension; `spare`: the layers seen with
    room beyond the tokens they held, which a cache that grows with its tokens (torch.cat) never has. Only
    when every layer had room and all have the same length (a hybrid cache's sliding layers are shorter:
    then no one length is the cache's)."""
    lengths = set(positions.values())
    if rows and len(lengths) == 1 and set(positions) <= spare:
        return rows, lengths.pop()
    return 0, 0


def event_rows(ev: KvEvent) -> int:
    """Batch rows an event's tokens are per: the rows in use where the log says (a preallocated module
    cache written for a smaller batch), else its tensor's batch dim; 0 without a shape."""
    return ev.rows or (ev.shape[0] if ev.shape else 0)


def buffer_shape(ev: KvEvent) -> list[int]:
    """A module buffer's shape with its positions at dim 1, whatever its layout (`BUFFER_PARTS`)."""
    shape = list(ev.shape)
    if BUFFER_PARTS.get(ev.part) == 2 and len(shape) >= 3:
        shape[1], shape[2] = shape[2], shape[1]
    return shape


def is_kv_data(ev: KvEvent) -> bool:
    """Whether the event's tensor holds the KV values themselves (not a scale, nor packed bits)."""
    if ev.part in _WHOLE_PARTS:
        return True
    return ev.part in _KV_DATA_PARTS and len(ev.shape or ()) >= 4


def eviction_reason(ev: KvEvent) -> str:
    """The kind of eviction an event with `evicted_tokens` reports (runs before the window kind: press)."""
    if ev.reason == "window":
        return "window"
    if ev.event == "cropped":
        return "crop"
    return "press"


@dataclass
class BufferStorage:
    """One module buffer's storage (Meta's cache_k/cache_v): its own shape and dtype, and what forwards wrote
    into it. A run that re-makes its caches holds buffers of several shapes in turn, so a moment's settings
    are those of the buffers live then, never the last ones'."""

    rows: int  # max_batch_size: its first dimension
    positions: int  # max_seq_len: its positions' dimension (`buffer_shape`)
    dtype: str
    rows_written: int = 0  # the most rows a forward wrote into it (0: no forward wrote it)
    tokens_written: int = 0  # the most tokens per row it held after a forward's write


@dataclass
class LayerFigures:
    """One layer of one cache object: several caches can hold the same layer index (an assistant model's
    draft next to the model's own, or two generate() outputs still referenced)."""

    layer: int
    k_bytes: int = 0
    v_bytes: int = 0
    evicted_tokens: int = 0
    tokens: int = 0
    evicted_by_reason: dict[str, int] = field(default_factory=dict)
    cache: int = 0


@dataclass
class CacheFigures:
    """One cache object of the log (the events' `cache` field), so that its bytes are divided by its own
    tokens and rows, never by another cache's."""

    cache: int
    layers: int  # layer indices that held KV data
    final_bytes: int  # its storages at the final state (0: released before the run's last step ended)
    tokens: int  # tokens per row of its fullest layer, as last seen
    rows: int  # batch rows of its last shaped KV tensor (0: none had a shape)
    last_seq: int  # `seq` of its last KV data event: the cache written last has the highest
    generated_tokens: int = 0
    """Tokens its forwards yielded per row: 1 per prefill, then per decode step the tokens appended per row
    (net of crops; a window's or a press's evictions added back, as those tokens were generated). The last
    token a run yields is never written back: the prefill's 1 stands for it."""
    generated_row_tokens: int = 0  # the same over every batch row: each step's yield x its rows
    call_step: int = 0
    """The step of its last prefill: where the generate() call that wrote it last began (a cache passed
    to a second call, or kept by transformers for it, has several); 0 when no prefill wrote it."""
    call_generated_tokens: int = 0
    """`generated_tokens` since that prefill: what that call yielded per row, its prompt not counted."""
    reordered: bool = False  # rows reordered or selected (beam search, contrastive search): rows are beams
    beams: int = 0
    """Rows per prompt under beam search (num_beams), from its first reorder's `reason` `beams:N`; 0 when
    the log does not say (no beam search, or a log from before kvtrace recorded it)."""
    capacity_rows: int = 0
    capacity_tokens: int = 0
    """A preallocated cache's room: a module cache's buffers' rows and positions, Meta's max_batch_size and
    max_seq_len (`preallocated_capacity`), or a transformers StaticCache's rows and max_cache_len
    (`static_capacity`); 0 for a cache whose storages follow the rows and tokens it holds."""
    capacity_of: str = ""  # "buffers" (module buffers) | "static_cache" (transformers' StaticCache) | ""
    static_positions: int = 0
    """Positions of its longest layer where each K/V data storage was allocated once and written in place
    (or had room beyond the tokens it held): a transformers StaticCache, a hybrid model's too (its sliding
    layers shorter, which `static_capacity` leaves out), its max_cache_len; 0 for a cache whose storages
    are replaced as it grows (torch.cat)."""
    bytes_by_tokens: dict[int, int] = field(default_factory=dict)
    """Its storages at the final state by the tokens per row their layer holds: one entry where every layer
    holds as many, several where a sliding window's layers hold fewer. What `bytes_per_token_row` divides."""


def bytes_per_token_row(bytes_by_tokens: dict[int, int], rows: int) -> float | None:
    """KV bytes one token of one row costs across the layers: each layer's storages over its own tokens,
    summed. Never every layer's bytes over one layer's tokens: a sliding window's layers hold fewer tokens,
    and so does a layer whose update a cut step did not reach. Layers of unknown tokens (0) are left out;
    None when none is known."""
    known = {tokens: nbytes for tokens, nbytes in bytes_by_tokens.items() if tokens > 0}
    if not known or rows <= 0:
        return None
    return sum(nbytes / (tokens * rows) for tokens, nbytes in known.items())


@dataclass(frozen=True)
class CutStep:
    """The last step of a run that never ended, cut between its layers' updates: the log holds some of
    them (the process was killed, or the writer had not flushed the rest yet). The figures of the end come
    from the step before it, the last whole one; the memory timeline still shows what of it was logged.

    Or, `raised`, the last step of a block that raised inside the model's forward (an OOM, a Ctrl-C): the
    step yielded no token and never ended, but the log holds all it did, so the end stays the moment it
    raised (the KV held then, its layers' tokens); only what a whole step means leaves it out (generated
    tokens, the step count, the tokens held at a step's end)."""

    step: int
    whole_step: int | None  # the last step before it in the log (None: it was the log's first)
    reached: dict[int, tuple[int, ...]]  # cache -> layers whose update of the step reached the log
    missing: dict[int, tuple[int, ...]]  # cache -> layers its previous step wrote that this one did not
    raised: bool = False


def cut_last_step(
    events: list[KvEvent], raised: int | None = None, block_raised: bool = False
) -> CutStep | None:
    """The log's last step where it wrote some layers of a cache that the cache's previous step wrote but
    not all of them (layers update in turn, so a kill between two leaves the first ones written). Layers
    holding fewer tokens (a sliding window) still update every step, so they tell nothing apart. A cut in a
    cache's first step (a prefill) cannot be told from the log: a pipeline stage holds some layers only.

    `raised`: the step whose forward raised, as its memory sample says: cut whichever of its layers the log
    holds (all of them where it raised after its last layer's update, none where before its first; a
    prefill too), where no later step followed it (code that caught the error and went on). `block_raised`:
    the recorded block raised or was interrupted, in a run whose samples do not say in which forward
    (recorded before they did): its last step is cut where the layers tell, as a killed run's is. Either
    way the block's logged teardown follows the cut step."""
    last_step = -1
    current: dict[int, tuple[int, set[int]]] = {}  # cache -> (its latest step, the layers it wrote then)
    previous: dict[int, set[int]] = {}  # cache -> the layers its step before that wrote
    for ev in events:
        if ev.phase == "end":
            if raised is None and not block_raised:
                return None  # the run's teardown was logged: it ended
            break
        last_step = ev.step
        if ev.event == "freed" or not is_kv_data(ev):
            continue
        step, layers = current.get(ev.cache, (-1, set()))
        if step != ev.step:
            if step >= 0:
                previous[ev.cache] = layers
            layers = set()
            current[ev.cache] = (ev.step, layers)
        layers.add(ev.layer)
    if raised is not None and raised < last_step:
        return None
    cut_step = last_step if raised is None else raised
    reached: dict[int, tuple[int, ...]] = {}
    missing: dict[int, tuple[int, ...]] = {}
    for cache, (step, layers) in current.items():
        if step == cut_step:
            gone = previous.get(cache, set()) - layers
            if gone or raised is not None:
                reached[cache], missing[cache] = tuple(sorted(layers)), tuple(sorted(gone))
        elif raised is not None and step == last_step:  # the raised step logged none of its layers
            reached[cache], missing[cache] = (), tuple(sorted(layers))
    if not missing:
        return None
    whole = max((ev.step for ev in events if ev.step < cut_step and ev.phase != "end"), default=None)
    return CutStep(
        step=cut_step,
        whole_step=whole,
        reached=reached,
        missing=missing,
        raised=raised is not None or block_raised,
    )


@dataclass
class KvLogAnalysis:
    """What the KV log says: final state (last step, before teardown), peak, churn, evictions, series."""

    final_bytes: int
    peak_bytes: int
    peak_t_ns: int
    allocated_bytes_total: int
    evicted_tokens: int
    per_layer: list[LayerFigures]
    evicted_by_reason: dict[str, int] = field(default_factory=dict)
    """Evicted tokens (all rows, all layers) by kind: window, press, crop (see EVICTION_REASONS)."""
    # One point per event: (t_ns, live KV bytes); and per step: {layer: live bytes} at the step's end.
    series_t_ns: list[int] = field(default_factory=list)
    series_bytes: list[int] = field(default_factory=list)
    layer_series: dict[int, list[int]] = field(default_factory=dict)
    step_live: dict[int, dict[int, int]] = field(default_factory=dict)
    step_phase: dict[int, str] = field(default_factory=dict)
    step_start_ns: dict[int, int] = field(default_factory=dict)
    evictions: list[KvEvent] = field(default_factory=list)
    evicted_by_step: dict[int, dict[int, dict[str, int]]] = field(default_factory=dict)
    """Per step: {layer: {kind: evicted tokens, all rows}}, every kind (window, press, crop) and cache: the
    per-layer figure of the report, step by step."""
    storages: list[tuple[int, int, int, int, int, str, int]] = field(default_factory=list)
    """Every KV storage: (addr, bytes, first_t_ns, last_t_ns, layer, kv, cache); last_t_ns = free time or
    -1."""
    scanned_after_ns: dict[int, int] = field(default_factory=dict)
    """The storages a scan found rather than an update (module caches, `source` "module": the recorder
    compares them at the end of each forward, so a storage's first `t_ns` may come a whole forward after
    its allocation): index in `storages` -> the `t_ns` of the log's last line before the step that found
    it, after which that step's forward made it (0: no line before)."""
    buffer_storages: dict[int, BufferStorage] = field(default_factory=dict)
    """The storages of module buffers of [batch, seq, ...] shape (`BUFFER_PARTS`): index in `storages` ->
    their shape, dtype and what was written into them (`buffers_live_at` picks a moment's)."""
    storage_shares: dict[int, dict[tuple[int, int], int]] = field(default_factory=dict)
    """The storages several layers' views share (one preallocated tensor for every layer): index in
    `storages` -> {(cache, layer): its views' bytes}, as last split (`kv_views`)."""
    found_storages: set[int] = field(default_factory=set)
    """The storages first logged as found (`created`, reason "found": a cache kvtrace first saw holding KV,
    filled before `record()`): indices in `storages`. Held since before the log's first sight of them,
    where a trace that began earlier has no allocation of theirs."""
    caches: list[CacheFigures] = field(default_factory=list)
    """Every cache object with KV data, by id. `per_layer` holds the rows of the caches live at the final
    state (or with evicted tokens); `step_live` and `layer_series` sum a layer index over the caches."""
    step_cache_live: dict[int, dict[tuple[int, int], int]] = field(default_factory=dict)
    """Per step: {(cache, layer): live bytes} at the step's end."""
    step_tokens: dict[int, dict[int, int]] = field(default_factory=dict)
    """Per step: {cache: tokens per row of its fullest layer} at the step's end, for the caches holding KV
    then: what a moment of that step held, where the run's final count may be many tokens later."""
    step_rows: dict[int, dict[int, int]] = field(default_factory=dict)
    """Per step: {cache: batch rows of its last shaped KV tensor} at the step's end (beam search and batch
    selection change them)."""
    cut: CutStep | None = None
    """A run that never ended whose last step the log holds only part of (`analyze_kv_log(unfinished=...)`):
    the final state, tokens, rows, evictions and generated tokens are the last whole step's, and the cut
    step has no end (no `step_live`, `step_tokens`, `step_rows` entry); the series, the peak and the
    storages keep every logged event. A `raised` one (a block that raised in the model's forward) yields no
    generated token; the rest is as logged, its end the moment it raised."""


def analyze_kv_log(
    events: list[KvEvent],
    prompt_ends: dict[int, int] | None = None,
    unfinished: bool = False,
    raised: Collection[int] = (),
    block_raised: bool = False,
) -> KvLogAnalysis:
    """`prompt_ends`: prefill step -> the cache positions its generate() call's prompt ends at (the step's
    memory sample says, since kvtrace 0.1's round 3): what the step's cache holds beyond it are draft
    tokens its forward verified and kept (assisted decoding), yielded besides the prefill's own token.
    `unfinished`: the run never ended (its manifest still says running): a last step the log holds only
    part of is left out of the figures of the end (`KvLogAnalysis.cut`). `raised`: the steps whose forward
    raised (their memory samples say): they yielded no token, and the last, where it is the log's, is a
    raised cut. `block_raised`: the block raised or was interrupted (its manifest says), in a run whose
    samples may not say where: a last step whose layers show it cut is one too."""
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
    scanned_after: dict[int, int] = {}  # storage index -> the last line's t_ns before its step
    found: set[int] = set()  # storage indices first logged as found
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
    rows_by_cache: dict[int, int] = {}
    last_seq_by_cache: dict[int, int] = {}
    evictions: list[KvEvent] = []
    evicted_by_step: dict[int, dict[int, dict[str, int]]] = {}  # step -> layer -> kind -> tokens, all rows
    final_state: dict[int, tuple[int, int, str, int]] | None = None
    # storages several slots are views of, split by view in the per-layer figures (the totals count each once)
    shared = SharedStorages()
    final_shares: dict[int, dict[Slot, int]] = {}
    final_total = 0
    open_step: int | None = None  # the step whose end state is not recorded yet
    step_tokens: dict[int, dict[int, int]] = {}
    step_rows: dict[int, dict[int, int]] = {}
    written: set[tuple[int, int]] = set()  # (cache, layer) slots written in the open step
    step_evicted: dict[tuple[int, int], int] = defaultdict(int)  # per row, crops left out
    closed_tokens: dict[tuple[int, int], int] = {}  # a slot's tokens at the end of the last step writing it
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

    def _close_step(step: int) -> None:
        step_live[step] = dict(layer_live)
        step_cache_live[step] = dict(cache_layer_live)
        phase = step_phase.get(step, "")
        if phase in ("prefill", "decode") and step not in no_yield:  # a model forward; step 0 is outside any
            yields: dict[int, int] = {}
            for slot in written:
                before = closed_tokens.get(slot)
                held = tokens_by_layer.get(slot, 0)
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
        tokens: dict[int, int] = {}
        for slot in cache_layer_live:  # the slots holding KV now
            tokens[slot[0]] = max(tokens.get(slot[0], 0), tokens_by_layer.get(slot, 0))
        step_tokens[step] = tokens
        step_rows[step] = {cache: rows for cache, rows in rows_by_cache.items() if cache in tokens}

    for index, ev in enumerate(events):
        if ev.step != step_after[0]:
            step_after = (ev.step, last_ns)
        last_ns = max(last_ns, ev.t_ns)
        ending = ev.phase == "end"
        if open_step is not None and (ending or ev.step != open_step):
            # Steps never go back: the state before this event is the open step's end state.
            _close_step(open_step)
            open_step = None
        if index == cut_from:
            whole_end = copy.deepcopy(
                (live, live_total, tokens_by_layer, rows_by_cache, last_seq_by_cache, evicted_by_layer,
                 evicted_by_layer_reason, generated, generated_rows, call_step, call_generated, reordered,
                 beams, buffer_shapes, buffer_in_place, shared.shares)
            )  # fmt: skip
        if ending and final_state is None:
            final_state = dict(live)
            final_shares = copy.deepcopy(shared.shares)
            final_total = live_total
        if not ending:
            step_phase.setdefault(ev.step, ev.phase)
            step_start.setdefault(ev.step, ev.t_ns)
        if ev.event == "freed":
            entry = live.pop(ev.addr, None)
            if entry is not None:
                live_total -= entry[0]
                _add_shares({slot: -nbytes for slot, nbytes in shared.release(ev.addr, entry).items()})
                index = open_storage.pop(ev.addr)
                addr, nbytes, first, _, layer, kv, cache = storages[index]
                storages[index] = (addr, nbytes, first, ev.t_ns, layer, kv, cache)
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
            storages.append((ev.addr, ev.storage_bytes, ev.t_ns, -1, ev.layer, ev.kv, ev.cache))
        if ev.event != "freed" and ev.logical_bytes and ev.addr in live:
            changes = shared.see(
                ev.addr, live[ev.addr], (ev.cache, ev.layer, ev.kv), ev.part, ev.logical_bytes
            )
            if changes:
                _add_shares(changes)
                split = shared.shares.get(ev.addr)
                if split is not None:
                    storage_shares[open_storage[ev.addr]] = layer_shares(split)
        if ev.event != "freed" and is_kv_data(ev):
            tokens_by_layer[(ev.cache, ev.layer)] = ev.tokens
            last_seq_by_cache[ev.cache] = ev.seq
            written.add((ev.cache, ev.layer))
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
            if ev.event == "reordered":
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
            in_step = evicted_by_step.setdefault(ev.step, {}).setdefault(ev.layer, {})
            in_step[reason] = in_step.get(reason, 0) + ev.evicted_tokens * rows
            if reason != "crop":
                step_evicted[slot] += ev.evicted_tokens
        if ev.event in ("evicted", "cropped") and ev.kv == "k":
            evictions.append(ev)
        if live_total > peak:
            peak, peak_t = live_total, ev.t_ns
        series_t.append(ev.t_ns)
        series_b.append(live_total)
        if not ending:
            open_step = ev.step
        layer_series[ev.layer].append(layer_live[ev.layer])
    if whole_end:
        # The cut step never ended: the end is the last whole step's (its updates stay in the series)
        (final_state, final_total, tokens_by_layer, rows_by_cache, last_seq_by_cache, evicted_by_layer,
         evicted_by_layer_reason, generated, generated_rows, call_step, call_generated, reordered, beams,
         buffer_shapes, buffer_in_place, final_shares) = whole_end  # fmt: skip
    elif open_step is not None:
        _close_step(open_step)
    if final_state is None:
        final_state, final_total, final_shares = dict(live), live_total, shared.shares

    final_by_cache: dict[int, int] = defaultdict(int)
    for nbytes, _, _, cache in held_by_slot(final_state, final_shares):
        final_by_cache[cache] += nbytes
    by_tokens: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))  # cache -> tokens -> bytes
    for nbytes, layer, _, cache in held_by_slot(final_state, final_shares):
        by_tokens[cache][tokens_by_layer.get((cache, layer), 0)] += nbytes
    caches = []
    for cache, last_seq in sorted(last_seq_by_cache.items()):
        tokens = max(tokens for (c, _), tokens in tokens_by_layer.items() if c == cache)
        rows = rows_by_cache.get(cache, 0)
        room = preallocated_capacity(buffer_shapes.get(cache), cache in buffer_in_place, tokens, rows)
        room_of = "buffers" if room[0] else ""
        if not room[0] and cache in data_positions:
            room = static_capacity(data_positions[cache], data_spare.get(cache, set()), rows)
            room_of = "static_cache" if room[0] else ""
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
        layer_series=dict(layer_series),
        step_live=step_live,
        step_phase=step_phase,
        step_start_ns=step_start,
        evictions=evictions,
        evicted_by_step=evicted_by_step,
        storages=storages,
        scanned_after_ns=scanned_after,
        found_storages=found,
        storage_shares=storage_shares,
        buffer_storages=buffer_storages,
        caches=caches,
        step_cache_live=step_cache_live,
        step_tokens=step_tokens,
        step_rows=step_rows,
        cut=cut,
    )


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


def buffers_live_at(kv_log: KvLogAnalysis, cache: int, at_us: float) -> dict[int, BufferStorage]:
    """`cache`'s module buffer storages live at a moment (`at_us`, a storage's `t_ns` / 1000, as
    `kv_views.split_by_view` reads them): index in `storages` -> its facts. A storage a scan found counts
    from just after the log's last line before the step that found it (`scanned_after_ns`), where code
    before that forward may have made it: a moment of a trace inside that span can hold both a re-made
    buffer and the one it replaced."""
    live: dict[int, BufferStorage] = {}
    for index, facts in kv_log.buffer_storages.items():
        _, _, first_ns, last_ns, _, _, owner = kv_log.storages[index]
        after_ns = kv_log.scanned_after_ns.get(index, 0)
        began = after_ns / 1000.0 < at_us if after_ns else first_ns / 1000.0 <= at_us
        if owner == cache and began and (last_ns < 0 or last_ns / 1000.0 > at_us):
            live[index] = facts
    return live


def analyze_run_kv_log(run: Run) -> KvLogAnalysis:
    """A run's KV log with what its memory samples and manifest say of it: its prefills' prompts, the steps
    whose forward raised, and how the block ended (a run that never ended, one that raised)."""
    prompt_ends: dict[int, int] = {}
    raised: set[int] = set()
    for sample in run.memory_samples:
        step, phase = sample.get("step"), sample.get("phase")
        if type(step) is not int or phase not in ("prefill", "decode"):
            continue
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
    )


def _total_by_reason(by_layer: dict[tuple[int, int], dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for by_reason in by_layer.values():
        for reason, count in by_reason.items():
            totals[reason] = totals.get(reason, 0) + count
    return {reason: totals[reason] for reason in EVICTION_REASONS if reason in totals}
