"""A recording on a disk that fills up: once full, no new file can be written (not even the atomic
manifest's temporary file), so the run must still end with a manifest that says which file could not be
written, and readers must refuse it in one line rather than take it for a run whose process died. A run
whose only unwritten file is the profiler's trace (its logs whole) reads without the trace.

A real full disk: a small tmpfs, which needs root and `mount` (those tests are skipped without them); or a
file size limit (RLIMIT_FSIZE), under which a write fails with EFBIG as one on a full disk fails with ENOSPC,
anywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvtrace.format import KV_EVENTS, MANIFEST, MEMORY_SAMPLES, WEIGHTS

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
    yield from _mounted(tmp_path, "size=4m")


@pytest.fixture
def few_inodes_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of 64 inodes (files and folders) mounted under tmp_path: quick to fill with files."""
    yield from _mounted(tmp_path, "size=4m,nr_inodes=64")


def _mounted(tmp_path: Path, options: str) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs root and mount (a tmpfs)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True)
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
    args = (disk / "run", batch_file, int(profiler), leave_free)
    return _child_lines(tmp_path, FILL_DISK + CHILD, *args)


def _run_child(tmp_path: Path, source: str, *args: object) -> subprocess.CompletedProcess[str]:
    """A child script (`source`, run with `args`), this checkout's kvtrace on its path."""
    script = tmp_path / "child.py"
    script.write_text(source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script), *(str(arg) for arg in args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def _child_lines(tmp_path: Path, source: str, *args: object) -> list[str]:
    """The lines a child script (`source`, run with `args`) prints; it must exit 0 without a traceback."""
    child = _run_child(tmp_path, source, *args)
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
    # manifest that the cut trace would leave no room for, were its room not given back
    errors = [line for line in said if line.startswith("error:")]
    assert len(errors) == 1, said
    trace = re.fullmatch(
        r"error: (.+\.pt\.trace\.json): cannot write \(No space left on device\): the run has no profiler "
        r"trace \(its KV log and samples are whole\)",
        errors[0],
    )
    assert trace is not None, errors
    assert Path(trace.group(1)).parent == run / "profiler"
    # AND no cut trace or temporary file is left; the manifest says what failed, and that no log did
    assert sorted(p.name for p in run.rglob("*") if p.is_file() and p.parent.name == "profiler") == []
    assert not [p.name for p in run.rglob("*.tmp")]
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["trace_error"] == f"{trace.group(1)}: cannot write (No space left on device)"
    assert "write_error" not in manifest["ended"]
    # AND a report reads it, saying that the trace was not written and why
    report = _report(run)
    assert report.returncode == 0, report.stderr
    assert f"note: the recorder could not write the profiler trace ({trace.group(1)}: cannot" in report.stdout


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


TRACE_LIMIT_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    import torch
    import kvtrace
    import kvtrace.run_writer
    from kvtrace.llama import build_model
    from kvtrace.recorder import RecordingError
    from tests.tiny import tiny_size

    out_dir = sys.argv[1]
    layers, new_tokens, limit, late_flush = (int(arg) for arg in sys.argv[2:6])
    if late_flush:  # every KV line reaches the disk in the block's last write, after the trace's
        kvtrace.run_writer.FLUSH_INTERVAL_S = 3600.0
    model = build_model(tiny_size(layers), seed=0)
    ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    # Files may not grow past `limit` bytes: a write beyond it fails with EFBIG, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=True):
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        print("no error")
    except RecordingError as exc:
        print("error:", exc)
    """
)


def _record_under_limit(
    run: Path, tmp_path: Path, layers: int, new_tokens: int, limit: int, late_flush: bool
) -> tuple[list[str], str, str]:
    """TRACE_LIMIT_CHILD's lines on stdout, its stderr, and the file its error names: the trace the profiler
    folder would hold, or the KV log."""
    script = tmp_path / "child.py"
    script.write_text(TRACE_LIMIT_CHILD, encoding="utf-8")
    args = [str(run), str(layers), str(new_tokens), str(limit), str(int(late_flush))]
    child = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    said = child.stdout.splitlines()
    named = re.fullmatch(r"error: (.+): cannot write \(File too large\): .*", said[-1])
    assert named is not None, said
    assert Path(named.group(1)).parent == run / "profiler" or Path(named.group(1)) == run / KV_EVENTS, said
    return said, child.stderr, named.group(1)


def test_a_run_whose_only_unwritten_file_is_its_trace_reads_without_it(tmp_path: Path) -> None:
    # GIVEN a recording with the profiler whose files may not grow past 256 KiB: its trace (~2 MiB) cannot
    # be written at the block's end, while the KV log (~16 KiB), the samples and the manifest can
    layers, new_tokens, kv_heads, head_dim, rows, prompt = 2, 8, 2, 16, 2, 8
    run = tmp_path / "run"
    said, stderr, trace = _record_under_limit(run, tmp_path, layers, new_tokens, 256 * 1024, late_flush=False)

    # THEN the block ends with one error naming the trace, saying the logs are whole
    assert said == [
        f"error: {trace}: cannot write (File too large): the run has no profiler trace (its KV log and "
        "samples are whole)"
    ]
    # AND kineto's own line on the failed write is not on stderr beside it
    assert "Failed to write to log file" not in stderr, stderr
    # AND the manifest names the trace as `trace_error`, with no `write_error`: the logs lost nothing.
    # A prefill creates K and V per layer, each of the other new_tokens - 1 forwards grows and frees them,
    # and the dropped cache's last storages are freed: 4 lines per layer and new token
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    made = 4 * layers * new_tokens
    assert manifest["ended"]["trace_error"] == f"{trace}: cannot write (File too large)"
    assert "write_error" not in manifest["ended"] and "kv_events_lost" not in manifest["ended"]
    assert manifest["kv_events"] == made
    assert (run / KV_EVENTS).read_bytes().count(b"\n") == made
    assert f"profiler trace not written: {trace}: cannot write (File too large)" in manifest["notes"]
    assert not list((run / "profiler").iterdir())

    # WHEN it is reported, in JSON
    report = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "report", "--no-export", "--json", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )

    # THEN it reads: a note says the trace was not written and why; the figures are the KV log's, the
    # final cache holding prompt + new_tokens - 1 tokens of K and V per layer and row, in fp32
    assert report.returncode == 0, report.stderr
    figures = json.loads(report.stdout)
    assert figures["kv"]["measured_from"] == "kv_log"
    tokens = prompt + new_tokens - 1
    assert figures["kv"]["final_bytes"] == layers * 2 * rows * tokens * kv_heads * head_dim * 4
    assert figures["notes"][0].startswith(
        f"the recorder could not write the profiler trace ({trace}: cannot write (File too large)), so no "
        "allocator events were read: memory figures are the KV log's over the weights"
    )
    # AND diagnose reads it too
    diagnose = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "diagnose", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert diagnose.returncode == 0, diagnose.stderr


def test_a_run_whose_kv_log_failed_at_the_blocks_end_is_refused_naming_it_not_the_trace(
    tmp_path: Path,
) -> None:
    # GIVEN a recording with the profiler whose files may not grow past 40 KiB, and whose ~60 KiB of KV
    # lines reach the disk in one write at the block's end, before the trace (which cannot be written
    # either: kvtrace writes the logs first, so that a process killed while the trace is written keeps them)
    layers, new_tokens = 2, 30
    run = tmp_path / "run"
    said, stderr, first = _record_under_limit(run, tmp_path, layers, new_tokens, 40 * 1024, late_flush=True)

    # THEN the error names the KV log, the first file that could not be written, and the run as incomplete
    assert first == str(run / KV_EVENTS)
    assert said == [f"error: {first}: cannot write (File too large): the run is incomplete"]
    assert "Failed to write to log file" not in stderr, stderr
    # AND the manifest counts the KV lines the limit cut off as lost
    made = 4 * layers * new_tokens
    whole = (run / KV_EVENTS).read_bytes().count(b"\n")
    assert 0 < whole < made
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["write_error"] == f"{first}: cannot write (File too large)"
    assert "trace_error" not in manifest["ended"]
    assert manifest["kv_events"] == whole
    assert manifest["ended"]["kv_events_lost"] == made - whole
    # AND a report refuses it in one line: its logs hold only the early part of the run
    report = _report(run)
    assert report.returncode == 2, report.stdout
    assert report.stderr.splitlines() == [
        f"kvtrace report: error: {run}: incomplete run: the recorder failed to write {first}: cannot write "
        f"(File too large); {made - whole} KV events were lost"
    ]


# The children's inode filler: empty files beside out_dir until the disk can hold no new file, then
# `leave_free` of them removed; returns the others, for the child to remove before it retries.
FILL_INODES = textwrap.dedent(
    """
    import os

    def fill_inodes(out_dir, leave_free):
        fillers = []
        while True:
            filler = os.path.join(os.path.dirname(out_dir), f"filler-{len(fillers)}")
            try:
                open(filler, "wb").close()
            except OSError:
                break
            fillers.append(filler)
        kept = len(fillers) - leave_free
        for filler in fillers[kept:]:
            os.unlink(filler)
        return fillers[:kept]
    """
)

INODES_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import kvtrace
    from kvtrace.llama import build_model
    from kvtrace.recorder import RecordingError
    from tests.tiny import tiny_size

    out_dir, when = sys.argv[1], sys.argv[2]
    layers, rows, prompt, new_tokens, leave_free = (int(arg) for arg in sys.argv[3:8])
    model = build_model(tiny_size(layers), seed=0)
    ids = torch.randint(3, 1000, (rows, prompt), generator=torch.Generator().manual_seed(0))

    def record(fill_at_end):
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if fill_at_end:  # the final manifest's temporary file can have no inode
                fill_inodes(out_dir, 0)

    fillers = fill_inodes(out_dir, leave_free) if when == "start" else []
    try:
        record(fill_at_end=when == "end")
        print("no error")
    except RecordingError as exc:
        print("error:", exc)
    if when == "start":
        print("left:", sorted(os.listdir(out_dir)))
        for filler in fillers:  # room again: the same call is retried
            os.unlink(filler)
        record(fill_at_end=False)
        print("retried")
    """
)

