"""A trace whose clock base Kineto set a few ms late, on a host that also descheduled the process between
a KV storage's allocation and the update that logs it, keeps its KV figures: the recorder's step ranges put
the trace on the run's clock.

CI found it (`test_plan_prefill_activations.py`'s eager test: 192,044 B more "other" than planned, one layer's
prompt K counted as other). On a loaded host a storage's `cat` took 8-13 ms, so most storages were logged
tens of ms after their allocation, beyond the reach by which `readers.trace_clock` lets allocations place a
trace; the two the log saw at once (layer 0's prefill K and V) fell past the join's tolerance under a base
2.15 ms late, and nothing moved the trace. Each step's range opens in the trace just after the recorder
reads the run's clock for the step's start (its sample's `started_ns`): the ranges measure the lead.

A cache layer that works on after storing stands in for the descheduled process here: it holds each update
but layer 0's prefill back, as the load held the `cat`s: each by its own time (`uneven`, 4 ms more each
update: no two updates' storages agree on a shift), or all by one (`even`: they agree on a wrong one).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

import kvtrace
from kvtrace.llama import build_model, cache_keyword
from tests.cli_json import report_json
from tests.late_trace import TOLERANCE_US, late_copy, own_lags_us
from tests.tiny import tiny_size

LAYERS, KV_HEADS, HEAD_DIM, FP32 = 3, 2, 16, 4
BATCH, PROMPT, NEW = 1, 64, 3
EVEN_S = 0.03


class HeldLayer(DynamicLayer):
    """A dynamic layer whose update returns `held(n)` s after storing (n: the cache's held updates so far),
    unless it is layer 0's first."""

    def __init__(self, index: int, held: Callable[[int], float], count: list[int]) -> None:
        super().__init__()
        self.index, self.held, self.count = index, held, count

    def update(self, *args: Any, **kwargs: Any) -> Any:
        first = not self.is_initialized
        stored = super().update(*args, **kwargs)
        if not (self.index == 0 and first):
            time.sleep(self.held(self.count[0]))
            self.count[0] += 1
        return stored


def _record(run: Path, held: Callable[[int], float]) -> Path:
    """A greedy generate() of NEW tokens on a 64-token prompt, its updates held back but layer 0's first."""
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    cache = DynamicCache()
    count = [0]
    Cache.__init__(cache, layers=[HeldLayer(i, held, count) for i in range(LAYERS)])
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model):
        model.generate(
            ids,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            **{cache_keyword(): cache},
        )
    return run


@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("uneven") / "run", lambda n: 0.004 * (n + 1))


@pytest.fixture(scope="module")
def even_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("even") / "run", lambda n: EVEN_S)


def test_a_late_trace_clock_on_a_loaded_host_keeps_every_kv_storage(
    uneven_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run, whose KV storages the log saw 4 ms or more after their allocation, each update's by its
    # own time, but layer 0's prefill K and V, seen at once
    held_run = uneven_run
    lags = sorted(own_lags_us(held_run))
    storages = LAYERS * 2 * (1 + NEW - 1)  # the prefill's, then one more per layer, K and V, each decode
    assert len(lags) == storages and lags[1] < TOLERANCE_US / 4 and lags[2] > 4000
    as_read = report_json(held_run, capsys)
    kv_end = LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32 * BATCH * (PROMPT + NEW - 1)
    assert as_read["kv"]["final_bytes"] == kv_end
    # AND copies whose trace's base was set late: from the lead that puts layer 0's prefill storages past the
    # join's tolerance after their sighting (where the KV was lost) to 8 ms, every 250 µs
    first = int(TOLERANCE_US - lags[0]) + 50
    leads = range(first, 8001, 250)
    # WHEN each is reported
    got = {}
    for lead_us in leads:
        copy = late_copy(held_run, tmp_path / f"late{lead_us}", lead_us)
        report = report_json(copy, capsys)
        got[lead_us] = (report["categories_at_peak"], report["notes"])
        shutil.rmtree(copy)
    # THEN every figure at the peak is the run's as read: the trace put back on the run's clock, silently
    # (a base a few ms off, as a loaded host's Kineto sets it)
    assert got == dict.fromkeys(leads, (as_read["categories_at_peak"], as_read["notes"]))
    assert as_read["categories_at_peak"]["kv"] > 0


def test_a_trace_on_a_loaded_host_whose_base_is_right_stays_where_it_is(
    even_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose KV storages the log saw EVEN_S after their allocation or a little more (but layer 0's
    # first two), so that most agree on a shift of the trace by about EVEN_S (on a quiet host, within 2 ms
    # of each other), though its base is as Kineto set it
    lags = sorted(own_lags_us(even_run))
    assert lags[1] < TOLERANCE_US / 4 and lags[2] > EVEN_S * 1e6
    # WHEN it is reported
    report = report_json(even_run, capsys)
    # THEN its trace is read on its own clock, without a note (the storages moved it 30 ms, and the note
    # blamed its base), and every KV storage found its allocation
    assert report["notes"] == []
    kv_end = LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32 * BATCH * (PROMPT + NEW - 1)
    assert report["kv"]["final_bytes"] == kv_end
