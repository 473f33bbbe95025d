"""Read torch.profiler `export_memory_timeline` / `export_memory_timeline_raw` JSON files, streaming.

Memory timelines (kind "memory_timeline"): `export_memory_timeline_raw` writes a JSON list of
``[ns_timestamp, action, bytes, category]`` (action 1 pre-existing with ts -1, 2 create, 3 version bump,
4 destroy); pre-existing bytes become the baseline, each version bump's (-n, +n) pair is dropped (no
memory moves) unless it moves the bytes into or out of the parameters, the rest are events. The coalesced
`export_memory_timeline` form ``[µs_times, sizes]`` is read as one event per change of the summed sizes
(per change of the parameters', the other known categories' and the unknown column's sizes, when the rows
have torch's columns). There a version bump is bytes leaving one column for another at one µs: between a
known category and the unknown column it is dropped, as in the raw form (a free and an allocation of the
same size at that µs read the same way: the coalesced form cannot tell them apart). Neither form records
the device: it is "unknown" unless told (torch writes the one asked for, by default cuda:0 where CUDA is
available and the CPU elsewhere, so no guess holds).

The category is torch's `_CATEGORY_TO_INDEX` (torch/profiler/_memory_profiler.py): 0 PARAMETER,
1 OPTIMIZER_STATE, 2 INPUT, 3 TEMPORARY, 4 ACTIVATION, 5 GRADIENT, 6 AUTOGRAD_DETAIL, 7 unknown (None).
Parameters are the weights; the other known categories are other; unknown is left to attribution.

torch's category itself is kept too (`DeviceEvents.torch_category`, analyzers.torch_categories): each
event's as its row gives it (a coalesced change of the other known categories takes the one that changed
most in its direction), the baseline's by category, and every version bump that changes the category as a
move of its bytes (`torch_moves`): torch's coalesced form moves them at the bump, so the live bytes by
category follow it where kvtrace's three categories keep the bytes where they were created. In the
coalesced form each row's moves make the live bytes by category equal the row's columns.
"""

from __future__ import annotations

import os
from array import array
from typing import Any

import numpy as np

from analyzers.model import OTHER, UNKNOWN_DEVICE, WEIGHTS, DeviceEvents, MemorySource
from analyzers.readers.json_stream import JsonStream
from analyzers.readers.memory_events_fast import MAX_EVENT_BYTES, MAX_MOVED_BYTES
from analyzers.readers.memory_events_fast import as_int as _as_int
from analyzers.readers.sources import ProgressFn, open_input
from kvtrace.errors import KvtraceError

__all__ = ["read_memory_timeline"]

_PARAMETER, _KNOWN_CATEGORIES = 0, 7  # torch's index of PARAMETER; indices below 7 name a category
# A coalesced row: a zero column, then one column per category index, each at index + 1 (`_coalesce_timeline`
# adds to `sizes[-1][_CATEGORY_TO_INDEX[category] + 1]`): the last, index 7's, holds the unknown (None) bytes.
_COALESCED_WIDTH = 1 + _KNOWN_CATEGORIES + 1
_UNKNOWN_COLUMN = 1 + _KNOWN_CATEGORIES


def _torch_code(torch_category: Any) -> int:
    """torch's index for a row's category: 0-6, or 7 for None and anything else (uncategorised)."""
    index = _as_int(torch_category, -1)
    return index if 0 <= index < _KNOWN_CATEGORIES else _KNOWN_CATEGORIES


def _stated(torch_category: Any) -> int:
    """kvtrace's category for torch's index: weights, other, or -1 (unknown: torch could not tell)."""
    index = _as_int(torch_category, -1)
    if index == _PARAMETER:
        return WEIGHTS
    return OTHER if 0 < index < _KNOWN_CATEGORIES else -1


