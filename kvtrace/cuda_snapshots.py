"""CUDA caching-allocator history and snapshot pickles (the files pytorch.org/memory_viz opens).

On a CPU build `torch.cuda.memory._record_memory_history` raises, so `start()` checks first and returns
the reason the snapshot is absent; the recorder writes it in the manifest and says it once.

The allocator's history is process-wide state, and torch says only whether it is on
(`torch._C._cuda_isHistoryEnabled`), not with which settings. So history the user turned on before
`record()` is left as it is, with the user's settings, on after the block too (the snapshots then have the
user's stacks and entries); only history kvtrace turned on is turned off at the end. This is how torch's own
inductor borrows it (`enable_history_recording` in torch/_inductor/cudagraph_trees.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_ACTIVE_SNAPSHOTS: CudaSnapshots | None = None
_OBSERVER_ATTACHED = False


def _attach_observer_once() -> None:
    """torch can attach OOM observers but not detach them: attach one per process, which forwards to the
    recording that is active (or does nothing outside a recording)."""
    global _OBSERVER_ATTACHED
    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if attach is None or _OBSERVER_ATTACHED:
        return

    def on_oom(device: int, alloc: int, device_allocated: int, device_free: int) -> None:
        active = _ACTIVE_SNAPSHOTS
        if active is not None:
            active._on_oom(device, alloc, device_allocated, device_free)

    # Dump at the moment of the OOM, while the tensors that filled memory are still alive.
    attach(on_oom)
    _OBSERVER_ATTACHED = True


def _history_already_on() -> bool:
    """Whether the allocator's history is on (the user's); False where torch cannot say (older torch)."""
    enabled = getattr(torch._C, "_cuda_isHistoryEnabled", None)
    if enabled is None:
        return False
    try:
        return bool(enabled())
    except RuntimeError:
        return False


class CudaSnapshots:
    """Allocator history on while recording; snapshot dumps at exit and when an OOM happens."""

    def __init__(self, folder: Path, max_entries: int) -> None:
        self.folder = folder
        self.max_entries = max_entries
        self.active = False
        self.users_history = False  # the history was on before start(): left on, with its settings
        self._oom_dumped: str | None = None

    def start(self) -> dict[str, Any]:
        if not torch.cuda.is_available():
            return {"status": "absent", "reason": "CUDA is not available (snapshots are CUDA-only)"}
        self.users_history = _history_already_on()
        if not self.users_history:
            try:
                torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
            except (AttributeError, RuntimeError) as exc:
                return {"status": "absent", "reason": f"allocator history unavailable: {exc}"}
        self.active = True
        _attach_observer_once()
        global _ACTIVE_SNAPSHOTS
        _ACTIVE_SNAPSHOTS = self
        if self.users_history:
            return {
                "status": "recording",
                "max_entries": None,
                "history": "the user's: on before record(), kept with its settings and left on",
            }
        return {"status": "recording", "max_entries": self.max_entries}

    def _on_oom(self, device: int, alloc: int, device_allocated: int, device_free: int) -> None:
        if self.active and self._oom_dumped is None:
            self._oom_dumped = self.dump("oom.pickle")

    def dump(self, name: str) -> str | None:
        """Write a snapshot pickle; returns its path relative to the run, or None when not recording."""
        if not self.active:
            return None
        if name == "oom.pickle" and self._oom_dumped is not None:
            return self._oom_dumped
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / name
        torch.cuda.memory._dump_snapshot(str(target))
        return f"{self.folder.name}/{name}"

    def stop(self) -> None:
        global _ACTIVE_SNAPSHOTS
        if _ACTIVE_SNAPSHOTS is self:
            _ACTIVE_SNAPSHOTS = None
        if self.active:
            if not self.users_history:
                torch.cuda.memory._record_memory_history(enabled=None)
            self.active = False
