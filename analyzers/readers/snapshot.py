"""Read CUDA caching-allocator snapshots (`torch.cuda.memory._dump_snapshot` pickles, torch 2.0 to 2.11+).

A snapshot holds two things: the allocator's state at the moment of the dump (`segments`, each with its
`blocks`) and a ring buffer of recent allocator actions per device (`device_traces`). We rebuild the
allocated-bytes timeline the way PyTorch's memory_viz does (`process_alloc_data` in MemoryViz.js):

* **alloc** is an ``alloc`` entry (+size); **free** is a ``free_completed`` entry (or the legacy /
  elided ``free``). ``free_requested`` only marks a free that waits on other streams (record_stream):
  the memory is still unusable until ``free_completed``, so that is when it leaves the timeline.
* A free of an address that was allocated inside the trace removes exactly the bytes that alloc added.
  A free with no matching alloc ("orphan") freed memory allocated before the ring buffer began: normal,
  its size counts as live from the start.
* Blocks still allocated at the dump (``active_allocated``, and ``active_pending_free`` alias
  ``active_awaiting_free``, whose free has not completed) that no alloc in the trace explains were live
  from the start too. ``baseline_bytes`` = orphan frees + those blocks, using the request size
  (``requested_size``, else the 2.0 ``history[0].real_size``, else the block size), like memory_viz, so
  the baseline is in the same unit as trace entries (which carry the requested size).
  memory_viz leaves out pending-free blocks; we count them since their memory is still held.
* allocated(t) = baseline_bytes + cumulative sum of delta_bytes; the peak is its maximum, baseline
  included.

Timestamps are ``time_us`` (Unix-epoch microseconds, torch >= 2.1-ish) when every entry of a device has
one, else the entry's index in that device's trace (``meta["timestamps"]`` says which). Reserved bytes are
rebuilt from the segments at the dump minus the net ``segment_alloc/map`` and ``segment_free/unmap`` of
the trace, then replayed forward; `total_allocated` is left None because the snapshot has no
allocator-reported running total. Stacks are interned as "file:line:name" lines, innermost first.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, chain
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np

from analyzers.model import DeviceEvents, Marker, MemorySource, OomInfo, Segment
from analyzers.readers.memory_events_fast import MAX_EVENT_BYTES, MAX_MOVED_BYTES
from analyzers.readers.safe_pickle import gc_paused, load_pickle
from analyzers.readers.sources import ProgressFn
from kvtrace.errors import KvtraceError

__all__ = ["PlainDevice", "load_snapshot", "plain_trace_ok", "read_snapshot", "snapshot_source"]

_FREE_ACTIONS = frozenset({"free_completed", "free"})
_LIVE_STATES = frozenset({"active_allocated", "active_pending_free", "active_awaiting_free"})
_SEGMENT_GROW = frozenset({"segment_alloc", "segment_map"})
_SEGMENT_SHRINK = frozenset({"segment_free", "segment_unmap"})
_KNOWN_KEYS = frozenset({"segments", "device_traces"})
_FRAME_KEYS = itemgetter("filename", "line", "name")
_ACTION = methodcaller("get", "action")


class _FrameTable:
    """Interns stacks: one string per distinct stack, shared by every event allocated from it."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._ids: dict[tuple[tuple[Any, Any, Any], ...], int] = {}
        # Snapshots share each frame dict among the stacks that hold it (pickle memo): the identities of a
        # stack's dicts name it without reading them. Valid while the loaded snapshot is alive (the read).
        self._by_identity: dict[tuple[int, ...], int] = {}
        # Whole frame lists are shared too (one per call site): one look-up then, not one per frame, so a
        # long list shared by many entries costs its length once.
        self._by_list: dict[int, int] = {}

    def intern(self, frames: Any) -> int:
        if not frames or not isinstance(frames, list):
            return -1
        known = self._by_list.get(id(frames))
        if known is not None:
            return known
        identity = tuple(map(id, frames))
        known = self._by_identity.get(identity)
        if known is not None:
            self._by_list[id(frames)] = known
            return known
        try:  # the usual frame: a dict with all three keys, read in C
            key = tuple(map(_FRAME_KEYS, frames))
        except (KeyError, TypeError):
            key = tuple((f.get("filename", "?"), f.get("line", 0), f.get("name", "?")) for f in frames)
        frame_id = self._ids.get(key)
        if frame_id is None:
            frame_id = len(self.texts)
            self._ids[key] = frame_id
            self.texts.append("\n".join(f"{file}:{line}:{name}" for file, line, name in key))
        self._by_identity[identity] = frame_id
        self._by_list[id(frames)] = frame_id
        return frame_id


