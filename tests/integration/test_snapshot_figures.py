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

import pytest

from kvtrace.cli import main

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
    assert "out of memory" in _cli(["diagnose", str(path)], as_json=False)


def _cli(argv: list[str], as_json: bool = True) -> Any:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue()) if as_json else out.getvalue()
