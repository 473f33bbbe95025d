"""Replay a CUDA caching-allocator snapshot's device traces into its allocated and reserved timelines (the
rules are in `analyzers.readers.snapshot`'s docstring): over columns with numpy, entry by entry for odd
value types, or over Python lists for a small snapshot of plain ints (`PlainDevice`, no numpy import).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import accumulate
from operator import methodcaller
from typing import Any

import numpy as np

from analyzers.model import DeviceEvents, Marker, MemorySource, OomInfo
from analyzers.readers.memory_events_fast import MAX_EVENT_BYTES, MAX_MOVED_BYTES
from analyzers.readers.snapshot_entries import (
    ACTION,
    FREE_ACTIONS,
    HAS_TIME,
    LIVE_STATES,
    LOST_SIZE_UNKNOWN,
    LOST_SIZE_USED,
    ONLY_INT,
    SEGMENT_GROW,
    SEGMENT_SHRINK,
    TIME,
    FrameTable,
    block_request_size,
    blocks_with_addresses,
    checked_bytes,
    integer,
    lacking_fields,
    private_pool,
    refuse_more_than_reserved,
    segment_bytes,
    stream_of,
    unrequested_free,
)
from analyzers.readers.snapshot_one_pass import NotPlain, replay_one_pass
from analyzers.readers.snapshot_pools import pool_levels
from kvtrace.errors import KvtraceError, shown_integer


def _replay_loop(
    trace: list[dict[str, Any]], timed: bool, frames: FrameTable, device: str, source: MemorySource
) -> _Replay:
    """The trace replayed entry by entry (see `_replay_columns` for the fast path)."""
    reserved = 0
    ts: list[int] = []
    addrs: list[int] = []
    deltas: list[int] = []
    reserved_col: list[int] = []
    frame_ids: list[int] = []
    live: dict[int, int] = {}  # address -> bytes added by an alloc seen in the trace
    orphan_bytes = orphan_count = 0
    skipped: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    pending_ooms: list[tuple[int, dict[str, Any], int, int]] = []
    segment_changes: list[tuple[int, Any, int]] = []  # (memory events before it, address, signed bytes)
    intern, pop = frames.intern, live.pop
    add_ts, add_addr, add_delta, add_reserved, add_frame = (
        ts.append,
        addrs.append,
        deltas.append,
        reserved_col.append,
        frame_ids.append,
    )
    for index, entry in enumerate(trace):  # the hot loop: one pass, plain ints skip conversions
        action = entry.get("action")
        if action == "alloc" or action in FREE_ACTIONS:
            if "size" in entry and "addr" in entry:
                size, address = entry["size"], entry["addr"]
            else:  # damaged: read as `_replay_columns` reads it
                if action == "alloc" or "addr" not in entry:  # left out
                    skipped[lacking_fields(entry) or ""] += 1
                    continue
                address = integer(entry["addr"], f"a trace entry ({action})", "addr")
                if address not in live:  # a free of a block allocated before the trace: its size is lost
                    skipped[LOST_SIZE_UNKNOWN.format(action=action)] += 1
                    continue
                repaired[LOST_SIZE_USED.format(action=action)] += 1
                size = live[address]  # the size its free would have repeated
            when = entry["time_us"] if timed else index
            if type(size) is not int or type(address) is not int or type(when) is not int:
                where = f"a trace entry ({action})"
                size, address = integer(size, where, "size"), integer(address, where, "addr")
                when = integer(when, where, "time_us")
            if size < 0:
                raise ValueError(f"negative size {shown_integer(size)} in a trace entry ({action})")
            if size > MAX_EVENT_BYTES:
                said = shown_integer(size)
                raise ValueError(f"size {said} in a trace entry ({action}), more than any device holds")
            if action == "alloc":
                live[address] = size
                delta = size
                # Only allocations need a stack (attribution, diagnose's top stacks); a free has its alloc's.
                add_frame(intern(entry.get("frames")))
            else:
                freed = pop(address, None)
                if freed is None:
                    orphan_bytes += size
                    orphan_count += 1
                    freed = size
                delta = -freed
                add_frame(-1)
            add_ts(when)
            add_addr(address)
            add_delta(delta)
            add_reserved(reserved)
            continue
        size = checked_bytes(entry.get("size", 0), f"a trace entry ({action})")
        when = integer(entry["time_us"], f"a trace entry ({action})", "time_us") if timed else index
        if action in SEGMENT_GROW:
            reserved += size
            segment_changes.append((len(deltas), entry.get("addr"), size))
        elif action in SEGMENT_SHRINK:
            reserved -= size
            segment_changes.append((len(deltas), entry.get("addr"), -size))
        elif action == "oom":
            pending_ooms.append((len(deltas), entry, reserved, when))
            label = f"OOM requesting {size} bytes"
            source.markers.append(Marker(kind="oom", ts_us=float(when), label=label, device=device))
        elif action == "snapshot":
            source.markers.append(Marker(kind="snapshot", ts_us=float(when), label="snapshot", device=device))
    return (
        ts,
        addrs,
        deltas,
        reserved_col,
        frame_ids,
        set(live),
        orphan_bytes,
        orphan_count,
        pending_ooms,
        reserved,
        skipped,
        repaired,
        segment_changes,
    )


_ACTION_CODES = {
    "alloc": 1,
    "free_completed": 2,
    "free": 2,
    "segment_alloc": 3,
    "segment_map": 3,
    "segment_free": 4,
    "segment_unmap": 4,
    "oom": 5,
    "snapshot": 6,
}


def _replay_columns(
    trace: list[dict[str, Any]], timed: bool, frames: FrameTable, device: str, source: MemorySource
) -> _Replay | None:
    """The trace replayed with numpy: fields pulled out in C, allocs and frees paired by sorting on address.

    A free matches an alloc when the previous memory entry of its address is an alloc (any free in between
    would have consumed it), exactly as the loop's `live` dict decides. None when a field is not a plain
    int (the loop then names it)."""
    codes_of: defaultdict[Any, int] = defaultdict(int, _ACTION_CODES)  # unknown actions: 0
    try:
        actions = np.fromiter(map(codes_of.__getitem__, map(ACTION, trace)), dtype=np.int8, count=len(trace))
        columns = [list(map(_SIZE_OR_ABSENT, trace)), list(map(_ADDR_OR_ABSENT, trace))]
        if timed:
            columns.append(list(map(TIME, trace)))
    except TypeError:  # an unhashable action
        return None
    # numpy would read True as 1, "1048576" as 1 MiB and 1.5e9 as an int: only ints are sizes
    if not all(ONLY_INT.issuperset(map(type, column)) for column in columns):
        return None
    try:
        sizes = np.array(columns[0], dtype=np.int64)
        addrs_all = np.array(columns[1], dtype=np.int64)
        times = np.array(columns[2], dtype=np.int64) if timed else np.arange(len(trace))
    except OverflowError:  # an int past int64: the loop names it
        return None
    if sizes.ndim != 1 or addrs_all.ndim != 1 or times.ndim != 1:
        return None
    skipped: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    lost_size = np.zeros(len(trace), dtype=bool)  # frees without size: their alloc's, once paired below
    # A missing size or addr reads as ABSENT, one pass in C; those few entries are then looked at by key.
    for index in np.flatnonzero((sizes == ABSENT) | (addrs_all == ABSENT)).tolist():
        entry = trace[index]
        reason = lacking_fields(entry)
        if reason is None:
            continue  # ABSENT written as a value: a negative size refused below, or an address
        if actions[index] == 2 and "addr" in entry:  # a free without size: as the loop reads it, below
            lost_size[index] = True
            sizes[index] = 0
        elif actions[index] in (1, 2):  # an alloc or free that cannot be replayed: left out, as the loop does
            skipped[reason] += 1
            actions[index] = 0
            sizes[index] = 0
        elif "size" not in entry:
            sizes[index] = 0  # a segment, oom or snapshot entry without a size: 0, as the loop reads it
    if sizes.size and sizes.min() < 0:
        raise ValueError(f"negative size {int(sizes.min())} in a trace entry")
    if sizes.size and sizes.max() > MAX_EVENT_BYTES:
        raise ValueError(f"size {int(sizes.max())} in a trace entry, more than any device holds")
    is_alloc = actions == 1
    memory = is_alloc | (actions == 2)
    grow, shrink = actions == 3, actions == 4
    reserved_after = np.cumsum(np.where(grow, sizes, 0) - np.where(shrink, sizes, 0))
    at = np.flatnonzero(memory)
    addr, size, alloc = addrs_all[at], sizes[at], is_alloc[at]
    order = np.argsort(addr, kind="stable")
    addr_o, size_o, alloc_o = addr[order], size[order], alloc[order]
    same = np.zeros(len(at), dtype=bool)
    same[1:] = addr_o[1:] == addr_o[:-1]
    after_alloc = np.zeros(len(at), dtype=bool)
    after_alloc[1:] = alloc_o[:-1]
    previous_size = np.zeros(len(at), dtype=np.int64)
    previous_size[1:] = size_o[:-1]
    matched = ~alloc_o & same & after_alloc
    orphan = ~alloc_o & ~matched
    delta = np.empty(len(at), dtype=np.int64)
    delta[order] = np.where(alloc_o, size_o, np.where(matched, -previous_size, -size_o))
    last = np.ones(len(at), dtype=bool)
    last[:-1] = addr_o[1:] != addr_o[:-1]
    live = set(addr_o[last & alloc_o].tolist())
    if lost_size.any():
        # A matched free without size frees its alloc's bytes (the -previous_size above); an orphan one is
        # left out. Dropping an orphan pairs no other entry anew: the one after it at its address still
        # follows no alloc, and it was never an address's last alloc (`live`).
        lost_o = lost_size[at][order]
        unknown = np.zeros(len(at), dtype=bool)
        unknown[order] = lost_o & orphan
        for index, was_matched in zip(at[order][lost_o].tolist(), matched[lost_o].tolist(), strict=True):
            template = LOST_SIZE_USED if was_matched else LOST_SIZE_UNKNOWN
            (repaired if was_matched else skipped)[template.format(action=trace[index]["action"])] += 1
        orphan &= ~lost_o
        keep = ~unknown
        at, addr, delta, alloc = at[keep], addr[keep], delta[keep], alloc[keep]
    frame_ids = np.full(len(at), -1, dtype=np.int32)
    intern = frames.intern
    alloc_rows = np.flatnonzero(alloc)
    frame_ids[alloc_rows] = [intern(trace[i].get("frames")) for i in at[alloc_rows].tolist()]
    changed = np.flatnonzero(grow | shrink)
    segment_changes = list(
        zip(
            np.searchsorted(at, changed).tolist(),
            addrs_all[changed].tolist(),
            np.where(grow[changed], sizes[changed], -sizes[changed]).tolist(),
            strict=True,
        )
    )
    pending_ooms: list[tuple[int, dict[str, Any], int, int]] = []
    for index in np.flatnonzero(actions >= 5).tolist():
        entry, when = trace[index], int(times[index])
        if entry.get("action") == "oom":
            done = int(np.searchsorted(at, index))
            pending_ooms.append((done, entry, int(reserved_after[index]), when))
            label = f"OOM requesting {int(sizes[index])} bytes"
            source.markers.append(Marker(kind="oom", ts_us=float(when), label=label, device=device))
        else:
            source.markers.append(Marker(kind="snapshot", ts_us=float(when), label="snapshot", device=device))
    return (
        times[at],
        addr,
        delta,
        reserved_after[at],
        frame_ids,
        live,
        int(size_o[orphan].sum()),
        int(np.count_nonzero(orphan)),
        pending_ooms,
        int(reserved_after[-1]) if len(trace) else 0,
        skipped,
        repaired,
        segment_changes,
    )


# A field an entry lacks, in the columns: no size (negative, refused) or address (a pointer) torch writes.
ABSENT = -(2**63)
_SIZE_OR_ABSENT = methodcaller("get", "size", ABSENT)
_ADDR_OR_ABSENT = methodcaller("get", "addr", ABSENT)

_Replay = tuple[
    Any,
    Any,
    Any,
    Any,
    Any,
    set[int],
    int,
    int,
    list[tuple[int, dict[str, Any], int, int]],
    int,
    Counter[str],
    Counter[str],
    list[tuple[int, Any, int]],
]


@dataclass
class PlainDevice:
    """One device's replayed trace as Python lists, where `DeviceEvents` holds arrays: what the report of a
    small snapshot reads without importing numpy (analyzers.snapshot_summary). Same fields, same figures."""

    device: str
    ts_us: list[int]
    addr: list[int]
    delta_bytes: list[int]
    total_reserved: list[int]
    frame_id: list[int]
    baseline_bytes: int
    baseline_blocks: list[tuple[int, int, int]]
    final_rounded_bytes: int
    private_pool_free: list[int] | None = None
    private_pool_free_at_dump: int | None = None


def _as_list(column: Any) -> list[int]:
    """A replayed column as Python ints: the columns path's arrays, the plain path's lists as they are."""
    return column.tolist() if hasattr(column, "tolist") else list(column)


def replay_device(
    device_index: int,
    trace: list[dict[str, Any]],
    segments: list[dict[str, Any]],
    frames: FrameTable,
    source: MemorySource,
    plain: bool = False,
    one_pass: bool = False,
    block_pairs: dict[int, list[tuple[int, dict[str, Any]]]] | None = None,
) -> PlainDevice | None:
    """Turn one device's trace ring buffer plus its final block state into a `DeviceEvents`, appended to
    `source.devices`; with `plain`, into the `PlainDevice` returned (the trace passed `plain_trace_ok`).
    With `one_pass` too, the trace is checked and replayed in one pass (`replay_one_pass`), and `NotPlain`
    raised where it is not plain. `block_pairs` keeps each segment's `blocks_with_addresses` (by the
    segment's id) for its record (`segment_record`), which walks the same blocks."""
    device = f"cuda:{device_index}"
    # Reserved bytes are replayed from 0 and shifted at the end: the dump's segments minus the trace's net
    # segment growth is what was reserved when the ring buffer began.
    counted: dict[str, int] | None = None
    replay: tuple[Any, ...] | None
    if plain and one_pass:
        passed = replay_one_pass(trace, frames, device, source)
        if passed is None:
            raise NotPlain(device)
        timed, counted, replay = passed
    else:
        timed = bool(trace) and all(map(HAS_TIME, trace))
        replay = None if plain else _replay_columns(trace, timed, frames, device, source)
        if replay is None:  # odd value types: the plain loop converts them one by one
            replay = _replay_loop(trace, timed, frames, device, source)
    (
        ts,
        addrs,
        deltas,
        reserved_col,
        frame_ids,
        live,
        orphan_bytes,
        orphan_count,
        pending_ooms,
        reserved,
        skipped,
        repaired,
        segment_changes,
    ) = replay
    if skipped:  # said in the report's notes, as the Chrome trace reader's skipped events are
        tally = source.meta.setdefault("skipped_events", {})
        for reason, count in sorted(skipped.items()):  # sorted: the loop and the columns meet them apart
            tally[f"{device} {reason}"] = count
    for reason, count in sorted(repaired.items()):  # read, not skipped: a note of its own
        source.meta.setdefault("input_notes", []).append(f"{device}: {count} {reason}")
    reserved_at_dump = sum(map(segment_bytes, segments))
    untotalled = [segment for segment in segments if "total_size" not in segment]
    if untotalled:
        derived = sum(map(segment_bytes, untotalled))
        source.meta.setdefault("input_notes", []).append(
            f"{device}: {len(untotalled)} of its {len(segments)} segments have no total_size: each counted "
            f"as the sum of its blocks ({derived:,} B in all), which tile a segment"
        )
    reserved_at_start = reserved_at_dump - reserved
    pools = None
    if any(private_pool(segment.get("segment_pool_id")) for segment in segments):  # CUDA graphs' (rare)
        pools = pool_levels(segments, _as_list(addrs), _as_list(deltas), segment_changes)
    if counted is None:
        counted = {str(action): count for action, count in Counter(map(ACTION, trace)).items()}

    baseline = orphan_bytes
    baseline_blocks: list[tuple[int, int, int]] = []
    rounded_at_dump = 0  # what torch.cuda.memory_allocated() counted at the dump: whole blocks
    for segment in segments:
        pairs = blocks_with_addresses(segment)
        if block_pairs is not None:
            block_pairs[id(segment)] = pairs
        for address, block in pairs:
            if block.get("state") not in LIVE_STATES:
                continue
            rounded_at_dump += int(block.get("size", 0))
            if address not in live:
                size = block_request_size(block)
                baseline += size
                stack = block.get("frames")
                history = block.get("history")
                if not stack and history and isinstance(history[-1], dict):  # torch 2.0 keeps it in history
                    stack = history[-1].get("frames")
                baseline_blocks.append((address, size, frames.intern(stack)))

    delta_arr = None if plain else np.asarray(deltas, dtype=np.int64)
    # Each size is bounded; many of them still add past int64 (300 of 2**55 printed a peak of 8 million TiB
    # and a negative final figure), the Chrome reader's "not a real trace" case. A plain trace's sum is
    # below 2**53 (`plain_trace_ok`): exact as floats too, so both sums are the same number.
    by_events = (
        float(sum(map(abs, deltas)))
        if delta_arr is None
        else float(np.abs(delta_arr.astype(np.float64)).sum())
    )
    moved = float(baseline) + by_events
    reserved_moved = float(reserved_at_dump) + abs(float(reserved))
    if max(moved, reserved_moved) > MAX_MOVED_BYTES:
        raise KvtraceError(
            f"{source.path}: snapshot whose sizes on {device} add up to {max(moved, reserved_moved):.3g} "
            "bytes: not a real snapshot (damaged or made up)"
        )
    refuse_more_than_reserved(source.path, device, trace, baseline, reserved_at_dump)
    running: Any = None  # the allocated level before each event: an OOM's (most traces have none)
    if pending_ooms:
        running = (
            list(accumulate(deltas, initial=baseline))
            if delta_arr is None
            else baseline + np.concatenate(([0], np.cumsum(delta_arr)))
        )
    impossible_free: list[int] = []
    for done, entry, reserved_then, when in pending_ooms:
        field = "device_free" if "device_free" in entry else "addr"
        free = entry.get(field)
        free_bytes = None if free is None else integer(free, "an oom entry", field)
        if free_bytes is not None and not 0 <= free_bytes <= MAX_EVENT_BYTES:
            impossible_free.append(free_bytes)  # no device has it free: unknown, as where torch wrote none
            free_bytes = None
        source.ooms.append(
            OomInfo(
                device=device,
                ts_us=float(when),
                requested_bytes=int(entry.get("size", 0)),
                device_free_bytes=free_bytes,
                allocated_bytes=int(running[done]),
                reserved_bytes=int(reserved_then) + reserved_at_start,
                stream=stream_of(entry.get("stream")),
            )
        )
    if impossible_free:
        count = len(impossible_free)
        entries = "1 oom entry gives" if count == 1 else f"{count:,} oom entries give"
        source.meta.setdefault("input_notes", []).append(
            f"{source.path}: {entries} a free memory no device has on {device} "
            f"({shown_integer(impossible_free[0])} B): read as unknown, as an OOM torch records without it"
        )
    source.meta["timestamps"][device] = "time_us" if timed else "event_index"
    source.meta["trace_actions"][device] = counted
    source.meta["orphan_frees"][device] = orphan_count
    # The span the trace's figures cover (its entries, first to last entry's µs; None without times): a ring
    # buffer of max_entries, maybe turned on mid-run, so the report says this, not "the run".
    first, last = (trace[0].get("time_us"), trace[-1].get("time_us")) if timed else (None, None)
    span = last - first if type(first) is int and type(last) is int else None
    if trace:
        source.meta.setdefault("trace_span", {})[device] = {"entries": len(trace), "span_us": span}
    # A free that completes with its request dropped (only an orphan free can be one): the ring buffer lost
    # the trace's start, which `analyzers.trace_coverage` says with the span the trace keeps.
    cut_at = unrequested_free(trace) if orphan_count else None
    if cut_at is not None:
        source.meta.setdefault("history_cut", {})[device] = {
            "entries": len(trace),
            "at": cut_at,
            "span_us": span,
        }
    if delta_arr is None:
        return PlainDevice(
            device=device,
            ts_us=ts,
            addr=addrs,
            delta_bytes=deltas,
            total_reserved=list(map(reserved_at_start.__add__, reserved_col)),
            frame_id=frame_ids,
            baseline_bytes=int(baseline),
            baseline_blocks=baseline_blocks,
            final_rounded_bytes=rounded_at_dump,
            private_pool_free=None if pools is None else pools.after,
            private_pool_free_at_dump=None if pools is None else pools.at_dump,
        )
    source.devices.append(
        DeviceEvents(
            device=device,
            ts_us=np.asarray(ts, dtype=np.int64),
            addr=np.asarray(addrs, dtype=np.int64),
            delta_bytes=delta_arr,
            total_reserved=np.asarray(reserved_col, dtype=np.int64) + reserved_at_start,
            frame_id=np.asarray(frame_ids, dtype=np.int32),
            baseline_bytes=int(baseline),
            baseline_blocks=baseline_blocks,
            size_basis="requested",
            final_rounded_bytes=rounded_at_dump,
            private_pool_free=None if pools is None else np.asarray(pools.after, dtype=np.int64),
            private_pool_free_at_dump=None if pools is None else pools.at_dump,
        )
    )
    return None
