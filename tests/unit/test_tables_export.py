"""`kvtrace export` / `query` / `load_tables` behaviour on small runs made from a sample: vLLM engine logs
(hand-written to the docs/format.md contract), adding to an export, bad inputs, newer schemas."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kvtrace
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.errors import KvtraceError

SAMPLE = Path(__file__).resolve().parents[2] / "sample_traces" / "static_b2"
ENGINE = {
    "name": "vllm", "version": "0.32.0", "status": "ok", "process": "inproc",
    "num_blocks": 32, "block_size": 32, "bytes_per_block": 32768, "kv_cache_bytes": 1048576,
}  # fmt: skip
STEPS = [
    {"step": 1, "t_ns": 100, "blocks_total": 32, "blocks_used": 10, "blocks_free": 22, "blocks_cached": 4,
     "running": 3, "waiting": 5, "tokens_scheduled": 128, "preempted": [], "prefix_evicted_blocks": 0,
     "prefix_hits": 0, "prefix_queries": 0},
    {"step": 2, "t_ns": 200, "blocks_total": 32, "blocks_used": 32, "blocks_free": 0, "blocks_cached": 0,
     "running": 2, "waiting": 6, "tokens_scheduled": 64, "preempted": ["req-3", "req-7"],
     "prefix_evicted_blocks": 2, "prefix_hits": 16, "prefix_queries": 64},
]  # fmt: skip
REQUESTS = [
    {"t_ns": 150, "step": 2, "request_id": "3", "event": "preempted", "blocks": 0, "tokens": 0,
     "prompt_tokens": 55, "output_tokens": 95, "dropped_blocks": 5, "dropped_tokens": 150},
]  # fmt: skip


def _small_run(path: Path) -> Path:
    """The sample run without its profiler trace: its KV log, samples and weights (memory events then
    come from the KV log's own alloc/free pairs)."""
    path.mkdir(parents=True)
    for name in ("manifest.json", "kv_events.jsonl", "memory_samples.jsonl", "weights.jsonl"):
        shutil.copy(SAMPLE / name, path / name)
    return path


def _json_out(capsys: pytest.CaptureFixture[str], argv: list[str], status: int = 0) -> Any:
    capsys.readouterr()
    assert main(argv) == status
    return json.loads(capsys.readouterr().out)


def test_engine_steps_and_requests_of_a_vllm_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _small_run(tmp_path / "vllm_run")
    (run / "engine.json").write_text(json.dumps(ENGINE))
    (run / "engine_steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in STEPS))
    (run / "engine_requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    out = tmp_path / "out"
    summary = _json_out(capsys, ["export", str(run), "-o", str(out), "--json"])
    assert summary["rows"]["engine_steps"] == 2 and summary["rows"]["engine_requests"] == 1
    steps = pq.read_table(out / "engine_steps").to_pylist()
    assert [{k: s[k] for k in STEPS[0]} for s in steps] == STEPS
    assert steps[0]["blocks_reserved"] is None  # a field this file does not have
    rows = _json_out(
        capsys,
        ["query", str(out), "--json",
         "SELECT r.kv_cache_bytes, r.num_blocks, max(s.blocks_used) AS peak_blocks,"
         " sum(len(s.preempted)) AS preemptions FROM runs r JOIN engine_steps s USING (run_id) GROUP BY ALL"],
    )  # fmt: skip
    assert rows == [{"kv_cache_bytes": 1048576, "num_blocks": 32, "peak_blocks": 32, "preemptions": 2}]
    (request,) = pq.read_table(out / "engine_requests").to_pylist()
    assert request["dropped_tokens"] == 150 and request["recomputed_tokens"] is None


def test_a_second_export_adds_a_part_and_skips_what_is_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = _small_run(tmp_path / "runs" / "a"), _small_run(tmp_path / "runs" / "b")
    out = tmp_path / "out"
    assert _json_out(capsys, ["export", str(first), "-o", str(out), "--json"])["part"] == 0
    summary = _json_out(capsys, ["export", str(tmp_path / "runs"), "-o", str(out), "--json"])
    assert (summary["part"], summary["exported"], summary["already_exported"]) == (1, 1, 1)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    rows = _json_out(capsys, ["query", str(out), "--json", "SELECT run_id FROM runs ORDER BY 1"])
    assert [r["run_id"] for r in rows] == [first.as_posix(), second.as_posix()]
    # a third export of the same sources adds nothing, not even an empty part
    summary = _json_out(capsys, ["export", str(tmp_path / "runs"), "-o", str(out), "--json"])
    assert (summary["part"], summary["exported"], summary["already_exported"]) == (None, 0, 2)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    # --overwrite writes its part after the earlier ones, then removes them (and its mark)
    summary = _json_out(capsys, ["export", str(second), "-o", str(out), "--json", "--overwrite"])
    assert summary["part"] == 2 and summary["rows"]["runs"] == 1
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["part-00002.parquet"]


def test_a_source_changed_since_its_export_is_exported_again_an_unchanged_one_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run recorded again into the same folder (its KV log now a line shorter) is exported again and
    replaces its rows; a `kvtrace report` writing its own files into the run changes nothing."""
    run, out = _small_run(tmp_path / "run"), tmp_path / "out"
    lines = (run / "kv_events.jsonl").read_text().splitlines(keepends=True)
    first = _json_out(capsys, ["export", str(run), "-o", str(out), "--json"])
    assert first["rows"]["kv_events"] == len(lines)
    assert main(["report", str(run), "-q"]) == 0  # writes kv_counters.trace.json.gz and tb_scalars/ there
    summary = _json_out(capsys, ["export", str(run), "-o", str(out), "--json"])
    assert (summary["part"], summary["already_exported"], summary["reexported"]) == (None, 1, [])
    (run / "kv_events.jsonl").write_text("".join(lines[:-1]))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "kv_events": len(lines) - 1}))
    summary = _json_out(capsys, ["export", str(run), "-o", str(out), "--json"])
    assert (summary["part"], summary["exported"], summary["already_exported"]) == (1, 1, 0)
    assert summary["reexported"] == [{"run_id": run.as_posix(), "replaced_part": 0}]
    rows = _json_out(capsys, ["query", str(out), "--json", "SELECT count(*) AS n FROM kv_events"])
    assert rows == [{"n": len(lines) - 1}]


def test_a_run_an_older_kvtrace_exported_while_running_is_exported_again_once_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export by a kvtrace that kept no source state: its row of a run still `running` is taken as
    partial once the run's manifest says it ended, and is exported again; until then it is skipped."""
    run, out = _small_run(tmp_path / "run"), tmp_path / "out"
    manifest = json.loads((run / "manifest.json").read_text())
    ended = manifest["ended"]
    (run / "manifest.json").write_text(json.dumps({**manifest, "ended": {"status": "running"}}))
    assert _json_out(capsys, ["export", str(run), "-o", str(out), "--json"])["part"] == 0
    # as kvtrace 0.1.0 wrote the runs part: without the source's state
    part = out / "runs" / "part-00000.parquet"
    state_columns = ["recording_pid", "source_bytes", "source_mtime_ns"]
    pq.write_table(pq.read_table(part).drop_columns(state_columns), part)
    summary = _json_out(capsys, ["export", str(run), "-o", str(out), "--json"])
    assert (summary["part"], summary["already_exported"]) == (None, 1)
    (run / "manifest.json").write_text(json.dumps(manifest))
    summary = _json_out(capsys, ["export", str(run), "-o", str(out), "--json"])
    assert summary["reexported"] == [{"run_id": run.as_posix(), "replaced_part": 0}]
    rows = _json_out(capsys, ["query", str(out), "--json", "SELECT run_id, ended_status FROM runs"])
    assert rows == [{"run_id": run.as_posix(), "ended_status": ended["status"]}]


def test_a_bad_input_is_skipped_named_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _small_run(tmp_path / "in" / "good")
    bad = tmp_path / "in" / "cut.pickle"
    bad.write_bytes(b"\x80\x04\x95\x10\x00\x00")  # a pickle that ends early
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "in"), "-o", str(out), "-q"]) == 2
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1 and str(bad) in warnings[0] and "Traceback" not in captured.err
    assert pq.read_table(out / "runs").column("run_id").to_pylist() == [good.as_posix()]
    assert main(["export", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kvtrace export: error: {tmp_path / 'missing'}: no such file or directory"
    ]


def test_query_refuses_newer_schemas_and_reports_sql_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["export", str(_small_run(tmp_path / "r")), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["query", str(out), "SELECT nope FROM runs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvtrace query: error: query failed:") and "nope" in err[0]
    assert main(["query", str(tmp_path / "r" / "kv_events.jsonl"), "SELECT 1"]) == 2  # not an export
    capsys.readouterr()
    table = pq.read_table(out / "runs")
    newer = table.replace_schema_metadata({b"kvtrace.schema_version": b"99", b"kvtrace.table": b"runs"})
    pq.write_table(newer, out / "runs" / "part-00007.parquet")
    assert main(["query", str(out), "SELECT count(*) FROM runs"]) == 2
    assert "schema version 99 is newer" in capsys.readouterr().err


def test_load_tables_reads_an_export_and_a_run_alike(tmp_path: Path) -> None:
    run = _small_run(tmp_path / "r")
    assert main(["export", str(run), "-o", str(tmp_path / "out"), "-q"]) == 0
    from_export = kvtrace.load_tables(tmp_path / "out")
    on_the_fly = kvtrace.load_tables(run)
    for name in from_export:
        assert from_export[name].equals(on_the_fly[name]), name
    kv_lines = len((SAMPLE / "kv_events.jsonl").read_text().splitlines())
    assert on_the_fly.kv_events.num_rows == kv_lines
    assert on_the_fly.sql("SELECT count(*) AS n FROM kv_events").to_pylist() == [{"n": kv_lines}]
    frames = on_the_fly.to_pandas()
    assert len(frames["kv_events"]) == kv_lines and list(frames["runs"]["run_id"]) == [run.as_posix()]
    assert isinstance(on_the_fly.runs, pa.Table) and "kv_events" in on_the_fly._repr_html_()


def test_an_export_directory_beside_other_inputs_is_named_never_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an export of one run, and another run
    exported, other = _small_run(tmp_path / "a"), _small_run(tmp_path / "b")
    out = tmp_path / "out"
    assert main(["export", str(exported), "-o", str(out), "-q"]) == 0
    said = f"{out}: an export directory (Parquet tables), not a run, trace or snapshot"
    # WHEN load_tables is given both (strict, the default), THEN it refuses in one line naming the export
    with pytest.raises(KvtraceError) as refused:
        kvtrace.load_tables(out, other)
    assert str(refused.value).startswith(said) and "\n" not in str(refused.value)
    # ... as it does two exports (not "no run directories ... found (nor an export)")
    with pytest.raises(KvtraceError, match="an export directory") as two:
        kvtrace.load_tables(out, out)
    assert str(two.value).startswith(said)
    # AND not strict: the export is skipped and said to on_skip; the run's rows are the only ones
    skipped: list[str] = []
    tables = kvtrace.load_tables(out, other, strict=False, on_skip=skipped.append)
    assert tables.runs.column("run_id").to_pylist() == [other.as_posix()]
    assert len(skipped) == 1 and skipped[0].startswith(said)
    # AND `kvtrace export` warns, exports the run and exits 2: "1 of 2 inputs"
    capsys.readouterr()
    assert main(["export", str(out), str(other), "-o", str(tmp_path / "out2"), "-q"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"kvtrace export: warning: skipped {skipped[0]}"]
    assert captured.out.startswith(f"exported 1 of 2 inputs to {tmp_path / 'out2'}")
    # AND the export alone is still read back whole
    assert kvtrace.load_tables(out).runs.column("run_id").to_pylist() == [exported.as_posix()]


def test_a_report_renders_in_a_notebook() -> None:
    _, report = build_report(SAMPLE)
    html = report._repr_html_()
    assert html.count("<svg") == len(report.devices) == 1
    assert str(SAMPLE) in html and "<script" not in html
    # The final KV size from the geometry: layers x (K, V) x kv_heads x head_dim x tokens x batch x 4 B
    model = json.loads((SAMPLE / "manifest.json").read_text())["model"]
    shape = json.loads((SAMPLE / "kv_events.jsonl").read_text().splitlines()[0])["shape"]
    kv_bytes = model["num_layers"] * 2 * model["num_kv_heads"] * model["head_dim"] * shape[2] * shape[0] * 4
    assert f"<td>final</td><td>{kv_bytes / 1024:.2f} KiB</td>" in html


def test_the_readme_notebook_snippet_and_queries_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Many runs: Parquet tables and SQL", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    monkeypatch.chdir(SAMPLE.parents[1])
    exec(snippet, namespace)  # the README's code, verbatim
    kv_lines = len((SAMPLE / "kv_events.jsonl").read_text().splitlines())
    assert len(namespace["kv"]) == kv_lines
    model = json.loads((SAMPLE / "manifest.json").read_text())["model"]
    assert namespace["per_layer"].column("layer").to_pylist() == list(range(model["num_layers"]))
    assert "<svg" in namespace["report"]._repr_html_()
    # The shell block's queries, on an export of the sample run.
    out = tmp_path / "tables"
    assert main(["export", str(SAMPLE), "-o", str(out), "-q"]) == 0
    queries = [
        q.strip().strip('"') for q in section.split("```bash\n", 1)[1].split("kvtrace query tables/ ")[1:]
    ]
    first = queries[0].split('"', 1)[0]
    second = queries[1].removeprefix("--json ").strip('"').split('"', 1)[0]
    shapes = [json.loads(line)["shape"] for line in (SAMPLE / "kv_events.jsonl").read_text().splitlines()]
    rows = _json_out(capsys, ["query", str(out), "--json", first])
    # A static cache is allocated at its full length, which the last decode step fills.
    full_length = max(s[2] for s in shapes if s)
    # the KV arithmetic: layers x K,V x KV heads x head_dim x tokens x rows x fp32 bytes, the report's figure
    batch = max(s[0] for s in shapes if s)
    arithmetic = model["num_layers"] * 2 * model["num_kv_heads"] * model["head_dim"] * full_length * batch * 4
    report = _json_out(capsys, ["report", str(SAMPLE), "--json", "--no-export", "-q"])
    assert rows == [
        {
            "run_id": SAMPLE.as_posix(),
            "group_id": None,
            "kv_heads_held": model["num_kv_heads"],
            "tokens": full_length,
            "kv_bytes": arithmetic,
        }
    ]
    assert arithmetic == report["kv"]["final_bytes"]
    peaks = _json_out(capsys, ["query", str(out), "--json", second])
    assert peaks == [
        {"run_id": SAMPLE.as_posix(), "device": "cpu", "peak": report["devices"][0]["peak_allocated_bytes"]}
    ]


def test_ranks_of_a_run_group_are_rows_of_one_group(tmp_path: Path) -> None:
    group = tmp_path / "tp2"
    for rank in (0, 1):
        run = _small_run(group / f"rank-{rank}")
        manifest = json.loads((run / "manifest.json").read_text())
        manifest.update(rank=rank, world_size=2, local_rank=rank, hostname="node-a", backend="gloo")
        (run / "manifest.json").write_text(json.dumps(manifest))
    runs = kvtrace.load_tables(group).runs.to_pylist()
    assert [(r["run_id"], r["group_id"], r["rank"], r["world_size"], r["backend"]) for r in runs] == [
        (f"{group.as_posix()}/rank-{rank}", group.as_posix(), rank, 2, "gloo") for rank in (0, 1)
    ]


def test_a_different_source_under_a_name_already_exported_gets_a_new_run_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    for place in ("monday", "tuesday"):  # the same relative name, run from two working directories
        _small_run(tmp_path / place / "runs" / "x")
        monkeypatch.chdir(tmp_path / place)
        assert main(["export", "runs/x", "-o", str(out), "-q"]) == 0
    runs = pq.read_table(out / "runs").to_pylist()
    assert sorted(r["run_id"] for r in runs) == ["runs/x", "runs/x#2"]
    assert len({r["path"] for r in runs}) == 2


def test_tables_show_as_one_line_of_row_counts() -> None:
    # GIVEN the sample run's tables, as a script's print() or a terminal's REPL shows them
    tables = kvtrace.load_tables(SAMPLE)
    # THEN one line gives each table's rows, counted here from the run's own files (it printed every column
    # of the seven tables: hundreds of lines)
    trace = json.loads(gzip.decompress(next((SAMPLE / "profiler").glob("*.json.gz")).read_bytes()))
    memory = sum(event.get("name") == "[memory]" for event in trace["traceEvents"])
    kv_lines = len((SAMPLE / "kv_events.jsonl").read_text().splitlines())
    samples = len((SAMPLE / "memory_samples.jsonl").read_text().splitlines())
    assert (
        repr(tables)
        == str(tables)
        == (
            f"Tables(rows: runs 1, devices 1, kv_events {kv_lines:,}, memory_events {memory:,}, "
            f"samples {samples:,}, engine_steps 0, engine_requests 0)"
        )
    )


def test_to_pandas_without_pandas_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtrace.errors import KvtraceError

    tables = kvtrace.load_tables(SAMPLE)
    monkeypatch.setitem(sys.modules, "pandas", None)  # what `import pandas` meets where it is not installed
    with pytest.raises(KvtraceError, match="pip install pandas"):
        tables.to_pandas()


def test_load_tables_takes_a_list_of_paths_as_its_paths(tmp_path: Path) -> None:
    # GIVEN two runs, named as a notebook names them: a list, as glob.glob returns (duckdb's read_parquet
    # takes one too)
    first, second = _small_run(tmp_path / "a"), _small_run(tmp_path / "b")
    # WHEN the list is given whole (it raised TypeError: "expected str, bytes or os.PathLike object, not
    # list", from deep in the reader)
    listed = kvtrace.load_tables([first, second])
    # THEN it reads as the paths given one by one
    named = kvtrace.load_tables(first, second)
    assert listed.runs.column("run_id").to_pylist() == [first.as_posix(), second.as_posix()]
    for name in named:
        assert listed[name].equals(named[name]), name
    # AND an empty list is refused in one line, as no path at all is
    with pytest.raises(KvtraceError, match="load_tables: give at least one path"):
        kvtrace.load_tables([])