LAYERS, ROWS, PROMPT, NEW_TOKENS, KV_HEADS, HEAD_DIM = 2, 2, 8, 4, 2, 16


def _record_with_inodes(run: Path, tmp_path: Path, when: str, leave_free: int) -> list[str]:
    """INODES_CHILD's lines on stdout: its disk's inodes filled at the block's start or end."""
    return _child_lines(
        tmp_path, FILL_INODES + INODES_CHILD, run, when, LAYERS, ROWS, PROMPT, NEW_TOKENS, leave_free
    )


def _final_kv_bytes(run: Path) -> int:
    report = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "report", "--no-export", "--json", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert report.returncode == 0, report.stderr
    return int(json.loads(report.stdout)["kv"]["final_bytes"])


# The start makes the run folder, its lock, manifest.json (via a temporary file), model_config.json (likewise;
# not written, a note), then kv_events.jsonl, memory_samples.jsonl and weights.jsonl, in that order.
@pytest.mark.parametrize(("leave_free", "unwritten"), [(3, KV_EVENTS), (5, MEMORY_SAMPLES), (6, WEIGHTS)])
def test_a_full_disk_at_the_start_refuses_in_one_line_and_leaves_no_run_to_block_the_retry(
    few_inodes_disk: Path, tmp_path: Path, leave_free: int, unwritten: str
) -> None:
    # GIVEN a disk with room for the run folder, its lock and its first manifest, and too few inodes for
    # one of the files the start writes after them
    run = few_inodes_disk / "run"

    # WHEN a recording starts there, and is retried once the disk has room
    said = _record_with_inodes(run, tmp_path, "start", leave_free)

    # THEN the start is refused in one line naming the file and the problem
    assert said[0] == f"error: {run / unwritten}: cannot write (No space left on device)"
    # AND what the start wrote is gone (no manifest "running" to read as a dead process); the folder stays
    assert said[1] == "left: []"
    # AND the same call, retried, is not refused as a run already there, and records the whole run
    assert said[2:] == ["retried"]
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["status"] == "ok" and "write_error" not in manifest["ended"]
    tokens = PROMPT + NEW_TOKENS - 1
    assert _final_kv_bytes(run) == LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * ROWS * 4