def _what(value: Any) -> str:
    """What a value that should be an int is, in the words of the JSON readers' errors."""
    kinds = {bool: "a boolean", str: "a string", float: "a number with a fraction", type(None): "None"}
    return kinds.get(type(value), type(value).__name__)


def _integer(value: Any, where: str, field: str) -> int:
    """A size, address or time as written: an int. torch writes nothing else; int() would read True as 1,
    "1048576" as 1 MiB and 1.5e9 as 1,500,000,000 (ValueError: the file is reported malformed)."""
    if type(value) is not int:
        raise ValueError(f"field {field!r} of {where} is {_what(value)}, expected an integer")
    return value


def _bytes(value: Any, where: str, field: str = "size") -> int:
    """A size field as an int. No allocator writes a negative size: only a damaged or crafted file has
    one, and it would make memory curves go below zero; nor one past any device, whose sums wrap the int64
    columns (ValueError: the file is reported malformed)."""
    size = _integer(value, where, field)
    if size < 0:
        raise ValueError(f"negative size {size} in {where}")
    if size > MAX_EVENT_BYTES:
        raise ValueError(f"size {size} in {where}, more than any device holds")
    return size


def _block_request_size(block: dict[str, Any]) -> int:
    """Bytes the program asked for: what trace entries carry, so baseline and deltas share a unit."""
    requested = block.get("requested_size")
    if requested is not None and (size := _bytes(requested, "a block", "requested_size")):
        return size
    history = block.get("history")
    real = history[0].get("real_size") if history and isinstance(history[0], dict) else None
    if real is not None and (size := _bytes(real, "a block's history", "real_size")):
        return size
    return _bytes(block.get("size", 0), "a block")


def _blocks_with_addresses(segment: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(address, block) pairs; torch 2.0 blocks have no address, they tile the segment in order."""
    address = _integer(segment.get("address", 0), "a segment", "address")
    pairs = []
    for block in segment.get("blocks", []):
        pairs.append((_integer(block.get("address", address), "a block", "address"), block))
        address = pairs[-1][0] + _bytes(block.get("size", 0), "a block")
    return pairs


def _segment_record(device: str, segment: dict[str, Any]) -> Segment:
    blocks = [block for _, block in _blocks_with_addresses(segment)]
    allocated = segment.get("allocated_size")
    if allocated is None:
        allocated = sum(int(b.get("size", 0)) for b in blocks if b.get("state") in _LIVE_STATES)
    free_sizes = [int(b.get("size", 0)) for b in blocks if b.get("state") == "inactive"]
    return Segment(
        device=device,
        address=int(segment.get("address", 0)),
        total_size=_bytes(segment.get("total_size", 0), "a segment"),
        allocated_size=_bytes(allocated, "a segment"),
        largest_free_block=max(free_sizes, default=0),
        segment_type=str(segment.get("segment_type", "")),
        stream=_stream(segment.get("stream")),
    )


def _stream(value: Any) -> int | None:
    """A stream handle as written (an int); anything else is unknown."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _replay_loop(
    trace: list[dict[str, Any]], timed: bool, frames: _FrameTable, device: str, source: MemorySource
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
    pending_ooms: list[tuple[int, dict[str, Any], int, int]] = []
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
        if action == "alloc" or action in _FREE_ACTIONS:
            size, address = entry.get("size", 0), entry.get("addr", -1)
            when = entry["time_us"] if timed else index
            if type(size) is not int or type(address) is not int or type(when) is not int:
                where = f"a trace entry ({action})"
                size, address = _integer(size, where, "size"), _integer(address, where, "addr")
                when = _integer(when, where, "time_us")
            if size < 0:
                raise ValueError(f"negative size {size} in a trace entry ({action})")
            if size > MAX_EVENT_BYTES:
                raise ValueError(f"size {size} in a trace entry ({action}), more than any device holds")
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
        size = _bytes(entry.get("size", 0), f"a trace entry ({action})")
        when = _integer(entry["time_us"], f"a trace entry ({action})", "time_us") if timed else index
        if action in _SEGMENT_GROW:
            reserved += size
        elif action in _SEGMENT_SHRINK:
            reserved -= size
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
_SIZE = methodcaller("get", "size", 0)
_HAS_TIME = methodcaller("__contains__", "time_us")
_ADDR = methodcaller("get", "addr", -1)
_TIME = itemgetter("time_us")
_ONLY_INT = frozenset({int})


def _replay_columns(
    trace: list[dict[str, Any]], timed: bool, frames: _FrameTable, device: str, source: MemorySource
) -> _Replay | None:
    """The trace replayed with numpy: fields pulled out in C, allocs and frees paired by sorting on address.

    A free matches an alloc when the previous memory entry of its address is an alloc (any free in between
    would have consumed it), exactly as the loop's `live` dict decides. None when a field is not a plain
    int (the loop then names it)."""
    codes_of: defaultdict[Any, int] = defaultdict(int, _ACTION_CODES)  # unknown actions: 0
    try:
        actions = np.fromiter(map(codes_of.__getitem__, map(_ACTION, trace)), dtype=np.int8, count=len(trace))
        columns = [list(map(_SIZE, trace)), list(map(_ADDR, trace))]
        if timed:
            columns.append(list(map(_TIME, trace)))
    except TypeError:  # an unhashable action
        return None
    # numpy would read True as 1, "1048576" as 1 MiB and 1.5e9 as an int: only ints are sizes
    if not all(_ONLY_INT.issuperset(map(type, column)) for column in columns):
        return None
    try:
        sizes = np.array(columns[0], dtype=np.int64)
        addrs_all = np.array(columns[1], dtype=np.int64)
        times = np.array(columns[2], dtype=np.int64) if timed else np.arange(len(trace))
    except OverflowError:  # an int past int64: the loop names it
        return None
    if sizes.ndim != 1 or addrs_all.ndim != 1 or times.ndim != 1:
        return None
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
    frame_ids = np.full(len(at), -1, dtype=np.int32)
    intern = frames.intern
    alloc_rows = np.flatnonzero(alloc)
    frame_ids[alloc_rows] = [intern(trace[i].get("frames")) for i in at[alloc_rows].tolist()]
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
    )


