"""Downsampling keeps every peak exact, whatever the input size."""

from __future__ import annotations

import numpy as np
import pytest

from analyzers.model import KV, WEIGHTS, DeviceEvents
from analyzers.timeline import device_timeline, downsample_indices, downsample_together


@pytest.mark.parametrize("n", [10, 4_001, 1_000_003])
def test_downsample_keeps_extremes_per_bucket(n: int) -> None:
    values = np.random.default_rng(n).integers(-(10**9), 10**9, n)
    keep = downsample_indices(values, 4000)
    assert keep.shape[0] <= 4004
    assert values[keep].max() == values.max()
    assert values[keep].min() == values.min()
    assert np.all(np.diff(keep) > 0)


def test_categories_and_baseline() -> None:
    dev = DeviceEvents(
        device="cpu",
        ts_us=np.array([1.0, 2.0, 3.0, 4.0]),
        addr=np.array([1, 2, 1, 3]),
        delta_bytes=np.array([100, 50, -100, 7]),
        category=np.array([KV, 0, KV, WEIGHTS], dtype=np.int8),
        baseline_bytes=1000,
    )
    tl = device_timeline(dev, baseline_category=WEIGHTS)
    assert tl.allocated.tolist() == [1100, 1150, 1050, 1057]
    assert tl.by_category["kv"].tolist() == [100, 100, 0, 0]
    assert tl.by_category["weights"].tolist() == [1000, 1000, 1000, 1007]
    assert tl.by_category["other"].tolist() == [0, 50, 50, 50]


def test_the_value_held_before_a_pause_is_kept_for_a_step_line() -> None:
    # GIVEN a KV series whose every update briefly doubles (the copy beside the old storage), then a long
    # pause (generate() is over, the block is not) before the teardown frees everything
    rng = np.random.default_rng(0)
    n = 20_000
    values = np.cumsum(rng.integers(0, 3, n)).astype(np.int64)
    values[1::2] *= 2  # transient maxima
    times = np.arange(n, dtype=np.int64)
    times[-1] = 10 * n  # the pause
    values[-1] = 0
    # WHEN cut to 1,000 points with the times
    keep = downsample_indices(values, 1000, times)
    # THEN the point before the pause holds the level of the last update, not a transient maximum,
    # and every bucket's extremes are still there
    assert keep[-2] == n - 2 and len(keep) <= 1100
    assert values[keep].max() == values.max() and values[keep].min() == values.min()


def test_downsampling_together_keeps_every_series_extremes_within_the_points() -> None:
    # GIVEN four aligned series of a million points, each with its own peaks and lows
    rng = np.random.default_rng(3)
    series = [np.cumsum(rng.integers(-1000, 1000, 1_000_003)) for _ in range(4)]
    times = np.cumsum(rng.integers(1, 50, 1_000_003))
    # WHEN cut together to 20,000 points
    keep = downsample_together(series, 20_000, times)
    # THEN the points are about that many, in order, and every series keeps its own max and min
    assert len(keep) <= 20_000 + 8 and np.all(np.diff(keep) > 0)
    for values in series:
        assert values[keep].max() == values.max() and values[keep].min() == values.min()
