"""Every file in shared/real_traces (written by others, on real GPUs) reads, and its figures are right.

Each expected figure is computed here from the raw file with plain `json.load` or a separate restricted
unpickler and simple loops, following the conventions documented in `analyzers/readers/snapshot.py` and
`analyzers/readers/chrome_trace.py`; nothing is read back from the code under test.
"""

from __future__ import annotations

import functools
import gzip
import io
import itertools
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzers.attribution import attribute
from analyzers.readers.sources import open_source as _open_source
from analyzers.summary import summarize
from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.errors import KvtraceError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces"
FILES = sorted(p for p in REAL.rglob("*") if p.is_file() and p.name != "README.md") if REAL.is_dir() else []
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real traces folder {REAL} is absent")

# Each real file is read once per session; several tests look at the same result.
open_source = functools.lru_cache(maxsize=None)(_open_source)
LIVE_STATES = ("active_allocated", "active_pending_free", "active_awaiting_free")


class _PlainUnpickler(pickle.Unpickler):
    """The test's own guard, independent of analyzers.readers.safe_pickle."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _peak(baseline: int, deltas: list[int]) -> int:
    level = peak = baseline
    for delta in deltas:
        level += delta
        peak = max(peak, level)
    return peak


def expected_snapshot(path: Path) -> dict[str, dict[str, int]]:
    """alloc/free counts, baseline, peak and final bytes per device, by hand."""
    data = _PlainUnpickler(io.BytesIO(_raw_bytes(path))).load()
    traces = data["device_traces"]
    devices = {seg["device"] for seg in data["segments"]} | {i for i, t in enumerate(traces) if t}
    figures = {}
    for dev in devices:
        trace = traces[dev] if dev < len(traces) else []
        live: dict[int, int] = {}
        deltas = []
        orphans = 0
        for entry in trace:
            if entry["action"] == "alloc":
                live[entry["addr"]] = entry["size"]
                deltas.append(entry["size"])
            elif entry["action"] in ("free_completed", "free"):
                if entry["addr"] in live:
                    deltas.append(-live.pop(entry["addr"]))
                else:
                    orphans += entry["size"]
                    deltas.append(-entry["size"])
        unexplained = held_at_dump = 0
        for seg in data["segments"]:
            if seg["device"] != dev:
                continue
            address = seg["address"]
            for block in seg["blocks"]:
                address = block.get("address", address)
                if block["state"] in LIVE_STATES:
                    requested = block.get("requested_size") or block["history"][0]["real_size"]
                    held_at_dump += requested
                    if address not in live:
                        unexplained += requested
                address += block["size"]
        baseline = orphans + unexplained
        levels = list(itertools.accumulate(deltas, initial=baseline))[1:]
        figures[f"cuda:{dev}"] = {
            "allocs": sum(1 for e in trace if e["action"] == "alloc"),
            "frees": sum(1 for e in trace if e["action"] in ("free_completed", "free")),
            "baseline": baseline,
            "peak": _peak(baseline, deltas),
            "held_at_dump": held_at_dump,
            # the level before the first event is higher than any after one: the peak precedes the trace
            "peak_before_trace": bool(levels) and max(levels) < baseline,
        }
    return figures


def expected_chrome(path: Path) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    trace = json.loads(_raw_bytes(path))
    per_device: dict[str, list[dict[str, Any]]] = {}
    for event in trace["traceEvents"]:
        if event.get("name") == "[memory]":
            args = event["args"]
            name = "cpu" if args["Device Type"] == 0 else f"cuda:{args['Device Id']}"
            per_device.setdefault(name, []).append(event)
    figures = {}
    for name, events in per_device.items():
        events.sort(key=lambda e: e["ts"])  # stable
        deltas = [e["args"]["Bytes"] for e in events]
        if all("Total Allocated" in e["args"] for e in events):
            baseline = max(0, events[0]["args"]["Total Allocated"] - deltas[0])
        else:
            level = lowest = 0
            for delta in deltas:
                level += delta
                lowest = min(lowest, level)
            baseline = -lowest
        figures[name] = {
            "allocs": sum(1 for d in deltas if d > 0),
            "frees": sum(1 for d in deltas if d < 0),
            "baseline": baseline,
            "peak": _peak(baseline, deltas),
        }
    steps = [
        e
        for e in trace["traceEvents"]
        if e.get("ph") == "X"
        and str(e.get("name", "")).startswith("ProfilerStep#")
        and e.get("cat") != "gpu_user_annotation"
    ]
    return figures, {"events": len(trace["traceEvents"]), "steps": len(steps)}


def expected_timeline(path: Path) -> dict[str, int]:
    rows = json.loads(_raw_bytes(path))
    level = peak = 0
    for row in rows:  # the file is in time order; a version bump's -n/+n pair never raises the peak
        level += row[2]
        peak = max(peak, level)
    return {
        "allocs": sum(1 for r in rows if r[1] == 2),
        "frees": sum(1 for r in rows if r[1] == 4),
        "baseline": sum(r[2] for r in rows if r[1] == 1),
        "peak": peak,
    }


def rows_in_time_order(path: Path) -> list[list[int]]:
    """A raw memory timeline's rows, by time (stably: rows of one instant in the file's order)."""
    return sorted(json.loads(_raw_bytes(path)), key=lambda row: row[0])


def measured(dev: Any) -> dict[str, int]:
    running = dev.baseline_bytes + np.concatenate(([0], np.cumsum(dev.delta_bytes)))
    return {
        "allocs": dev.alloc_events,
        "frees": dev.free_events,
        "baseline": dev.baseline_bytes,
        "peak": int(running.max()),
    }


def test_the_folder_holds_every_format_generation() -> None:
    kinds = {open_source(p).kind for p in FILES}
    assert kinds == {"snapshot", "chrome_trace", "memory_timeline"}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_real_file_figures_match_the_raw_file(path: Path) -> None:
    source = open_source(path)
    assert source.path == str(path)

    if source.kind == "snapshot":
        expected = expected_snapshot(path)
        assert {d.device for d in source.devices} == set(expected)
        for dev in source.devices:
            want = expected[dev.device]
            assert measured(dev) == {k: want[k] for k in ("allocs", "frees", "baseline", "peak")}
            # The replay must end where the dump says memory was: an invariant from the end state alone.
            final = dev.baseline_bytes + int(dev.delta_bytes.sum())
            assert final == want["held_at_dump"]
            assert len(dev) == dev.alloc_events + dev.free_events
        raw = _PlainUnpickler(io.BytesIO(_raw_bytes(path))).load()
        assert len(source.segments) == len(raw["segments"])
    elif source.kind == "chrome_trace":
        expected, counts = expected_chrome(path)
        assert {d.device: measured(d) for d in source.devices} == expected
        assert source.meta["trace_events"] == counts["events"]
        assert len(source.markers) == counts["steps"]
        for dev in source.devices:
            assert np.all(np.diff(dev.ts_us) >= 0)
    else:
        (dev,) = source.devices
        assert measured(dev) == expected_timeline(path)


def _copy_with(tmp_path: Path, original: Path, data: bytes) -> Path:
    path = tmp_path / original.name
    path.write_bytes(data)
    return path


def _require(name: str) -> Path:
    matches = [p for p in FILES if p.name == name]
    if not matches:
        pytest.skip(f"{name} not in {REAL}")
    return matches[0]


@pytest.mark.parametrize(
    "name", ["memory_snapshot.pickle", "worker0.1623143089861.pt.trace.json.gz", "memory_timeline.raw.gz"]
)
def test_truncated_copy_of_a_real_file(tmp_path: Path, name: str) -> None:
    original = _require(name)
    data = original.read_bytes()
    path = _copy_with(tmp_path, original, data[: len(data) * 2 // 3])
    with pytest.raises(KvtraceError, match="truncated") as caught:
        open_source(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_corrupt_copy_of_a_real_snapshot(tmp_path: Path) -> None:
    original = _require("memory_snapshot.pickle")
    data = bytearray(original.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64
    path = _copy_with(tmp_path, original, bytes(data))
    with pytest.raises(KvtraceError) as caught:
        open_source(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_corrupt_gzip_stream_of_a_real_trace(tmp_path: Path) -> None:
    original = _require("rank0.json.gz")
    data = bytearray(original.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 32] = bytes(b ^ 0x5A for b in data[middle : middle + 32])
    path = _copy_with(tmp_path, original, bytes(data))
    with pytest.raises(KvtraceError) as caught:
        open_source(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "damage",
    [
        # a comma lost between two events in the middle of the file (events we would otherwise skip)
        lambda text: (
            text[: text.index("\n  },\n  {", len(text) // 2) + 4]
            + text[text.index("\n  },\n  {", len(text) // 2) + 5 :]
        ),
        # garbage inside a [memory] event
        lambda text: text.replace('"Bytes": ', '"Bytes": @@', 1),
    ],
    ids=["lost-comma", "garbage-in-memory-event"],
)
def test_corrupt_json_inside_a_real_trace(tmp_path: Path, damage: Any) -> None:
    original = _require("worker0.1623143089861.pt.trace.json.gz")
    text = damage(_raw_bytes(original).decode())
    path = tmp_path / "worker0.json"
    path.write_text(text)
    with pytest.raises(KvtraceError, match="corrupt JSON") as caught:
        open_source(path)
    assert str(caught.value).startswith(f"{path}: ")


SNAPSHOTS = [p for p in FILES if p.suffix == ".pickle"]


@pytest.mark.parametrize("path", SNAPSHOTS, ids=[p.name for p in SNAPSHOTS])
def test_diagnose_takes_the_peak_the_raw_file_shows(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The peak can be the level before the trace's first event (the 1.3b snapshots free one block they
    # never allocate): diagnose must describe that level, as report does, not the largest level after one
    want = expected_snapshot(path)
    assert main(["diagnose", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    if result["event"] == "peak":
        assert result["allocated_bytes"] == want[result["device"]]["peak"]


def test_memory_timeline_parameters_are_the_weights_at_peak() -> None:
    # GIVEN torch's own category per row (0 PARAMETER, torch/profiler/_memory_profiler.py _CATEGORY_TO_INDEX)
    path = _require("memory_timeline.raw.gz")
    rows = json.loads(_raw_bytes(path))
    level = sum(r[2] for r in rows if r[1] == 1)
    weights = sum(r[2] for r in rows if r[1] == 1 and r[3] == 0)
    peak, weights_at_peak = level, weights
    for row in rows:  # in time order; pre-existing rows are the level before the first event
        if row[1] != 1:
            level += row[2]
            weights += row[2] if row[3] == 0 else 0
            if level > peak:
                peak, weights_at_peak = level, weights

    # WHEN it is reported
    (dev,) = summarize(attribute(_open_source(path))).devices

    # THEN the parameters at the peak are the weights (HTA's memory analysis says the same)
    assert weights_at_peak == 102_440_608
    assert dev.peak_allocated_bytes == peak
    assert dev.categories_at_peak == {"kv": 0, "weights": weights_at_peak, "other": peak - weights_at_peak}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_the_html_chart_reaches_the_peak_of_the_raw_file(path: Path) -> None:
    """The chart starts from the level before the first event: a snapshot whose trace begins by freeing
    blocks allocated before it (torch 2.0 dumps) peaks there, and the chart must show the page's peak."""
    from analyzers.render.html import _timeline_figure
    from analyzers.units import binary_unit

    source = attribute(_open_source(path))
    report = summarize(source)
    figure = _timeline_figure(source, report)
    for dev in source.devices:
        if not len(dev):
            continue  # nothing over time to chart (a snapshot without a trace): the page gives the state
        peak = measured(dev)["peak"]
        _, factor = binary_unit(max(d.peak_allocated_bytes for d in report.devices))
        prefix = f"{dev.device} " if len(source.devices) > 1 else ""
        (allocated,) = [t for t in figure.data if t.name == f"{prefix}allocated"]
        assert round(float(np.max(allocated.y)) * factor) == peak
        stacked = sum(
            np.asarray(t.y)
            for t in figure.data
            if t.name in {f"{prefix}{c}" for c in ("weights", "kv", "other")}
        )
        assert np.allclose(stacked, np.asarray(allocated.y))


