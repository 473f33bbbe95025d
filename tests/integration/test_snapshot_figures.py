"""Snapshot figures against the raw pickles (issue 10, items 2-3): the peak counts blocks that the trace frees
but never allocates, and the report says in which unit each figure is (requested bytes or allocator blocks).

Expected figures come from the raw file, read with the test's own restricted unpickler and plain loops.
"""

from __future__ import annotations

import io
import json
import pickle
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvtrace.cli import main
from tests.plotly_figures import page_figure

SNAPSHOTS = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"
NAMES = sorted(p.name for p in SNAPSHOTS.glob("*.pickle")) if SNAPSHOTS.is_dir() else []
LIVE = ("active_allocated", "active_pending_free", "active_awaiting_free")


class _Plain(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _raw(name: str) -> dict[str, Any]:
    path = SNAPSHOTS / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return _Plain(io.BytesIO(path.read_bytes())).load()


def _report(name: str) -> dict[str, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(SNAPSHOTS / name), "--json", "-q"]) == 0
    return json.loads(out.getvalue())


def _live_blocks(raw: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for seg in raw["segments"] for b in seg["blocks"] if b["state"] in LIVE]


def _requested(block: dict[str, Any]) -> int:
    return block.get("requested_size") or block["history"][0]["real_size"]


@pytest.mark.parametrize("name", ["08fa910_1.3b_snapshot.pickle", "1.3b_snapshot.pickle"])
def test_a_block_freed_but_never_allocated_in_the_trace_was_live_at_the_start(name: str) -> None:
    raw = _raw(name)
    (trace,) = raw["device_traces"]
    # these torch 2.0 dumps hold a single free of a block allocated before the ring buffer began
    assert [entry["action"] for entry in trace] == ["free_completed"]
    final = sum(_requested(block) for block in _live_blocks(raw))
    freed = trace[0]["size"]

    (device,) = _report(name)["devices"]

    assert device["final_allocated_bytes"] == final
    assert device["peak_allocated_bytes"] == final + freed
    assert sum(device["categories_at_peak"].values()) == final + freed


@pytest.mark.parametrize("name", ["08fa910_1.3b_snapshot.pickle", "1.3b_snapshot.pickle"])
def test_the_chart_of_a_single_free_draws_the_level_before_it_and_after_it(name: str, tmp_path: Path) -> None:
    # GIVEN a torch 2.0 dump whose trace is one free, of a block allocated before the trace began: the peak
    # is the level before that free
    raw = _raw(name)
    ((free,),) = raw["device_traces"]
    final = sum(_requested(block) for block in _live_blocks(raw))
    peak = final + free["size"]
    unit = 2**30 if peak >= 2**30 else 2**20  # the chart's binary unit: GiB for the 3.61 GiB one

    # WHEN its HTML report is written
    page = tmp_path / "report.html"
    _cli(["report", str(SNAPSHOTS / name), "-q", "-o", str(page)], as_json=False)
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")

    # THEN every series spans the event before the trace (-1) to one after the free (1), stepping at the
    # free: the areas have a width (they were two dots at x=0, on an empty axis)
    by_name = {trace["name"]: trace for trace in traces}
    assert set(by_name) == {"weights", "kv", "other", "allocated", "reserved"}
    assert all(trace["x"] == [-1, 0, 0, 1] for trace in traces)
    allocated = [round(y * unit) for y in by_name["allocated"]["y"]]
    assert allocated == [peak, peak, final, final]
    stacked = np.sum([by_name[c]["y"] for c in ("weights", "kv", "other")], axis=0)
    assert np.allclose(stacked, by_name["allocated"]["y"])
    # the weights area (most of the peak), drawn across the chart at the page's figure for them
    (device,) = _report(name)["devices"]
    weights = device["categories_at_peak"]["weights"]
    assert weights > 0.9 * peak
    assert [round(y * unit) for y in by_name["weights"]["y"]] == [weights] * 4
    # AND the chart says what it holds, and what x = -1 is
    assert layout["annotations"][0]["text"].startswith("Memory by category: the trace holds a single event")
    assert "-1: the level before the trace" in layout["xaxis"]["title"]["text"]


