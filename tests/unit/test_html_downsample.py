"""The HTML report's "Memory by category" chart, downsampled: every series it draws reaches exactly its own
highest and lowest bytes, not only the allocated line that used to pick the points for all of them, and a
long trace fills the page's points rather than the half or quarter a worst-case bucket count left."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from analyzers.model import CATEGORY_NAMES, KV, OTHER, WEIGHTS, DeviceEvents, MemorySource
from analyzers.render.html import MAX_POINTS, report_to_html
from analyzers.report import build_report
from analyzers.summary import summarize
from analyzers.timeline import downsample_indices, timeline_indices
from kvtrace.cli import main
from tests.plotly_figures import page_figure

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _churn(events: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(category, signed bytes) of `events` allocations and frees spread over the three categories, each
    free at most what its category holds: KV, weights and other memory rising and falling independently."""
    rng = np.random.default_rng(seed)
    category = rng.choice(np.array([KV, WEIGHTS, OTHER], dtype=np.int8), events)
    size = rng.integers(1, 4096, events)
    free = rng.random(events) < 0.45
    held = {KV: 0, WEIGHTS: 0, OTHER: 0}
    delta = np.zeros(events, dtype=np.int64)
    for i in range(events):
        code, amount = int(category[i]), int(size[i])
        if free[i] and held[code] >= amount:
            amount = -amount
        held[code] += amount
        delta[i] = amount
    return category, delta


def test_each_category_drawn_keeps_its_own_peak_and_low() -> None:
    # GIVEN a trace of a device with three times more events than the chart draws
    events = 3 * MAX_POINTS
    category, delta = _churn(events, seed=7)
    device = DeviceEvents(
        device="cpu",
        ts_us=np.arange(events, dtype=np.float64) * 10.0,
        addr=np.full(events, -1, dtype=np.int64),
        delta_bytes=delta,
        category=category,
    )
    source = MemorySource(kind="chrome_trace", path="churn.json", devices=[device])
    # WHEN the HTML report draws it
    traces, layout = page_figure(report_to_html(source, summarize(source)), "kvtrace-timeline")
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    drawn = {t["name"]: np.asarray(t["y"]) * factor for t in traces if t.get("name")}
    assert len(drawn["kv"]) < events  # downsampled
    # THEN each category's line reaches its full series' max and min (the level before the trace, 0,
    # included), as does allocated, their sum; the figures from the events alone
    expected = {
        name: np.cumsum(np.where(category == code, delta, 0)) for code, name in enumerate(CATEGORY_NAMES)
    }
    expected["allocated"] = np.cumsum(delta)
    for name, full in expected.items():
        levels = np.concatenate([[0], full])
        assert (drawn[name].max(), drawn[name].min()) == (levels.max(), levels.min()), name


def test_a_downsampled_step_line_draws_each_peak_at_its_level_from_its_time() -> None:
    # GIVEN a trace of three times more events than the chart draws, one every 10 us
    events = 3 * MAX_POINTS
    category, delta = _churn(events, seed=11)
    ts_us = np.arange(events, dtype=np.float64) * 10.0
    device = DeviceEvents(
        device="cpu",
        ts_us=ts_us,
        addr=np.full(events, -1, dtype=np.int64),
        delta_bytes=delta,
        category=category,
    )
    source = MemorySource(kind="chrome_trace", path="churn.json", devices=[device])
    # WHEN the HTML report draws it
    traces, layout = page_figure(report_to_html(source, summarize(source)), "kvtrace-timeline")
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    # THEN each level is a step held until the next point drawn, and at the time of its full series' peak
    # (the first event reaching it) the step is at that peak: the point drawn there is the peak's own
    expected = {
        name: np.cumsum(np.where(category == code, delta, 0)) for code, name in enumerate(CATEGORY_NAMES)
    }
    expected["allocated"] = np.cumsum(delta)
    for name, full in expected.items():
        (trace,) = [t for t in traces if t.get("name") == name]
        assert trace["line"]["shape"] == "hv", name
        x, y = np.asarray(trace["x"]), np.rint(np.asarray(trace["y"]) * factor)
        assert len(x) < events  # downsampled
        peak_at = float(ts_us[int(np.argmax(full))]) / 1e6  # seconds from the first event (at 0)
        held = y[np.searchsorted(x, peak_at, side="right") - 1]
        assert held == full.max(), name


REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "chrome"
REAL_TRACE = REAL / "worker0.1623143089861.pt.trace.json.gz"  # ResNet-50 on a V100 (2021), kineto samples


