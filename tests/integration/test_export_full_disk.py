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


def _export(run: Path, out: Path, file_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """`kvtrace export` in a fresh process; with `file_limit`, no file of it may grow past that many bytes
    (a write beyond fails with EFBIG, as one on a full disk fails with ENOSPC)."""

    def limit_files() -> None:
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "export", "-q", str(run), "-o", str(out)],
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
    # AND no table holds a part or a temporary file of it: nothing says the run was exported
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == []

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