_Replay = tuple[Any, Any, Any, Any, Any, set[int], int, int, list[tuple[int, dict[str, Any], int, int]], int]


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


def _replay_device(
    device_index: int,
    trace: list[dict[str, Any]],
    segments: list[dict[str, Any]],
    frames: _FrameTable,
    source: MemorySource,
    plain: bool = False,
) -> PlainDevice | None:
    """Turn one device's trace ring buffer plus its final block state into a `DeviceEvents`, appended to
    `source.devices`; with `plain`, into the `PlainDevice` returned (the trace passed `plain_trace_ok`)."""
    device = f"cuda:{device_index}"
    timed = bool(trace) and all(map(_HAS_TIME, trace))
    # Reserved bytes are replayed from 0 and shifted at the end: the dump's segments minus the trace's net
    # segment growth is what was reserved when the ring buffer began.
    replay = None if plain else _replay_columns(trace, timed, frames, device, source)
    if replay is None:  # odd value types: the plain loop converts them one by one
        replay = _replay_loop(trace, timed, frames, device, source)
    ts, addrs, deltas, reserved_col, frame_ids, live, orphan_bytes, orphan_count, pending_ooms, reserved = (
        replay
    )
    reserved_at_dump = sum(_bytes(s.get("total_size", 0), "a segment", "total_size") for s in segments)
    reserved_at_start = reserved_at_dump - reserved
    actions = {str(action): count for action, count in Counter(map(_ACTION, trace)).items()}

    baseline = orphan_bytes
    baseline_blocks: list[tuple[int, int, int]] = []
    rounded_at_dump = 0  # what torch.cuda.memory_allocated() counted at the dump: whole blocks
    for segment in segments:
        for address, block in _blocks_with_addresses(segment):
            if block.get("state") in _LIVE_STATES:
                rounded_at_dump += int(block.get("size", 0))
            if block.get("state") in _LIVE_STATES and address not in live:
                size = _block_request_size(block)
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
    _refuse_more_than_reserved(source.path, device, trace, baseline, reserved_at_dump)
    running: Any = (
        list(accumulate(deltas, initial=baseline))
        if delta_arr is None
        else baseline + np.concatenate(([0], np.cumsum(delta_arr)))
    )
    for done, entry, reserved_then, when in pending_ooms:
        field = "device_free" if "device_free" in entry else "addr"
        free = entry.get(field)
        source.ooms.append(
            OomInfo(
                device=device,
                ts_us=float(when),
                requested_bytes=int(entry.get("size", 0)),
                device_free_bytes=None if free is None else _integer(free, "an oom entry", field),
                allocated_bytes=int(running[done]),
                reserved_bytes=int(reserved_then) + reserved_at_start,
                stream=_stream(entry.get("stream")),
            )
        )
    source.meta["timestamps"][device] = "time_us" if timed else "event_index"
    source.meta["trace_actions"][device] = actions
    source.meta["orphan_frees"][device] = orphan_count
    if delta_arr is None:
        return PlainDevice(
            device=device,
            ts_us=ts,
            addr=addrs,
            delta_bytes=deltas,
            total_reserved=[level + reserved_at_start for level in reserved_col],
            frame_id=frame_ids,
            baseline_bytes=int(baseline),
            baseline_blocks=baseline_blocks,
            final_rounded_bytes=rounded_at_dump,
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
        )
    )
    return None


