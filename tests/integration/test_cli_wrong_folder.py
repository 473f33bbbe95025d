"""A folder of the wrong kind handed to the CLI: an export directory given to the commands that read one run,
and a file where a recording's folder would go. Each is one line, said before any work.

Found by a walkthrough: `kvtrace report` on an export said it "holds no runs or traces" (it holds nothing
else: they are its tables), and `kvtrace demo -o FILE` imported torch and built the model before it refused,
naming FILE/timeline.html.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A copy of a sample run, and the export directory `kvtrace export` writes from it."""
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    tables = tmp_path / "tables"
    assert main(["export", str(run), "-q", "-o", str(tables)]) == 0
    capsys.readouterr()
    return run, tables


def test_an_export_given_to_report_diagnose_or_compare_is_named_with_the_query_that_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an export directory written by `kvtrace export` from a copy of a sample run
    run, tables = _exported(tmp_path, capsys)
    said = (
        f"{tables}: a kvtrace export (Parquet tables), not a run, trace or snapshot: read it with "
        f'`kvtrace query {tables} "SQL"`'
    )
    for argv in (
        ["report", str(tables), "--no-export"],
        ["diagnose", str(tables)],
        ["compare", str(tables), str(run)],
        ["compare", str(run), str(tables)],
    ):
        # WHEN a command that reads runs, traces and snapshots is given it
        # THEN one line saying what it is and how to read it, status 2 (it used to say it "holds no runs")
        assert main(argv) == 2
        assert capsys.readouterr() == ("", f"kvtrace {argv[0]}: error: {said}\n")
    # AND the query it names reads it: the one run exported
    assert main(["query", str(tables), "SELECT count(*) AS runs FROM runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"runs": 1}]


def test_a_table_or_part_of_an_export_is_named_with_the_query_that_reads_its_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an export directory written by `kvtrace export` from a copy of a sample run, one of its tables
    # (a folder of Parquet parts), one of those parts, and a copy of that part on its own
    _, tables = _exported(tmp_path, capsys)
    (part,) = (tables / "kv_events").glob("part-*.parquet")
    lone = shutil.copy(part, tmp_path / "lone.parquet")
    query = f'read it with `kvtrace query {tables} "SQL"`'
    said = {
        tables
        / "kv_events": f"a table of the kvtrace export {tables} (Parquet), not a run, trace or snapshot: "
        + query,
        part: f"a Parquet part of the kvtrace export {tables}, not a run, trace or snapshot: {query}",
        lone: 'a Parquet file, not a run, trace or snapshot; `kvtrace query DIR "SQL"` reads a kvtrace '
        "export's tables",
    }
    for given, what in said.items():
        for argv in (["report", str(given), "--no-export"], ["diagnose", str(given)]):
            # WHEN a command that reads runs, traces and snapshots is given it
            # THEN one line saying what it is and how its rows are read, status 2 (it said the table "holds no
            # runs", and of the part "not a CUDA snapshot pickle, Chrome trace or memory timeline")
            assert main(argv) == 2
            assert capsys.readouterr() == ("", f"kvtrace {argv[0]}: error: {given}: {what}\n")


# Each command in a fresh interpreter: whether torch was imported says whether any work (a model built, a
# script run) came before the refusal, without timing it.
_REFUSE = """
import json, sys
from kvtrace.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--size", "tiny"],
        ["demo", "--size", "tiny", "--no-report"],
        ["sweep", "--size", "tiny", "--batch", "1", "--context", "8"],
        ["run", "SCRIPT"],
    ],
    ids=["demo", "demo-no-report", "sweep", "run"],
)
def test_a_recording_into_a_file_is_refused_before_torch_is_imported(argv: list[str], tmp_path: Path) -> None:
    # GIVEN a regular file, and a script to record
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    script = tmp_path / "user.py"
    script.write_text("print('ran')\n")
    args = [str(script) if arg == "SCRIPT" else arg for arg in argv]
    folder = "the sweep's folder" if argv[0] == "sweep" else "the run folder"
    for out, why in [
        (taken, "a file of that name is there, not a folder"),
        (taken / "sub", f"a parent of the path is a file: {taken}"),
    ]:
        # WHEN a recording is sent into it, or into a folder below it
        command = [sys.executable, "-c", _REFUSE, *args[:1], "-o", str(out), *args[1:]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        # THEN one line naming the file, status 1 (an output that cannot be written), and torch never
        # imported: no model built, no script run (demo used to build and run its model first)
        assert json.loads(done.stdout.splitlines()[-1]) == {"status": 1, "torch": False}, done.stderr
        assert done.stderr == f"kvtrace {argv[0]}: error: {out}: cannot create {folder} ({why})\n"
        assert taken.read_text() == "not a folder"
