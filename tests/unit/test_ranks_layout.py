"""Where each rank of a torch.distributed job writes its run, and what makes a folder a run group."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kvtrace.distributed import run_path
from kvtrace.errors import KvtraceError, RecordingError
from kvtrace.format import (
    GROUP_MARKER,
    KV_EVENTS,
    MANIFEST,
    MEMORY_SAMPLES,
    WEIGHTS,
    is_run_dir,
    is_run_group,
    rank_dirs,
    read_run,
)
from kvtrace.run_lock import RunLock


def _facts(rank: int, world_size: int) -> dict[str, object]:
    return {"rank": rank, "world_size": world_size, "local_rank": rank, "hostname": "h", "backend": "gloo"}


def _fake_run(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text("{}")


def test_outside_a_group_or_alone_the_run_is_out_dir(tmp_path):
    assert run_path(tmp_path / "run", None, overwrite=False) == tmp_path / "run"
    assert run_path(tmp_path / "run", _facts(0, 1), overwrite=False) == tmp_path / "run"
    assert not (tmp_path / "run").exists()  # nothing written for a plain run


def test_each_rank_writes_rank_dir_and_rank_0_the_marker(tmp_path):
    out = tmp_path / "group"
    assert run_path(out, _facts(1, 2), overwrite=False) == out / "rank-1"
    assert not (out / GROUP_MARKER).exists()  # only rank 0 writes the marker
    assert run_path(out, _facts(0, 2), overwrite=False) == out / "rank-0"
    marker = json.loads((out / GROUP_MARKER).read_text())
    assert marker["format"] == "kvtrace-run-group" and marker["world_size"] == 2


def test_overwrite_by_a_smaller_world_removes_the_ranks_it_no_longer_has(tmp_path):
    out = tmp_path / "group"
    for rank in range(4):
        _fake_run(out / f"rank-{rank}")
    run_path(out, _facts(0, 2), overwrite=True)
    assert [r for r, _ in rank_dirs(out)] == [0, 1]
    for rank in (2, 3):
        _fake_run(out / f"rank-{rank}")
    run_path(out, _facts(0, 2), overwrite=False)  # without overwrite nothing is removed
    assert [r for r, _ in rank_dirs(out)] == [0, 1, 2, 3]


def test_a_group_is_known_by_its_rank_runs_not_by_its_marker(tmp_path):
    out = tmp_path / "group"
    out.mkdir()
    (out / GROUP_MARKER).write_text("{}")
    (out / "rank-0").mkdir()  # a rank that never wrote its manifest
    (out / "rank-x").mkdir()
    assert not is_run_group(out)
    _fake_run(out / "rank-10")
    _fake_run(out / "rank-2")
    _fake_run(out / "rank-٣")  # not an ASCII digit: not a rank
    assert is_run_group(out)
    assert [r for r, _ in rank_dirs(out)] == [2, 10]
    with pytest.raises(KvtraceError, match=r"group: a run group \(2 rank-<r>/ runs, .* e\.g\. .*rank-2$"):
        read_run(out)  # one line that says what the folder is
    (out / MANIFEST).write_text("{}")  # a run directory is a run, whatever its children
    assert not is_run_group(out)


def _fake_full_run(folder: Path) -> None:
    """A run with every kind of file a run owns, and a file of the user's beside them."""
    _fake_run(folder)
    for name in (KV_EVENTS, WEIGHTS, MEMORY_SAMPLES, "timeline.html"):
        (folder / name).write_text("")
    (folder / "profiler").mkdir()
    (folder / "profiler" / "host_7.1796139297214739841.pt.trace.json").write_text(
        "{}"
    )  # as the profiler names it
    (folder / "notes.txt").write_text("mine")


