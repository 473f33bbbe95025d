"""The snapshot replay's two paths (numpy columns; the entry-by-entry loop for odd value types) give the
same figures, which are checked by hand on a small made-up trace."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzers.readers import snapshot_replay
from analyzers.readers.snapshot import read_snapshot
from kvtrace.errors import KvtraceError

FRAMES = [{"filename": "model.py", "line": 7, "name": "forward"}]


def _snapshot(as_text: bool) -> dict[str, Any]:
    def num(value: int) -> Any:
        return str(value) if as_text else value

    trace = [
        {"action": "segment_alloc", "addr": num(0), "size": num(4096), "time_us": num(1)},
        {"action": "free_completed", "addr": num(9000), "size": num(100), "time_us": num(2)},  # orphan
        {"action": "alloc", "addr": num(0), "size": num(512), "time_us": num(3), "frames": FRAMES},
        {"action": "alloc", "addr": num(512), "size": num(1024), "time_us": num(4), "frames": FRAMES},
        {"action": "free_requested", "addr": num(0), "size": num(512), "time_us": num(5)},
        {"action": "free_completed", "addr": num(0), "size": num(512), "time_us": num(6)},
        {"action": "oom", "size": num(1 << 30), "device_free": num(0), "time_us": num(7)},
        {"action": "alloc", "addr": num(0), "size": num(256), "time_us": num(8), "frames": FRAMES},
    ]
    blocks = [
        {"address": 0, "size": 512, "requested_size": 256, "state": "active_allocated"},
        {"address": 512, "size": 1024, "requested_size": 1024, "state": "active_allocated"},
        {"address": 1536, "size": 2560, "requested_size": 2560, "state": "active_allocated"},  # from before
    ]
    segment = {"device": 0, "address": 0, "total_size": 4096, "allocated_size": 4096, "blocks": blocks}
    return {"segments": [segment], "device_traces": [trace]}


def _read(tmp_path: Path, as_text: bool) -> Any:
    path = tmp_path / f"s{as_text}.pickle"
    path.write_bytes(pickle.dumps(_snapshot(as_text), protocol=4))
    return read_snapshot(path)


def test_both_replay_paths_give_the_hand_computed_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _read(tmp_path, as_text=False)
    monkeypatch.setattr(snapshot_replay, "_replay_columns", lambda *args: None)  # the entry-by-entry loop
    slow = _read(tmp_path, as_text=False)
    for source in (fast, slow):
        (dev,) = source.devices
        assert dev.delta_bytes.tolist() == [-100, 512, 1024, -512, 256]
        assert dev.ts_us.tolist() == [2, 3, 4, 6, 8]
        assert dev.baseline_bytes == 100 + 2560  # the orphan free and the block no alloc explains
        assert dev.total_reserved.tolist() == [4096] * 5  # the segment was allocated at t=1
        assert (dev.frame_id >= 0).tolist() == [False, True, True, False, True]
        (oom,) = source.ooms
        assert (oom.requested_bytes, oom.allocated_bytes, oom.reserved_bytes) == (1 << 30, 2660 + 924, 4096)
        assert source.meta["orphan_frees"] == {"cuda:0": 1}
    for column in ("ts_us", "addr", "delta_bytes", "total_reserved", "frame_id"):
        np.testing.assert_array_equal(getattr(fast.devices[0], column), getattr(slow.devices[0], column))
    assert fast.markers == slow.markers and fast.frames == slow.frames


@pytest.mark.parametrize("loop", [False, True], ids=["columns", "loop"])
def test_numbers_written_as_text_are_refused_by_both_replay_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: bool
) -> None:
    # torch writes ints only: int() read "4096" as 4096 (and True as 1, 1.5e9 as 1,500,000,000)
    if loop:
        monkeypatch.setattr(snapshot_replay, "_replay_columns", lambda *args: None)
    with pytest.raises(KvtraceError) as refused:
        _read(tmp_path, as_text=True)
    said = "field 'size' of a trace entry (segment_alloc) is a string, expected an integer"
    assert str(refused.value).endswith(f"malformed snapshot (ValueError: {said})")


def test_both_replay_paths_give_a_free_without_size_its_allocations_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the small snapshot whose two free_completed entries lost their size: one frees the 512 B alloc
    # at address 0 of the trace, the other (the orphan) a block from before the trace, of a size now unknown
    data = _snapshot(as_text=False)
    (trace,) = data["device_traces"]
    del trace[1]["size"], trace[5]["size"]
    path = tmp_path / "free_without_size.pickle"
    path.write_bytes(pickle.dumps(data, protocol=4))

    # WHEN it is read by the columns and by the loop
    fast = read_snapshot(path)
    monkeypatch.setattr(snapshot_replay, "_replay_columns", lambda *args: None)
    slow = read_snapshot(path)

    # THEN the first free takes its alloc's 512 B, the orphan is left out (its 100 B not in the baseline)
    for source in (fast, slow):
        (dev,) = source.devices
        assert dev.delta_bytes.tolist() == [512, 1024, -512, 256]
        assert dev.ts_us.tolist() == [3, 4, 6, 8]
        assert dev.baseline_bytes == 2560
        (oom,) = source.ooms
        assert oom.allocated_bytes == 2560 + 512 + 1024 - 512
        assert source.meta["orphan_frees"] == {"cuda:0": 0}
        assert source.meta["input_notes"] == [
            "cuda:0: 1 free_completed entry without size: its allocation's size used"
        ]
        (reason,) = source.meta["skipped_events"]
        assert reason.startswith(
            "cuda:0 free_completed entry without size at an address no alloc in the trace"
        )
    assert fast.meta == slow.meta and fast.markers == slow.markers


@pytest.mark.parametrize("loop", [False, True], ids=["columns", "loop"])
@pytest.mark.parametrize(
    ("size", "said"), [(float("inf"), "infinite"), (float("nan"), "not a number (NaN)")], ids=["inf", "nan"]
)
def test_a_non_finite_size_is_said_as_what_it_is_by_both_replay_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: bool, size: float, said: str
) -> None:
    # GIVEN the small snapshot whose first alloc's size is infinite or NaN (a float torch never writes; it
    # was said "a number with a fraction")
    if loop:
        monkeypatch.setattr(snapshot_replay, "_replay_columns", lambda *args: None)
    data = _snapshot(as_text=False)
    data["device_traces"][0][2]["size"] = size
    path = tmp_path / "non_finite.pickle"
    path.write_bytes(pickle.dumps(data, protocol=4))
    # THEN the error says what the value is
    with pytest.raises(KvtraceError) as refused:
        read_snapshot(path)
    entry = "field 'size' of a trace entry (alloc)"
    assert str(refused.value).endswith(
        f"malformed snapshot (ValueError: {entry} is {said}, expected an integer)"
    )
