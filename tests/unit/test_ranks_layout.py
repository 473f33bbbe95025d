"""Where each rank of a torch.distributed job writes its run, and what makes a folder a run group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtrace.distributed import run_path
from kvtrace.errors import KvtraceError
from kvtrace.format import GROUP_MARKER, MANIFEST, is_run_group, rank_dirs, read_run


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
    with pytest.raises(KvtraceError, match=r"group: not a kvtrace run directory .*a run group"):
        read_run(out)  # one line that says what the folder is
    (out / MANIFEST).write_text("{}")  # a run directory is a run, whatever its children
    assert not is_run_group(out)