def _refuse_more_than_reserved(
    name: str, device: str, trace: list[dict[str, Any]], baseline: int, reserved_at_dump: int
) -> None:
    """Every block live when the trace began sat in a segment reserved then, and no moment of the trace
    reserved more than the dump's segments plus those the trace released (its segment_alloc entries only
    lower that). A level before the trace above that bound (49 frees of 1 TiB blocks never allocated, on
    2 MiB of segments, printed a 49 TiB peak) is no state the allocator was ever in: the file is refused."""
    if baseline <= reserved_at_dump:
        return  # the usual case, without a pass over the trace
    released = sum(e.get("size", 0) for e in trace if e.get("action") in _SEGMENT_SHRINK)  # checked ints
    if baseline > reserved_at_dump + released:
        raise KvtraceError(
            f"{name}: not a real snapshot (damaged or made up): on {device} its trace begins with "
            f"{baseline:,} B allocated (blocks it frees or the dump holds that it never allocates), more "
            f"than its segments ever reserved ({reserved_at_dump:,} B at the dump, plus {released:,} B the "
            "trace released)"
        )


def _refuse_shared_containers(name: str, segments: list[Any], traces: list[list[Any]]) -> None:
    """A real dump builds each segment, block list, block, device trace and trace entry once. A pickle can
    list one object many times for a few bytes each (its memo), and the segment x block walks then grow
    with the square of the file's size (16 KB took 17 s and 1 GB), or every reference to an entry or block
    becomes one more event or block to hold (a 4 MB file read as 2 million events, 330 MB): such a file is
    refused. Real dumps do share frames, the frame lists and frame dicts of their entries and blocks:
    allowed, as each stack is interned once."""
    block_lists = [s["blocks"] for s in segments if isinstance(s, dict) and isinstance(s.get("blocks"), list)]
    for what, containers in (
        ("segment", [s for s in segments if isinstance(s, dict)]),
        ("segment's block list", [b for b in block_lists if b]),
        ("device trace", [t for t in traces if t]),
    ):
        distinct = len(set(map(id, containers)))
        if distinct != len(containers):
            raise KvtraceError(
                f"{name}: not a real snapshot (damaged or made up): {len(containers) - distinct} of its "
                f"{len(containers)} {what}s repeat another object (a real dump writes each once)"
            )
    # Entries and blocks are many (a million in a big dump): their identities as one sorted array, or a set
    # where they are few (a small snapshot's report needs no numpy).
    for what, lists in (("trace entries", traces), ("blocks", block_lists)):
        count = sum(map(len, lists))
        if count <= PLAIN_MAX_ENTRIES:
            repeats = count - len(set(map(id, chain.from_iterable(lists))))
        else:
            ids = np.fromiter(map(id, chain.from_iterable(lists)), dtype=np.uint64, count=count)
            ids.sort()
            repeats = int(np.count_nonzero(ids[1:] == ids[:-1]))
        if repeats:
            raise KvtraceError(
                f"{name}: not a real snapshot (damaged or made up): {repeats} of its {count} {what} repeat "
                "another object (a real dump writes each once)"
            )


def _value_counts(traces: list[list[dict[str, Any]]], key: str, boring: frozenset[str]) -> dict[str, int]:
    """Distinct per-entry values of `key` (compile_context, user_metadata) worth showing, with counts."""
    counts: Counter[str] = Counter()
    getter = methodcaller("get", key)
    for trace in traces:
        if not trace or (key not in trace[0] and key not in trace[-1]):
            continue  # written by every entry of the torch versions that have it
        for value, count in Counter(map(getter, trace)).items():  # counted in C; few distinct values
            if value is not None and str(value) not in boring:
                counts[str(value)] += count
    return dict(counts)


