"""The CUDA allocator's history is process-wide: `record()` must leave it as the user had it. torch says
whether it is on (`torch._C._cuda_isHistoryEnabled`) but not with which settings, so history the user
turned on before the block is kept, settings and all, and stays on after it; history kvtrace turned on is
turned off. No GPU here: torch.cuda's history switch is a stand-in that records its calls, the snapshots
object is the real one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvtrace.cuda_snapshots import CudaSnapshots


def _history(monkeypatch: pytest.MonkeyPatch, on: bool) -> list[dict[str, Any]]:
    """torch.cuda on a machine with a GPU whose allocator history is `on`; the calls that switch it."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_isHistoryEnabled", lambda: on, raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *args, **kw: calls.append(kw))
    return calls


def test_history_the_user_turned_on_is_left_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # GIVEN a process whose allocator history the user turned on (say with stacks="all")
    calls = _history(monkeypatch, on=True)
    snapshots = CudaSnapshots(tmp_path / "snapshots", max_entries=1000)
    # WHEN a recording starts and stops
    started = snapshots.start()
    snapshots.stop()
    # THEN the history is never switched: the user's settings hold during the block and it is on after it
    assert calls == []
    assert started["status"] == "recording" and started["max_entries"] is None
    assert "the user's" in started["history"]


def test_history_kvtrace_turned_on_is_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # GIVEN a process whose allocator history is off
    calls = _history(monkeypatch, on=False)
    snapshots = CudaSnapshots(tmp_path / "snapshots", max_entries=1000)
    # WHEN a recording starts and stops
    started = snapshots.start()
    snapshots.stop()
    # THEN kvtrace turned it on with its own settings, and off again
    assert calls == [{"max_entries": 1000, "stacks": "python"}, {"enabled": None}]
    assert started == {"status": "recording", "max_entries": 1000}
