"""`kvtrace export` writes a field a log line leaves out as null, in every column type: a `freed` KV line has
no dtype, shape or tokens, and its row used to say `''`, `[]` and 0, so that `IS NULL` and `count(column)`
in DuckDB gave wrong answers. A value a line does hold, `""` or 0 included, is kept as it is. Counts come
from the raw JSON lines of kvtrace's sample runs (real recordings), copied; the answers from DuckDB."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from analyzers.tables import SCHEMAS
from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
# An HF run (its `freed` lines name only the storage) and a vLLM run (its lines write `rows` and
# `masked_entries` as 0, engine steps and requests beside)
RUNS = ("dynamic_b2", "vllm_preempt")
# table -> the run's file of one line per row
LINE_FILES = {
    "kv_events": "kv_events.jsonl",
    "samples": "memory_samples.jsonl",
    "engine_steps": "engine_steps.jsonl",
    "engine_requests": "engine_requests.jsonl",
}


def _query(capsys: pytest.CaptureFixture[str], out: Path, sql: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["query", str(out), "--json", sql]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("left_out")
    for name in RUNS:
        shutil.copytree(SAMPLES / name, work / "runs" / name)
    out = work / "tables"
    assert main(["export", str(work / "runs"), "-o", str(out), "-q"]) == 0
    return work / "runs", out


def _lines(run: Path, table: str) -> list[dict[str, Any]]:
    path = run / LINE_FILES[table]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("table", sorted(LINE_FILES))
def test_a_field_a_line_leaves_out_is_null(
    exported: tuple[Path, Path], table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, out = exported
    columns = [f.name for f in SCHEMAS[table] if f.name != "run_id"]
    # A freed row's device is the one of the storage it frees (docs/format.md), filled in on purpose
    filled = {"device"} if table == "kv_events" else set()
    checked = 0
    for name in RUNS:
        lines = _lines(runs / name, table)
        if not lines:
            continue
        run_id = (runs / name).as_posix()
        counts = ", ".join(f'count(*) FILTER (WHERE "{c}" IS NULL) AS "{c}"' for c in columns)
        # GIVEN the run's lines, WHEN DuckDB counts each column's nulls in the export
        nulls = _query(capsys, out, f"SELECT {counts} FROM {table} WHERE run_id = '{run_id}'")[0]
        for column in columns:
            if column in filled:
                continue
            # THEN they are the lines that leave the field out (or hold null)
            absent = sum(1 for line in lines if line.get(column) is None)
            assert nulls[column] == absent, (table, name, column)
            checked += absent
    assert checked or table != "kv_events"  # the freed lines' dtype, shape, tokens... are there to check


def test_freed_rows_are_null_where_their_lines_say_nothing(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, out = exported
    lines = _lines(runs / "dynamic_b2", "kv_events")
    freed = [line for line in lines if line["event"] == "freed"]
    said = [line for line in lines if line["event"] != "freed"]
    assert freed and not any("dtype" in line or "shape" in line or "tokens" in line for line in freed)
    run_id = (runs / "dynamic_b2").as_posix()
    # WHEN the string, list and integer columns a freed line leaves out are counted
    rows = _query(
        capsys,
        out,
        "SELECT count(*) FILTER (WHERE dtype IS NULL) AS no_dtype, count(dtype) AS dtypes, "
        "count(*) FILTER (WHERE shape IS NULL) AS no_shape, count(tokens) AS tokens, "
        "count(*) FILTER (WHERE source IS NULL) AS no_source, "
        "count(*) FILTER (WHERE reason = '') AS empty_reasons, "
        "count(*) FILTER (WHERE event = 'freed' AND device IS NOT NULL) AS freed_devices "
        f"FROM kv_events WHERE run_id = '{run_id}'",
    )
    # THEN exactly the freed rows are null there; a line's own "" reason stays ""; a freed row still names
    # its storage's device
    assert rows == [
        {
            "no_dtype": len(freed),
            "dtypes": len(said),
            "no_shape": len(freed),
            "tokens": len(said),
            "no_source": len(freed),
            "empty_reasons": sum(1 for line in said if line.get("reason") == ""),
            "freed_devices": len(freed),
        }
    ]


def test_a_zero_a_line_writes_stays_zero(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, out = exported
    lines = _lines(runs / "vllm_preempt", "kv_events")
    # GIVEN a vLLM run whose lines write rows 0 and masked_entries 0 (every row: as a line leaving it out)
    assert lines and all(line["rows"] == 0 and line["masked_entries"] == 0 for line in lines)
    run_id = (runs / "vllm_preempt").as_posix()
    rows = _query(
        capsys,
        out,
        "SELECT count(*) FILTER (WHERE rows = 0) AS rows_0, count(*) FILTER (WHERE masked_entries = 0) AS "
        f"masked_0, count(capacity_tokens) AS capacities FROM kv_events WHERE run_id = '{run_id}'",
    )
    # THEN they are 0 in the table, and the capacity no line writes is null
    assert rows == [{"rows_0": len(lines), "masked_0": len(lines), "capacities": 0}]