def _cuda_allocated(path: Path) -> np.ndarray:
    """Allocated bytes after each cuda:0 `[memory]` event of a Kineto trace in the old form (Bytes only, no
    running total, first event from 0), from the raw file."""
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    return np.cumsum(
        [e["args"]["Bytes"] for e in events if e.get("name") == "[memory]" and e["args"]["Device Type"] == 1],
        dtype=np.int64,
    )


@pytest.mark.skipif(not REAL_TRACE.is_file(), reason=f"{REAL_TRACE} is absent")
def test_the_page_of_a_real_trace_draws_every_event_it_has_room_for(tmp_path: Path) -> None:
    # GIVEN a real ResNet-50 trace whose GPU has 8,220 memory events, fewer than the page's points
    allocated = _cuda_allocated(REAL_TRACE)
    assert len(allocated) == 8_220 < MAX_POINTS
    # WHEN `kvtrace report` draws it (the trace is read streaming, its events folded as they come)
    page = tmp_path / "page.html"
    assert main(["report", str(REAL_TRACE), "-o", str(page), "-q"]) == 0
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")
    # THEN the GPU's allocated line is every event, exactly, after the level before the first (0): it drew
    # 3,221 of them
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    (drawn,) = [t for t in traces if t.get("name") == "cuda:0 allocated"]
    drawn_bytes = np.rint(np.asarray(drawn["y"]) * factor).astype(np.int64)
    np.testing.assert_array_equal(drawn_bytes, np.concatenate([[0], allocated]))


@pytest.mark.skipif(not REAL_TRACE.is_file(), reason=f"{REAL_TRACE} is absent")
def test_the_page_header_counts_the_steps_the_input_marks(tmp_path: Path) -> None:
    # GIVEN the real trace, whose ProfilerStep ranges are the steps, and a real snapshot, which marks none
    raw = json.loads(gzip.decompress(REAL_TRACE.read_bytes()))
    marked = {e["name"] for e in raw["traceEvents"] if str(e.get("name", "")).startswith("ProfilerStep#")}
    snapshot = REAL.parent / "snapshots" / "mem_snapshot.pickle"
    pages = {}
    for name, path in (("trace", REAL_TRACE), ("snapshot", snapshot)):
        pages[name] = tmp_path / f"{name}.html"
        assert main(["report", str(path), "-o", str(pages[name]), "-q"]) == 0
    # THEN the trace's header says them, with the right plural; the snapshot's says no "0 steps"
    steps = len(marked)
    said = "1 step" if steps == 1 else f"{steps:,} steps"
    assert f"<p>source: chrome_trace, {said}</p>" in pages["trace"].read_text()
    assert "<p>source: snapshot</p>" in pages["snapshot"].read_text()


@pytest.mark.skipif(not REAL_TRACE.is_file(), reason=f"{REAL_TRACE} is absent")
@pytest.mark.parametrize("budget", [500, 2_000])
def test_a_real_timeline_cut_to_fewer_points_fills_them_and_keeps_its_peaks(budget: int) -> None:
    # GIVEN the real trace's GPU timeline: allocated, KV, weights and other at each of its 8,220 events
    allocated = _cuda_allocated(REAL_TRACE)
    _, report = build_report(REAL_TRACE)
    (timeline,) = [tl for tl in report.timelines if tl.device == "cuda:0"]
    np.testing.assert_array_equal(timeline.allocated, allocated)
    # WHEN the page cuts it to fewer points than it has events
    keep = timeline_indices(timeline, budget)
    # THEN it draws nearly all of them (it drew a quarter: 138 of 500, 492 of 2,000), never more, in order
    assert 0.9 * budget <= len(keep) <= budget and np.all(np.diff(keep) > 0)
    # and the peak is where it is first reached, every series keeping its own highest and lowest level
    assert int(np.argmax(allocated)) in keep
    for series in (timeline.allocated, *timeline.by_category.values()):
        assert (series[keep].max(), series[keep].min()) == (series.max(), series.min())


H200_TRACE = (
    Path(__file__).resolve().parents[2]
    / "sample_traces/h200/dynamic_b24/profiler/vm_516.1796402501433276047.pt.trace.json.gz"
)


