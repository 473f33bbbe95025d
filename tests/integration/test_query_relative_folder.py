"""`kvtrace query tables/`, the README's form, with the folder named relative to the working directory.

The sandbox lets DuckDB read only the export's parts (`allowed_paths`, absolute); DuckDB 1.2 to 1.4 match a
part's name against that list as the view writes it, so a view naming `tables/runs/part-00000.parquet`
was refused, and the query was an "internal error" (exit 70). Row counts are counted from the raw log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from analyzers.query import connect, run_query
from kvtrace.cli import main

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "sample_traces" / "static_b2"
KV_LINES = len((RUN / "kv_events.jsonl").read_text().splitlines())


def test_a_relative_export_folder_reads_the_same_parts_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a run exported into `tables`, connected to by that relative name
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(RUN), "-o", "tables", "-q"]) == 0
    con = connect("tables")
    # WHEN the working directory then changes (a notebook's os.chdir)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # THEN the views still read the export's own parts: every line of the KV log is a row
    assert run_query(con, "SELECT count(*) AS n FROM kv_events").rows == [(KV_LINES,)]


def _lowest_duckdb() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"duckdb>=([0-9.]+)"', pyproject)
    assert found is not None, "the export extra names duckdb>=X"
    return found.group(1)


@pytest.mark.slow
def test_the_lowest_duckdb_the_export_extra_allows_queries_a_relative_folder(tmp_path: Path) -> None:
    # GIVEN the oldest DuckDB `pip install 'kvtrace[export]'` accepts, as a laptop may already have it
    lowest = _lowest_duckdb()
    target = tmp_path / "duckdb"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    got = subprocess.run([*pip, f"duckdb=={lowest}"], capture_output=True, text=True, timeout=300)
    if got.returncode != 0:
        pytest.skip(f"duckdb=={lowest} could not be installed here (offline?): {got.stderr.strip()[-200:]}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    kvtrace = [sys.executable, "-m", "kvtrace"]
    exported = subprocess.run([*kvtrace, "export", str(RUN), "-o", "tables", "-q"], cwd=tmp_path, env=env)
    assert exported.returncode == 0
    # WHEN the README's form runs: the folder named relative to the working directory
    sql = "SELECT (SELECT version()) AS duckdb, count(*) AS n FROM kv_events"
    done = subprocess.run(
        [*kvtrace, "query", "tables/", "--json", sql], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    # THEN that DuckDB answers, every line of the KV log a row, and nothing goes to stderr
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    ((answered, rows),) = [(row["duckdb"], row["n"]) for row in json.loads(done.stdout)]
    assert Version(answered.removeprefix("v")) == Version(lowest)
    assert rows == KV_LINES
