"""`kvtrace export` / `kvtrace query` when one input is damaged in a way that used to lose the others or the
run's own data: a trace with one event nested 50,000 levels deep (it aborted the whole export, naming no
file), and a run folder whose manifest.json is gone (its trace was exported as the whole run, the KV log
silently left out). Real sample runs, copied and damaged here; row counts are counted from the raw files.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
DEPTH = 50_000  # far past the JSON decoder's recursion limit (about 1,000)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _rows(out: Path, table: str) -> int:
    """Rows of a table, read from its part files with pyarrow (not through kvtrace's readers)."""
    return sum(pq.read_metadata(p).num_rows for p in sorted((out / table).glob("part-*.parquet")))


def _expected_rows(run: Path) -> dict[str, int]:
    """A run's rows, counted from its own files: a line per KV event and sample, a `[memory]` event each."""
    (trace,) = sorted((run / "profiler").glob("*.pt.trace.json.gz"))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return {
        "runs": 1,
        "kv_events": len((run / "kv_events.jsonl").read_text().splitlines()),
        "samples": len((run / "memory_samples.jsonl").read_text().splitlines()),
        "memory_events": sum(1 for event in events if event.get("name") == "[memory]"),
    }


def _nested_trace(folder: Path, layout: str) -> Path:
    """A real trace of a sample run with one event's `args` nested DEPTH levels deep: added to a `[memory]`
    event in Kineto's own layout (the byte scanner's path), or as one more event after re-writing the whole
    trace compactly (the streaming JSON reader's path)."""
    (source,) = sorted((SAMPLES / "dynamic_b2" / "profiler").glob("*.pt.trace.json.gz"))
    text = gzip.decompress(source.read_bytes()).decode()
    nested = "[" * DEPTH + "]" * DEPTH
    if layout == "kineto":
        field = '"Ev Idx": '
        at = text.index(field, text.index('"name": "[memory]"'))
        text = f'{text[:at]}"deep": {nested}, {text[at:]}'
    else:
        trace = json.loads(text)
        trace["traceEvents"].append(
            {"ph": "X", "name": "x", "ts": 1, "dur": 1, "pid": 1, "tid": 1, "args": {}}
        )
        compact = json.dumps(trace, separators=(",", ":"))
        text = compact.replace('"args":{}}', f'"args":{{"a":{nested}}}}}')
    path = folder / f"nested_{layout}.pt.trace.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("layout", ["kineto", "compact"])
def test_a_deeply_nested_trace_is_skipped_and_the_run_beside_it_exported(tmp_path: Path, layout: str) -> None:
    # GIVEN a real run, and a real trace with one event nested 50,000 levels deep
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    nested = _nested_trace(tmp_path, layout)
    out = tmp_path / "tables"

    # WHEN both are exported
    code, stdout, err = _cli("export", "-q", str(run), str(nested), "-o", str(out))

    # THEN the trace is skipped in one line naming it and the problem, exit 2 as for any unreadable input (it
    # ended "error: an input is nested too deeply (run, trace, out)" and wrote no part)
    assert code == 2
    assert err.splitlines() == [
        f"kvtrace export: warning: skipped {nested}: JSON nested too deeply to read inside traceEvents"
    ]
    assert "exported 1 of 2 inputs" in stdout
    # AND every row of the run is exported
    expected = _expected_rows(run)
    assert {table: _rows(out, table) for table in expected} == expected

    # WHEN the folder holding both is queried
    folder = tmp_path / "both"
    shutil.copytree(run, folder / "run")
    shutil.copy(nested, folder / nested.name)
    code, stdout, err = _cli("query", str(folder), "--json", "SELECT count(*) AS n FROM kv_events")

    # THEN the trace is skipped with the same line, and the run's rows are all there
    assert code == 2
    assert err.splitlines() == [
        f"kvtrace query: warning: skipped {folder / nested.name}: JSON nested too deeply to read inside "
        "traceEvents"
    ]
    assert json.loads(stdout) == [{"n": expected["kv_events"]}]

    # WHEN the trace alone is reported
    code, stdout, err = _cli("report", "--no-export", str(nested))

    # THEN one line names it and the problem
    assert (code, stdout) == (2, "")
    assert err == f"kvtrace report: error: {nested}: JSON nested too deeply to read inside traceEvents\n"


def _run_without_manifest(folder: Path) -> Path:
    """A copy of a real recorded run whose manifest.json is gone (its KV log and profiler/ still there)."""
    run = folder / "partial"
    shutil.copytree(SAMPLES / "static_b2", run)
    (run / "manifest.json").unlink()
    return run


def _refusal(run: Path) -> str:
    (trace,) = sorted((run / "profiler").glob("*.pt.trace.json.gz"))
    return (
        f"{run}: not a kvtrace run: no manifest.json, which its kv_events.jsonl cannot be read without (a "
        f"partial copy?); its profiler trace reads on its own: pass {trace}"
    )


def test_a_run_folder_without_its_manifest_is_refused_as_report_refuses_it(tmp_path: Path) -> None:
    # GIVEN a run whose manifest is gone
    run = _run_without_manifest(tmp_path)
    out = tmp_path / "tables"

    # WHEN it alone is exported, or queried
    exported = _cli("export", "-q", str(run), "-o", str(out))
    queried = _cli("query", str(run), "SELECT count(*) FROM runs")
    reported = _cli("report", "--no-export", str(run))

    # THEN each refuses it in report's one line, exit 2, and no table is written (export said "exported 1 of 1
    # inputs", exit 0, a run of its trace alone with kv_events 0: its KV log's events lost without a word)
    assert exported == (2, "", f"kvtrace export: error: {_refusal(run)}\n")
    assert queried == (2, "", f"kvtrace query: error: {_refusal(run)}\n")
    assert reported == (2, "", f"kvtrace report: error: {_refusal(run)}\n")
    assert not out.exists()


def test_a_run_folder_without_its_manifest_is_skipped_and_the_others_exported(tmp_path: Path) -> None:
    # GIVEN a folder holding a whole run and a copy of another whose manifest is gone
    folder = tmp_path / "runs"
    folder.mkdir()
    run = folder / "whole"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    partial = _run_without_manifest(folder)
    out = tmp_path / "tables"

    # WHEN the folder is exported
    code, stdout, err = _cli("export", "-q", str(folder), "-o", str(out))

    # THEN the partial copy is skipped in one line, exit 2 (as any unreadable input), and every row of the
    # whole run is exported, nothing of the partial one's trace
    assert code == 2
    assert err.splitlines() == [f"kvtrace export: warning: skipped {_refusal(partial)}"]
    assert "exported 1 of 2 inputs" in stdout
    expected = _expected_rows(run)
    assert {table: _rows(out, table) for table in expected} == expected
    (row,) = pq.read_table(out / "runs").to_pylist()
    assert (row["run_id"], row["source_kind"]) == (run.as_posix(), "run")

    # WHEN the folder is queried
    code, stdout, err = _cli("query", str(folder), "--json", "SELECT run_id, kv_events FROM runs")

    # THEN the same line, and the whole run alone
    assert code == 2
    assert err.splitlines() == [f"kvtrace query: warning: skipped {_refusal(partial)}"]
    assert json.loads(stdout) == [{"run_id": run.as_posix(), "kv_events": expected["kv_events"]}]


def test_an_export_that_adds_nothing_leaves_no_folder(tmp_path: Path) -> None:
    # GIVEN a trace nested too deeply to read, and an export folder that does not exist yet
    nested = _nested_trace(tmp_path, "compact")
    out = tmp_path / "tables"

    # WHEN it alone is exported
    code, _, err = _cli("export", "-q", str(nested), "-o", str(out))

    # THEN it is skipped, and no folder is left (it left the seven tables' folders, empty)
    assert code == 2
    assert err.splitlines() == [
        f"kvtrace export: warning: skipped {nested}: JSON nested too deeply to read inside traceEvents"
    ]
    assert not out.exists()


def test_an_export_folder_whose_path_is_not_utf8_is_refused_in_one_line(tmp_path: Path) -> None:
    # GIVEN a sample run, and an export folder whose name holds a byte that is not UTF-8 (Linux allows it;
    # Python holds the byte as a lone surrogate, which pyarrow cannot encode)
    out = tmp_path / "tables\udcff"

    # WHEN the run is exported there
    code, stdout, err = _cli("export", "-q", str(SAMPLES / "dynamic_b2"), "-o", str(out))

    # THEN one line names the folder and the problem, exit 2 (it was an "internal error", exit 70), and
    # nothing is left behind
    assert code == 2
    assert stdout == ""
    assert err.splitlines() == [
        f"kvtrace export: error: {out}: the export folder's path is not UTF-8, which Parquet's writer "
        "and DuckDB's reader cannot open: choose a folder whose path is UTF-8"
    ]
    assert not out.exists()
