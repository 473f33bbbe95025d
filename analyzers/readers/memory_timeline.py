"""Read torch.profiler `export_memory_timeline` / `export_memory_timeline_raw` JSON files, streaming.

Memory timelines (kind "memory_timeline"): `export_memory_timeline_raw` writes a JSON list of
``[ns_timestamp, action, bytes, category]`` (action 1 pre-existing with ts -1, 2 create, 3 version bump,
4 destroy); pre-existing bytes become the baseline, each version bump's (-n, +n) pair is dropped (no
memory moves), the rest are events. The coalesced `export_memory_timeline` form ``[times, sizes]`` is
read as one event per change of the summed sizes. Neither records the device: it is "cuda:0" unless told.
"""

from __future__ import annotations

import os
from array import array
from typing import Any

import numpy as np

from analyzers.model import DeviceEvents, MemorySource
from analyzers.readers.memory_events_fast import as_int as _as_int
from analyzers.readers.sources import JsonStream, ProgressFn, open_input
from kvtrace.errors import KvtraceError

__all__ = ["read_memory_timeline"]


class _TimelineCollector:
    """Streams `export_memory_timeline_raw` rows into columns; holds the first two elements back until
    it knows whether the file is the raw form or the coalesced `[times, sizes]` form."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.head: list[Any] = []
        self.ts_ns = array("q")
        self.delta = array("q")
        self.baseline = 0
        self.bump_rows = 0
        self.coalesced = False

    def __call__(self, row: Any) -> None:
        if len(self.head) < 2 and not self.ts_ns and not self.bump_rows and not self.baseline:
            self.head.append(row)
            if len(self.head) == 2 and not _is_coalesced(self.head):
                self._flush_head()
            return
        self._raw_row(row)

    def _flush_head(self) -> None:
        head, self.head = self.head, []
        for row in head:
            self._raw_row(row)

    def _raw_row(self, row: Any) -> None:
        if not isinstance(row, list) or len(row) < 3:
            raise KvtraceError(
                f"{self.name}: memory timeline row {row!r:.60} is not [ts, action, bytes, ...]"
            )
        ts, action, numbytes = _as_int(row[0], -1), _as_int(row[1], 0), _as_int(row[2], 0)
        if action == 1 or ts < 0:  # PREEXISTING: allocated before the profiler started
            self.baseline += numbytes
        elif action == 3:  # INCREMENT_VERSION: (-n, +n) at one instant, only the category changes
            self.bump_rows += 1
        else:
            self.ts_ns.append(ts)
            self.delta.append(numbytes)

    def finish(self) -> str:
        if _is_coalesced(self.head):
            times, sizes = self.head
            if len(times) != len(sizes):
                raise KvtraceError(f"{self.name}: memory timeline [times, sizes] lists differ in length")
            previous = 0
            for index, (ts, row) in enumerate(zip(times, sizes, strict=True)):
                total = sum(_as_int(v, 0) for v in row)
                if index == 0:
                    self.baseline = total
                else:
                    self.ts_ns.append(_as_int(ts, 0))
                    self.delta.append(total - previous)
                previous = total
            return "coalesced"
        self._flush_head()
        return "raw"


def _is_coalesced(head: list[Any]) -> bool:
    return (
        len(head) == 2
        and all(isinstance(part, list) for part in head)
        and bool(head[1])
        and isinstance(head[1][0], list)
    )


def read_memory_timeline(
    path: str | os.PathLike[str], progress: ProgressFn | None = None, device: str = "cuda:0"
) -> MemorySource:
    """A `MemorySource` (kind "memory_timeline") from torch.profiler `export_memory_timeline[_raw]` JSON.

    The file does not say which device it describes, hence `device`.
    """
    name = str(path)
    collector = _TimelineCollector(name)
    with open_input(path, progress) as binary:
        stream = JsonStream(binary, name)
        first = stream.peek()
        if first != "[":
            raise stream.error("empty file" if not first else "not a memory timeline: expected a JSON list")
        stream.each_element("the memory timeline", collector)
        stream.end()
    form = collector.finish()
    ts_ns = np.frombuffer(collector.ts_ns, dtype=np.int64)
    order = np.argsort(ts_ns, kind="stable")
    ts_ns = ts_ns[order]
    integral = bool(np.all(ts_ns % 1000 == 0))
    source = MemorySource(kind="memory_timeline", path=name)
    source.devices.append(
        DeviceEvents(
            device=device,
            ts_us=ts_ns // 1000 if integral else ts_ns / 1000.0,
            addr=np.full(len(ts_ns), -1, dtype=np.int64),
            delta_bytes=np.frombuffer(collector.delta, dtype=np.int64)[order],
            baseline_bytes=int(collector.baseline),
        )
    )
    source.meta.update(
        {
            "format": f"memory_timeline_{form}",
            "device_assumed": device,
            "version_bumps": collector.bump_rows >> 1,
        }
    )
    return source
