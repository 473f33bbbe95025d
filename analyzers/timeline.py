"""Live bytes per category over time, and downsampling that keeps every peak exact.

A timeline of ten million events cannot be drawn point by point; averaging would lower the peaks the
user came to see. `downsample_indices` keeps, per bucket, the first, lowest, highest and last point, so
the drawn curve reaches exactly the same heights as the full one. Series drawn at shared x (a device's
categories, stacked) are cut by `downsample_together`, which keeps each series' own extremes, not only
those of the one that chose the points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from analyzers.model import CATEGORY_NAMES, KV, OTHER, WEIGHTS, DeviceEvents

# The points the HTML report draws of a device's timeline (per series drawn at shared x)
PAGE_POINTS = 20_000


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique` of a 1-D array, without it: numpy 2's `unique` imports `numpy.ma` (11 ms, a twentieth of
    a small report's start-up) to ask whether the array is masked."""
    ordered = np.sort(values)
    if ordered.shape[0] < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def run_starts(ordered: np.ndarray) -> np.ndarray:
    """Position of the first element of each run of equal values in a sorted 1-D array (what
    `np.unique(ordered, return_index=True)[1]` gives)."""
    if ordered.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))


@dataclass
class DeviceTimeline:
    """Columns aligned with the device's events: allocated and per-category live bytes after each event."""

    device: str
    ts_us: np.ndarray
    allocated: np.ndarray
    reserved: np.ndarray | None
    by_category: dict[str, np.ndarray]
    capacity_bytes: int | None
    # The level before the first event, at the first event's time: the peak where a trace begins by freeing
    # blocks it never allocated (a snapshot's), so a chart must start from it.
    start_allocated: int = 0
    start_by_category: dict[str, int] = field(default_factory=dict)


def device_timeline(dev: DeviceEvents, baseline_category: int = OTHER) -> DeviceTimeline:
    """`baseline_category`: what the bytes live before the first event are (weights, for kvtrace runs)."""
    delta = dev.delta_bytes.astype(np.int64)
    implied = 0
    if dev.total_allocated is not None and len(dev.total_allocated) == len(delta) and len(delta):
        # The allocator's own running total already counts what was live before the first event; add only
        # the part of the baseline it cannot know (weights loaded before a kvtrace profiler started).
        implied = int(dev.total_allocated[0]) - int(delta[0])
        allocated = dev.total_allocated.astype(np.int64) + (dev.baseline_bytes - implied)
    else:
        allocated = np.cumsum(delta) + dev.baseline_bytes
    category = dev.category if dev.category is not None else np.zeros(len(delta), dtype=np.int8)
    by_category: dict[str, np.ndarray] = {}
    held: dict[str, int] = {}  # each category's bytes before the first event
    for code in (KV, WEIGHTS):
        base = 0
        if dev.baseline_categories is not None:
            base = dev.baseline_categories.get(code, 0)
        elif code == baseline_category:
            # What the trace's own total counted before its first event stays "other": only the part
            # the reader added (e.g. a run's weights table) belongs to the baseline category.
            base = max(dev.baseline_bytes - implied if baseline_category != OTHER else dev.baseline_bytes, 0)
        by_category[CATEGORY_NAMES[code]] = np.cumsum(np.where(category == code, delta, 0)) + base
        held[CATEGORY_NAMES[code]] = int(base)
    by_category["other"] = allocated - by_category["kv"] - by_category["weights"]
    reserved = None
    if dev.total_reserved is not None and len(dev.total_reserved) == len(delta) and dev.total_reserved.any():
        reserved = dev.total_reserved.astype(np.int64)
    # No events (a snapshot whose trace kept none): what was held is all there is to draw
    held["other"] = dev.baseline_bytes - held["kv"] - held["weights"]
    start_allocated, start_by_category = dev.baseline_bytes, held
    if len(delta):
        first = int(delta[0])
        start_allocated = int(allocated[0]) - first
        start_by_category = {name: int(series[0]) for name, series in by_category.items()}
        start_by_category[CATEGORY_NAMES[int(category[0])]] -= first
    return DeviceTimeline(
        dev.device,
        dev.ts_us,
        allocated,
        reserved,
        by_category,
        dev.capacity_bytes,
        start_allocated,
        start_by_category,
    )