def test_a_final_manifest_written_in_place_on_a_full_disk_is_a_complete_run(
    few_inodes_disk: Path, tmp_path: Path
) -> None:
    # GIVEN a recording whose disk can hold no new file when its block ends: the final manifest's atomic
    # write (a temporary file, renamed) fails, while every log was written whole
    run = few_inodes_disk / "run"
    said = _record_with_inodes(run, tmp_path, "end", 0)

    # THEN the block ends without an error: the manifest is written over the room reserved at the start
    assert said == ["no error"]
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["status"] == "ok"
    assert "write_error" not in manifest["ended"] and "kv_events_lost" not in manifest["ended"]
    assert manifest["notes"][-1] == (
        "manifest.json written over the room reserved at start: its atomic write failed "
        "(No space left on device)"
    )
    assert not [p.name for p in run.rglob("*.tmp")]
    # AND its KV log is whole: a prefill creates K and V per layer, each of the other new tokens' forwards
    # grows and frees them, and the dropped cache's last storages are freed: 4 lines per layer and new token
    made = 4 * LAYERS * NEW_TOKENS
    assert manifest["kv_events"] == made
    assert (run / KV_EVENTS).read_bytes().count(b"\n") == made
    # AND a report reads it: the final cache holds prompt + new tokens - 1 tokens of K and V per layer and
    # row, in fp32
    tokens = PROMPT + NEW_TOKENS - 1
    assert _final_kv_bytes(run) == LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * ROWS * 4


