"""What a new user's mistakes and damaged inputs get from the CLI: one line naming the file or flag and an
exit status, never a traceback, never a run destroyed by its own report, and JSON that strict parsers read.

Each case here was found by trying the CLI the way users do (a size typed as 1e400, `-o` pointed at the
run's manifest, a hand-edited manifest, an empty SQL string) and used to end in a traceback or in damage.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvtrace import load_tables
from kvtrace.cli import main
from kvtrace.run_reader import read_run

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _strict_loads(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture()
def run_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", copy)
    return copy


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--preset", "llama-3-8b", "--gpu-memory", "1e400"],
        ["plan", "--preset", "llama-3-8b", "--gpu-memory", "1e99"],
        ["plan", "--preset", "llama-3-8b", "--reserve", "1e309"],
        ["diagnose", str(SAMPLES / "dynamic_b2"), "--budget", "1e400"],
        ["demo", "--no-report", "--gpu-memory", "1e400"],
        ["sweep", "--batch", "1", "--context", "8", "--gpu-memory", "1e400", "--out", "unused"],
    ],
    ids=["plan-inf", "plan-1e99", "plan-reserve", "diagnose-budget", "demo", "sweep"],
)
def test_a_size_too_large_for_any_device_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a working folder where the README's `kvtrace demo` already ran
    monkeypatch.chdir(tmp_path)
    shutil.copytree(SAMPLES / "dynamic_b2", tmp_path / "runs" / "demo-dynamic")
    # WHEN a size is typed beyond 16 EiB (it used to overflow float arithmetic: OverflowError)
    assert main(argv) == 2
    # THEN one line says so, naming the value
    err = capsys.readouterr().err
    assert "size too large" in err and err.count("\n") == 1
    assert not Path("unused").exists()


_BARE = (
    "{flag} {n}: a number without a unit is bytes, and {n} B is no device's memory: give its unit, e.g. "
    "{flag} {n}GiB"
)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["plan", "--preset", "llama-3-8b", "--gpu-memory", "70M"], "--gpu-memory: cannot read size '70M'"),
        (["plan", "--preset", "llama-3-8b", "--gpu-memory", "1.5B"], "--gpu-memory: a size in bytes must be"),
        (["plan", "--preset", "llama-3-8b", "--reserve", "70M"], "--reserve: cannot read size '70M'"),
        # a NaN compared as a fraction raised decimal's InvalidOperation: an "internal error", exit status 70
        (["plan", "--preset", "llama-3-8b", "--reserve", "nan"], "--reserve: cannot read size 'nan'"),
        (["plan", "--preset", "llama-3-8b", "--reserve", "sNaN"], "--reserve: cannot read size 'sNaN'"),
        (["plan", "--preset", "llama-3-8b", "--reserve=-NaN"], "--reserve: cannot read size '-NaN'"),
        (
            ["plan", "--preset", "llama-3-8b", "--engine", "vllm", "--gpu-memory", "0"],
            "--gpu-memory 0: a memory size must be positive",
        ),
        (
            ["plan", "--preset", "llama-3-8b", "--engine", "vllm", "--kv-cache-memory", "1.5B"],
            "--kv-cache-memory: a size in bytes must be a whole number, got '1.5B'",
        ),
        (
            ["plan", "--preset", "llama-3-8b", "--engine", "vllm", "--weights-bytes", "-1"],
            "--weights-bytes: size cannot be negative: '-1'",
        ),
        (["diagnose", str(SAMPLES / "dynamic_b2"), "--budget", "70M"], "--budget: cannot read size '70M'"),
        (
            ["sweep", "--batch", "1", "--context", "8", "--budget", "0", "--out", "unused"],
            "--budget 0: a memory size must be positive",
        ),
        (
            # the flag as typed (it used to name --budget, an alias the user never typed)
            ["sweep", "--out", "unused", "--gpu-memory", "24G"],
            "--gpu-memory: cannot read size '24G'",
        ),
        (["demo", "--no-report", "--gpu-memory", "70M"], "--gpu-memory: cannot read size '70M'"),
        (["demo", "--no-report", "--gpu-memory", "1.5B"], "--gpu-memory: a size in bytes must be"),
        (["demo", "--no-report", "--gpu-memory", "nan"], "--gpu-memory: cannot read size 'nan'"),
        (["demo", "--no-report", "--gpu-memory", "inf"], "--gpu-memory: cannot read size 'inf'"),
        (["sweep", "--out", "unused", "--gpu-memory", "nan"], "--gpu-memory: cannot read size 'nan'"),
        (["sweep", "--out", "unused", "--gpu-memory", "inf"], "--gpu-memory: cannot read size 'inf'"),
        # a device's memory without its unit: 24 bytes planned a GPU of 0.02 KiB ("peak ... of 0.02 KiB")
        (["plan", "--preset", "llama-3-8b", "--gpu-memory", "24"], _BARE.format(flag="--gpu-memory", n=24)),
        (
            ["plan", "--preset", "llama-3.1-8b", "--engine", "vllm", "--gpu-memory", "24"],
            _BARE.format(flag="--gpu-memory", n=24),
        ),
        (["diagnose", str(SAMPLES / "dynamic_b2"), "--budget", "80"], _BARE.format(flag="--budget", n=80)),
        (["sweep", "--out", "unused", "--budget", "80"], _BARE.format(flag="--budget", n=80)),
        (["sweep", "--out", "unused", "--gpu-memory", "80"], _BARE.format(flag="--gpu-memory", n=80)),
        (["demo", "--no-report", "--gpu-memory", "8"], _BARE.format(flag="--gpu-memory", n=8)),
        (
            ["run", "--gpu-memory", "24", "--out", "unused", "script.py"],
            _BARE.format(flag="--gpu-memory", n=24),
        ),
    ],
    ids=[
        "plan",
        "plan-fraction",
        "plan-reserve",
        "plan-reserve-nan",
        "plan-reserve-snan",
        "plan-reserve-minus-nan",
        "plan-vllm-zero",
        "plan-vllm-kv",
        "plan-vllm-weights",
        "diagnose",
        "sweep-zero",
        "sweep-gpu-memory",
        "demo",
        "demo-fraction",
        "demo-nan",
        "demo-inf",
        "sweep-nan",
        "sweep-inf",
        "plan-bare",
        "plan-vllm-bare",
        "diagnose-bare",
        "sweep-budget-bare",
        "sweep-gpu-memory-bare",
        "demo-bare",
        "run-bare",
    ],
)
def test_a_bad_size_is_refused_naming_its_flag(
    argv: list[str],
    said: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a working folder
    monkeypatch.chdir(tmp_path)
    # WHEN a size flag is given a unit kvtrace does not read, a fraction of a byte, zero or a negative size
    assert main(argv) == 2
    # THEN one line names the flag, and nothing was run or written
    err = capsys.readouterr().err
    assert f"error: {said}" in err and err.count("\n") == 1
    assert not Path("unused").exists()


def test_report_and_compare_refuse_to_write_html_over_a_file_of_the_run(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = (run_copy / "manifest.json").read_bytes()
    # WHEN -o names the run's own manifest or log THEN nothing is done, and the run stays readable
    for target in ("manifest.json", "kv_events.jsonl"):
        assert main(["report", str(run_copy), "--no-export", "-o", str(run_copy / target)]) == 2
        assert "exists and is not an HTML file" in capsys.readouterr().err
    assert main(["compare", str(run_copy), str(run_copy), "-o", str(run_copy / "manifest.json")]) == 2
    assert "exists and is not an HTML file" in capsys.readouterr().err
    assert (run_copy / "manifest.json").read_bytes() == manifest
    # AND a folder or an empty path is refused before the report is built (nothing printed on stdout)
    for target in (str(run_copy), ""):
        assert main(["report", str(run_copy), "--no-export", "-o", target]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1
    # AND an HTML file is written, and written again
    page = run_copy / "timeline.html"
    for _ in range(2):
        assert main(["report", str(run_copy), "--no-export", "-q", "-o", str(page)]) == 0
        assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_an_output_named_for_json_or_text_is_refused_not_filled_with_html(
    run_copy: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # GIVEN -o paths named for what report and compare print on stdout: `-o figures.json` wrote the 5 MB
    # HTML page there, which no JSON reader could read
    for command in (["report", str(run_copy), "--no-export"], ["compare", str(run_copy), str(run_copy)]):
        for name, said in (("figures.json", "`--json > "), ("figures.TXT", "(`> ")):
            target = tmp_path / name
            # WHEN one is given THEN one line says what -o writes and how to get that file, nothing written
            assert main([*command, "-q", "-o", str(target)]) == 2
            out = capsys.readouterr()
            assert out.out == "" and out.err.count("\n") == 1, out.err
            assert "-o writes an HTML page" in out.err and f"{said}{target}`" in out.err, out.err
            assert not target.exists()


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("device", None, "field 'device' is null, expected an object"),
        ("ended", "x", "field 'ended' is str, expected an object"),
        ("options", None, "field 'options' is null, expected an object"),
        ("model", "x", "field 'model' is str, expected an object or null"),
        ("notes", 3, "field 'notes' is int, expected a list"),
    ],
)
def test_a_manifest_with_a_field_of_the_wrong_type_is_one_line(
    run_copy: Path, field: str, value: object, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    path.write_text(json.dumps(manifest))
    for argv in (["report", str(run_copy), "--no-export"], ["diagnose", str(run_copy)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and str(path) in err and err.count("\n") == 1


def _snapshot(trace_size: int, segment_size: int, addr: int = 8192) -> dict[str, object]:
    block = {"address": 4096, "size": 512, "requested_size": 500, "state": "active_allocated", "frames": []}
    segment = {"device": 0, "address": 4096, "total_size": segment_size, "allocated_size": 512}
    entry = {"action": "alloc", "addr": addr, "size": trace_size, "stream": 0, "time_us": 1, "frames": []}
    return {"segments": [{**segment, "blocks": [block]}], "device_traces": [[entry]]}


@pytest.mark.parametrize(
    ("trace_size", "segment_size", "addr", "where"),
    [
        (-4096, 2 << 20, 8192, "a trace entry"),
        (-4096, 2 << 20, 1 << 64, "a trace entry (alloc)"),  # past int64: the entry-by-entry replay
        (512, -1, 8192, "a segment"),
    ],
    ids=["trace-entry", "trace-entry-loop", "segment"],
)
def test_a_snapshot_with_a_negative_size_is_malformed(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    trace_size: int,
    segment_size: int,
    addr: int,
    where: str,
) -> None:
    import pickle

    # GIVEN a snapshot whose sizes no allocator writes (it drew memory curves below zero)
    path = tmp_path / "crafted.pickle"
    path.write_bytes(pickle.dumps(_snapshot(trace_size, segment_size, addr)))
    # THEN one line names the file and the field, exit 2
    assert main(["report", str(path), "--no-export"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "negative size -" in err and where in err and err.count("\n") == 1
    # AND the same snapshot with sane sizes reads
    path.write_bytes(pickle.dumps(_snapshot(1024, 2 << 20)))
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"][0]["final_allocated_bytes"] == 500 + 1024


def test_a_trace_with_nan_timestamps_reports_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a trace whose memory events carry NaN or infinite timestamps (Python's json reads them)
    trace = tmp_path / "nan.json"
    event = (
        '{"ph":"i","name":"[memory]","ts":%s,"pid":1,"tid":1,'
        '"args":{"Bytes":%d,"Addr":%d,"Device Id":0,"Device Type":1}}'
    )
    events = [
        event % ("NaN", 100, 1),
        event % ("Infinity", 100, 2),
        event % ("5", 256, 3),
        event % ('"nan"', 1, 4),
    ]
    trace.write_text('{"traceEvents":[' + ",".join(events) + "]}")
    # WHEN reported with --json
    for argv in (["report", str(trace), "--json", "-q"], ["diagnose", str(trace), "--json"]):
        assert main(argv) == 0
        figures = _strict_loads(capsys.readouterr().out)  # THEN strict JSON: no NaN anywhere
        assert isinstance(figures, dict)
    assert main(["report", str(trace), "--json", "-q"]) == 0
    report = _strict_loads(capsys.readouterr().out)
    assert isinstance(report, dict)
    # AND the event with a real time is kept, the three others skipped and said
    device = report["devices"][0]
    assert device["peak_allocated_bytes"] == 256
    # (NaN and Infinity are numbers at no place in time; "nan" is a string)
    assert (
        "skipped 3 of 4 events: 2 [memory] with an infinite or NaN ts, 1 [memory] with a non-numeric ts"
        in report["notes"]
    )


@pytest.mark.parametrize("order", [(1, 2), (2, 1)], ids=["in-order-streamed", "out-of-order-columns"])
def test_a_trace_with_a_negative_allocator_total_never_goes_below_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], order: tuple[int, int]
) -> None:
    # GIVEN a trace whose allocator total goes below zero (crafted): 100 B allocated, then freed
    def memory(ts: int, delta: int, total: int) -> dict[str, object]:
        args = {"Bytes": delta, "Addr": 5, "Total Allocated": total, "Device Type": 1, "Device Id": 0}
        return {"ph": "i", "name": "[memory]", "ts": ts, "pid": 1, "tid": 1, "args": args}

    # (written in that order; with the second earlier in time, the events are sorted in memory)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": [memory(order[0], 100, 100), memory(order[1], -100, -5000)]}))
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    report = _strict_loads(capsys.readouterr().out)
    assert isinstance(report, dict)
    # THEN the total is ignored, said in a note, and the figures come from Bytes
    (device,) = report["devices"]
    if order == (1, 2):
        assert (device["peak_allocated_bytes"], device["final_allocated_bytes"]) == (100, 0)
    else:  # the free comes first in time: 100 B were held before the trace began
        assert (device["peak_allocated_bytes"], device["final_allocated_bytes"]) == (100, 100)
    assert any("'Total Allocated' below zero" in note for note in report["notes"])


def test_query_refuses_empty_sql_and_a_folder_without_sources_and_writes_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = str(SAMPLES / "dynamic_b2")
    for sql in ("", "  ", "-- only a comment", ";"):
        assert main(["query", run, sql]) == 2
        assert "no SQL statement" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["query", str(empty), "select * from runs"]) == 2
    assert "no run directories, traces or snapshots found" in capsys.readouterr().err
    # DuckDB values JSON has no type for (UUID, NaN, infinity) come out as text or null, in one valid document
    sql = "select uuid() as id, 'nan'::double as n, 'inf'::double as i, count(*) as events from kv_events"
    assert main(["query", run, "--json", sql]) == 0
    rows = _strict_loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert len(row["id"]) == 36 and row["n"] is None and row["i"] is None
    assert row["events"] == len((SAMPLES / "dynamic_b2" / "kv_events.jsonl").read_text().splitlines())


def test_query_runs_one_statement_and_only_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(SAMPLES / "dynamic_b2")
    target = tmp_path / "out.csv"
    # WHEN a "query" would write a file, install an extension, or hide a second statement after the first
    refused = {
        f"COPY (SELECT * FROM runs) TO '{target}'": "COPY statements are refused",
        "INSTALL httpfs": "INSTALL statements are refused",
        "FORCE INSTALL httpfs": "INSTALL statements are refused",
        "LOAD httpfs": "LOAD statements are refused",
        f"ATTACH '{tmp_path / 'x.db'}'": "ATTACH statements are refused",
        f"SELECT 1; COPY (SELECT 1) TO '{target}'": "2 SQL statements",
        # EXPLAIN ANALYZE runs what it explains: it used to write the file
        f"EXPLAIN ANALYZE COPY (SELECT * FROM runs) TO '{target}'": "COPY statements are refused",
        "/* a comment */ explain analyze INSTALL httpfs": "INSTALL statements are refused",
    }
    for sql, said in refused.items():
        # THEN it is refused in one line (exit 2) before anything runs
        assert main(["query", run, sql]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert not target.exists() and not (tmp_path / "x.db").exists()
    # AND no file outside the tables can be read, on a source or an export folder
    secret = tmp_path / "secret.txt"
    secret.write_text("not for a query\n")
    export_dir = tmp_path / "tables"
    assert main(["export", run, "-o", str(export_dir), "-q"]) == 0
    capsys.readouterr()
    for source in (run, str(export_dir)):
        assert main(["query", source, f"SELECT * FROM read_text('{secret}')"]) == 2
        err = capsys.readouterr().err
        assert "Permission Error" in err and str(secret) in err and err.count("\n") == 1, err
    assert main(["query", str(export_dir), "--json", "EXPLAIN ANALYZE SELECT count(*) FROM kv_events"]) == 0
    capsys.readouterr()
    # AND reading statements still run, a trailing semicolon included
    assert main(["query", run, "--json", "DESCRIBE runs;"]) == 0
    columns = _strict_loads(capsys.readouterr().out)
    assert isinstance(columns, list) and "run_id" in [row["column_name"] for row in columns]


def test_query_and_export_of_a_folder_skip_an_unreadable_input_and_name_it_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a folder holding a run and a trace cut short (an interrupted copy), named relative to the cwd
    shutil.copytree(SAMPLES / "dynamic_b2", tmp_path / "in" / "run")
    (tmp_path / "in" / "cut.pt.trace.json").write_text('{"traceEvents": [')
    monkeypatch.chdir(tmp_path)
    said = "warning: skipped in/cut.pt.trace.json: truncated"
    # WHEN it is queried, THEN the run is counted and the trace skipped with a warning that names it as
    # given; the status is 2, as `export` gives when it skips an input
    assert main(["query", "in", "--json", "SELECT count(*) AS runs FROM runs"]) == 2
    out, err = capsys.readouterr()
    assert _strict_loads(out) == [{"runs": 1}]
    assert f"kvtrace query: {said}" in err and str(tmp_path) not in err
    # AND export says the same
    assert main(["export", "in", "-o", "tables", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"kvtrace export: {said}" in err and str(tmp_path) not in err
    # AND a folder where nothing can be read is an error, as is the cut trace named on its own
    (tmp_path / "in" / "run" / "manifest.json").unlink()
    shutil.rmtree(tmp_path / "in" / "run")
    # (the folder's one input: its problem is the error, in one line, as for the file named on its own)
    assert main(["query", "in", "SELECT 1"]) == 2
    cut = "in/cut.pt.trace.json: truncated: the JSON ends inside traceEvents"
    assert capsys.readouterr().err.splitlines() == [f"kvtrace query: error: {cut}"]
    assert main(["query", "in/cut.pt.trace.json", "SELECT 1"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"kvtrace query: error: {cut}"]
    # AND of two unreadable inputs each is named, then the folder
    (tmp_path / "in" / "empty.pickle").write_bytes(b"")
    assert main(["query", "in", "SELECT 1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "kvtrace query: warning: skipped in/cut.pt.trace.json: truncated: the JSON ends inside traceEvents",
        "kvtrace query: warning: skipped in/empty.pickle: empty file",
        "kvtrace query: error: in: could not read any of its 2 inputs",
    ]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["diagnose", str(SAMPLES / "dynamic_b2"), "--budget", "0"], "--budget 0: a memory size must be"),
        (["plan", "--preset", "llama-3-8b", "--reserve", "-0.1"], "--reserve -0.1: cannot be negative"),
        (["plan", "--preset", "llama-3-8b", "--cache", "sliding"], "give one with --window"),
        (["sweep", "--cache", "foo", "--out", "unused"], "--cache: unknown cache kind foo; choose from"),
        (["sweep", "--batch", "1,1", "--out", "unused"], "--batch lists a value twice: '1,1'"),
        (["sweep", "--context", "8,8", "--out", "unused"], "--context lists a value twice"),
        (["sweep", "--cache", "dynamic,dynamic", "--out", "unused"], "--cache lists a kind twice"),
    ],
    ids=[
        "budget-0",
        "reserve-negative",
        "sliding-no-window",
        "cache-kind",
        "batch-twice",
        "context-twice",
        "cache-twice",
    ],
)
def test_a_flag_value_that_cannot_work_is_named(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN a value is refused, THEN one line names the flag and why (a sweep listing a point twice used to
    # record both into one folder, the second over the first)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err
    assert not Path("unused").exists()


@pytest.mark.parametrize("name", ["kv_events.jsonl", "weights.jsonl", "memory_samples.jsonl"])
def test_a_finished_run_with_a_file_cut_afterwards_is_damaged_not_interrupted(
    run_copy: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose manifest says it ended, with one of its logs cut mid-line (a partial copy)
    path = run_copy / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # THEN a cut KV log is an error naming the file (its figures would be wrong, not merely early); the
    # weights or samples are read as missing, a note naming the file and the damage (the KV log is whole)
    if name == "kv_events.jsonl":
        assert main(["report", str(run_copy), "--json", "--no-export"]) == 2
        err = capsys.readouterr().err
        assert f"{path}: damaged after the run ended" in err and err.count("\n") == 1
        total = len(data.decode().splitlines())
        kept = len(data[: len(data) // 2].decode().splitlines()) - 1
        assert f"{kept} complete events of the {total} the manifest counts" in err
    else:
        assert main(["report", str(run_copy), "--json", "--no-export", "-q"]) == 0
        notes = _strict_loads(capsys.readouterr().out)["notes"]  # type: ignore[index]
        said = f"{path}: damaged after the run ended: "
        assert [n for n in notes if n.startswith(said) and ", so it is read as missing: " in n], notes
    # AND a run whose process died (manifest still "running") is still read up to its last whole line
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["ended"] = {"status": "running"}
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", str(run_copy), "--json", "--no-export"]) == 0
    assert "the run never finished" in " ".join(_strict_loads(capsys.readouterr().out)["notes"])  # type: ignore[index]


REAL = SAMPLES.parent.parent / "shared" / "real_traces"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--dtype", "fp8"], "--dtype fp8 with --engine vllm: vLLM's plan takes bf16, fp16 or fp32"),
        (["--kv-dtype", "fp8"], "--kv-dtype does not apply with --engine vllm: use --kv-cache-dtype"),
        (["--max-model-len", "0"], "--max-model-len must be at least 1, got 0"),
    ],
    ids=["dtype", "kv-dtype", "max-model-len-0"],
)
def test_plan_for_vllm_refuses_flags_it_would_ignore(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # these used to be planned silently as bf16 weights, "auto" KV, and 8192 tokens
    assert main(["plan", "--engine", "vllm", "--preset", "llama-3-8b", *argv]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["int4", "int8", "fp8"])
def test_plan_of_quantized_weights_keeps_a_bf16_kv_cache(
    dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # weight-only quantization computes in bf16: Llama 3 8B's KV is 32 x 2 x 8 x 128 x 2 B per token, not
    # the weights' width (a GPTQ int4 user used to be told a KV cache 4x too small)
    assert main(["plan", "--preset", "llama-3-8b", "--dtype", dtype, "--json"]) in (0, 1)
    plan = _strict_loads(capsys.readouterr().out)
    assert isinstance(plan, dict) and plan["kv_bytes_per_token"] == 32 * 2 * 8 * 128 * 2
    # AND fp8 KV is transformers' QuantizedCache's fp8 backend (a DynamicCache of fp8 is refused)
    fp8_cache = ["--cache", "quantized", "--kv-dtype", "fp8", "--json"]
    assert main(["plan", "--preset", "llama-3-8b", "--dtype", dtype, *fp8_cache]) in (0, 1)
    plan = _strict_loads(capsys.readouterr().out)
    assert isinstance(plan, dict) and plan["kv_bytes_per_token"] == 32 * 2 * 8 * 128 * 1


def test_diagnose_says_what_it_cannot_know(capsys: pytest.CaptureFixture[str]) -> None:
    trace, snapshot = REAL / "chrome" / "rank0.json.gz", REAL / "snapshots" / "memory_snapshot.pickle"
    if not trace.exists() or not snapshot.exists():
        pytest.skip("the real traces are not here")
    # a trace without memory events: one line, not an empty diagnosis of "?" with exit 0
    assert main(["diagnose", str(trace)]) == 2
    assert "no memory events to diagnose (profile with torch.profiler(profile_memory=True)" in (
        capsys.readouterr().err
    )
    # a snapshot has no steps: the budget headline does not print "step None (None)"
    assert main(["diagnose", str(snapshot), "--budget", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "would run out of memory on a 12.00 GiB device (cuda:0): a 96.00 MiB" in out
    assert "None" not in out
    # a vLLM run whose KV dtype was not recorded: null in JSON, not the text "None"
    assert main(["report", str(SAMPLES / "vllm_refused"), "--json", "--no-export"]) == 0
    report = _strict_loads(capsys.readouterr().out)
    assert isinstance(report, dict) and report["engine"]["kv_dtype"] is None


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", *argv], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["diagnose", str(SAMPLES / "dynamic_b2"), "--no-export"],
            "kvtrace diagnose: error: unrecognized arguments: --no-export (see kvtrace diagnose --help)",
        ),
        (
            ["plan", "--batch", "abc"],
            "kvtrace plan: error: argument --batch: a whole number or a comma list of them (1,4,8), "
            "not 'abc' (see kvtrace plan --help)",
        ),
        (
            ["report"],
            "kvtrace report: error: the following arguments are required: PATH (see kvtrace report --help)",
        ),
    ],
    ids=["unknown-flag", "bad-value", "missing-path"],
)
def test_a_bad_flag_is_one_line_naming_its_command(argv: list[str], said: str) -> None:
    # WHEN a flag is wrong THEN one line names the command, the flag and where the flags are listed: not
    # argparse's usage block (17 lines for `plan`) above it
    done = _cli(*argv)
    assert done.returncode == 2
    assert done.stderr == said + "\n" and done.stdout == ""


def test_an_output_below_a_file_is_refused_before_the_work_with_status_1(tmp_path: Path) -> None:
    # GIVEN -o PATH whose parent is a file
    parent = tmp_path / "a-file"
    parent.write_text("x")
    target = parent / "t.html"
    # WHEN report and compare are asked to write there THEN status 1 (as their --help says), nothing on
    # stdout, and the line names the file in the way ("File exists" read as if the output were there)
    for argv in (
        ["report", str(SAMPLES / "static_b2"), "--no-export", "-q", "-o", str(target)],
        ["compare", str(SAMPLES / "static_b2"), str(SAMPLES / "dynamic_b2"), "-o", str(target)],
    ):
        done = _cli(*argv)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr == (
            f"kvtrace {argv[0]}: error: {target}: cannot write (a parent of the path is a file: {parent})\n"
        )
        assert "1 when" in " ".join(_cli(argv[0], "--help").stdout.split())
    # AND an export DIR below the file: the same line, status 1
    tables = parent / "tables"
    done = _cli("export", str(SAMPLES / "static_b2"), "-q", "-o", str(tables))
    assert done.returncode == 1
    said = f"{tables}: cannot write (a parent of the path is a file: {parent})"
    assert done.stderr == f"kvtrace export: error: {said}\n"
    assert parent.read_text() == "x"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_html_output_that_is_an_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a trace named t.html (the readers know it by its content), and a link to it
    trace = tmp_path / "t.html"
    shutil.copy(next((SAMPLES / "static_b2" / "profiler").iterdir()), trace)
    (tmp_path / "link.html").symlink_to("t.html")
    content = trace.read_bytes()
    run = str(SAMPLES / "dynamic_b2")
    for argv, out, given in [
        (["report", str(trace), "-q", "-o", str(trace)], trace, trace),
        (["report", str(tmp_path / "link.html"), "-q", "-o", str(trace)], trace, tmp_path / "link.html"),
        (["report", str(trace), "-q", "-o", str(tmp_path / "link.html")], tmp_path / "link.html", trace),
        (
            ["compare", str(trace), run, "-o", str(tmp_path / "x" / ".." / "t.html")],
            tmp_path / "x/../t.html",
            trace,
        ),
    ]:
        # WHEN -o names it, as typed, through a link, or by another path
        # THEN one line and status 2 before any work (the page replaced the trace), the trace as it was
        assert main(argv) == 2
        said = f"{out}: is an input ({given}), which the page would replace; give another -o path"
        assert capsys.readouterr() == ("", f"kvtrace {argv[0]}: error: {said}\n")
        assert trace.read_bytes() == content and (tmp_path / "link.html").is_symlink()


def test_an_export_into_an_input_or_a_run_is_refused_and_a_run_into_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run C, a folder of runs holding it, and an export directory E
    runs = tmp_path / "runs"
    run = runs / "C"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    tables = tmp_path / "E"
    assert main(["export", str(SAMPLES / "static_b2"), "-q", "-o", str(tables)]) == 0
    capsys.readouterr()
    before, exported = _files(runs), _files(tables)
    # WHEN the run is exported into itself, below itself, below a run found in a folder exported, or into
    # another run (the tables used to land in the run, which was then "an export directory, not a run")
    other = tmp_path / "other"
    shutil.copytree(SAMPLES / "static_b2", other)
    for argv, said in [
        (["export", str(run), "-o", str(run)], f"{run}: is an input ({run})"),
        (["export", str(run), "-o", str(run / "t")], f"{run / 't'}: inside the run {run}, an input"),
        (
            ["export", str(runs), "-o", str(run / "t")],
            f"{run / 't'}: inside the run {runs.as_posix()}/C, an input",
        ),
    ]:
        # THEN one line, status 2, nothing written
        assert main([*argv, "-q"]) == 2
        assert capsys.readouterr() == (
            "",
            f"kvtrace export: error: {said}; give the tables a folder of their own as -o DIR\n",
        )
    assert main(["export", str(run), "-q", "-o", str(other)]) == 2
    said = f"{other}: a kvtrace run, not an export directory; give the tables a folder of their own"
    assert capsys.readouterr().err == f"kvtrace export: error: {said}\n"
    assert _files(runs) == before and not (other / "runs").exists()
    # AND the run is still exported (it used to be refused as an export directory)
    assert main(["export", str(run), "-q", "-o", str(tmp_path / "tables")]) == 0
    capsys.readouterr()

    # WHEN a run or a sweep is recorded into the export directory THEN it is refused, as a sweep's folder is
    (tmp_path / "user.py").write_text("print('ran')\n")
    for argv in (
        ["run", "-o", str(tables), str(tmp_path / "user.py")],
        ["demo", "--size", "tiny", "--no-report", "--out", str(tables), "--overwrite"],
        ["sweep", "--size", "tiny", "--batch", "1", "--context", "8", "--out", str(tables)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"kvtrace {argv[0]}: error: {tables}: an export directory (Parquet tables), not a "
        )
        assert err.count("\n") == 1
    assert _files(tables) == exported


def test_a_demo_into_a_path_that_is_a_file_is_one_line_and_status_1(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtrace.cli",
            "demo",
            "--new-tokens",
            "2",
            "--no-profiler",
            "--no-report",
            "--out",
            str(target),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    said = f"{target}: cannot create the run folder (a file of that name is there, not a folder)"
    assert said in done.stderr and "Traceback" not in done.stderr
    assert target.read_text() == "not a folder"


def test_a_sweep_of_a_config_with_a_small_vocabulary_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Llama-architecture config with a 32k vocabulary (prompt ids used to be drawn below 128,000)
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "vocab_size": 32000,
            }
        )
    )
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--batch", "2", "--context", "8", "--new-tokens", "3"]
    assert main([*argv, "--cache", "dynamic", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"]
    # AND the same sweep again refuses to replace it without --overwrite, and leaves it as it was
    written = (out / "sweep.json").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--cache", "dynamic", "--out", str(out)]) == 2
    assert "already holds a sweep; pass --overwrite" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == written
    # THEN its KV is the arithmetic: layers x 2 x kv_heads x head_dim x tokens x batch x 4 bytes (float32),
    # with 8 + 3 - 1 tokens held at the end (the last new token is never fed back)
    assert rows[0]["kv_final_bytes"] == 2 * 2 * 2 * (64 // 4) * (8 + 3 - 1) * 2 * 4


def test_a_sweep_of_a_config_whose_head_dim_is_not_hidden_over_heads_runs(tmp_path: Path) -> None:
    # GIVEN a config whose head_dim (32) is not hidden_size / heads (64 / 4 = 16), as Qwen3's and Gemma's
    config = tmp_path / "config.json"
    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}
    config.write_text(json.dumps({**shape, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 1000}))
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--batch", "2", "--context", "8", "--new-tokens", "3"]
    # WHEN it is swept
    assert main([*argv, "--cache", "dynamic", "--out", str(out)]) == 0
    (row,) = json.loads((out / "sweep.json").read_text())["rows"]
    # THEN the model recorded has the config's head_dim, and its KV is the arithmetic of it: layers x 2 x
    # kv_heads x head_dim x (8 + 3 - 1 tokens) x batch x 4 bytes (float32)
    assert read_run(row["run"]).manifest["model"]["head_dim"] == 32
    assert row["kv_final_bytes"] == 2 * 2 * 1 * 32 * (8 + 3 - 1) * 2 * 4


def test_a_sweep_of_heads_not_a_multiple_of_the_kv_heads_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Llama's attention shares each KV head among heads / KV heads query heads: 6 over 4 cannot run
    config = tmp_path / "config.json"
    shape = {"num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 96}
    config.write_text(json.dumps({**shape, "intermediate_size": 128, "vocab_size": 1000}))
    argv = ["sweep", "--config", str(config), "--batch", "1", "--context", "8", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "6 attention heads are not a multiple of its 4 KV heads" in err and "head_dim" not in err
    assert not (tmp_path / "s").exists()


def test_a_sweep_refusing_a_config_names_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a config file that is not called config.json, in a folder named for something else: its
    # layers keep a 12-token window, which the points' 8 + 8 tokens pass
    config = tmp_path / "mistral-like.json"
    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
    config.write_text(
        json.dumps({**shape, "intermediate_size": 128, "vocab_size": 1000, "sliding_window": 12})
    )
    argv = ["sweep", "--config", str(config), "--batch", "1", "--context", "8", "--new-tokens", "8"]
    # WHEN it is swept
    assert main([*argv, "--out", str(tmp_path / "s")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    # THEN the one line names the file given, not the folder it is in (the name of the folder the user ran
    # the command from, for a config in the current folder)
    assert line.startswith(f"kvtrace sweep: error: {config}: 2 of its layers keep a 12-token window"), line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("reserve", ["1.5", "2", "1023"])
def test_plan_refuses_a_reserve_that_is_neither_a_fraction_nor_a_size(
    reserve: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # a bare "1.5" used to mean 1 byte: neither the 150% nor the 1.5 GB the user had in mind
    assert main(["plan", "--preset", "llama-3-8b", "--reserve", reserve]) == 2
    assert f"--reserve {reserve}: a fraction must be below 1" in capsys.readouterr().err
    for accepted in ("0.15", "2GiB", "12345"):
        assert main(["plan", "--preset", "llama-3-8b", "--reserve", accepted, "--json"]) in (0, 1)
        assert _strict_loads(capsys.readouterr().out)


def test_compare_of_one_folder_of_runs_names_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(SAMPLES)]) == 2
    err = capsys.readouterr().err
    runs = sorted(p for p in SAMPLES.iterdir() if (p / "manifest.json").is_file())
    assert f"holds {len(runs)} runs: name them, e.g. kvtrace compare {runs[0]} {runs[1]}" in err


def test_a_sweep_past_the_models_positions_is_refused_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    assert (
        main(["sweep", "--batch", "1", "--context", "8,200000", "--new-tokens", "2", "--out", str(out)]) == 2
    )
    assert "200002 tokens passes the model's max_position_embeddings (131072)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--window", "4"], "--window applies to --cache sliding or static_sliding, not dynamic"),
        (["--compression", "0.3"], "--compression applies with --press"),
        (["--press", "snapkv", "--compression", "2"], "--compression must be in [0, 1), got 2.0"),
        (["--with-stack", "--no-profiler"], "--with-stack adds stacks to the profiler trace"),
        (["--prompt", "a", "--prompt", "b", "--batch", "1"], "2 prompts for --batch 1"),
    ],
    ids=["window", "compression", "compression-range", "with-stack", "prompts"],
)
def test_a_demo_flag_that_would_do_nothing_is_refused(
    tmp_path: Path, flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # they used to be accepted and ignored: the user believed the run had a window, a press, stacks
    assert main(["demo", "--no-report", "--out", str(tmp_path / "r"), *flags]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_plan_from_a_run_that_is_not_there_says_so(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN --from-run names nothing (a typo) THEN it is said as every command says it; it used to send the
    # user looking for an engine.json ("not a vLLM run")
    missing = tmp_path / "does" / "not" / "exist"
    assert main(["plan", "--engine", "vllm", "--from-run", str(missing)]) == 2
    assert capsys.readouterr().err == f"kvtrace plan: error: {missing}: no such file or directory\n"
    # AND a run that is there but not vLLM's is still named as such
    assert main(["plan", "--engine", "vllm", "--from-run", str(run_copy)]) == 2
    assert capsys.readouterr().err == f"kvtrace plan: error: {run_copy}: not a vLLM run (no engine.json)\n"


def test_vllm_first_run_mistakes_are_refused_without_touching_a_run(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = (run_copy / "manifest.json").read_bytes()
    # the vLLM demo into a folder holding a run: refused as the HF demo is (it used to replace the run)
    assert main(["demo", "--engine", "vllm", "--out", str(run_copy), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert f"{run_copy}: already holds a run; pass --overwrite" in err and err.count("\n") == 1
    assert (run_copy / "manifest.json").read_bytes() == manifest
    # a vLLM run planned with --engine hf (transformers' caches) is refused, saying what to drop
    assert main(["plan", "--engine", "hf", "--from-run", str(SAMPLES / "vllm_preempt")]) == 2
    assert "a vLLM run, whose pool --engine hf does not plan: drop --engine hf" in capsys.readouterr().err
    assert (run_copy / "manifest.json").read_bytes() == manifest
    # a refused run recorded without the model's MLP size (as kvtrace wrote engine.json before it kept it):
    # its pool was sized by kv_cache_memory_bytes, which needs no weights, so it is planned as vLLM refused
    # it (exit 1), the weights left unknown
    refused = shutil.copytree(SAMPLES / "vllm_refused", tmp_path / "vllm_refused")
    older = json.loads((refused / "engine.json").read_text())
    del older["model"]["intermediate_size"]
    (refused / "engine.json").write_text(json.dumps(older))
    assert main(["plan", "--engine", "vllm", "--from-run", str(refused), "--json"]) == 1
    planned = json.loads(capsys.readouterr().out)
    engine = json.loads((refused / "engine.json").read_text())
    assert planned["weights_bytes"] is None and planned["starts"] is False
    assert planned["estimated_max_model_len"] == engine["refused"]["estimated_max_model_len"]
    # where the profile arithmetic sizes the pool (a GPU typed): weights not guessed (MLP 0 halved them)
    assert main(["plan", "--engine", "vllm", "--from-run", str(refused), "--gpu-memory", "24GiB"]) == 2
    assert f"{refused}: its engine.json does not give the model's MLP size" in capsys.readouterr().err
    # the plugin (vllm serve with KVTRACE_DIR) names its own knob to replace a run
    from kvtrace.integrations import vllm_plugin
    from kvtrace.recorder import RecordingError

    monkeypatch.setenv("KVTRACE_DIR", str(run_copy))
    monkeypatch.delenv("KVTRACE_OVERWRITE", raising=False)
    with pytest.raises(RecordingError, match="set KVTRACE_OVERWRITE=1 to replace it"):
        vllm_plugin._open_run()
    assert (run_copy / "manifest.json").read_bytes() == manifest


def test_a_block_that_raised_or_was_interrupted_says_so_in_the_report(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    interrupted = {"status": "interrupted", "type": "KeyboardInterrupt"}
    raised = {"status": "exception", "type": "ValueError", "message": "bad prompt"}
    for ended, said in (
        (interrupted, "the recorded block was interrupted (Ctrl-C)"),
        (raised, "the recorded block raised ValueError: bad prompt"),
    ):
        manifest["ended"] = {**ended, "t_ns": manifest["ended"]["t_ns"]}
        path.write_text(json.dumps(manifest))
        assert main(["report", str(run_copy), "--json", "--no-export"]) == 0
        notes = " ".join(_strict_loads(capsys.readouterr().out)["notes"])  # type: ignore[index]
        assert said in notes


def test_a_link_to_nothing_and_a_loop_of_links_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    said = {"dangling": f"a symbolic link to nothing ({tmp_path / 'gone'})", "a": "a loop of symbolic links"}
    for name, what in said.items():
        for command in (["report"], ["diagnose"], ["compare", str(tmp_path / "b")]):
            assert main([command[0], str(tmp_path / name), *command[1:]]) == 2
            assert capsys.readouterr().err.strip().endswith(f"{tmp_path / name}: {what}")


def test_export_counts_a_missing_input_among_the_inputs_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run and a glob that matched nothing (the shell passes it on as written): two inputs
    missing = tmp_path / "nightly" / "*.pickle"
    kv_lines = len((SAMPLES / "static_b2" / "kv_events.jsonl").read_text().splitlines())
    # WHEN both are exported THEN the run is, the glob is skipped, and the count is of the two given
    given = [str(SAMPLES / "static_b2"), str(missing)]
    assert main(["export", *given, "-o", str(tmp_path / "t"), "-q"]) == 2
    out, err = capsys.readouterr()
    assert err == f"kvtrace export: warning: skipped {missing}: no such file or directory\n"
    first, second = out.splitlines()
    assert first.startswith(
        f"exported 1 of 2 inputs to {tmp_path / 't'} (part 0): runs 1, devices 1, kv_events {kv_lines:,},"
    )
    assert second == "1 skipped (see the warnings above)"
    # AND --json says the same
    assert main(["export", *given, "-o", str(tmp_path / "j"), "--json"]) == 2
    summary = json.loads(capsys.readouterr().out)
    assert (summary["inputs"], summary["exported"], len(summary["skipped"])) == (2, 1, 1)


def test_export_of_a_folder_holding_links_to_itself_reads_each_folder_once(tmp_path: Path) -> None:
    # GIVEN a folder of a run and a trace one folder down, with two links back to the folder (`current -> .`
    # as users make them), one from the subfolder up to it, and two inside the run to itself: a walk that
    # follows links blindly meets 2^40 paths before the system's limit on links stops it
    runs = tmp_path / "runs"
    shutil.copytree(SAMPLES / "static_b2", runs / "r1")
    (trace,) = (SAMPLES / "dynamic_b2" / "profiler").iterdir()
    (runs / "old").mkdir()
    shutil.copy(trace, runs / "old" / trace.name)
    for link, target in (("a", "."), ("b", "."), ("old/up", ".."), ("r1/w-a", "."), ("r1/w-b", ".")):
        (runs / link).symlink_to(target)
    # WHEN it is exported and queried, each in a process of its own (a hang is killed: TimeoutExpired)
    argv = [sys.executable, "-m", "kvtrace.cli"]
    exported = subprocess.run(
        [*argv, "export", "runs", "-o", "tables", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    queried = subprocess.run(
        [*argv, "query", "runs", "--json", "SELECT run_id FROM runs ORDER BY run_id"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # THEN both finish: each input once, named by the path without links, nothing skipped
    assert exported.returncode == 0, exported.stderr
    summary = _strict_loads(exported.stdout)
    assert isinstance(summary, dict)
    assert (summary["inputs"], summary["exported"], summary["skipped"]) == (2, 2, [])
    names = [f"runs/old/{trace.name}", "runs/r1"]
    assert load_tables(tmp_path / "tables").runs.column("run_id").to_pylist() == names
    rows = [{"run_id": name} for name in names]
    assert (queried.returncode, _strict_loads(queried.stdout)) == (0, rows), queried.stderr


def test_export_of_a_folder_with_an_unreadable_subfolder_skips_it_by_its_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_unreadable: Callable[[Path], None],
) -> None:
    # GIVEN a folder holding a run and a subfolder this user may not list, named relative to the cwd
    shutil.copytree(SAMPLES / "static_b2", tmp_path / "top" / "ok" / "r1")
    (tmp_path / "top" / "locked").mkdir()
    make_unreadable(tmp_path / "top" / "locked")
    monkeypatch.chdir(tmp_path)
    kv_lines = len((SAMPLES / "static_b2" / "kv_events.jsonl").read_text().splitlines())
    said = "top/locked: permission denied"
    # WHEN the folder is exported, or its two subfolders are
    for given, out_dir in ((["top"], "t1"), (["top/ok", "top/locked"], "t2")):
        assert main(["export", *given, "-o", out_dir, "-q"]) == 2
        out, err = capsys.readouterr()
        # THEN the subfolder is skipped by its own path (not `top/locked/runs`), as a missing input is, and
        # the run is exported (nothing was, with `error: top/locked: Permission denied`), exit 2
        assert err == f"kvtrace export: warning: skipped {said}\n"
        first, second = out.splitlines()
        assert first.startswith(
            f"exported 1 of 2 inputs to {out_dir} (part 0): runs 1, devices 1, kv_events {kv_lines:,},"
        )
        assert second == "1 skipped (see the warnings above)"
    # AND --json lists it under `skipped`
    assert main(["export", "top", "-o", "t3", "--json"]) == 2
    summary = json.loads(capsys.readouterr().out)
    assert (summary["inputs"], summary["exported"]) == (2, 1)
    assert summary["skipped"] == [{"path": "top/locked", "error": said}]
    # AND query reads the rest, naming it the same way
    assert main(["query", "top", "--json", "SELECT run_id FROM runs"]) == 2
    out, err = capsys.readouterr()
    skipped = f"kvtrace query: warning: skipped {said}\n"
    assert (_strict_loads(out), err) == ([{"run_id": "top/ok/r1"}], skipped)
    # AND given alone (or a path inside it), it is the one-line error
    assert main(["export", "top/locked", "-o", "t4"]) == 2
    assert capsys.readouterr().err == f"kvtrace export: error: {said}\n"
    assert main(["export", "top/ok", "top/locked/r2", "-o", "t5", "-q"]) == 2
    assert capsys.readouterr().err == "kvtrace export: warning: skipped top/locked/r2: permission denied\n"


def test_report_writes_two_files_into_a_run_and_says_so(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.relative_to(run_copy).as_posix() for p in run_copy.rglob("*"))
    # WHEN a run is reported with --no-export THEN nothing in it changes
    assert main(["report", str(run_copy), "--no-export", "-q"]) == 0
    assert sorted(p.relative_to(run_copy).as_posix() for p in run_copy.rglob("*")) == before
    # WHEN it is reported as the README shows THEN the KV counter trace and the scalars' folder are added
    assert main(["report", str(run_copy), "-q"]) == 0
    top_level = {p.split("/")[0] for p in before}
    assert {p.name for p in run_copy.iterdir()} - top_level == {"kv_counters.trace.json.gz", "tb_scalars"}
    # AND --help, the README and docs/format.md name both
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "writes two files into the run itself" in said
    root = SAMPLES.parent
    for text in (said, (root / "README.md").read_text(), (root / "docs" / "format.md").read_text()):
        assert "kv_counters.trace.json.gz" in text and "tb_scalars/" in text and "--no-export" in text


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size is a vLLM setting: add --engine vllm"),
        (
            ["--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.8"],
            "--gpu-memory-utilization, --kv-cache-dtype are vLLM settings: add --engine vllm",
        ),
    ],
)
def test_a_plain_plan_refuses_vllms_settings_it_would_ignore(
    flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the plan of Llama 3 8B on one GPU, as a plain (transformers) plan prints it
    assert main(["plan", "--preset", "llama-3-8b", "--json"]) == 0
    one_gpu = json.loads(capsys.readouterr().out)
    # WHEN a vLLM-only setting is added without --engine vllm (it used to print the same plan, exit 0:
    # 128 KiB of KV per token read as per GPU at tensor parallel 2, where each GPU holds 64 KiB)
    status = main(["plan", "--preset", "llama-3-8b", "--json", *flags])
    captured = capsys.readouterr()
    # THEN one line says what to add, status 2, and no plan is printed
    assert status == 2 and captured.out == ""
    assert said in captured.err and captured.err.count("\n") == 1
    # AND with --engine vllm, tensor parallel 2 halves the KV per GPU: 32 layers x 2 x 4 heads x 128 x 2 B
    geometry = one_gpu["request"]["geometry"]
    assert (geometry["num_layers"], geometry["num_kv_heads"], geometry["head_dim"]) == (32, 8, 128)
    if "--tensor-parallel-size" in flags:
        assert main(["plan", "--preset", "llama-3-8b", "--engine", "vllm", "--json", *flags]) == 0
        vllm = json.loads(capsys.readouterr().out)
        assert vllm["kv_heads_per_worker"] == 4
        assert vllm["kv_bytes_per_token"] == 32 * 2 * 4 * 128 * 2


_SHAPE = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            {"kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 24},
            "it caches a multi-head latent (kv_lora_rank 32), not K and V per head",
        ),
        ({"num_local_experts": 8}, "4 of its layers route over 8 experts"),
        (
            {"layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"]},
            "only 1 of its 4 layers hold a KV cache",
        ),
        (
            {"model_type": "mistral", "sliding_window": 8},
            "4 of its layers keep an 8-token window, which points of 16 tokens pass",
        ),
    ],
    ids=["latent", "experts", "linear-attention", "window"],
)
def test_a_sweep_of_a_config_a_llama_cannot_build_is_refused(
    extra: dict[str, object], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a config whose KV (latent attention, KV-less layers) or weights (routed experts) a random-weights
    # Llama 3 would not have: swept as one, its every figure was another model's, unmarked
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**_SHAPE, "intermediate_size": 128, "vocab_size": 1000, **extra}))
    out = tmp_path / "sweep"
    # WHEN it is swept
    argv = ["--batch", "1", "--context", "8", "--new-tokens", "8", "--out", str(out)]
    code = main(["sweep", "--config", str(config), *argv])
    # THEN it is refused before anything runs, with what the Llama lacks and where to size it instead
    err = capsys.readouterr().err
    assert code == 2 and said in err, err
    assert f"kvtrace plan --config {config} sizes it without running" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("module", "argv", "said"),
    [
        ("vllm", ["demo", "--engine", "vllm"], "kvtrace demo: error: --engine vllm needs vLLM in this"),
        (
            "kvpress",
            ["demo", "--size", "tiny", "--new-tokens", "2", "--no-profiler", "--press", "streaming_llm"],
            "kvtrace demo: error: --press needs NVIDIA's kvpress",
        ),
    ],
    ids=["vllm", "kvpress"],
)
def test_a_part_not_installed_is_one_line_and_status_1(
    module: str, argv: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a flag whose part is not installed here: vLLM, kvpress (a quantized cache's backend: test_demo.py)
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    out = tmp_path / "out"
    # WHEN the command runs THEN one line names the part, with status 1, as the README's exit-status table
    # says for a part not installed (the flags were right: not 2), and nothing is recorded
    assert main([*argv, "--no-report", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1, err
    assert not out.exists()


def test_a_press_without_kvpress_is_refused_before_the_model_is_built(tmp_path: Path) -> None:
    # GIVEN kvpress not installed here, and a demo asked to evict with a press
    if importlib.util.find_spec("kvpress") is not None:
        pytest.skip("kvpress is installed here")
    out = tmp_path / "out"
    probe = (
        "import sys\n"
        "from kvtrace.cli import main\n"
        f"code = main(['demo', '--size', 'tiny', '--press', 'knorm', '--no-report', '--out', {str(out)!r}])\n"
        "print(code, any(m.startswith('transformers.models.llama') for m in sys.modules))\n"
    )
    # WHEN it runs in a fresh process
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    # THEN it is refused with status 1 before the Llama model was ever built (its modeling module loaded),
    # not after a model, a tokenizer and the prompts were made for nothing
    assert done.stdout.split() == ["1", "False"], (done.stdout, done.stderr)
    assert "--press needs NVIDIA's kvpress" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["report", ""], "PATH"),
        (["diagnose", ""], "PATH"),
        (["compare", "", "x"], "RUN"),
        (["plan", "--from-run", ""], "--from-run"),
        (["plan", "--config", ""], "--config"),
        (["query", "", "SELECT 1"], "DIR"),
        (["export", "x", "-o", ""], "--output"),
        (["report", "x", "-o", ""], "--output"),
        (["demo", "--out", ""], "--out"),
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(
    argv: list[str],
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the current folder holding a real run (what "" would read, as pathlib makes it ".")
    shutil.copytree(SAMPLES / "static_b2", tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    # WHEN a path argument is given empty (an unset shell variable) THEN one line names it, status 2
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"error: {named}: an empty path ('') names no file or folder") and "\n" not in err
    # AND nothing was read as a run or written in the current folder
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_a_window_of_one_token_is_refused(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a sliding cache of one token: transformers' sliding layer keeps `states[..., -window + 1:, :]`,
    # every token at a window of 1 (`-0:`), so the run never slid (23 of 23 tokens held) while its manifest
    # said a 1-token window and `plan --from-run` planned one
    out = tmp_path / "r"
    flags = ["--no-report"] if command == "demo" else ["--batch", "1", "--context", "8", "-q"]
    # WHEN it is asked for THEN it is refused in one line, before anything is recorded
    assert main([command, "--cache", "sliding", "--window", "1", "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err.endswith(
        "--window must be at least 2, got 1: transformers' sliding cache keeps every token at a window of 1\n"
    )
    assert not out.exists()


def test_plan_refuses_a_sliding_window_of_one_token_as_demo_does(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a dynamic sliding cache of one token, which transformers never slides (every token kept): the
    # plan read "KV cache 128.00 KiB (1 x 0 tokens)" beside a cache holding the whole context
    argv = ["plan", "--preset", "llama-3-8b", "--cache", "sliding", "--context", "4096", "--prompt", "100"]
    # WHEN it is planned THEN it is refused in one line, naming why, as demo and sweep refuse it
    assert main([*argv, "--window", "1"]) == 2
    assert capsys.readouterr().err.endswith(
        "--window must be at least 2 for --cache sliding, got 1: transformers' sliding cache keeps every "
        "token at a window of 1\n"
    )
    # AND a window of 2 is planned
    assert main([*argv, "--window", "2"]) == 0
    assert "sliding (2-token window on 32 of 32 layers)" in capsys.readouterr().out