def test_a_memory_timeline_says_its_device_is_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    """export_memory_timeline files do not name their device (torch's default is cuda:0 only where CUDA is
    available): the report shows it as unknown, and says why, rather than guess a GPU."""
    path = _require("memory_timeline.raw.gz")
    assert main(["report", str(path), "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["device"] for d in data["devices"]] == ["unknown"]
    assert any("does not say which device" in note and "unknown" in note for note in data["notes"])


@pytest.mark.parametrize(
    "base",
    [10**30, 1.6e18, float("nan"), "1623143089861000000", True],
    ids=["int", "float", "nan", "str", "bool"],
)
def test_a_clock_base_no_int64_is_no_base_and_said(
    base: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the real ResNet trace (integral Unix-epoch ts, no base) with a base no Kineto writes (int64 ns)
    original = _require("worker0.1623143089861.pt.trace.json.gz")
    trace = json.loads(_raw_bytes(original))
    assert "baseTimeNanoseconds" not in trace
    trace["baseTimeNanoseconds"] = base
    path = tmp_path / "worker0.json"
    path.write_text(json.dumps(trace))

    # WHEN both are reported
    assert main(["report", str(original), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["report", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)

    # THEN the base is left out, as if absent (it would overflow int64 or round every ts away): the same
    # figures, the same Unix-epoch peak time, and one more note that says the base was ignored
    (said,) = [note for note in got["notes"] if note not in want["notes"]]
    assert said.startswith(f"'baseTimeNanoseconds' is {base!r}"[:40]) and "ignored" in said
    got["notes"].remove(said)
    want["source"]["path"] = got["source"]["path"]
    assert got == want


def _report_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("path", SNAPSHOTS, ids=[p.name for p in SNAPSHOTS])
def test_a_peak_before_the_trace_is_said_and_its_reserved_memory_is_no_slack(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch 2.0 dumps keep one trace entry (`trace_alloc_max_entries=1`): the 1.3b snapshots' trace is one
    free of a block allocated before it, so their peak is the level before it and the run peaked then or
    earlier. What was reserved then (6.20 GiB against 3.61 GiB for 1.3b, a wholly free 394 MiB segment among
    them) the allocator had cached at earlier, higher levels: no slack of a peak."""
    # GIVEN the raw file's own figures
    raw = _PlainUnpickler(io.BytesIO(_raw_bytes(path))).load()
    (want,) = expected_snapshot(path).values()
    trace = raw["device_traces"][0]
    segment_moves = [e for e in trace if e["action"].startswith("segment_")]
    reserved_at_dump = sum(segment["total_size"] for segment in raw["segments"])

    # WHEN it is reported and diagnosed
    report = _report_json(path, capsys)
    (device,) = report["devices"]
    assert main(["report", str(path), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out
    assert main(["diagnose", str(path), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    said = [note for note in report["notes"] if "the level before the trace's first event" in note]

    # THEN the peak is the raw file's either way, and only a peak before the trace carries the note
    assert device["peak_allocated_bytes"] == want["peak"]
    assert device["peak_before_trace"] is want["peak_before_trace"]
    (expandable,) = [r for r in diagnosis["remedies"] if r["kind"] == "expandable_segments"]
    if not want["peak_before_trace"]:
        assert said == []
        assert device["fragmentation_at_peak_bytes"] == device["reserved_at_peak_bytes"] - want["peak"]
        return
    assert path.name in ("1.3b_snapshot.pickle", "08fa910_1.3b_snapshot.pickle")
    assert [e["action"] for e in trace] == ["free_completed"] and not segment_moves
    assert want["peak"] == want["held_at_dump"] + trace[0]["size"]
    (note,) = said
    assert note.startswith("cuda:0: the peak is the level before the trace's first event (the trace holds ")
    assert "0 allocs / 1 frees" in note and "trace_alloc_max_entries" in note
    # what was reserved when the trace began (the dump's segments: the trace moves none) is no peak's slack
    assert device["reserved_at_peak_bytes"] == reserved_at_dump
    assert device["fragmentation_at_peak_bytes"] is None
    assert f"  note: {note}" in text
    assert f"reserved {human_bytes(reserved_at_dump)} when the trace began" in text
    assert "reserved but unallocated at the peak" not in text
    # diagnose says the same, and does not sell the cached memory as fragmentation expandable segments recover
    assert note in diagnosis["notes"]
    assert diagnosis["allocated_bytes"] == want["peak"]
    assert diagnosis["reserved_unallocated_bytes"] == reserved_at_dump - want["peak"]
    assert expandable["saved_bytes"] is None and "cached earlier" in expandable["sentence"]
    assert "recovering" not in expandable["sentence"]


SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
# Real H200 dumps of kvtrace's own runs: the OOM runs' trace ring buffer (max_entries 12,000) wrapped
RING_SNAPSHOTS = [p for p in FILES if p.suffix == ".pickle"] + sorted(
    SAMPLES.glob("h200/*/snapshots/*.pickle")
)


@pytest.mark.parametrize(
    "path", RING_SNAPSHOTS, ids=[f"{p.parent.parent.name}/{p.name}" for p in RING_SNAPSHOTS]
)
def test_a_trace_that_lost_its_start_to_the_ring_buffer_says_so(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """c10 records each free's request before its completion: a trace whose free completes with no request
    of its address before it had its older entries dropped by the ring buffer (`max_entries`). Its peak is
    then that of its last seconds only, which the report says; memory_viz draws the span without a word."""
    # GIVEN the raw file's own figures: the first free completed unrequested, and the trace's span
    raw = _PlainUnpickler(io.BytesIO(_raw_bytes(path))).load()
    (want,) = expected_snapshot(path).values()
    (trace,) = [t for t in raw["device_traces"] if t] or [[]]
    requested: set[int] = set()
    cut_at = None
    for index, entry in enumerate(trace):
        if entry["action"] == "free_requested":
            requested.add(entry["addr"])
        elif entry["action"] == "free_completed":
            if entry["addr"] not in requested:
                cut_at = index
                break
            requested.remove(entry["addr"])
    timed = bool(trace) and all("time_us" in entry for entry in trace)

    # WHEN it is reported
    report = _report_json(path, capsys)
    (device,) = report["devices"]
    said = [note for note in report["notes"] if "lost its oldest entries" in note]

    # THEN the peak is the raw file's, and a trace that lost its start (not already a peak before it) says so
    assert device["peak_allocated_bytes"] == want["peak"]
    if cut_at is None or want["peak_before_trace"]:
        assert said == []
        return
    (note,) = said
    assert note.startswith(
        f"cuda:0: the snapshot's trace lost its oldest entries: its entry {cut_at + 1:,} of "
    )
    assert f" of {len(trace):,} completes a free whose request is not in it" in note
    assert "max_entries" in note and "the run may have peaked earlier, unseen" in note
    if timed:
        span = (trace[-1]["time_us"] - trace[0]["time_us"]) / 1e6
        assert f"The figures cover the last {span:,.3f} s before the dump" in note


CHROME = [p for p in FILES if p.name.endswith(".json.gz")]


@pytest.mark.parametrize("path", CHROME, ids=[p.name for p in CHROME])
def test_a_trace_without_memory_events_says_its_memory_is_unknown(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real Chrome trace, and its [memory] events counted with json.load
    trace = json.loads(_raw_bytes(path))
    memory_events = sum(1 for e in trace["traceEvents"] if e.get("name") == "[memory]")

    # WHEN it is reported: the CLI (events folded while read), the library (columns), and as text
    report = _report_json(path, capsys)
    library = summarize(attribute(_open_source(path)))
    assert main(["report", str(path), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out

    # THEN a trace without them says it has no allocator events and why, instead of a silent 0 B
    said = [note for note in report["notes"] if "no allocator events" in note]
    assert [n for n in library.notes if "no allocator events" in n] == said
    if memory_events:
        assert said == [] and report["devices"]
        return
    assert path.name in (
        "rank0.json.gz",
        "mi250_minitoy_train_ROCm6_2_kineto.json.gz",
        "rank-34.Jul_15_10_52_41.1074.pt.trace.json.gz",
    )
    (note,) = said
    assert "profile_memory=True" in note and "unknown, not 0" in note
    assert f"  note: {note}" in text
    # the JSON keeps its documented shape (docs/format.md: 0, null, {} without a device)
    assert report["devices"] == [] and report["peak_allocated_bytes"] == 0 and report["peak_time"] is None


@pytest.mark.parametrize("path", CHROME, ids=[p.name for p in CHROME])
def test_a_trace_without_memory_events_gets_no_memory_chart(path: Path, tmp_path: Path) -> None:
    # GIVEN a real Chrome trace, and its [memory] events counted with json.load
    trace = json.loads(_raw_bytes(path))
    memory_events = sum(1 for e in trace["traceEvents"] if e.get("name") == "[memory]")

    # WHEN its HTML report is written
    out = tmp_path / "report.html"
    assert main(["report", str(path), "-o", str(out), "--no-export", "-q"]) == 0
    page = out.read_text()

    # THEN a trace with them gets its chart; one without draws none (an empty "B" axis from -1 to 1, its
    # steps at 0 B), and its note says the figures are unknown
    if memory_events:
        assert page.count("Plotly.newPlot") == 1
        return
    assert "Plotly.newPlot" not in page and "Memory by category over time" not in page
    assert "unknown, not 0" in page


def test_a_budget_crossing_in_a_chrome_trace_names_its_unit_and_profiler_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the V100 ResNet-50 trace (old `[memory]` form: Bytes, the allocator's blocks, no totals) and a
    # 2 GiB budget: the first CUDA allocation that takes the level above it, replayed by hand
    path = _require("worker0.1623143089861.pt.trace.json.gz")
    trace = json.loads(_raw_bytes(path))
    budget = 2 * 2**30
    memory = sorted(
        (e for e in trace["traceEvents"] if e.get("name") == "[memory]" and e["args"]["Device Type"] == 1),
        key=lambda e: e["ts"],
    )
    level = lowest = 0
    for event in memory:
        level += event["args"]["Bytes"]
        lowest = min(lowest, level)
    level = -lowest  # what was held before the first event
    for event in memory:
        if level + event["args"]["Bytes"] > budget:
            crossing = event
            break
        level += event["args"]["Bytes"]
    steps = [
        e
        for e in trace["traceEvents"]
        if e.get("ph") == "X"
        and str(e.get("name", "")).startswith("ProfilerStep#")
        and e.get("cat") != "gpu_user_annotation"
        and e["ts"] <= crossing["ts"]
    ]
    (inside,) = [s for s in steps if crossing["ts"] <= s["ts"] + s["dur"]]

    # WHEN diagnosed against that budget
    assert main(["diagnose", str(path), "--budget", "2GiB", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["budget_crossing"]

    # THEN the crossing is that allocation, counted in the allocator's block sizes (it said "requested"),
    # inside the profiler step that was running (step and phase were null)
    assert (found["request_bytes"], found["allocated_before_bytes"]) == (crossing["args"]["Bytes"], level)
    assert "the allocator's block sizes" in found["counts"] and "requested" not in found["counts"]
    assert (found["step"], found["phase"]) == (len(steps), inside["name"]) == (1, "ProfilerStep#5")


def test_both_memory_timeline_forms_label_the_same_bytes_alike(tmp_path: Path) -> None:
    # GIVEN the raw timeline, and its coalesced form as torch's `_coalesce_timeline` builds it: µs times, and
    # per time a row of running sizes with category index i (7: None, unknown) in column i + 1
    path = _require("memory_timeline.raw.gz")
    rows = json.loads(_raw_bytes(path))
    times: list[int] = []
    sizes: list[list[int]] = []
    t_min = -1
    for ts, _action, nbytes, category in rows:
        t = int(ts / 1000) if ts != -1 else ts
        if t_min == -1 or 0 < t < t_min:
            t_min = t
        if not times or t != times[-1]:
            times.append(t)
            sizes.append(sizes[-1].copy() if sizes else [0] * 9)
        sizes[-1][category + 1] += nbytes
    coalesced = tmp_path / "memory_timeline.json"
    coalesced.write_text(json.dumps([[t_min if t < 0 else t for t in times], sizes]))
    # the bytes created with no torch category, and with one (version bumps move bytes, create none)
    unknown = sum(r[2] for r in rows if r[1] == 2 and r[3] == 7)
    known = sum(r[2] for r in rows if r[1] == 2 and r[3] != 7)

    # WHEN both forms are reported
    (from_raw,) = summarize(attribute(_open_source(path))).devices
    (from_coalesced,) = summarize(attribute(_open_source(coalesced))).devices

    # THEN both say which bytes torch could not categorise (the coalesced form called all 65,435,686,400 B
    # torch's own category, its unknown column included)
    expected = {"none": unknown, "profiler_category": known}
    assert (unknown, known) == (29_581_253_120, 35_854_433_280)
    assert from_raw.bytes_by_method == from_coalesced.bytes_by_method == expected
    assert from_raw.peak_allocated_bytes == from_coalesced.peak_allocated_bytes


def test_diagnose_stacks_of_a_memory_timeline_add_up_to_what_is_live(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN torch's raw memory timeline: no addresses, no stacks; its peak and what existed before it, by hand
    path = _require("memory_timeline.raw.gz")
    want = expected_timeline(path)

    # WHEN diagnosed at its peak
    assert main(["diagnose", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    # THEN the rows hold every live byte: what existed before the trace, and one row for the bytes allocated
    # since, whose allocations the file cannot tell apart (only the first was listed: 316.68 MiB of 2.87 GiB)
    assert result["event"] == "peak" and result["allocated_bytes"] == want["peak"] == 3_082_832_104
    rows = {row["stack"]: row["bytes"] for row in result["top_stacks"]}
    assert sum(rows.values()) == want["peak"]
    # AND what existed before is what is still held at the peak: the trace's creations and destructions
    # (version bumps move no bytes), replayed by hand up to the peak, fall 107,868,160 B below where they
    # began, so at least that much of the 332,060,904 B held before was freed first (its row counted it all)
    level = peak = lowest_before_peak = lowest = 0
    for _ts, action, nbytes, _category in rows_in_time_order(path):
        if action in (2, 4):
            level += nbytes
            lowest = min(lowest, level)
            if level > peak:
                peak, lowest_before_peak = level, lowest
    assert want["baseline"] + peak == want["peak"]
    still_held = want["baseline"] + lowest_before_peak
    assert (want["baseline"], still_held) == (332_060_904, 224_192_744)
    assert rows["(weights and others, allocated before the trace began)"] == still_held
    (unlisted,) = [nbytes for stack, nbytes in rows.items() if stack.startswith("(no stack recorded")]
    assert unlisted == want["peak"] - still_held


@pytest.mark.parametrize("path", [p for p in FILES if ".json" in p.name], ids=lambda p: p.name)
def test_a_trace_without_allocator_totals_says_its_figures_start_from_its_own_events(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real Chrome trace; the devices whose [memory] events lack 'Total Allocated' (worker0's, an
    # older profiler's ResNet-50 training, whose weights were on the GPU throughout), by hand
    trace = json.loads(_raw_bytes(path))
    totals: dict[str, bool] = {}
    for event in trace["traceEvents"]:
        if event.get("name") == "[memory]":
            args = event["args"]
            name = "cpu" if args["Device Type"] == 0 else f"cuda:{args['Device Id']}"
            totals[name] = totals.get(name, True) and "Total Allocated" in args
    without = sorted(name for name, known in totals.items() if not known)
    # WHEN reported, streamed (`report --json`) and read whole (the source diagnose and the page use)
    assert main(["report", str(path), "--json", "--no-export", "-q"]) == 0
    streamed = json.loads(capsys.readouterr().out)["notes"]
    whole = _open_source(path).meta.get("input_notes", [])
    # THEN each such device, and only those, is said to count from the trace's own start, a lower bound
    for notes in (streamed, whole):
        said = sorted(n.split(": its memory")[0] for n in notes if "carry no 'Total Allocated'" in n)
        assert said == without
        assert all("is not in them, a lower bound" in n for n in notes if "'Total Allocated'" in n)
    if path.name.startswith("worker0"):
        assert without == ["cpu", "cuda:0"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_kv_that_nothing_attributes_is_unknown_not_0(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real file from others: nothing in it marks KV-cache allocations
    # WHEN reported as JSON and as a page
    assert main(["report", str(path), "--json", "--no-export", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert main(["report", str(path), "-o", str(tmp_path / "page.html"), "--no-export", "-q"]) == 0
    page = (tmp_path / "page.html").read_text()
    # THEN its KV figures are unknown (null), as the text report's "-" says, not a measured 0
    assert data["kv"]["measured_from"] == "none"
    kv = data["kv"]
    figures = ("peak_bytes", "final_bytes", "allocated_bytes_total", "evicted_tokens")
    assert [kv[name] for name in figures] == [None] * 4
    assert "<td>0 B</td>" not in page.split("KV final", 1)[1].split("</tr>", 1)[0]
    if data["devices"]:  # a device's KV at its peak is counted in other, and the page says so
        assert "kv at peak</th><td>- (not attributed: counted in other)</td>" in page
