"""`kvtrace export -o DIR` into a folder that holds files it did not write, or an export that lost its runs
part: it used to remove them as "parts without their runs part" (the user's own pyarrow or Spark datasets,
every earlier run of a damaged export), exit 0. Only files provably an interrupted export's own are removed;
anything else is refused in one line and kept byte for byte. Real exports of the sample runs; row counts are
counted from the raw files.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from kvtrace.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "sample_traces"
TABLES = ("runs", "devices", "kv_events", "memory_events", "samples", "engine_steps", "engine_requests")


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (an export's lock aside) and its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".kvtrace.lock"
    }


def _kv_lines(*runs: Path) -> int:
    return sum(len((run / "kv_events.jsonl").read_text().splitlines()) for run in runs)


def _kv_rows(out: Path) -> dict[str, int]:
    """kv_events rows per run_id, read with pyarrow from every part file there (not through kvtrace)."""
    counts: dict[str, int] = {}
    for part in sorted((out / "kv_events").glob("part-*.parquet")):
        for run_id in pq.read_table(part, columns=["run_id"]).column("run_id").to_pylist():
            counts[run_id] = counts.get(run_id, 0) + 1
    return counts


def _users_datasets(folder: Path, writer: str) -> Path:
    """The user's own Parquet datasets in folders named as kvtrace's tables (and one that is not), as
    pyarrow writes them (`part-0.parquet`) or Spark names them (`part-00000-<uuid>.snappy.parquet`)."""
    table = pa.table({"id": list(range(1000))})
    for name in ("samples", "devices", "other"):
        if writer == "pyarrow":
            ds.write_dataset(table, folder / name, format="parquet")
        else:
            (folder / name).mkdir(parents=True)
            pq.write_table(
                table, folder / name / "part-00000-8c1f3a52-0b7e-4d0e-9a53-2f1e7c6d4b10-c000.snappy.parquet"
            )
    return folder


@pytest.mark.parametrize("writer", ["pyarrow", "spark"])
def test_an_export_into_a_folder_of_the_users_own_datasets_is_refused_and_keeps_them(
    tmp_path: Path, writer: str
) -> None:
    # GIVEN a folder holding the user's own Parquet datasets, two of them in folders named as kvtrace's tables
    out = _users_datasets(tmp_path / "data", writer)
    before = _files(out)
    (devices_part,) = (out / "devices").glob("*.parquet")

    # WHEN a sample run is exported into it
    code, stdout, stderr = _cli("export", str(SAMPLES / "static_b2"), "-o", str(out), "-q")

    # THEN one line names the first file that is not kvtrace's, exit status 2, nothing exported
    assert code == 2
    assert stderr.splitlines() == [
        f"kvtrace export: error: {devices_part}: not a kvtrace devices part, left as it is; "
        "export into a folder of kvtrace's own (a new -o DIR)"
    ]
    assert stdout == ""
    # AND every file of the user's is there byte for byte, and no other file was added
    assert _files(out) == before


def test_an_export_missing_its_runs_part_is_refused_then_replaced_only_with_overwrite(tmp_path: Path) -> None:
    # GIVEN an export of two sample runs (one part) that has lost its runs part (a partial copy, a stray rm)
    out = tmp_path / "tables"
    first = [SAMPLES / "dynamic_b2", SAMPLES / "static_b2"]
    assert _cli("export", *map(str, first), "-o", str(out), "-q")[0] == 0
    (out / "runs" / "part-00000.parquet").unlink()
    before = _files(out)
    assert _kv_rows(out) == {run.as_posix(): _kv_lines(run) for run in first}

    # WHEN another run is exported into it
    other = SAMPLES / "sliding_b2"
    code, _, stderr = _cli("export", str(other), "-o", str(out), "-q")

    # THEN one line names every file of the orphaned part and says what to do (not --overwrite, which would
    # drop the earlier runs' rows), exit status 2
    assert code == 2
    orphans = sorted(f"{table}/part-00000.parquet" for table in TABLES if table != "runs")
    assert stderr.splitlines() == [
        f"kvtrace export: error: {out}: part 0's runs part ({out / 'runs' / 'part-00000.parquet'}) is "
        f"missing: a damaged export, left as it is; its rows name no run. Remove its {len(orphans)} files "
        f"({', '.join(orphans)}) to export into it again, or export into a new -o DIR"
    ]
    # AND the earlier runs' rows are all there, byte for byte (they used to be removed, exit 0)
    assert _files(out) == before
    assert _kv_rows(out) == {run.as_posix(): _kv_lines(run) for run in first}

    # WHEN the user asks for --overwrite
    code, _, stderr = _cli("export", str(other), "-o", str(out), "-q", "--overwrite")

    # THEN the damaged part is replaced: the new part alone, numbered after it, holds the run
    assert (code, stderr) == (0, "")
    assert sorted(_files(out)) == [f"{table}/part-00001.parquet" for table in sorted(TABLES)]
    assert _kv_rows(out) == {other.as_posix(): _kv_lines(other)}


@pytest.mark.parametrize(
    ("table", "damage"), [("kv_events", "empty"), ("runs", "empty"), ("memory_events", "cut")]
)
def test_a_damaged_part_file_is_refused_then_replaced_with_overwrite(
    tmp_path: Path, table: str, damage: str
) -> None:
    # GIVEN an export of two sample runs, one of whose part files a full disk or a killed copy left empty
    # (0 bytes) or cut to its first half (no Parquet footer)
    out = tmp_path / "tables"
    first = [SAMPLES / "dynamic_b2", SAMPLES / "static_b2"]
    assert _cli("export", *map(str, first), "-o", str(out), "-q")[0] == 0
    part = out / table / "part-00000.parquet"
    whole = part.read_bytes()
    part.write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    before = _files(out)

    # WHEN another run is exported into it
    other = SAMPLES / "sliding_b2"
    code, stdout, stderr = _cli("export", str(other), "-o", str(out), "-q")

    # THEN one line says the part is damaged, what is wrong and how to export again, exit 2, nothing touched
    assert (code, stdout) == (2, "")
    said = "empty (0 bytes)" if damage == "empty" else "not readable as Parquet ("
    named = ", ".join(f"{t}/part-00000.parquet" for t in sorted(TABLES))
    (line,) = stderr.splitlines()
    assert line.startswith(f"kvtrace export: error: {part}: {said}")
    assert line.endswith(
        ": a damaged part of this export (cut by a full disk, a killed copy or a crash), left as it is; "
        "export again with --overwrite to replace the whole export with the inputs given, or remove part 0's "
        f"{len(TABLES)} files ({named}) and export its inputs again, or export into a new -o DIR"
    )
    assert _files(out) == before

    # WHEN the user asks for --overwrite (the damaged file used to be refused as unreadable even then)
    code, stdout, stderr = _cli("export", str(other), "-o", str(out), "-q", "--overwrite")

    # THEN the export is replaced, the damaged file with it: the new part alone holds the run, whole
    assert (code, stderr) == (0, "")
    assert sorted(_files(out)) == [f"{t}/part-00001.parquet" for t in sorted(TABLES)]
    assert _kv_rows(out) == {other.as_posix(): _kv_lines(other)}
    code, stdout, _ = _cli("query", str(out), "--json", "SELECT count(*) AS n FROM kv_events")
    assert (code, json.loads(stdout)) == (0, [{"n": _kv_lines(other)}])


def test_a_symbolic_link_loop_in_place_of_the_runs_part_is_refused(tmp_path: Path) -> None:
    # GIVEN an export whose runs part is a link to itself
    out = tmp_path / "tables"
    assert _cli("export", str(SAMPLES / "static_b2"), "-o", str(out), "-q")[0] == 0
    runs_part = out / "runs" / "part-00000.parquet"
    runs_part.unlink()
    runs_part.symlink_to(runs_part.name)
    before = _files(out)

    # WHEN another run is exported into it, even with --overwrite
    for flags in ([], ["--overwrite"]):
        code, _, stderr = _cli("export", str(SAMPLES / "sliding_b2"), "-o", str(out), "-q", *flags)

        # THEN one line names the link as not a readable Parquet file, exit 2, and every part is kept
        assert code == 2
        (line,) = stderr.splitlines()
        assert line.startswith(f"kvtrace export: error: {runs_part}: not a readable Parquet file (")
        assert line.endswith(
            "), left as it is; move it out of the export's table folders, or export into a new -o DIR"
        )
        assert _files(out) == before
        assert runs_part.is_symlink()


KILLED_EXPORT = """
import os, signal, sys
import analyzers.export_parquet as export_parquet

