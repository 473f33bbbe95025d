"""A Chrome trace's report in bounded memory: events are folded chunk by chunk, never kept.

What `report` needs of a trace's memory events is small: per device the counts, the running allocated
bytes and where they peak (with the reserved bytes there), the final level, and a timeline to draw. A
raw Kineto trace has no KV log and no stacks, so every event is "other" and nothing else needs the events.
So the reader hands each device's events over in file-order chunks (`read_chrome_trace(sink_for=...)`)
and `DeviceFold` keeps running figures plus a peak-exact downsampled timeline: memory stays flat from
thousands to tens of millions of events. The figures are those of `summarize` on the full columns; the
rules are the same (`analyzers.timeline.device_timeline`, `analyzers.summary._device_summary`):

* with the allocator's `Total Allocated` on every event, allocated = that total, raised by what it cannot
  know (never negative at the start); else the running sum of `Bytes` over the smallest baseline that
  keeps it >= 0;
* the peak is the highest level, the level before the first event included.

Events out of time order (Kineto writes them in order) would need a sort: `Unsorted` is raised, and the
caller reads the file into columns instead. So are events that `readers.impossible_events` may rule out
(a free larger than every earlier total, a span past `FAR_US`): dropping one changes the figures before it,
already folded. Runs (KV log join) and snapshots keep the columns path.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from analyzers.model import MemorySource
from analyzers.readers.impossible_events import FAR_US, oversized_frees
from analyzers.readers.kineto_scan import as_int64
from analyzers.readers.sources import ProgressFn
from analyzers.summary import DeviceSummary, Report, summarize
from analyzers.timeline import PAGE_POINTS, DeviceTimeline, run_starts, sorted_unique

__all__ = ["DeviceFold", "PeakExactSampler", "Unsorted", "stream_report"]


class Unsorted(Exception):
    """A device's events are not in time order, or hold one that `impossible_events` may rule out (judged
    on the whole device): summarize from sorted columns instead."""


def _extremes(index: np.ndarray, values: np.ndarray, bucket: int) -> np.ndarray:
    """Positions of the first, last, first highest and first lowest point of each bucket of `bucket`
    consecutive event indices (`index` ascending)."""
    ids = index // bucket
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    ends = np.concatenate((starts[1:], [len(ids)]))
    segment = np.repeat(np.arange(len(starts)), ends - starts)
    keep = [starts, ends - 1]
    for reduce in (np.maximum, np.minimum):
        extreme = reduce.reduceat(values, starts)
        hits = np.flatnonzero(values == extreme[segment])
        keep.append(hits[run_starts(segment[hits])])  # `segment[hits]` ascends with `hits`
    return sorted_unique(np.concatenate(keep))


class PeakExactSampler:
    """About `max_points` points of a series fed in chunks (from half to twice as many), keeping per bucket
    its first, last, highest and lowest point: the drawn curve reaches exactly the heights of the full one.
    Buckets double in size when the points outgrow twice the limit; the extremes of two buckets are among
    theirs, so it stays exact."""

    def __init__(self, max_points: int = 4000) -> None:
        self.max_points = max_points
        self.bucket = 1
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.size = 0

    def add(self, start: int, *columns: np.ndarray) -> None:
        """`columns[0]` is the series; the others (time, reserved...) ride along."""
        index = np.arange(start, start + len(columns[0]), dtype=np.int64)
        self._append((index, *columns))
        if self.size > 2 * self.max_points:
            self._compact()

    def _append(self, part: tuple[np.ndarray, ...]) -> None:
        keep = _extremes(part[0], part[1], self.bucket)
        self.parts.append(tuple(as_int64(column[keep]) for column in part))  # digits kept as text: now
        self.size += len(keep)

    def _compact(self) -> None:
        merged = tuple(np.concatenate(columns) for columns in zip(*self.parts, strict=True))
        self.parts, self.size = [], 0
        while True:
            self.bucket *= 2
            keep = _extremes(merged[0], merged[1], self.bucket)
            if len(keep) <= self.max_points:
                break
        self._append(tuple(column[keep] for column in merged))

    def points(self) -> tuple[np.ndarray, ...]:
        if not self.parts:
            return ()
        return tuple(np.concatenate(columns) for columns in zip(*self.parts, strict=True))


class DeviceFold:
    """Running figures of one device's memory events (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.count = self.allocs = self.frees = self.alloc_bytes = 0
        self.running = 0  # sum of Bytes so far
        self.lowest = 0  # lowest running sum after an event
        self.all_allocated = self.all_reserved = True
        self.negative_total = False
        self.any_reserved = False  # some event has nonzero reserved bytes (else there is no reserved series)
        self.first: tuple[float, int, int] | None = None  # (ts, Bytes, Total Allocated) of the first event
        self.last_ts = -np.inf
        self.last_running = self.last_allocated = 0
        self.most_allocated = -1  # the largest 'Total Allocated' so far (-1: none known)
        # A sampler holds between about half and twice its points: twice the page's leaves the page's own
        # cut (analyzers.timeline.timeline_indices) at least the points it draws, not a fifth of them
        self.by_sum = PeakExactSampler(2 * PAGE_POINTS)  # running sum, ts, reserved
        self.by_total = PeakExactSampler(2 * PAGE_POINTS)  # allocator's total, ts, reserved

    def add(self, chunk: tuple[np.ndarray, ...], allocated_known: bool, reserved_known: bool) -> None:
        ts, _addr, delta, allocated, reserved = chunk
        n = len(ts)
        if n == 0:
            return
        if ts[0] < self.last_ts or (n > 1 and bool(np.any(ts[1:] < ts[:-1]))):
            raise Unsorted(self.device)
        if self.first is None:
            self.first = (float(ts[0]), int(delta[0]), int(allocated[0]))
        oversized, self.most_allocated = oversized_frees(delta, allocated, self.most_allocated)
        if float(ts[-1]) - self.first[0] > FAR_US or bool(oversized.any()):
            raise Unsorted(self.device)
        running = np.cumsum(delta) + self.running
        self.by_sum.add(self.count, running, ts, reserved)
        self.all_allocated = self.all_allocated and allocated_known
        if self.all_allocated and int(allocated.min()) < 0:  # see chrome_trace.NEGATIVE_TOTAL_NOTE
            self.all_allocated, self.negative_total = False, True
        self.all_reserved = self.all_reserved and reserved_known
        if not self.any_reserved:
            self.any_reserved = bool(np.any(reserved != (b"0" if reserved.dtype.kind == "S" else 0)))
        if self.all_allocated:
            self.by_total.add(self.count, allocated, ts, reserved)
        self.lowest = min(self.lowest, int(running.min()))
        self.running = int(running[-1])
        self.last_allocated = int(allocated[-1])
        self.last_ts = float(ts[-1])
        self.count += n
        positive = delta > 0
        self.allocs += int(np.count_nonzero(positive))
        self.frees += int(np.count_nonzero(delta < 0))
        self.alloc_bytes += int(delta[positive].sum())

    def summary(
        self, capacity: int | None, base_ns: Any, integral: bool
    ) -> tuple[DeviceSummary, DeviceTimeline, int]:
        """(summary, downsampled timeline, baseline bytes), as `summarize` gives them from columns."""
        from analyzers.readers.chrome_trace import timestamps

        assert self.first is not None
        with_total = self.all_allocated and self.count > 0
        if with_total:
            implied = self.first[2] - self.first[1]
            baseline = max(0, implied)
            shift = baseline - implied
            index, series, raw_ts, reserved = self.by_total.points()
            final = self.last_allocated + shift
        else:
            baseline = max(0, -self.lowest)
            shift = baseline
            index, series, raw_ts, reserved = self.by_sum.points()
            final = self.running + shift
        allocated = series + shift
        peak_at = int(np.argmax(allocated))
        peak = int(allocated[peak_at])
        ts_us = timestamps(raw_ts, base_ns, integral)
        peak_time = float(ts_us[peak_at])
        reserved_series = reserved if self.all_reserved and self.any_reserved else None
        reserved_at_peak = int(reserved_series[peak_at]) if reserved_series is not None else None
        before_trace = baseline > peak
        if before_trace:  # the level before the first event
            peak, peak_time = baseline, float(ts_us[0])
            reserved_at_peak = int(reserved_series[0]) if reserved_series is not None else None
        zeros = np.zeros(len(index), dtype=np.int64)
        # The level before the first event is the baseline (the weights a trace begins holding), as
        # `device_timeline` has it: a chart starting from 0 would draw them freed and allocated again
        timeline = DeviceTimeline(
            self.device,
            ts_us,
            allocated,
            reserved_series,
            {"kv": zeros, "weights": zeros, "other": allocated},
            capacity,
            start_allocated=baseline,
            start_by_category={"kv": 0, "weights": 0, "other": baseline},
        )
        summary = DeviceSummary(
            device=self.device,
            alloc_events=self.allocs,
            free_events=self.frees,
            peak_allocated_bytes=peak,
            peak_time=peak_time,
            final_allocated_bytes=final,
            capacity_bytes=capacity,
            categories_at_peak={"kv": 0, "weights": 0, "other": peak},
            reserved_at_peak=reserved_at_peak,
            fragmentation_at_peak_bytes=(
                reserved_at_peak - peak if reserved_at_peak is not None and not before_trace else None
            ),
            bytes_by_method={"none": self.alloc_bytes} if self.alloc_bytes else {},
            peak_before_trace=before_trace,
        )
        return summary, timeline, baseline


