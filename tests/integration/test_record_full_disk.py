"""A recording on a disk that fills up: once full, no new file can be written (not even the atomic
manifest's temporary file), so the run must still end with a manifest that says which file could not be
written, and readers must refuse it in one line rather than take it for a run whose process died.

A real full disk: a small tmpfs, which needs root and `mount`; the test is skipped without them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvtrace.format import KV_EVENTS, MANIFEST, MEMORY_SAMPLES

REPO_ROOT = Path(__file__).resolve().parents[2]

# The children's disk filler: writes until `leave_free` bytes are left on out_dir's disk, or none at all
# (smaller and smaller writes at the end).
FILL_DISK = textwrap.dedent(
    """
    import os, shutil

    def fill_disk(out_dir, leave_free):
        with open(os.path.join(os.path.dirname(out_dir), "filler"), "wb", buffering=0) as fh:
            chunk = 1 << 16
            while chunk:
                room = shutil.disk_usage(out_dir).free - leave_free
                try:
                    if room < chunk:
                        raise OSError("enough")
                    fh.write(b"x" * chunk)
                except OSError:
                    chunk //= 2
    """
)

CHILD = textwrap.dedent(
    """
    import os, shutil, sys
    import torch
    import kvtrace
    from kvtrace.llama import build_model
    from kvtrace.recorder import RecordingError

    out_dir, batch_file, profiler, leave_free = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    model = build_model("tiny")
    batch = torch.load(batch_file)

    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=profiler):
            if not profiler:
                fill_disk(out_dir, leave_free)  # the KV log's next write fails
            model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            if profiler:
                fill_disk(out_dir, leave_free)  # the trace, written at the block's end, does not fit
        print("no error")
    except RecordingError as exc:
        print("error:", exc)
    """
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted under tmp_path."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs root and mount (a tmpfs)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _record(disk: Path, tmp_path: Path, prompt_batch, profiler: bool, leave_free: int) -> list[str]:
    batch_file = tmp_path / "batch.pt"
    torch.save(
        {"input_ids": prompt_batch.input_ids, "attention_mask": prompt_batch.attention_mask}, batch_file
    )
    script = tmp_path / "child.py"
    script.write_text(FILL_DISK + CHILD, encoding="utf-8")
    child = subprocess.run(
        [
            sys.executable,
            str(script),
            str(disk / "run"),
            str(batch_file),
            str(int(profiler)),
            str(leave_free),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "Traceback" not in child.stderr
    return child.stdout.splitlines()


def _report(run: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "report", "--no-export", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_a_log_write_on_a_full_disk_ends_with_a_manifest_that_says_so(small_disk, tmp_path, prompt_batch):
    # GIVEN a recording whose disk is full from the start of its block
    run = small_disk / "run"
    said = _record(small_disk, tmp_path, prompt_batch, profiler=False, leave_free=0)

    # THEN the block ends with one error naming the log that could not be written
    errors = [line for line in said if line.startswith("error:")]
    logs = [run / KV_EVENTS, run / MEMORY_SAMPLES]
    full = next((log for log in logs if errors and errors[0].startswith(f"error: {log}: ")), None)
    assert full is not None, said
    assert errors == [f"error: {full}: cannot write (No space left on device): the run is incomplete"]
    # AND the manifest was written all the same (over the room reserved at start): not "running"
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["status"] == "ok"
    assert manifest["ended"]["write_error"] == f"{full}: cannot write (No space left on device)"
    assert not [p.name for p in run.rglob("*.tmp")]
    # AND a report refuses it in one line naming that file, not "the process died"
    report = _report(run)
    assert report.returncode == 2, report.stdout
    assert report.stderr.splitlines() == [
        f"kvtrace report: error: {run}: incomplete run: the recorder failed to write {full}: cannot write "
        f"(No space left on device); {manifest['ended']['kv_events_lost']} KV events were lost"
    ]


def test_a_trace_that_does_not_fit_is_the_file_the_error_names(small_disk, tmp_path, prompt_batch):
    # GIVEN a recording with the profiler whose disk has 256 KiB left when the block ends (its trace takes
    # more: several MiB)
    run = small_disk / "run"
    said = _record(small_disk, tmp_path, prompt_batch, profiler=True, leave_free=256 * 1024)

    # THEN the error names the trace (the first file that could not be written), not the log or the
    # manifest that the cut trace then left no room for
    errors = [line for line in said if line.startswith("error:")]
    assert len(errors) == 1, said
    trace = re.fullmatch(
        r"error: (.+\.pt\.trace\.json): cannot write \(No space left on device\): the run is incomplete",
        errors[0],
    )
    assert trace is not None, errors
    assert Path(trace.group(1)).parent == run / "profiler"
    # AND no cut trace or temporary file is left; the manifest says what failed
    assert sorted(p.name for p in run.rglob("*") if p.is_file() and p.parent.name == "profiler") == []
    assert not [p.name for p in run.rglob("*.tmp")]
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["write_error"] == f"{trace.group(1)}: cannot write (No space left on device)"
    # AND a report refuses it in one line
    report = _report(run)
    assert report.returncode == 2, report.stdout
    assert len(report.stderr.splitlines()) == 1
    assert f"incomplete run: the recorder failed to write {trace.group(1)}" in report.stderr


CUT_WRITE_CHILD = textwrap.dedent(
    """
    import os, shutil, sys
    import torch
    import kvtrace
    import kvtrace.run_writer
    from kvtrace.llama import build_model
    from kvtrace.recorder import RecordingError
    from tests.tiny import tiny_size

    out_dir = sys.argv[1]
    layers, new_tokens, leave_free = (int(arg) for arg in sys.argv[2:5])
    # No flush on the writer thread: every KV line reaches the disk in the block's last write, which the
    # disk takes only the start of
    kvtrace.run_writer.FLUSH_INTERVAL_S = 3600.0
    model = build_model(tiny_size(layers), seed=0)
    ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))

    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
            fill_disk(out_dir, leave_free)
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        print("no error")
    except RecordingError as exc:
        print("error:", exc)
    """
)


def test_a_kv_log_write_cut_by_a_full_disk_counts_as_lost_only_the_lines_not_in_the_file(
    small_disk: Path, tmp_path: Path
) -> None:
    # GIVEN a recording whose disk has 16 KiB left, and whose ~50 KiB of KV lines reach it in one write at
    # the block's end: the disk takes its first pages, cutting a line, and refuses the rest
    layers, new_tokens = 2, 30
    run = small_disk / "run"
    script = tmp_path / "child.py"
    script.write_text(FILL_DISK + CUT_WRITE_CHILD, encoding="utf-8")
    child = subprocess.run(
        [sys.executable, str(script), str(run), str(layers), str(new_tokens), str(16 * 1024)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines() == [
        f"error: {run / KV_EVENTS}: cannot write (No space left on device): the run is incomplete"
    ]
    # A prefill creates K and V per layer, each of the other new_tokens - 1 forwards grows and frees them,
    # and the dropped cache's last storages are freed: 4 lines per layer and new token
    made = 4 * layers * new_tokens

    # WHEN the file's whole lines are counted
    text = (run / KV_EVENTS).read_bytes()
    whole = text.count(b"\n")
    assert 0 < whole < made
    for line in text.split(b"\n")[:whole]:
        json.loads(line)

    # THEN the manifest counts those as written, and only the others (a cut last one included) as lost
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["write_error"] == f"{run / KV_EVENTS}: cannot write (No space left on device)"
    assert manifest["kv_events"] == whole
    assert manifest["ended"]["kv_events_lost"] == made - whole
