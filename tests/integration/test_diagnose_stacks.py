"""`diagnose` groups and shows stacks by the frames that tell them apart: the real C++ and Python stacks of
a snapshot taken with context "all" (torch >= 2.1), filtered as torch's own memory_viz filters them."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from analyzers.planning.diagnose import diagnose
from analyzers.render.diagnosis import diagnosis_to_text
from analyzers.report import build_report

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces"
SNAPSHOT = REAL / "snapshots" / "mem_snapshot.pickle"
pytestmark = pytest.mark.skipif(not SNAPSHOT.exists(), reason=f"{SNAPSHOT} not present")
UNWINDER = ("unwind::unwind", "CapturedTraceback::gather", "gather_with_cpp")


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _allocs() -> list[dict[str, Any]]:
    with SNAPSHOT.open("rb") as stream:
        raw = _PlainData(stream).load()
    return [entry for entry in raw["device_traces"][0] if entry["action"] == "alloc"]


def _text(frames: list[dict[str, Any]]) -> str:
    return "\n".join(f"{f['filename']}:{f['line']}:{f['name']}" for f in frames)


def _python(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["filename"].endswith(".py")]


def _memory_viz_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What torch's memory_viz shows of a stack: the oracle."""
    memory_viz = pytest.importorskip("torch.cuda._memory_viz")
    return [f for f in frames if memory_viz._frame_filter(f["name"], f["filename"])]


def _expected_heading(frames: list[dict[str, Any]]) -> str:
    """Python frames; for a C++-only stack its ATen operators and autograd backward functions."""
    operators = [f for f in frames if f["name"].startswith(("at::_ops::", "torch::autograd::generated::"))]
    return _text(_python(frames) or operators)


def _write_snapshot(path: Path, sizes: list[int], stacks: list[list[dict[str, Any]]], live: int) -> Path:
    """One 64 KiB segment; the allocations one after the other; those after the first `live` freed."""
    segment_size = 1 << 16
    trace: list[dict[str, Any]] = [{"action": "segment_alloc", "addr": 0, "size": segment_size, "time_us": 1}]
    blocks: list[dict[str, Any]] = []
    address = 0
    for index, (size, frames) in enumerate(zip(sizes, stacks, strict=True)):
        trace.append(
            {"action": "alloc", "addr": address, "size": size, "time_us": 2 + index, "frames": frames}
        )
        if index < live:
            state = {"state": "active_allocated", "requested_size": size, "frames": frames}
            blocks.append({"address": address, "size": size, **state})
        else:
            for action in ("free_requested", "free_completed"):
                trace.append({"action": action, "addr": address, "size": size, "time_us": 20, "frames": []})
        address += size
    held = sum(sizes[:live])
    blocks.append({"address": held, "size": segment_size - held, "requested_size": 0, "state": "inactive"})
    segment = {
        "device": 0,
        "address": 0,
        "total_size": segment_size,
        "allocated_size": held,
        "blocks": blocks,
    }
    path.write_bytes(pickle.dumps({"segments": [segment], "device_traces": [trace]}, protocol=4))
    return path


