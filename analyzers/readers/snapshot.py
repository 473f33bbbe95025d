"""Read CUDA caching-allocator snapshots (`torch.cuda.memory._dump_snapshot` pickles, torch 2.0 to 2.11+).

A snapshot holds two things: the allocator's state at the moment of the dump (`segments`, each with its
`blocks`) and a ring buffer of recent allocator actions per device (`device_traces`). We rebuild the
allocated-bytes timeline the way PyTorch's memory_viz does (`process_alloc_data` in MemoryViz.js):

* **alloc** is an ``alloc`` entry (+size); **free** is a ``free_completed`` entry (or the legacy /
  elided ``free``). ``free_requested`` only marks a free that waits on other streams (record_stream):
  the memory is still unusable until ``free_completed``, so that is when it leaves the timeline.
* A free of an address that was allocated inside the trace removes exactly the bytes that alloc added.
  A free with no matching alloc ("orphan") freed memory allocated before the ring buffer began: normal,
  its size counts as live from the start. A free whose ``size`` is lost (a damaged file) frees its
  alloc's bytes; an orphan one, or one without ``addr``, is left out with a note.
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
from collections import Counter
from collections.abc import Callable
from itertools import chain
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np

from analyzers.model import MemorySource
from analyzers.readers.safe_pickle import load_pickle
from analyzers.readers.snapshot_entries import (
    KNOWN_KEYS,
    PLAIN_MAX_ENTRIES,
    FrameTable,
    plain_trace_ok,
    segment_record,
)
from analyzers.readers.snapshot_replay import PlainDevice, replay_device
from analyzers.readers.sources import ProgressFn
from kvtrace.collector import collector_paused
from kvtrace.errors import KvtraceError, shown_integer

# c10::DeviceIndex is an int16 (int8 before torch 2.3): no dump names a device past it, and a damaged one's
# 10**30 would print whole in every note and heading that names its device ("cuda:1000...").
_MAX_DEVICE_INDEX = 2**15 - 1

__all__ = [
    "PLAIN_MAX_ENTRIES",
    "PlainDevice",
    "load_snapshot",
    "plain_trace_ok",
    "read_snapshot",
    "snapshot_source",
]


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
    getter, every = methodcaller("get", key), itemgetter(key)
    for trace in traces:
        if not trace or (key not in trace[0] and key not in trace[-1]):
            continue  # written by every entry of the torch versions that have it
        try:  # counted in C; few distinct values. An item read is half a `get`'s time, where all have it
            values = Counter(map(every, trace))
        except (KeyError, TypeError):  # an entry without it (or odd): counted, or refused, as `get` reads it
            values = Counter(map(getter, trace))
        for value, count in values.items():
            if value is not None and str(value) not in boring:
                counts[str(value)] += count
    return dict(counts)


def read_snapshot(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    """A `MemorySource` (kind "snapshot") from a CUDA caching-allocator snapshot pickle.

    One `DeviceEvents` ("cuda:N") per device that has segments or trace entries; `segments` describes
    the allocator state at the dump, `ooms` and "oom"/"snapshot" markers come from the trace.
    """
    with collector_paused():
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
def snapshot_source(
    name: str,
    data: dict[str, Any],
    plain: Callable[[PlainDevice], None] | None = None,
    one_pass: bool = False,
) -> MemorySource:
    """The `MemorySource` of a loaded snapshot (`load_snapshot`). With `plain`, each device's replay is
    handed to it as a `PlainDevice` instead of joining `source.devices` as arrays: numpy is never used.
    With `one_pass` too, each trace is checked as it is replayed, and `NotPlain` raised for one that is not
    plain (`analyzers.readers.snapshot_one_pass`): the caller reads the snapshot by the two-step path."""
    traces = data.get("device_traces") or []
    try:
        segments_by_device: dict[int, list[dict[str, Any]]] = {}
        for segment in data["segments"]:
            device = int(segment.get("device", 0))
            if not 0 <= device <= _MAX_DEVICE_INDEX:  # a negative index would pick another device's trace
                said = shown_integer(device)
                raise KvtraceError(f"{name}: malformed snapshot (a segment on device {said})")
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
            if key not in KNOWN_KEYS:
                source.meta[key] = value
        for key in ("compile_context", "user_metadata"):
            counts = _value_counts(traces, key, frozenset({"", "N/A"}))
            if counts:
                source.meta.setdefault(key, counts)
        frames = FrameTable()
        block_pairs: dict[int, list[tuple[int, dict[str, Any]]]] = {}  # walked once for both uses
        for index in device_indices:
            trace = traces[index] if index < len(traces) else []
            device_segments = segments_by_device.get(index, [])
            replayed = replay_device(
                index,
                trace,
                device_segments,
                frames,
                source,
                plain=plain is not None,
                one_pass=one_pass,
                block_pairs=block_pairs,
            )
            if plain is not None and replayed is not None:
                plain(replayed)
            source.segments.extend(
                segment_record(f"cuda:{index}", s, block_pairs.get(id(s))) for s in device_segments
            )
        source.frames = frames.texts
        source.markers.sort(key=lambda m: m.ts_us)
        if "skipped_events" in source.meta:  # the note's "skipped 1 of 97 events"
            source.meta["trace_events"] = sum(map(len, traces))
    except (AttributeError, TypeError, ValueError, KeyError, OverflowError) as exc:  # Overflow: 1e400
        raise KvtraceError(f"{name}: malformed snapshot ({type(exc).__name__}: {exc})") from exc
    return source