def test_a_group_into_a_plain_run_is_refused_by_every_rank(tmp_path):
    out = tmp_path / "run"
    _fake_full_run(out)
    before = sorted(p.name for p in out.iterdir())
    for rank in (0, 1):
        with pytest.raises(RecordingError, match=r"run: already holds a kvtrace run \(pass overwrite=True"):
            run_path(out, _facts(rank, 2), overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing removed


def test_a_group_with_overwrite_replaces_the_plain_run_keeping_the_users_files(tmp_path):
    out = tmp_path / "run"
    _fake_full_run(out)
    assert run_path(out, _facts(1, 2), overwrite=True) == out / "rank-1"
    assert is_run_dir(out)  # rank 0 replaces it, the others only write their own folder
    assert run_path(out, _facts(0, 2), overwrite=True) == out / "rank-0"
    assert sorted(p.name for p in out.iterdir()) == [GROUP_MARKER, "notes.txt"]


def test_a_plain_run_into_a_group_is_refused_and_with_overwrite_replaces_it(tmp_path):
    out = tmp_path / "group"
    for rank in range(3):
        _fake_full_run(out / f"rank-{rank}")
    (out / "rank-2" / "notes.txt").unlink()
    (out / GROUP_MARKER).write_text("{}")
    for facts in (None, _facts(0, 1)):
        with pytest.raises(
            RecordingError, match=r"group: already holds a kvtrace run group \(pass overwrite"
        ):
            run_path(out, facts, overwrite=False)
    assert [r for r, _ in rank_dirs(out)] == [0, 1, 2]
    assert run_path(out, None, overwrite=True) == out
    # every rank run is gone; a folder with a file of the user's stays, holding only that
    assert sorted(p.name for p in out.iterdir()) == ["rank-0", "rank-1"]
    assert [p.name for p in (out / "rank-0").iterdir()] == ["notes.txt"]
    assert not is_run_group(out) and rank_dirs(out) == []


def test_overwrite_refuses_a_rank_folder_another_recording_is_writing(tmp_path):
    out = tmp_path / "group"
    _fake_full_run(out / "rank-0")
    lock = RunLock(out / "rank-0")
    lock.acquire()
    try:
        with pytest.raises(RecordingError, match=r"rank-0: another recording is writing this folder \(pid "):
            run_path(out, None, overwrite=True)
    finally:
        lock.release()
    assert is_run_dir(out / "rank-0")


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_refuses_a_rank_whose_profiler_is_a_link_before_removing_any_rank(tmp_path):
    # GIVEN a group of 4 ranks, rank 3's profiler/ a link to a folder elsewhere (the old trace is there)
    out = tmp_path / "group"
    for rank in range(4):
        _fake_full_run(out / f"rank-{rank}")
    elsewhere = tmp_path / "scratch"
    (out / "rank-3" / "profiler").rename(elsewhere)
    (out / "rank-3" / "profiler").symlink_to(elsewhere)
    before, kept = _listing(out), _listing(elsewhere)

    # WHEN a world of 2 replaces it THEN rank 3 is refused in one line naming the link, before rank 2 loses
    # a file (the removal used to empty rank 2, then raise OSError "Cannot call rmtree on a symbolic link")
    said = re.escape(f"{out / 'rank-3' / 'profiler'}: a symbolic link where the run's profiler/ folder goes")
    with pytest.raises(RecordingError, match=f"^{said}.*: nothing was removed; remove the link") as refused:
        run_path(out, _facts(0, 2), overwrite=True)
    assert refused.value.exit_code == 2
    assert _listing(out) == before and _listing(elsewhere) == kept


def test_removing_a_rank_keeps_the_users_files_in_its_profiler_and_snapshots_folders(tmp_path):
    # GIVEN rank 2 of a group with files of the user's in profiler/ and snapshots/, beside the run's
    out = tmp_path / "group"
    for rank in range(3):
        _fake_full_run(out / f"rank-{rank}")
    rank_2 = out / "rank-2"
    (rank_2 / "profiler" / "notes.txt").write_text("mine")
    (rank_2 / "snapshots").mkdir()
    (rank_2 / "snapshots" / "exit.pickle").write_bytes(b"")
    (rank_2 / "snapshots" / "keep.txt").write_text("mine too")

    # WHEN a world of 2 replaces the group
    run_path(out, _facts(0, 2), overwrite=True)

    # THEN only the run's own files went: its trace and snapshot; the user's stay, with their folders
    assert _listing(rank_2) == [
        "notes.txt",
        "profiler",
        "profiler/notes.txt",
        "snapshots",
        "snapshots/keep.txt",
    ]
    assert (rank_2 / "profiler" / "notes.txt").read_text() == "mine"


def test_a_rank_whose_log_is_a_folder_is_refused_with_nothing_removed(tmp_path):
    # GIVEN a plain run whose weights.jsonl is a folder (of the user's: no run writes one)
    out = tmp_path / "run"
    _fake_full_run(out)
    (out / WEIGHTS).unlink()
    (out / WEIGHTS).mkdir()
    (out / WEIGHTS / "mine.txt").write_text("mine")
    before = _listing(out)
    # WHEN a group replaces it THEN rank 0 refuses in one line; kv_events.jsonl (removed first) is still there
    with pytest.raises(
        RecordingError, match=re.escape(f"{out / WEIGHTS}: a folder where the run has a file")
    ):
        run_path(out, _facts(0, 2), overwrite=True)
    assert _listing(out) == before


def test_a_rank_whose_manifest_is_a_link_loop_is_named_not_called_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN a group of a real rank 0 (the sample run) and a rank 1 whose manifest is a loop of links
    sample = Path(__file__).resolve().parents[2] / "sample_traces" / "dynamic_b2"
    shutil.copytree(sample, tmp_path / "rank-0")
    (tmp_path / "rank-1").mkdir()
    (tmp_path / "rank-1" / MANIFEST).symlink_to(MANIFEST)
    # THEN the group holds both ranks, and its report names rank 1's manifest and why it cannot be read
    assert [rank for rank, _ in rank_dirs(tmp_path)] == [0, 1]
    assert main(["report", str(tmp_path), "--no-export"]) == 2  # rank 0's report, and rank 1 unreadable
    captured = capsys.readouterr()
    said = f"rank 1 left out: {tmp_path / 'rank-1' / MANIFEST}: cannot read (a loop of symbolic links)"
    assert said in captured.out and "stopped before record() started" not in captured.out
    assert captured.err == f"kvtrace report: error: {said}\n"