class _TimelineCollector:
    """Streams `export_memory_timeline_raw` rows into columns; holds the first two elements back until
    it knows whether the file is the raw form or the coalesced `[times, sizes]` form."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.head: list[Any] = []
        self.ts_ns = array("q")
        self.delta = array("q")
        self.category = array("b")
        self.torch = array("b")  # torch's index per event
        self.torch_baseline = [0] * (_KNOWN_CATEGORIES + 1)
        self.torch_levels = [0] * (_KNOWN_CATEGORIES + 1)  # the coalesced form's, as its events leave them
        self.has_torch = True
        # version bumps that change torch's category: (ts_ns, events before it, bytes, from, to)
        self.moves: list[tuple[int, int, int, int, int]] = []
        self.baseline = 0
        self.baseline_weights = 0
        self.bump_rows = 0
        self.bump_release: tuple[int, int, int, int] | None = None  # a bump's (ts, -n, category, torch's)
        self.moved = 0  # |bytes| of every row so far: past MAX_MOVED_BYTES the int64 totals would wrap

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
        ts, action, numbytes = _as_int(row[0], -1), _as_int(row[1], 0), self._size(row[2], row)
        category = _stated(row[3]) if len(row) > 3 else -1
        torch_code = _torch_code(row[3]) if len(row) > 3 else _KNOWN_CATEGORIES
        if action == 1 or ts < 0:  # PREEXISTING: allocated before the profiler started
            if numbytes < 0:
                raise KvtraceError(
                    f"{self.name}: memory timeline row {row!r:.60}: {numbytes} bytes allocated before the "
                    "profiler started: not a real timeline (damaged or made up)"
                )
            self.baseline += numbytes
            self.torch_baseline[torch_code] += numbytes
            if category == WEIGHTS:
                self.baseline_weights += numbytes
        elif action == 3:  # INCREMENT_VERSION: (-n, +n) at one instant, only the category changes
            self.bump_rows += 1
            if numbytes < 0:
                self.bump_release = (ts, numbytes, category, torch_code)
            elif self.bump_release is not None:
                released, self.bump_release = self.bump_release, None
                if (released[2] == WEIGHTS) != (category == WEIGHTS):  # bytes become or stop being weights
                    self._event(*released)
                    self._event(ts, numbytes, category, torch_code)
                elif released[3] != torch_code:
                    self.moves.append((ts, len(self.ts_ns), numbytes, released[3], torch_code))
        else:
            self._event(ts, numbytes, category, torch_code)

    def _size(self, value: Any, row: Any) -> int:
        """A row's bytes. A string, null or 1e400 (infinite once parsed) is damage, as are sizes past any
        device or adding up past int64: refused, where they were read as 0 or overflowed the totals."""
        if type(value) is not int:
            if not isinstance(value, float) or not value.is_integer():
                raise KvtraceError(
                    f"{self.name}: memory timeline row {row!r:.60}: bytes {value!r:.30} is not a size"
                )
            value = int(value)
        self.moved += abs(value)
        if abs(value) > MAX_EVENT_BYTES or self.moved > MAX_MOVED_BYTES:
            raise KvtraceError(
                f"{self.name}: memory timeline row {row!r:.60}: sizes past what a device holds "
                f"({float(self.moved):.3g} bytes so far): not a real timeline (damaged or made up)"
            )
        return value

    def _event(self, ts_ns: int, numbytes: int, category: int, torch_code: int) -> None:
        self.ts_ns.append(ts_ns)
        self.delta.append(numbytes)
        self.category.append(category)
        self.torch.append(torch_code)
        self.torch_levels[torch_code] += numbytes

    def _settle_row(self, ts_ns: int, columns: list[int]) -> None:
        """Moves that take the coalesced events' live bytes by category to the row's own columns."""
        gaps = [column - level for column, level in zip(columns, self.torch_levels, strict=True)]
        givers = [[code, -gap] for code, gap in enumerate(gaps) if gap < 0]
        for code, wanted in ((code, gap) for code, gap in enumerate(gaps) if gap > 0):
            for giver in givers:
                moved = min(wanted, giver[1])
                if moved:
                    self.moves.append((ts_ns, len(self.ts_ns), moved, giver[0], code))
                    giver[1] -= moved
                    wanted -= moved
        self.torch_levels = list(columns)

    def finish(self) -> str:
        if _is_coalesced(self.head):
            times, sizes = self.head
            if len(times) != len(sizes):
                raise KvtraceError(f"{self.name}: memory timeline [times, sizes] lists differ in length")
            # torch's rows: a zero column, then one per category; any other width is read as one total.
            by_category = all(isinstance(row, list) and len(row) == _COALESCED_WIDTH for row in sizes)
            self.has_torch = by_category
            previous_weights = previous_other = previous_unknown = 0
            previous: list[int] = []
            for index, (ts, row) in enumerate(zip(times, sizes, strict=True)):
                total = sum(_as_int(v, 0) for v in row)
                weights = _as_int(row[1 + _PARAMETER], 0) if by_category else 0
                # torch's unknown column is left to attribution, as the raw form's category 7 rows are
                unknown = _as_int(row[_UNKNOWN_COLUMN], 0) if by_category else 0
                other = total - weights - unknown
                ts_ns = _as_int(ts, 0) * 1000  # torch writes these in µs (the raw form's are ns)
                columns = [_as_int(v, 0) for v in row[1:]] if by_category else []
                if index == 0:
                    self.baseline, self.baseline_weights = total, weights
                    self.torch_baseline = list(columns) if by_category else self.torch_baseline
                    self.torch_levels = list(columns) if by_category else self.torch_levels
                elif not by_category:
                    self._event(ts_ns, total - previous_other, -1, _KNOWN_CATEGORIES)
                else:
                    other_change, unknown_change = _without_moves(
                        other - previous_other, unknown - previous_unknown
                    )
                    # Releases first: bytes moving between categories at one instant never raise the peak.
                    changes = (
                        (weights - previous_weights, WEIGHTS),
                        (other_change, OTHER),
                        (unknown_change, -1),
                    )
                    for change, category in sorted(changes):
                        if change:
                            self._event(
                                ts_ns, change, category, _coalesced_code(category, change, columns, previous)
                            )
                    self._settle_row(ts_ns, columns)
                previous = columns
                previous_weights, previous_other, previous_unknown = weights, other, unknown
            return "coalesced"
        self._flush_head()
        return "raw"


def _coalesced_code(category: int, change: int, columns: list[int], previous: list[int]) -> int:
    """torch's index for a coalesced event: the other known categories' change takes the one whose column
    changed most in its direction (the row's moves settle the rest)."""
    if category == WEIGHTS:
        return _PARAMETER
    if category != OTHER:
        return _KNOWN_CATEGORIES
    steps = [
        (now - before) * (1 if change > 0 else -1) for now, before in zip(columns, previous, strict=True)
    ]
    return max(range(_PARAMETER + 1, _KNOWN_CATEGORIES), key=lambda code: steps[code])


def _without_moves(other: int, unknown: int) -> tuple[int, int]:
    """A known category's and the unknown column's changes at one instant, less the bytes that moved from
    one to the other: a version bump that torch categorises anew (-n in one column, +n in the other), which
    the raw form's reading drops, keeping the bytes where they were created (not a free and an allocation)."""
    if other * unknown >= 0:
        return other, unknown
    moved = min(abs(other), abs(unknown))
    return other - moved * (1 if other > 0 else -1), unknown - moved * (1 if unknown > 0 else -1)


def _placed_moves(
    moves: list[tuple[int, int, int, int, int]], ts_ns: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """The moves as `DeviceEvents.torch_moves` rows, placed among the events sorted by time (`ts_ns`, by the
    stable `order`): a move goes after the events of earlier times and those of its time read before it."""
    placed = np.zeros((len(moves), 5), dtype=np.int64)
    for row, (ts, events_before, nbytes, source, target) in enumerate(moves):
        left = int(np.searchsorted(ts_ns, ts, "left"))
        right = int(np.searchsorted(ts_ns, ts, "right"))
        position = left + int(np.searchsorted(order[left:right], events_before))  # ascending: a stable sort
        same_instant = int(position > 0 and int(ts_ns[position - 1]) == ts)
        placed[row] = (position, nbytes, source, target, same_instant)
    return placed


def _is_coalesced(head: list[Any]) -> bool:
    return (
        len(head) == 2
        and all(isinstance(part, list) for part in head)
        and bool(head[1])
        and isinstance(head[1][0], list)
    )


def read_memory_timeline(
    path: str | os.PathLike[str], progress: ProgressFn | None = None, device: str = UNKNOWN_DEVICE
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
    delta = np.frombuffer(collector.delta, dtype=np.int64)[order]
    if len(delta) and int(np.cumsum(delta).min()) + collector.baseline < 0:
        lowest = int(np.cumsum(delta).min()) + collector.baseline
        raise KvtraceError(
            f"{name}: memory timeline whose allocated bytes go below zero (to {lowest}): "
            "not a real timeline (damaged or made up)"
        )
    integral = bool(np.all(ts_ns % 1000 == 0))
    source = MemorySource(kind="memory_timeline", path=name)
    source.devices.append(
        DeviceEvents(
            device=device,
            ts_us=ts_ns // 1000 if integral else ts_ns / 1000.0,
            addr=np.full(len(ts_ns), -1, dtype=np.int64),
            delta_bytes=delta,
            stated_category=np.frombuffer(collector.category, dtype=np.int8)[order],
            torch_category=np.frombuffer(collector.torch, dtype=np.int8)[order]
            if collector.has_torch
            else None,
            torch_moves=_placed_moves(collector.moves, ts_ns, order) if collector.has_torch else None,
            torch_baseline=dict(enumerate(collector.torch_baseline)) if collector.has_torch else None,
            baseline_bytes=int(collector.baseline),
            baseline_categories={
                WEIGHTS: collector.baseline_weights,
                OTHER: collector.baseline - collector.baseline_weights,
            },
        )
    )
    source.meta.update(
        {
            "format": f"memory_timeline_{form}",
            "device_assumed": device,
            "version_bumps": collector.bump_rows >> 1,
            "input_notes": [
                "a memory timeline does not say which device it describes (torch writes the one asked for, "
                f"by default cuda:0 where CUDA is available and the CPU elsewhere): shown as {device}"
            ],
        }
    )
    return source
