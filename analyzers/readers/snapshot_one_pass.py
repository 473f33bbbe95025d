"""One pass over a small snapshot's device trace that checks each entry is plain and replays it as lists.

The two-step plain path (`plain_trace_ok`, then `snapshot_replay._replay_loop`) walks a trace about a dozen
times: its checks one column at a time in C, the action counts, then the replay. A real snapshot's trace
entries are dicts the unpickler scattered over the heap, and each walk over them costs about what the
replay itself does (0.2-1 ms for 5,000 entries here). This reads each entry once, makes the checks of
`plain_trace_ok` inline and replays it as `_replay_loop` does. It gives up (None) at the first entry those
checks would refuse or that the loop would repair or skip (a memory entry without its size or address, an
action that is not a string): the caller then reads the snapshot anew by the two-step path, so a damaged or
odd file is read exactly as before, and a plain one gives the same figures (a test compares both paths).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from analyzers.model import Marker, MemorySource
from analyzers.readers.memory_events_fast import MAX_EVENT_BYTES
from analyzers.readers.snapshot_entries import SEGMENT_GROW, SEGMENT_SHRINK, FrameTable

__all__ = ["NotPlain", "replay_one_pass"]

_LOW, _HIGH = -(2**63), 2**63 - 1  # int64, as `plain_trace_ok` bounds sizes, addresses and times
_EXACT_FLOAT = 2**53


class NotPlain(Exception):
    """A trace the one pass gave up on: read the snapshot by the two-step path instead. Not one of the
    errors `snapshot_source` reports as a malformed file, so it reaches the caller."""


def replay_one_pass(
    trace: list[Any], frames: FrameTable, device: str, source: MemorySource
) -> tuple[bool, dict[str, int], tuple[Any, ...]] | None:
    """(timed, action counts, the `_replay_loop` tuple) of a plain trace; None where it is not plain (the
    caller drops the source and its frame table then, and reads the snapshot anew)."""
    timed = bool(trace) and isinstance(trace[0], dict) and "time_us" in trace[0]
    reserved = total = orphan_bytes = orphan_count = 0
    ts: list[int] = []
    addrs: list[int] = []
    deltas: list[int] = []
    reserved_col: list[int] = []
    frame_ids: list[int] = []
    live: dict[int, int] = {}  # address -> bytes added by an alloc seen in the trace
    counts: dict[str, int] = {}  # Counter(actions) in first-seen order, as `replay_device` counts them
    markers: list[Marker] = []
    pending_ooms: list[tuple[int, dict[str, Any], int, int]] = []
    segment_changes: list[tuple[int, Any, int]] = []
    intern, pop, seen = frames.intern, live.pop, counts.get
    add_ts, add_addr, add_delta, add_reserved, add_frame = (
        ts.append,
        addrs.append,
        deltas.append,
        reserved_col.append,
        frame_ids.append,
    )
    try:
        for index, entry in enumerate(trace):  # the hot loop: each entry's dict read once
            action = entry["action"]
            if type(action) is not str:
                return None
            counts[action] = seen(action, 0) + 1
            if action == "alloc" or action == "free_completed" or action == "free":
                size, address = entry["size"], entry["addr"]
                when = entry["time_us"] if timed else index
                if type(size) is not int or type(address) is not int or type(when) is not int:
                    return None
                if size < 0 or size > MAX_EVENT_BYTES:
                    return None
                total += size
                if action == "alloc":
                    live[address] = size
                    add_delta(size)
                    # Only allocations need a stack (attribution, top stacks); a free has its alloc's.
                    add_frame(intern(entry.get("frames")))
                else:
                    freed = pop(address, None)
                    if freed is None:
                        orphan_bytes += size
                        orphan_count += 1
                        freed = size
                    add_delta(-freed)
                    add_frame(-1)
                add_ts(when)
                add_addr(address)
                add_reserved(reserved)
                continue
            # free_requested, segments, oom, snapshot: `plain_trace_ok` reads a missing size as 0, address -1
            size, address = entry.get("size", 0), entry.get("addr", -1)
            when = entry["time_us"] if timed else index
            if type(size) is not int or type(address) is not int or type(when) is not int:
                return None
            if size < 0 or size > MAX_EVENT_BYTES:
                return None
            if not _LOW <= address <= _HIGH or not _LOW <= when <= _HIGH:
                return None
            total += size
            if action in SEGMENT_GROW:
                reserved += size
                segment_changes.append((len(deltas), entry.get("addr"), size))
            elif action in SEGMENT_SHRINK:
                reserved -= size
                segment_changes.append((len(deltas), entry.get("addr"), -size))
            elif action == "oom":
                pending_ooms.append((len(deltas), entry, reserved, when))
                label = f"OOM requesting {size} bytes"
                markers.append(Marker(kind="oom", ts_us=float(when), label=label, device=device))
            elif action == "snapshot":
                markers.append(Marker(kind="snapshot", ts_us=float(when), label="snapshot", device=device))
    except (KeyError, TypeError, AttributeError):  # a field missing, an entry not a dict: not plain
        return None
    if addrs and (min(addrs) < _LOW or max(addrs) > _HIGH):
        return None
    if ts and (min(ts) < _LOW or max(ts) > _HIGH):
        return None
    if 2 * total >= _EXACT_FLOAT:  # a free's delta is its alloc's size: at most twice the sizes
        return None
    source.markers.extend(markers)  # as `_replay_loop` adds them, once the trace is known to be plain
    replay: tuple[Any, ...] = (
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
        Counter(),
        Counter(),
        segment_changes,
    )
    return timed, counts, replay