@pytest.mark.parametrize("moment", ["dump", "before_dump"])
def test_rows_are_the_frames_memory_viz_shows(tmp_path: Path, moment: str) -> None:
    # GIVEN three live allocations with the real file's stacks (one through Python code, two from the
    # autograd engine's C++ thread, each a different op); "before_dump": a fourth, freed after the peak
    allocs = _allocs()
    with_python = max((e for e in allocs if _python(e["frames"])), key=lambda e: e["size"])
    cpp_only = [e for e in allocs if not _python(e["frames"])]
    first_op = _expected_heading(cpp_only[0]["frames"])
    other_op = next(e for e in cpp_only if _expected_heading(e["frames"]) != first_op)
    stacks = [with_python["frames"], cpp_only[0]["frames"], other_op["frames"]]
    sizes = [4096, 2048, 1024]
    if moment == "before_dump":
        stacks.append(next(e for e in allocs if _python(e["frames"]) and e is not with_python)["frames"])
        sizes.append(8192)
    path = _write_snapshot(tmp_path / "stacks.pickle", sizes, stacks, live=3)

    # WHEN diagnosed
    diagnosis = diagnose(*build_report(path))

    # THEN each row is one allocation's stack as memory_viz shows it, known by its Python frames or ops
    expected = {
        (_text(_memory_viz_frames(frames)), size, 1, _expected_heading(frames))
        for size, frames in zip(sizes, stacks, strict=True)
    }
    got = {(s.stack, s.bytes, s.allocations, s.heading) for s in diagnosis.top_stacks}
    assert got == expected
    text = diagnosis_to_text(diagnosis)
    assert not any(name in text for name in UNWINDER)
    for _stack, _size, _count, heading in expected:
        assert heading.splitlines()[0] in text


def test_real_snapshot_rows_can_be_told_apart() -> None:
    # GIVEN the real snapshot, whose every stack starts with the unwinder's three frames
    allocs = _allocs()
    assert all(name in _text(e["frames"][:3]) for e in allocs for name in UNWINDER)
    shown = {_text(_memory_viz_frames(e["frames"])): _expected_heading(e["frames"]) for e in allocs}

    # WHEN diagnosed (at its peak, from the trace's allocations)
    diagnosis = diagnose(*build_report(SNAPSHOT))

    # THEN every row is an allocation's stack as memory_viz shows it, known by its Python frames or ops
    rows = diagnosis.top_stacks
    assert len(rows) == 10
    for row in rows:
        assert row.stack in shown
        assert row.heading == shown[row.stack]
    assert not any(name in row.stack for row in rows for name in UNWINDER)
    # the five largest, which all read "torch::unwind::unwind() <- ..." before, differ
    assert len({row.heading for row in rows[:5]}) == 5
    # the softmax the program wrote (exp of a 512 MiB tensor) is known by its own frame
    (softmax,) = [
        row for row in rows if row.heading.splitlines()[0].endswith("trace_peak_memory.py:7:custom_softmax")
    ]
    sizes = {e["size"] for e in allocs if _text(_memory_viz_frames(e["frames"])) == softmax.stack}
    assert softmax.allocations == 1 and sizes == {softmax.bytes} == {512 * 2**20}
    assert "at::_ops::exp::" in softmax.stack


def test_the_row_before_the_trace_leaves_out_what_the_trace_freed_of_it() -> None:
    """A trace that frees blocks allocated before it began, before its peak: the row of memory from before
    the trace holds only what is still live at the peak, so the rows add up to the peak."""
    path = REAL / "snapshots" / "memory_snapshot.pickle"
    if not path.exists():
        pytest.skip(f"{path} missing")
    # GIVEN the snapshot's own trace, replayed here: a free of an address the trace never allocated is a
    # block from before the trace
    with open(path, "rb") as fh:
        data = _PlainData(fh).load()
    live: dict[int, int] = {}
    level = peak = freed_before = freed_at_peak = 0
    for entry in data["device_traces"][0]:
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry["size"]
            level += entry["size"]
        elif entry["action"] == "free_completed":
            level -= entry["size"]
            if live.pop(entry["addr"], None) is None:
                freed_before += entry["size"]
        if level > peak:
            peak, freed_at_peak = level, freed_before
    assert freed_at_peak > 0  # the case at hand: 312.5 MiB of it freed before the peak

    # WHEN diagnosed (at its peak)
    diagnosis = diagnose(*build_report(path))

    # THEN the row is what was live at the start, less what the trace freed of it by the peak
    (row,) = [s for s in diagnosis.top_stacks if "before the trace began" in s.stack]
    start = diagnosis.allocated_bytes - peak  # the level before the trace's first event
    assert row.bytes == start - freed_at_peak