SIGTERM_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    out_dir = sys.argv[1]
    layers, rows, prompt, new_tokens, stop_at = (int(arg) for arg in sys.argv[2:7])
    model = build_model(tiny_size(layers), seed=0)
    ids = torch.randint(3, 1000, (rows, prompt), generator=torch.Generator().manual_seed(0))
    forwards = []

    def hook(module, args, output):
        forwards.append(1)
        if len(forwards) == stop_at:  # a scheduler's SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)

    export = torch.profiler.profile.export_chrome_trace

    def fill_then_export(*args, **kwargs):  # another writer fills the disk before the trace is written
        fill_disk(out_dir, 0)
        return export(*args, **kwargs)

    torch.profiler.profile.export_chrome_trace = fill_then_export
    model.register_forward_hook(hook)
    with torch.no_grad(), kvtrace.record(out_dir, model=model):
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    """
)


def test_a_disk_that_fills_after_a_sigterm_leaves_room_for_the_final_manifest(
    small_disk: Path, tmp_path: Path
) -> None:
    # GIVEN a recording SIGTERMed (its manifest notes the SIGTERM at once, before the trace is written) on a
    # disk that fills before the profiler's trace is written: no room for it or the final manifest's new file
    run, stop_at = small_disk / "run", 3
    child = _run_child(tmp_path, FILL_DISK + SIGTERM_CHILD, run, LAYERS, ROWS, PROMPT, NEW_TOKENS, stop_at)
    assert child.returncode == -signal.SIGTERM, child.stderr[-3000:]

    # THEN the final manifest is written over the room reserved at the start, which the SIGTERM's manifest
    # kept (it was written at its own length, too short for the final one: the run stayed "running", its
    # end unwritten)
    ended = json.loads((run / MANIFEST).read_text(encoding="utf-8"))["ended"]
    assert (ended["status"], ended["signal"]) == ("interrupted", "SIGTERM"), ended
    assert "write_error" not in ended
    # AND the run reads without its trace: the KV after forward 3 (the prompt and 2 tokens fed back), fp32
    tokens = PROMPT + stop_at - 1
    assert _final_kv_bytes(run) == LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * ROWS * 4