def downsample_indices(values: np.ndarray, max_points: int, times: np.ndarray | None = None) -> np.ndarray:
    """Indices of at most ~max_points points whose max and min equal the full series' per bucket.

    Each bucket keeps its first and last point too. With `times` (sorted), half the buckets are cut by
    time: a step line holds each value until the next point, so the last value before a long pause (the
    KV held between generate()'s end and the block's) must be a point, not the bucket's transient max.
    The buckets are as many as fill the points (`_filled`): a bucket whose extremes are its ends (a
    growing KV cache) keeps 2 points, not 4."""
    n = int(values.shape[0])
    if n <= max_points:
        return np.arange(n)
    return _filled(
        lambda buckets: _bucket_extremes(values, buckets, times), max(1, max_points // 4), max_points
    )


def downsample_together(
    series: Sequence[np.ndarray], max_points: int, times: np.ndarray | None = None
) -> np.ndarray:
    """Indices, shared by several aligned series, at which each keeps its own per-bucket max and min.

    The union of every series' bucket extremes, since the indices one series picks miss another's peak
    (the KV bytes peak where allocated does not, when other memory was freed in between). All cut the
    same buckets, whose first and last points they share: a bucket keeps at most 2 + 2 per series, but
    most keep fewer (a category flat in it, two series peaking at one event), so the buckets are as many
    as fill `max_points` (`_filled`), not only as many as that worst case allows."""
    n = int(series[0].shape[0]) if series else 0
    if n <= max_points:
        return np.arange(n)

    def union(buckets: int) -> np.ndarray:
        return sorted_unique(np.concatenate([_bucket_extremes(values, buckets, times) for values in series]))

    return _filled(union, max(1, max_points // (2 + 2 * len(series))), max_points)


# Passes `_filled` may make over the series beyond the first; each costs one pass (0.1 s on 1M events x 5)
_FILL_PASSES = 4
# Close enough: a fill past this share of the points is kept as it is
_FILL_SHARE = 0.95


def _filled(keep_for: Callable[[int], np.ndarray], buckets: int, max_points: int) -> np.ndarray:
    """`keep_for(buckets)` for about the most buckets whose kept points stay within `max_points`.

    `buckets` is the count the worst case allows (every bucket keeping all its extremes apart), which alone
    leaves a real series at a half or a quarter of its points. The points grow about in proportion to the
    buckets, so a few guesses, each between the most buckets that fitted and the fewest that did not, come
    close. Any bucket count keeps each bucket's max and min: every guess is as peak-exact as the first."""
    best = keep_for(buckets)
    fits, over = buckets, None
    fit_points, over_points = len(best), 0
    for _ in range(_FILL_PASSES):
        if fit_points >= _FILL_SHARE * max_points or fit_points == 0:
            break
        if over is None:  # in proportion, aiming a little under
            guess = int(fits * _FILL_SHARE * max_points / fit_points)
        else:  # between the two, where the line through them meets the points
            slope = (over_points - fit_points) / (over - fits)
            guess = fits + int((max_points - fit_points) / slope) if slope > 0 else (fits + over) // 2
            guess = min(guess, over - 1)
        if guess <= fits:
            break
        kept = keep_for(guess)
        if len(kept) <= max_points:
            best, fits, fit_points = kept, guess, len(kept)
        else:
            over, over_points = guess, len(kept)
    return best


def _bucket_extremes(values: np.ndarray, buckets: int, times: np.ndarray | None) -> np.ndarray:
    """First, last, first max and first min of each of about `buckets` buckets (with `times`, half of
    them cut by event count and half by time; see `downsample_indices`)."""
    n = int(values.shape[0])
    buckets = min(buckets, n)  # distinct edges: no bucket left empty
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    if times is not None and n and times[-1] > times[0]:
        half = max(1, buckets // 2)
        by_time = np.searchsorted(times, np.linspace(times[0], times[-1], half + 1)[1:-1], side="left")
        edges = sorted_unique(np.concatenate([edges[::2], by_time, [n]]).astype(np.int64))
    starts, ends = edges[:-1], edges[1:]
    keep = [starts, ends - 1]
    # Per-bucket argmax/argmin, vectorised with reduceat over the bucket starts.
    valid = ends > starts
    starts, ends = starts[valid], ends[valid]
    maxima = np.maximum.reduceat(values, starts)
    minima = np.minimum.reduceat(values, starts)
    bucket_of = np.repeat(np.arange(starts.shape[0]), ends - starts)
    is_max = values == maxima[bucket_of]
    is_min = values == minima[bucket_of]
    # First position of the max/min in each bucket.
    max_pos = np.full(starts.shape[0], -1, dtype=np.int64)
    min_pos = np.full(starts.shape[0], -1, dtype=np.int64)
    idx = np.arange(n)
    rev = slice(None, None, -1)
    max_pos[bucket_of[is_max][rev]] = idx[is_max][rev]
    min_pos[bucket_of[is_min][rev]] = idx[is_min][rev]
    keep += [max_pos, min_pos]
    return sorted_unique(np.concatenate(keep))


def timeline_indices(timeline: DeviceTimeline, max_points: int) -> np.ndarray:
    """`downsample_together` of what a chart draws of one device at the same x: allocated, each category
    and reserved, cut with the events' times."""
    series = [timeline.allocated, *timeline.by_category.values()]
    if timeline.reserved is not None:
        series.append(timeline.reserved)
    return downsample_together(series, max_points, timeline.ts_us)