def test_events_at_one_instant_are_drawn_in_order(tmp_path: Path) -> None:
    # GIVEN a timed snapshot whose trace is two frees at the same microsecond, of blocks allocated before it
    at = 1_700_000_000_000_000
    trace = [
        {"action": "free_completed", "addr": 8192, "size": 4096, "time_us": at},
        {"action": "free_completed", "addr": 12288, "size": 2048, "time_us": at},
    ]
    blocks = [{"address": 0, "size": 1024, "requested_size": 1024, "state": "active_allocated"}]
    segment = {"device": 0, "address": 0, "total_size": 16384, "allocated_size": 1024, "blocks": blocks}
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(pickle.dumps({"segments": [segment], "device_traces": [trace]}, protocol=4))

    # WHEN its HTML report is written
    page = tmp_path / "report.html"
    _cli(["report", str(path), "-q", "-o", str(page)], as_json=False)
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")

    # THEN the events go in their order, after the level before them and before the level after them
    (allocated,) = [t for t in traces if t["name"] == "allocated"]
    assert allocated["x"] == [-1, 0, 0, 1, 2]
    assert [round(y * 1024) for y in allocated["y"]] == [1024 + 4096 + 2048] * 2 + [1024 + 2048, 1024, 1024]
    assert layout["annotations"][0]["text"].startswith("Memory by category: the trace's 2 events fall at one")
    assert layout["xaxis"]["title"]["text"].startswith("allocator event, in order (all at one time")


@pytest.mark.parametrize("name", NAMES)
def test_snapshot_figures_name_their_unit_and_give_the_allocator_blocks_too(name: str) -> None:
    raw = _raw(name)
    live = _live_blocks(raw)
    requested = sum(_requested(block) for block in live)
    rounded = sum(block["size"] for block in live)

    report = _report(name)
    (device,) = report["devices"]

    assert report["size_basis"] == device["size_basis"] == "requested"
    assert device["final_allocated_bytes"] == requested
    assert device["final_allocated_rounded_bytes"] == rounded


def test_the_unit_gap_is_what_the_raw_file_says() -> None:
    # the 2.11 snapshot: 3,834,364 bytes between what the program asked for and what the allocator holds
    raw = _raw("memory_snapshot.pickle")
    live = _live_blocks(raw)
    gap = sum(block["size"] for block in live) - sum(_requested(block) for block in live)
    (device,) = _report("memory_snapshot.pickle")["devices"]
    assert gap == 3_834_364
    assert device["final_allocated_rounded_bytes"] - device["final_allocated_bytes"] == gap


def test_a_snapshot_without_trace_events_reports_what_its_segments_reserve() -> None:
    raw = _raw("oom_snapshot.pickle")
    assert not any(entry["action"] in ("alloc", "free_completed") for entry in raw["device_traces"][0])
    # the peak is the state at the dump; its segments are what was reserved then (diagnose says the same)
    reserved = sum(segment["total_size"] for segment in raw["segments"])
    (device,) = _report("oom_snapshot.pickle")["devices"]
    assert device["reserved_at_peak_bytes"] == reserved
    assert device["fragmentation_at_peak_bytes"] == reserved - device["peak_allocated_bytes"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["diagnose", str(SNAPSHOTS / "oom_snapshot.pickle"), "--json"]) == 0
    assert json.loads(out.getvalue())["reserved_bytes"] == reserved


def test_the_chart_of_a_snapshot_without_trace_events_draws_what_it_held(tmp_path: Path) -> None:
    # GIVEN the torch 2.0 near-OOM dump whose trace kept no allocations, only blocks live at the dump
    raw = _raw("oom_snapshot.pickle")
    assert not any(entry["action"] in ("alloc", "free_completed") for entry in raw["device_traces"][0])
    held = sum(_requested(block) for block in _live_blocks(raw))
    reserved = sum(segment["total_size"] for segment in raw["segments"])
    assert held >= 2**30  # the chart's unit is GiB

    # WHEN its HTML report is written
    page = tmp_path / "report.html"
    _cli(["report", str(SNAPSHOTS / "oom_snapshot.pickle"), "-q", "-o", str(page)], as_json=False)
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")

    # THEN the level held is drawn across the chart, in GiB (it was an empty chart in bytes)
    by_name = {trace["name"]: trace for trace in traces}
    assert set(by_name) == {"weights", "kv", "other", "allocated", "reserved"}
    assert all(len(trace["x"]) == 2 for trace in traces)
    assert layout["yaxis"]["title"]["text"] == "GiB"
    assert [round(y * 2**30) for y in by_name["allocated"]["y"]] == [held, held]
    assert [round(y * 2**30) for y in by_name["reserved"]["y"]] == [reserved, reserved]
    stacked = np.sum([by_name[c]["y"] for c in ("weights", "kv", "other")], axis=0)
    assert np.allclose(stacked, by_name["allocated"]["y"])
    # AND the chart says there are no allocations in the trace, only the state at the dump
    assert layout["annotations"][0]["text"].endswith(
        "the trace holds no allocations, only the state at the dump"
    )


