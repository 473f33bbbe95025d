"""The level before a run's first traced event (analyzers/readers/run_dir.py `held_before_trace`): the
weights listed at the start, and what else the trace frees without having seen it allocated, each once.

A CPU trace shows the free of a block allocated before it began when an earlier profiling session in the
same process left the block's size with torch's reporter (a notebook, a test session, a loop of runs):
such frees of the listed weights are the weights' own, not more memory besides them."""

from __future__ import annotations

import numpy as np

from analyzers.model import KV, WEIGHTS, DeviceEvents
from analyzers.readers.run_baseline import held_before_trace
from analyzers.timeline import device_timeline

WEIGHT_A, WEIGHT_B, OTHER_ADDR, NEW_ADDR = 0x1000, 0x2000, 0x3000, 0x4000


def _cpu_trace(rows: list[tuple[int, int]]) -> DeviceEvents:
    """(address, bytes) events, one µs apart; the baseline as the trace reader leaves it (the least level
    that keeps the running sum at or above zero)."""
    delta = np.array([r[1] for r in rows], dtype=np.int64)
    dev = DeviceEvents(
        "cpu", np.arange(len(rows), dtype=np.float64), np.array([r[0] for r in rows], dtype=np.int64), delta
    )
    dev.baseline_bytes = max(0, -int(np.cumsum(delta).min()))
    return dev


def test_frees_of_the_listed_weights_and_of_other_blocks_each_count_once() -> None:
    # GIVEN weights a (400 B) and b (40 B) listed at the start; the trace frees a (its own size) and a
    # block of 1,000 B it never saw allocated, then allocates 200 B that stay
    listed = {WEIGHT_A: 400, WEIGHT_B: 40}
    dev = _cpu_trace([(WEIGHT_A, -400), (OTHER_ADDR, -1000), (NEW_ADDR, 200)])
    # WHEN the level before the trace is settled
    held_before_trace(dev, 440, 0, listed)
    # THEN it is the weights and the other block, once each (not the weights twice, nor 1,400 B as weights)
    assert dev.baseline_bytes == 440 + 1000
    assert dev.baseline_categories == {KV: 0, WEIGHTS: 440}
    timeline = device_timeline(dev, WEIGHTS)
    assert int(timeline.allocated[-1]) == 440 + 1000 - 400 - 1000 + 200
    assert int(timeline.by_category["weights"][0]) == 440


def test_a_free_of_another_size_at_a_weights_address_is_not_the_weights() -> None:
    # GIVEN a free of 128,000 B at weight a's address (a block whose size an earlier session left there)
    dev = _cpu_trace([(WEIGHT_A, -128_000)])
    held_before_trace(dev, 440, 0, {WEIGHT_A: 400, WEIGHT_B: 40})
    # THEN that block is held besides the weights
    assert dev.baseline_bytes == 440 + 128_000
    assert dev.baseline_categories == {KV: 0, WEIGHTS: 440}
