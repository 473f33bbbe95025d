"""What a report's figures cover, said in its words where "over the run" would be wrong.

* A snapshot's "allocated" sums its trace, a ring buffer of max_entries whose history may have been turned
  on mid-run: the report says over the trace's entries and the seconds before the dump, not "the run".
* A CPU Chrome trace's 'Total Allocated' may start above its own first 'Bytes' (the profiler's counter
  carried over from an earlier session in the same process: sample_traces/static_b2's starts at what
  sliding_b2's session left). kvtrace counts the 'Bytes' from 0, TensorBoard plots the total: a note says so.
  Not of its run folder: there the 'Bytes' count from the weights held before it, above TensorBoard's.
"""

from __future__ import annotations

import gzip
import html
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from analyzers.readers.chrome_trace import read_chrome_trace
from analyzers.report import build_report
from analyzers.units import human_bytes
from kvtrace.cli import main

ROOT = Path(__file__).resolve().parents[2]
REAL_SNAPSHOT = ROOT.parent / "shared" / "real_traces" / "snapshots" / "memory_forward_bf16_128.pickle"
STATIC_TRACE = next((ROOT / "sample_traces" / "static_b2" / "profiler").glob("*.pt.trace.json.gz"))


def _report(argv: list[str], capsys: Any) -> str:
    assert main(["report", *argv, "--no-export"]) == 0
    return capsys.readouterr().out


def _real_snapshot_span() -> str:
    """The real snapshot's span in words, from its pickle: its one trace's entries and first-to-last µs."""
    with REAL_SNAPSHOT.open("rb") as f:
        snapshot = pickle.load(f)
    traced = [trace for trace in snapshot["device_traces"] if trace]
    assert len(traced) == 1
    trace = traced[0]
    span_s = (trace[-1]["time_us"] - trace[0]["time_us"]) / 1e6
    return f"the trace's {len(trace):,} entries, the last {span_s:,.3f} s before the dump"


@pytest.mark.skipif(not REAL_SNAPSHOT.exists(), reason="shared/real_traces not present")
def test_snapshot_allocated_says_the_trace_span(capsys: Any) -> None:
    # GIVEN a real torch 2.6 snapshot (builtin types only), its trace's entries and first-to-last µs
    span = _real_snapshot_span()
    # WHEN reported
    text = _report([str(REAL_SNAPSHOT)], capsys)
    # THEN what was allocated is said over that span, not over the run
    assert f"    allocated over {span}, by how each allocation was attributed:\n" in text
    assert "over the run" not in text


@pytest.mark.skipif(not REAL_SNAPSHOT.exists(), reason="shared/real_traces not present")
def test_snapshot_page_and_notebook_say_the_trace_span(tmp_path: Path, capsys: Any) -> None:
    # GIVEN the real snapshot's span, and its KV allocated as the text report says it
    span = _real_snapshot_span()
    _, report = build_report(REAL_SNAPSHOT)
    allocated = json.loads(_report([str(REAL_SNAPSHOT), "--json"], capsys))["kv"]["allocated_bytes_total"]
    # WHEN its HTML page is written and a notebook shows it (`Report._repr_html_`)
    page_path = tmp_path / "page.html"
    assert main(["report", str(REAL_SNAPSHOT), "--no-export", "-q", "-o", str(page_path)]) == 0
    page = page_path.read_text()
    cell = report._repr_html_()
    # THEN the page's summary row and the notebook's KV row say the text's span, not "over the run"
    assert f"<tr><th>KV allocated over {html.escape(span)}</th><td>{human_bytes(allocated)}</td></tr>" in page
    # and, as the page and the JSON (null), the notebook gives the unattributed KV as unknown, not 0 B
    assert allocated is None
    assert f"<tr><td>allocated over {html.escape(span)}</td><td>-</td></tr>" in cell
    assert "<tr><td>peak</td><td>-</td></tr>" in cell and "<tr><td>final</td><td>-</td></tr>" in cell
    assert "over the run" not in page
    assert "over the run" not in cell


