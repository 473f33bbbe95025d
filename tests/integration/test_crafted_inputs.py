"""Inputs crafted to cost far more than their size or to print impossible figures (found by a hostile
tour of the CLI): each is refused in one line naming the file, exit 2, before the work grows past what
the file holds. Real snapshots read on: they share frames, never segments, block lists or traces.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

REAL = Path(__file__).resolve().parents[3] / "shared" / "real_traces"


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _shared_segments(n: int) -> dict[str, Any]:
    block = {"size": 8, "state": "active_allocated", "address": 0}
    segment = {"device": 0, "address": 0, "total_size": 8, "blocks": [block] * n}
    return {"segments": [segment] * n, "device_traces": []}


def _shared_block_lists(n: int) -> dict[str, Any]:
    blocks = [{"size": 8, "state": "active_allocated", "address": 0}] * n
    segments = [{"device": 0, "address": i, "total_size": 8, "blocks": blocks} for i in range(n)]
    return {"segments": segments, "device_traces": []}


def _shared_traces(n: int) -> dict[str, Any]:
    trace = [{"action": "alloc", "addr": 4096, "size": 8, "time_us": 1}] * n
    return {"segments": [], "device_traces": [trace] * n}


@pytest.mark.parametrize(
    ("build", "said"),
    [
        (_shared_segments, "1999 of its 2000 segments repeat another object"),
        (_shared_block_lists, "1999 of its 2000 segment's block lists repeat another object"),
        (_shared_traces, "1999 of its 2000 device traces repeat another object"),
    ],
    ids=["segments", "block-lists", "traces"],
)
def test_a_snapshot_that_lists_one_container_many_times_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Any, said: str
) -> None:
    # GIVEN a pickle of a few KB whose memo repeats one segment / block list / trace 2000 times (4 million
    # blocks or entries to walk: seconds and hundreds of MB before)
    path = tmp_path / "bomb.pickle"
    path.write_bytes(pickle.dumps(build(2000), protocol=4))
    assert path.stat().st_size < 64_000
    # THEN one line says it is not a real snapshot, exit 2
    assert main(["report", str(path), "--json", "--no-export"]) == 2
    err = _one_error(capsys)
    assert str(path) in err and "not a real snapshot" in err and said in err


def test_real_snapshots_share_frames_and_still_read(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a real torch 2.6 dump, whose entries share frame lists and frame dicts through the memo
    path = REAL / "snapshots" / "mem_snapshot.pickle"
    if not path.exists():
        pytest.skip("no real traces here")
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"]