def stream_report(
    path: str | os.PathLike[str], progress: ProgressFn | None = None, input_notes: list[str] | None = None
) -> tuple[MemorySource, Report] | None:
    """The report of a Chrome trace file without keeping its events; None when they need sorting."""
    from analyzers.readers.chrome_trace import (
        NEGATIVE_TOTAL_NOTE,
        counter_start_note,
        no_total_note,
        read_chrome_trace,
    )

    folds: dict[str, DeviceFold] = {}

    def sink_for(device: str) -> Any:
        return folds.setdefault(device, DeviceFold(device)).add

    try:
        source = read_chrome_trace(path, progress, sink_for=sink_for)
    except Unsorted:
        return None
    if source.meta.get("python_stacks") and source.devices:
        return None  # stacks attribute each event (KV, weights): the columns path keeps them
    devices: list[DeviceSummary] = []
    timelines: list[DeviceTimeline] = []
    base_ns, integral = source.meta.get("baseTimeNanoseconds"), bool(source.meta.get("ts_integral"))
    for dev in source.devices:
        fold = folds.get(dev.device)
        if fold is None or fold.count == 0:
            return None  # a device without events: rare, and the columns path handles it
        summary, timeline, baseline = fold.summary(dev.capacity_bytes, base_ns, integral)
        if fold.negative_total:
            source.meta.setdefault("input_notes", []).append(NEGATIVE_TOTAL_NOTE.format(device=dev.device))
        missing = source.meta.get("without_totals", {}).get(dev.device)
        if missing is not None:
            source.meta.setdefault("input_notes", []).append(no_total_note(dev.device, baseline, missing))
        counter_start_note(source, dev.device, baseline)
        dev.baseline_bytes = baseline
        devices.append(summary)
        timelines.append(timeline)
    source.meta["streamed"] = True
    if input_notes:
        source.meta.setdefault("input_notes", []).extend(input_notes)
    return source, summarize(source, precomputed=(devices, timelines))