def _small_snapshot(timed: bool) -> dict[str, Any]:
    """Two allocations, a free, then an allocator OOM; torch < 2.1 wrote no `time_us` in trace entries."""
    trace = [
        {"action": "segment_alloc", "addr": 0, "size": 8192},
        {"action": "alloc", "addr": 0, "size": 1024},
        {"action": "alloc", "addr": 1024, "size": 4096},
        {"action": "free_requested", "addr": 1024, "size": 4096},
        {"action": "free_completed", "addr": 1024, "size": 4096},
        {"action": "oom", "size": 1 << 20, "device_free": 0, "addr": 0},
    ]
    if timed:
        for offset, entry in enumerate(trace):
            entry["time_us"] = 1_700_000_000_000_000 + 250 * offset
    blocks = [
        {"address": 0, "size": 1024, "requested_size": 1024, "state": "active_allocated"},
        {"address": 1024, "size": 7168, "requested_size": 0, "state": "inactive"},
    ]
    segment = {"device": 0, "address": 0, "total_size": 8192, "allocated_size": 1024, "blocks": blocks}
    return {"segments": [segment], "device_traces": [trace]}


@pytest.mark.parametrize("timed", [True, False], ids=["time_us", "no-time_us"])
def test_peak_time_is_a_time_or_none(tmp_path: Path, timed: bool) -> None:
    # GIVEN a snapshot whose trace entries have, or lack, `time_us`
    raw = _small_snapshot(timed)
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(pickle.dumps(raw, protocol=4))
    level = peak = 0
    peak_entry: dict[str, Any] = {}
    for entry in raw["device_traces"][0]:
        if entry["action"] in ("alloc", "free_completed"):
            level += entry["size"] if entry["action"] == "alloc" else -entry["size"]
            if level > peak:
                peak, peak_entry = level, entry
    (oom_entry,) = [e for e in raw["device_traces"][0] if e["action"] == "oom"]

    # WHEN reported and diagnosed
    report = _cli(["report", str(path), "--json", "--no-export", "-q"])
    diagnosis = _cli(["diagnose", str(path), "--json"])

    # THEN the times are the entries' own, or None: an entry's index in the trace is no time
    assert report["peak_allocated_bytes"] == peak == 5120
    assert report["peak_time"] == report["devices"][0]["peak_time"] == peak_entry.get("time_us")
    assert report["oom"]["time"] == diagnosis["ts_us"] == oom_entry.get("time_us")
    # and the text and HTML renderers take None
    assert "peak" in _cli(["report", str(path), "--no-export"], as_json=False)
    _cli(["report", str(path), "-q", "-o", str(tmp_path / "report.html")], as_json=False)
    page = (tmp_path / "report.html").read_text()
    assert "<html" in page[:2000].lower()
    # an entry's place in the trace is no time either: the chart's axis says which it is
    assert ("seconds from first event" in page) is timed
    assert ("this snapshot records no times" in page) is not timed
    # and the OOM's marker is on that axis: seconds from the first alloc, or entries after it (it was at
    # 4e-06, an entry count divided as if microseconds)
    first = next(i for i, e in enumerate(raw["device_traces"][0]) if e["action"] == "alloc")
    oom_index = raw["device_traces"][0].index(oom_entry)
    expected_x = (
        (oom_entry["time_us"] - raw["device_traces"][0][first]["time_us"]) / 1e6
        if timed
        else oom_index - first
    )
    (marker,) = [t for t in page_figure(page, "kvtrace-timeline")[0] if t["name"] == "oom"]
    assert marker["x"] == [expected_x]
    assert "out of memory" in _cli(["diagnose", str(path)], as_json=False)


def _cli(argv: list[str], as_json: bool = True) -> Any:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue()) if as_json else out.getvalue()
