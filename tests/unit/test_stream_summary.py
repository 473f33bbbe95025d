"""The streamed report (events folded while reading, not kept) equals the report from full columns, and
its downsampled timeline keeps the exact extremes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzers.render.json import report_to_json
from analyzers.report import build_report
from analyzers.stream_summary import PeakExactSampler

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "real_traces" / "chrome"
TRACES = sorted(REAL.glob("*.json.gz")) + sorted(ROOT.glob("sample_traces/*/profiler/*.pt.trace.json.gz"))


def _both(path: Path) -> tuple[dict[str, Any], dict[str, Any], bool]:
    streamed_source, streamed = build_report(path, keep_events=False)
    _, full = build_report(path)
    return report_to_json(streamed), report_to_json(full), bool(streamed_source.meta.get("streamed"))


@pytest.mark.parametrize("path", TRACES, ids=[p.name[:40] for p in TRACES])
def test_streamed_report_equals_the_columns_report_on_real_traces(path: Path) -> None:
    streamed, full, was_streamed = _both(path)
    assert was_streamed
    assert streamed == full


# and the H200 run's trace, whose GPU began holding the weights
STARTED = [*TRACES, *sorted(ROOT.glob("sample_traces/h200/*/profiler/*.pt.trace.json.gz"))]


@pytest.mark.parametrize("path", STARTED, ids=[p.name[:40] for p in STARTED])
def test_a_streamed_timeline_starts_from_the_level_the_columns_one_does(path: Path) -> None:
    # The level before the first event is what a chart draws first: the H200 trace began holding 15 GiB
    # of weights, which the streamed timeline put at 0 B
    streamed_source, streamed = build_report(path, keep_events=False)
    _, full = build_report(path)
    assert streamed_source.meta.get("streamed")
    starts = [(tl.device, tl.start_allocated, tl.start_by_category) for tl in streamed.timelines]
    assert starts == [(tl.device, tl.start_allocated, tl.start_by_category) for tl in full.timelines]


def test_sampler_keeps_exact_extremes_in_bounded_points() -> None:
    rng = np.random.default_rng(3)
    series = np.cumsum(rng.integers(-1000, 1000, 200_000))
    sampler = PeakExactSampler(max_points=500)
    start = 0
    while start < len(series):
        size = int(rng.integers(1, 7000))
        chunk = series[start : start + size]
        sampler.add(start, chunk, chunk * 2)
        start += len(chunk)
    index, values, ridden = sampler.points()
    assert len(index) <= 1000
    assert values.max() == series.max() and values.min() == series.min()
    assert int(index[np.argmax(values)]) == int(np.argmax(series))  # the first time it peaks
    assert index[0] == 0 and index[-1] == len(series) - 1
    np.testing.assert_array_equal(values, series[index])
    np.testing.assert_array_equal(ridden, 2 * series[index])


def _mem(ts: float, nbytes: int, dev: tuple[int, int], totals: tuple[int, int] | None) -> dict[str, Any]:
    args: dict[str, Any] = {"Device Type": dev[0], "Device Id": dev[1], "Bytes": nbytes, "Addr": 4096}
    if totals is not None:
        args["Total Allocated"], args["Total Reserved"] = totals
    return {"ph": "i", "s": "t", "name": "[memory]", "pid": 1, "tid": 1, "ts": ts, "args": args}


@pytest.mark.parametrize("case", ["totals", "no-totals", "two-devices", "unsorted", "reserved-once"])
def test_streamed_report_equals_the_columns_report_on_synthetic_traces(tmp_path: Path, case: str) -> None:
    rng = random.Random(5)
    events: list[dict[str, Any]] = []
    level = {0: 5000, 1: 0}
    for i in range(30_000):
        dev = (1, rng.randrange(2)) if case == "two-devices" else (1, 0)
        delta = rng.choice([1, -1]) * rng.randrange(1, 1 << 16)
        level[dev[1]] += delta
        reserved = 1 << 30 if case != "reserved-once" else (4096 if i == 12_345 else 0)
        totals = (level[dev[1]], reserved) if case != "no-totals" else None
        ts = i + (rng.random() * 50 if case == "unsorted" and i % 1000 == 0 else 0.0)
        events.append(_mem(ts, delta, dev, totals))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events, "baseTimeNanoseconds": 1_700_000_000_000_000_000}))
    streamed, full, was_streamed = _both(path)
    assert was_streamed == (case != "unsorted")
    assert streamed == full