def kill(*_args):
    os.kill(os.getpid(), signal.SIGKILL)

out, moment, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
if moment == "renaming":  # every other table's part renamed into place, not yet the runs part
    commit = export_parquet._TableWriter.commit
    export_parquet._TableWriter.commit = lambda w: kill() if w.final.parent.name == "runs" else commit(w)
export_parquet.export(sources, out, on_input=kill if moment == "writing" else None)
"""


@pytest.mark.parametrize("moment", ["writing", "renaming"])
def test_an_export_killed_mid_way_is_removed_by_the_next_one(tmp_path: Path, moment: str) -> None:
    # GIVEN an export of one run, then one of another killed (SIGKILL) while it writes its temporary files
    # (no footer yet), or once its other tables' parts are renamed into place, before its runs part is
    out = tmp_path / "tables"
    first, second = SAMPLES / "dynamic_b2", SAMPLES / "static_b2"
    assert _cli("export", str(first), "-o", str(out), "-q")[0] == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(out), moment, str(second)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert killed.returncode == -9, killed.stderr
    left = "kv_events/.part-00001.parquet.tmp" if moment == "writing" else "kv_events/part-00001.parquet"
    assert (out / left).is_file()
    assert not (out / "runs" / "part-00001.parquet").exists()

    # WHEN the second run is exported again
    code, stdout, stderr = _cli("export", str(second), "-o", str(out), "-q")

    # THEN the killed export's files go, the run is exported in full as part 1, and the first is kept
    assert (code, stderr) == (0, "")
    assert "(part 1)" in stdout
    assert sorted(_files(out)) == sorted(f"{t}/part-0000{n}.parquet" for t in TABLES for n in (0, 1))
    assert _kv_rows(out) == {first.as_posix(): _kv_lines(first), second.as_posix(): _kv_lines(second)}


def test_an_earlier_kvtraces_killed_export_leaves_temporary_files_the_next_one_removes(
    tmp_path: Path,
) -> None:
    # GIVEN an export of one run, beside which an earlier kvtrace's export killed mid-write left its hidden
    # temporary files of part 1 (cut short: no footer yet) and no pending mark (that kvtrace made none)
    out = tmp_path / "tables"
    assert _cli("export", str(SAMPLES / "dynamic_b2"), "-o", str(out), "-q")[0] == 0
    for table in ("kv_events", "samples"):
        (out / table / ".part-00001.parquet.tmp").write_bytes(b"PAR1\x00cut")
    # WHEN another run is exported into it THEN the leftovers go and both runs' rows are there
    code, _, stderr = _cli("export", str(SAMPLES / "static_b2"), "-o", str(out), "-q")
    assert (code, stderr) == (0, "")
    assert not list(out.glob("*/.part-*"))
    runs = [SAMPLES / "dynamic_b2", SAMPLES / "static_b2"]
    assert _kv_rows(out) == {run.as_posix(): _kv_lines(run) for run in runs}


@pytest.mark.parametrize("below", ["", "sub"])
def test_export_into_a_file_is_an_output_that_cannot_be_written(tmp_path: Path, below: str) -> None:
    # GIVEN a file where the output folder (or a parent of it) would be
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"the user's own\n")
    out = blocker / below if below else blocker

    # WHEN a sample run is exported there
    code, stdout, stderr = _cli("export", str(SAMPLES / "static_b2"), "-o", str(out), "-q")

    # THEN exit 1, as `export --help` says for a DIR that cannot be written, in one line naming the file
    why = "it is a file" if not below else f"a parent of the path is a file: {blocker}"
    assert (code, stdout) == (1, "")
    assert stderr.splitlines() == [f"kvtrace export: error: {out}: cannot write ({why})"]
    assert blocker.read_bytes() == b"the user's own\n"


def _empty(data: bytes) -> bytes:
    return b""


def _footer_damaged(data: bytes) -> bytes:
    """The footer's last 32 bytes before its length and magic overwritten: Parquet's magic intact, its
    metadata unreadable ("Couldn't deserialize thrift"), which pyarrow raises as an OSError."""
    return data[:-40] + b"\x01" * 32 + data[-8:]


@pytest.mark.parametrize("damage", [_empty, _footer_damaged], ids=["empty", "footer"])
def test_a_query_on_a_damaged_part_points_to_export_overwrite(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    # GIVEN an export whose kv_events part a full disk left empty, or whose footer was damaged
    out = tmp_path / "tables"
    assert _cli("export", str(SAMPLES / "static_b2"), "-o", str(out), "-q")[0] == 0
    part = out / "kv_events" / "part-00000.parquet"
    part.write_bytes(damage(part.read_bytes()))

    # WHEN it is queried THEN one line names the part, why, and how to write it again, exit 2
    code, _, stderr = _cli("query", str(out), "SELECT count(*) FROM kv_events")
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith(f"kvtrace query: error: {part}: not a readable Parquet file (")
    assert line.endswith("run the `kvtrace export` that wrote it again with --overwrite")
    # AND `kvtrace export --overwrite` of the same input writes it again, which the query then reads
    assert _cli("export", str(SAMPLES / "static_b2"), "-o", str(out), "-q", "--overwrite")[0] == 0
    code, stdout, _ = _cli("query", str(out), "--json", "SELECT count(*) AS n FROM kv_events")
    assert code == 0 and json.loads(stdout)[0]["n"] == _kv_lines(SAMPLES / "static_b2")
