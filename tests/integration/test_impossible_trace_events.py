"""A real Chrome trace with one `[memory]` event made impossible by its own trace's other fields: a free
larger than any 'Total Allocated' before it, a `ts` 1e30 µs. Each is skipped with a note on every reader path
(the byte scan, the streaming JSON reader and its Kineto runs, plain JSON decoding, the streamed report),
and the figures are the undamaged trace's. Frees of memory allocated before the trace stay counted.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzers.model import MemorySource
from analyzers.readers.chrome_trace import read_chrome_trace
from kvtrace.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = next((ROOT / "sample_traces" / "dynamic_b2" / "profiler").glob("*.pt.trace.json.gz"))


def _memory(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if isinstance(e, dict) and e.get("name") == "[memory]"]


def _figures(memory: list[dict[str, Any]]) -> tuple[int, int]:
    """(peak, final) of a CPU trace by hand: its 'Total Allocated' is the profiler's own counter, so the
    level is the running sum of Bytes in time order over the smallest baseline that keeps it >= 0."""
    ordered = sorted(memory, key=lambda e: e["ts"])  # stable: ties keep file order
    running = np.cumsum([e["args"]["Bytes"] for e in ordered])
    baseline = max(0, -int(running.min()))
    return max(baseline, baseline + int(running.max())), baseline + int(running[-1])


def _damaged(tmp_path: Path, field: str, value: int) -> tuple[Path, Path, list[dict[str, Any]]]:
    """The sample trace with `field` of its largest allocation set to `value`, edited in Kineto's own text
    (the byte scan reads it), and a re-indented copy (decoded event by event); and the undamaged events."""
    text = gzip.decompress(SAMPLE.read_bytes()).decode()
    memory = _memory(json.loads(text))
    largest = max(memory, key=lambda e: e["args"]["Bytes"])
    end = text.index(f'"Ev Idx": {largest["args"]["Ev Idx"]}\n')  # unique in the file
    start = text.rindex("\n  {\n", 0, end)
    old = f'"{field}": {json.dumps(largest["args"][field] if field == "Bytes" else largest[field])}'
    event = text[start:end]
    assert event.count(old) == 1, old
    path = tmp_path / "damaged.pt.trace.json"
    path.write_text(text[:start] + event.replace(old, f'"{field}": {value}') + text[end:])
    reindented = tmp_path / "reindented.pt.trace.json"
    reindented.write_text(json.dumps(json.loads(path.read_text()), indent=1))
    return path, reindented, memory


def _same_events(a: MemorySource, b: MemorySource) -> None:
    for x, y in zip(a.devices, b.devices, strict=True):
        assert x.device == y.device
        for column in ("ts_us", "addr", "delta_bytes"):
            np.testing.assert_array_equal(getattr(x, column), getattr(y, column))
        assert x.baseline_bytes == y.baseline_bytes


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("Bytes", -(10**12), "[memory] freeing more than any earlier 'Total Allocated'"),
        ("ts", 10**30, "[memory] with a ts far outside the trace's other events"),
    ],
    ids=["free-of-1e12-bytes", "ts-1e30"],
)
def test_an_impossible_memory_event_in_a_real_trace_is_skipped_on_every_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: int, reason: str
) -> None:
    # GIVEN the sample trace (its 'Total Allocated' never exceeds 7,384,956) with its largest allocation's
    # Bytes set to -1e12 (the report said "cpu: peak 931.32 GiB", no note) or its ts to 1e30 (sorted after
    # its own free: final 1,026,048 instead of 0, no note)
    path, reindented, memory = _damaged(tmp_path, field, value)
    peak, final = _figures(memory)
    # WHEN read by the byte scan, the streaming JSON reader (its Kineto runs), plain JSON decoding and the
    # whole-text reader
    sources = [
        read_chrome_trace(path),
        read_chrome_trace(path, byte_scan=False, in_memory=False),
        read_chrome_trace(reindented, in_memory=False),
        read_chrome_trace(reindented),
    ]
    assert [s.meta["reader"] for s in sources] == ["byte_scan", "json_stream", "json_stream", "in_memory"]
    # THEN each skips that one event, and says why
    for source in sources:
        assert source.meta["skipped_events"] == {reason: 1}
        (device,) = source.devices
        assert len(device.delta_bytes) == len(memory) - 1
    for source in sources[1:]:
        _same_events(sources[0], source)
    # AND the report (streamed where it can be) gives the undamaged trace's peak and final, with a note
    for trace in (path, reindented):
        assert main(["report", str(trace), "--json", "--no-export"]) == 0
        report = json.loads(capsys.readouterr().out)
        (cpu,) = report["devices"]
        assert (cpu["peak_allocated_bytes"], report["final_allocated_bytes"]) == (peak, final)
        assert cpu["peak_before_trace"] is False
        events = len(json.loads(path.read_text())["traceEvents"])
        assert report["notes"] == [f"skipped 1 of {events} events: 1 {reason}"]


def test_a_trace_cut_after_its_start_keeps_its_frees_of_earlier_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sample trace without its first 2,000 memory events, as if the profiler had started later:
    # its frees of memory allocated before are unmatched, and its totals still count that memory
    trace = json.loads(gzip.decompress(SAMPLE.read_bytes()))
    cut = {id(e) for e in _memory(trace)[:2000]}
    trace["traceEvents"] = [e for e in trace["traceEvents"] if id(e) not in cut]
    kept = _memory(trace)
    assert sum(1 for e in kept if e["args"]["Bytes"] < 0) > sum(1 for e in kept if e["args"]["Bytes"] > 0)
    path = tmp_path / "late.pt.trace.json"
    path.write_text(json.dumps(trace))
    peak, final = _figures(kept)
    # THEN none is skipped: the level before the trace holds what they free
    source = read_chrome_trace(path)
    assert "skipped_events" not in source.meta
    (device,) = source.devices
    assert len(device.delta_bytes) == len(kept)
    assert device.baseline_bytes > 0  # what the unmatched frees free, held before the first event
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    (cpu,) = report["devices"]
    assert (cpu["peak_allocated_bytes"], report["final_allocated_bytes"]) == (peak, final)
    assert report["notes"] == []