def read_snapshot(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    """A `MemorySource` (kind "snapshot") from a CUDA caching-allocator snapshot pickle.

    One `DeviceEvents` ("cuda:N") per device that has segments or trace entries; `segments` describes
    the allocator state at the dump, `ooms` and "oom"/"snapshot" markers come from the trace.
    """
    with gc_paused():
        name = str(path)
        return snapshot_source(name, load_snapshot(name, progress))


def load_snapshot(name: str, progress: ProgressFn | None = None) -> dict[str, Any]:
    """The snapshot's dict, loaded without running code; refused unless it is shaped as torch writes it."""
    data = load_pickle(name, progress)
    if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
        raise KvtraceError(f"{name}: a pickle, but not a CUDA memory snapshot (no 'segments' list)")
    traces = data.get("device_traces") or []
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        raise KvtraceError(f"{name}: a snapshot whose 'device_traces' is not a list of lists")
    _refuse_shared_containers(name, data["segments"], traces)
    return data


# Up to this many trace entries a snapshot's report is worked out with Python lists: numpy's import alone
# (60 ms here) is then most of the report's time. The lists cost ~4 µs per entry, so past it (both took
# 0.13 s at 20,000 entries; at 100,000, 0.55 s against 0.37 s) the columns are faster.
PLAIN_MAX_ENTRIES = 20_000
_INT64 = range(-(2**63), 2**63)
_EXACT_FLOAT = 2**53


def plain_trace_ok(trace: list[Any]) -> bool:
    """Whether `_replay_device(plain=True)` gives this trace's figures as the columns would: every action
    hashable and every size, address and time a plain int in int64, no size negative or past any device,
    and the sizes' sum exact as a float. Anything else (damaged or crafted files) is read with numpy, which
    names the problem as it always has."""
    try:
        set(map(_ACTION, trace))
    except TypeError:  # an unhashable action
        return False
    sizes = list(map(_SIZE, trace))
    columns = [sizes, list(map(_ADDR, trace))]
    if trace and all(map(_HAS_TIME, trace)):
        columns.append(list(map(_TIME, trace)))
    if not all(_ONLY_INT.issuperset(map(type, column)) for column in columns):
        return False
    if any(column and (min(column) not in _INT64 or max(column) not in _INT64) for column in columns):
        return False
    if sizes and (min(sizes) < 0 or max(sizes) > MAX_EVENT_BYTES):
        return False
    return 2 * sum(sizes) < _EXACT_FLOAT  # a free's delta is its alloc's size: at most twice the sizes


def snapshot_source(
    name: str, data: dict[str, Any], plain: Callable[[PlainDevice], None] | None = None
) -> MemorySource:
    """The `MemorySource` of a loaded snapshot (`load_snapshot`). With `plain`, each device's replay is
    handed to it as a `PlainDevice` instead of joining `source.devices` as arrays: numpy is never used."""
    traces = data.get("device_traces") or []
    try:
        segments_by_device: dict[int, list[dict[str, Any]]] = {}
        for segment in data["segments"]:
            device = int(segment.get("device", 0))
            if device < 0:  # a negative index would pick another device's trace
                raise KvtraceError(f"{name}: malformed snapshot (a segment on device {device})")
            segments_by_device.setdefault(device, []).append(segment)
        device_indices = sorted(set(segments_by_device) | {i for i, trace in enumerate(traces) if trace})
        has_history = any("history" in b for s in data["segments"] for b in s.get("blocks", []))
        source = MemorySource(kind="snapshot", path=name)
        source.meta.update(
            {
                "format": "cuda_allocator_snapshot",
                "layout": "history (torch 2.0)" if has_history else "frames",
                "timestamps": {},
                "trace_actions": {},
                "orphan_frees": {},
            }
        )
        for key, value in data.items():
            if key not in _KNOWN_KEYS:
                source.meta[key] = value
        for key in ("compile_context", "user_metadata"):
            counts = _value_counts(traces, key, frozenset({"", "N/A"}))
            if counts:
                source.meta.setdefault(key, counts)
        frames = _FrameTable()
        for index in device_indices:
            trace = traces[index] if index < len(traces) else []
            device_segments = segments_by_device.get(index, [])
            replayed = _replay_device(index, trace, device_segments, frames, source, plain=plain is not None)
            if plain is not None and replayed is not None:
                plain(replayed)
            source.segments.extend(_segment_record(f"cuda:{index}", s) for s in device_segments)
        source.frames = frames.texts
        source.markers.sort(key=lambda m: m.ts_us)
    except (AttributeError, TypeError, ValueError, KeyError, OverflowError) as exc:  # Overflow: 1e400
        raise KvtraceError(f"{name}: malformed snapshot ({type(exc).__name__}: {exc})") from exc
    return source
