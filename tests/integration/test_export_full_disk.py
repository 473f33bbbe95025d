"""`kvtrace export` when its output cannot be written to the end (a full disk, a file size limit): a part is
committed all tables or none, so that a later export exports the same sources again, in full."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import kvtrace

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "sample_traces"
TABLES = ("runs", "devices", "kv_events", "memory_events", "samples", "engine_steps", "engine_requests")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, tiny_model, prompt_batch) -> Path:
    """A real run of the tiny model, with the profiler's memory events (the export's biggest table)."""
    run = tmp_path_factory.mktemp("export_full_disk") / "run"
    with torch.no_grad(), kvtrace.record(run, model=tiny_model):
        tiny_model.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
        )
    return run


def _export(
    run: Path, out: Path, file_limit: int | None = None, *flags: str
) -> subprocess.CompletedProcess[str]:
    """`kvtrace export` in a fresh process; with `file_limit`, no file of it may grow past that many bytes
    (a write beyond fails with EFBIG, as one on a full disk fails with ENOSPC)."""

    def limit_files() -> None:
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "export", "-q", str(run), "-o", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        preexec_fn=limit_files,
    )


def _rows(out: Path) -> dict[str, int]:
    """Rows per table, read from the part files with pyarrow (not through kvtrace's readers)."""
    return {
        table: sum(pq.read_metadata(p).num_rows for p in sorted((out / table).glob("part-*.parquet")))
        for table in TABLES
    }


def test_an_export_that_cannot_write_a_table_commits_no_table(recorded: Path, tmp_path: Path) -> None:
    # GIVEN the part sizes of a complete export of the run
    clean = tmp_path / "clean"
    assert _export(recorded, clean).returncode == 0
    sizes = {table: next((clean / table).glob("part-*.parquet")).stat().st_size for table in TABLES}
    biggest = max(sizes, key=lambda table: sizes[table])
    second = sorted(sizes.values())[-2]
    assert sizes[biggest] > second + 4096, sizes  # one table alone hits the limit

    # WHEN the same export runs where files cannot grow past a size only the biggest part reaches
    out = tmp_path / "tables"
    failed = _export(recorded, out, file_limit=(second + sizes[biggest]) // 2)

    # THEN one line names that part and the cause, exit status 1 (the output, not the input, failed)
    part = out / biggest / "part-00000.parquet"
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines() == [f"kvtrace export: error: {part}: cannot write (File too large)"]
    # AND no table holds a part or a temporary file of it: nothing says the run was exported; nor is the
    # folder the export made left behind, empty (it held the seven tables' folders)
    assert not out.exists()

    # WHEN the export runs again with room to write
    again = _export(recorded, out)

    # THEN it exports the run in full, every table as in the clean export
    assert again.returncode == 0, again.stderr
    assert "exported 1 of 1 inputs" in again.stdout
    assert _rows(out) == _rows(clean)


def test_a_half_committed_export_is_exported_again(recorded: Path, tmp_path: Path) -> None:
    # GIVEN an export as kvtrace 0.1.0 left it on a full disk: runs and kv_events renamed into place,
    # memory_events and samples still temporary files
    clean = tmp_path / "clean"
    out = tmp_path / "tables"
    assert _export(recorded, clean).returncode == 0
    assert _export(recorded, out).returncode == 0
    for table in ("memory_events", "samples"):
        (out / table / "part-00000.parquet").rename(out / table / ".part-00000.parquet.tmp")

    # WHEN it is exported again
    again = _export(recorded, out)

    # THEN the run is not taken as exported: every table holds it once, no temporary file is left
    assert again.returncode == 0, again.stderr
    assert "exported 1 of 1 inputs" in again.stdout
    assert _rows(out) == _rows(clean)
    assert not list(out.rglob("*.tmp"))


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an export (its lock aside) and its bytes."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".kvtrace.lock"
    }


def _run_ids(out: Path) -> list[str]:
    """The runs an export holds, as `kvtrace query` reads them (committed parts only)."""
    from analyzers.load import load_tables

    return sorted(load_tables(out).runs.column("run_id").to_pylist())


def test_an_overwrite_that_cannot_write_keeps_the_earlier_export(recorded: Path, tmp_path: Path) -> None:
    # GIVEN an export of the run, and the part sizes a complete export of it has
    out = tmp_path / "tables"
    assert _export(recorded, out).returncode == 0
    before = _files(out)
    sizes = {table: len(before[f"{table}/part-00000.parquet"]) for table in TABLES}
    biggest = max(sizes, key=lambda table: sizes[table])
    second = sorted(sizes.values())[-2]

    # WHEN it is exported again with --overwrite where only the biggest table's part cannot be written
    failed = _export(recorded, out, (second + sizes[biggest]) // 2, "--overwrite")

    # THEN one line names the new part and the cause, exit status 1
    part = out / biggest / "part-00001.parquet"
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines() == [f"kvtrace export: error: {part}: cannot write (File too large)"]
    # AND the earlier export is there byte for byte, with no file of the failed one beside it
    assert _files(out) == before
    assert _run_ids(out) == [recorded.as_posix()]


def test_an_interrupted_overwrite_keeps_the_earlier_export(tmp_path: Path) -> None:
    from analyzers.export_parquet import export

    # GIVEN an export of one sample run
    out = tmp_path / "tables"
    first, others = SAMPLES / "dynamic_b2", [SAMPLES / "static_b2", SAMPLES / "sliding_b2"]
    export([first], out)
    before = _files(out)

    # WHEN an --overwrite of two other runs gets Ctrl-C (a real SIGINT) once it has read the first
    def interrupt(_inp: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    # (Python's own handler: a background job, `pytest &`, inherits SIGINT ignored from its shell)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            export(others, out, overwrite=True, on_input=interrupt)
    finally:
        signal.signal(signal.SIGINT, handler)

    # THEN the earlier export is whole, and nothing of the interrupted one is left
    assert _files(out) == before
    assert _run_ids(out) == [first.as_posix()]


def test_an_overwrite_with_no_readable_input_keeps_the_earlier_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN an export of one sample run, and an empty pickle
    out, empty = tmp_path / "tables", tmp_path / "empty.pickle"
    assert main(["export", str(SAMPLES / "dynamic_b2"), "-o", str(out), "-q"]) == 0
    before = _files(out)
    empty.write_bytes(b"")
    capsys.readouterr()

    # WHEN only the empty pickle is exported with --overwrite
    code = main(["export", str(empty), "-o", str(out), "-q", "--overwrite"])

    # THEN it is skipped in one line, exit 2, and the earlier export stays as it was (and says so)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.splitlines() == [f"kvtrace export: warning: skipped {empty}: empty file"]
    assert f"nothing new exported to {out}: no part added, its earlier parts are kept" in captured.out
    assert _files(out) == before
    assert _run_ids(out) == [(SAMPLES / "dynamic_b2").as_posix()]


def test_an_overwrite_killed_while_removing_the_old_parts_shows_only_the_new_one(tmp_path: Path) -> None:
    from analyzers.export_parquet import export

    # GIVEN what an --overwrite killed after its commit leaves: the old part 0, its own part 1, and its
    # mark (the old part's files are removed after the mark is set and part 1's runs part renamed in)
    out = tmp_path / "tables"
    old, new = SAMPLES / "dynamic_b2", SAMPLES / "static_b2"
    export([old], out)
    export([new], out)
    (out / "runs" / ".overwrite-00001").touch()

    # WHEN it is read, THEN only the new part is there (not both: the old run is replaced)
    assert _run_ids(out) == [new.as_posix()]

    # AND the next export into the folder ends the removal: part 1 alone, no mark
    summary = export([new], out)
    assert (summary.part, summary.already_exported) == (None, 1)
    assert sorted(_files(out)) == [f"{table}/part-00001.parquet" for table in sorted(TABLES)]
    assert _run_ids(out) == [new.as_posix()]