def test_the_page_of_a_long_real_trace_fills_its_points_from_the_level_it_began_with(tmp_path: Path) -> None:
    # GIVEN the H200 trace of a Llama 3 8B-shaped generate(): 22,609 GPU memory events, more than the page
    # draws, with the allocator's total on each; the weights were loaded before the profiler started
    raw = json.loads(gzip.decompress(H200_TRACE.read_bytes()))["traceEvents"]
    gpu = [e["args"] for e in raw if e.get("name") == "[memory]" and e["args"]["Device Type"] == 1]
    totals = np.array([a["Total Allocated"] for a in gpu], dtype=np.int64)
    began = int(totals[0]) - int(gpu[0]["Bytes"])
    assert (len(gpu), began) == (22_609, 16_094_077_952)
    # WHEN `kvtrace report` draws it (read streaming)
    page = tmp_path / "page.html"
    assert main(["report", str(H200_TRACE), "-o", str(page), "-q"]) == 0
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    (drawn,) = [t for t in traces if t.get("name") == "cuda:0 allocated"]
    drawn_bytes = np.rint(np.asarray(drawn["y"]) * factor).astype(np.int64)
    # THEN the line starts from the 15 GiB held before the first event (it started from 0 B, as if the
    # weights had been freed), fills the page's points (it drew 2,677 of 20,000) and reaches exactly the
    # trace's highest and lowest totals
    assert drawn_bytes[0] == began
    assert 0.9 * MAX_POINTS <= len(drawn_bytes) <= MAX_POINTS + 1
    assert drawn_bytes.max() == totals.max() and drawn_bytes.min() == min(began, int(totals.min()))


@pytest.mark.parametrize("copies", [True, False], ids=["transient-copies", "grown-in-place"])
def test_a_growing_kv_series_fills_its_points_and_keeps_its_peaks(copies: bool) -> None:
    # GIVEN a KV log's bytes over 200,000 updates at uneven times: the cache grows by a token or two a step,
    # each update briefly holding the old storage beside the new (a transient copy) or growing in place
    rng = np.random.default_rng(1)
    steps, token = 100_000, 4_096
    held = np.cumsum(rng.integers(1, 3, steps)) * token
    series = np.empty(2 * steps, dtype=np.int64)
    series[0::2] = 2 * held - token if copies else held - token // 2
    series[1::2] = held
    times = np.cumsum(rng.integers(500, 1_500, 2 * steps))
    # WHEN the page cuts it to its points (the KV panel's cut)
    keep = downsample_indices(series, MAX_POINTS, times)
    # THEN it fills them (buckets whose extremes are their ends kept fewer: 17,077 and 9,851 of 20,000),
    # never more, and keeps the highest and lowest level where each is first reached
    assert 0.9 * MAX_POINTS <= len(keep) <= MAX_POINTS
    assert int(np.argmax(series)) in keep and int(np.argmin(series)) in keep
    assert series[keep].max() == series.max() and series[keep].min() == series.min()


def test_the_page_of_a_long_streamed_trace_fills_its_points(tmp_path: Path) -> None:
    # GIVEN a Chrome trace of 200,000 GPU memory events with the allocator's totals, levels rising and
    # falling at random, more than the streaming reader's sampler holds (it then merges buckets)
    rng = np.random.default_rng(11)
    events = 200_000
    delta = rng.integers(1, 1 << 20, events) * np.where(rng.random(events) < 0.5, 1, -1)
    total = (1 << 34) + np.cumsum(delta)
    trace = {
        "traceEvents": [
            {
                "ph": "i",
                "s": "t",
                "name": "[memory]",
                "pid": 1,
                "tid": 1,
                "ts": i,
                "args": {
                    "Device Type": 1,
                    "Device Id": 0,
                    "Bytes": int(d),
                    "Addr": 4096,
                    "Total Allocated": int(t),
                    "Total Reserved": 1 << 35,
                },
            }
            for i, (d, t) in enumerate(zip(delta, total, strict=True))
        ]
    }
    path = tmp_path / "long.json"
    path.write_text(json.dumps(trace))
    # WHEN `kvtrace report` draws it
    page = tmp_path / "page.html"
    assert main(["report", str(path), "-o", str(page), "-q"]) == 0
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    (drawn,) = [t for t in traces if t.get("name") == "allocated"]
    drawn_bytes = np.rint(np.asarray(drawn["y"]) * factor).astype(np.int64)
    # THEN the line fills the page's points (it drew 3,024 of 20,000, whatever the trace's length),
    # reaching exactly the trace's highest and lowest totals, the level before the first event included
    assert 0.9 * MAX_POINTS <= len(drawn_bytes) <= MAX_POINTS + 1
    levels = np.concatenate([[total[0] - delta[0]], total])
    assert (drawn_bytes.max(), drawn_bytes.min()) == (levels.max(), levels.min())