@pytest.mark.skipif(not REAL_SNAPSHOT.exists(), reason="shared/real_traces not present")
def test_the_json_carries_the_span_that_the_tensorboard_tab_shows(capsys: Any) -> None:
    # GIVEN the real snapshot's span, and a run's report (the TensorBoard tab's table is built from this
    # JSON, `report_to_json`: it said "KV allocated over the run" whatever the input, the page and text not)
    span = _real_snapshot_span()
    # WHEN both are reported as JSON
    snapshot = json.loads(_report([str(REAL_SNAPSHOT), "--json", "-q"], capsys))["kv"]
    run = json.loads(_report([str(ROOT / "sample_traces" / "dynamic_b2"), "--json", "-q"], capsys))["kv"]
    # THEN each says what its KV allocated sums over, in the text's words: the snapshot's trace span
    assert snapshot["allocated_over"] == f"over {span}"
    assert f"allocated {snapshot['allocated_over']}, by how" in _report([str(REAL_SNAPSHOT), "-q"], capsys)
    assert run["allocated_over"] == "over the run"
    # AND the tab's table builds its row from it, not from words of its own
    tab = (ROOT / "analyzers" / "tb_plugin" / "static" / "kvcache.js").read_text()
    assert "`KV allocated ${kv.allocated_over}`" in tab and "KV allocated over the run" not in tab


def _first_memory_event(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    memory = [e for e in events if e.get("name") == "[memory]"]
    return min(memory, key=lambda e: e["ts"])  # min keeps the first of equal ts, as a stable sort


def _counter_note(start: int) -> str:
    return (
        f"cpu: the trace's 'Total Allocated' starts at {start:,} B from before the profiling began (the "
        "profiler's counter, carried over from an earlier profiler session in the same process); kvtrace "
        f"counts the trace's own 'Bytes' from 0, so TensorBoard's memory view, which plots 'Total "
        f"Allocated', shows up to {start:,} B more"
    )


def test_cpu_counter_carried_over_is_said(capsys: Any) -> None:
    # GIVEN a CPU trace whose first [memory] event's total is above its own Bytes
    first = _first_memory_event(STATIC_TRACE)
    start = first["args"]["Total Allocated"] - first["args"]["Bytes"]
    assert start > 0
    note = _counter_note(start)
    # WHEN reported (streamed), as text and as JSON
    text = _report([str(STATIC_TRACE)], capsys)
    notes = json.loads(_report([str(STATIC_TRACE), "--json"], capsys))["notes"]
    # THEN both say where the counter started and that kvtrace counts from 0
    assert f"  note: {note}\n" in text
    assert note in notes
    # AND the columns reader says it too
    assert note in read_chrome_trace(STATIC_TRACE).meta["input_notes"]


def test_counter_started_at_zero_says_nothing(capsys: Any) -> None:
    # GIVEN a CPU trace whose profiler counter started at 0 (the first profiling session of its process)
    trace = next((ROOT / "sample_traces" / "dynamic_b2" / "profiler").glob("*.pt.trace.json.gz"))
    first = _first_memory_event(trace)
    assert first["args"]["Total Allocated"] == first["args"]["Bytes"]
    # WHEN reported, THEN no note on the counter
    assert "'Total Allocated' starts at" not in _report([str(trace)], capsys)


def test_run_folder_of_a_carried_over_counter_counts_from_its_weights_not_the_counter(capsys: Any) -> None:
    # GIVEN the static_b2 run folder, whose bare trace gets the counter note (its counter starts at what
    # sliding_b2's session left, freed before this session began), and the weights it lists
    run = ROOT / "sample_traces" / "static_b2"
    first = _first_memory_event(STATIC_TRACE)
    start = first["args"]["Total Allocated"] - first["args"]["Bytes"]
    weights = sum(
        json.loads(line)["storage_bytes"] for line in (run / "weights.jsonl").read_text().splitlines() if line
    )
    assert 0 < start < weights
    # WHEN the run and its bare trace are reported
    (bare,) = json.loads(_report([str(STATIC_TRACE), "--json"], capsys))["devices"]
    report = json.loads(_report([str(run), "--json"], capsys))
    (cpu,) = report["devices"]
    # THEN the run's figures are the trace's Bytes from the weights held before it: above TensorBoard's
    # curve ('Total Allocated', from `start`) by weights - start, so "TensorBoard shows up to N more" is
    # not said of the run
    assert cpu["peak_allocated_bytes"] == bare["peak_allocated_bytes"] + weights
    assert cpu["final_allocated_bytes"] == bare["final_allocated_bytes"] + weights
    assert not any("'Total Allocated' starts at" in note for note in report["notes"])
