"""The recording's ranges: NVTX for Nsight Systems and, while torch.profiler runs, `record_function` ranges of
the same names for its trace, pushed and popped together around each step and eviction.

Apart from `nvtx_ranges.py`, which stays torch-free: this side needs torch's record_function.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

# A C++ record_function context (torch >= 2.2); older torch goes through the dispatcher op.
_FAST_RECORD_FUNCTION: Any = getattr(getattr(torch._C, "_profiler", None), "_RecordFunctionFast", None)


class StepRanges:
    """NVTX ranges and, while the profiler runs, `record_function` ranges of the same names."""

    def __init__(self, use_nvtx: bool, use_record_function: bool) -> None:
        self._nvtx: Any = None
        if use_nvtx:
            from kvtrace.nvtx_ranges import NvtxRanges  # a no-op without the nvtx package or a tool

            ranges = NvtxRanges("kvtrace")
            self._nvtx = ranges if ranges.enabled else None
        self._use_rf = use_record_function
        # Nobody listening (no NVTX tool, no profiler): callers skip push/pop altogether.
        self.active = self._nvtx is not None or use_record_function
        self.nvtx: Any = self._nvtx
        # One stack per thread: NVTX and record_function ranges are per thread, and torch refuses to close
        # a range from another thread than the one that opened it (continuous batching's generation thread).
        self._stacks: dict[int, list[Any]] = {}

    def push(self, name: str) -> None:
        if self._nvtx is not None:
            self._nvtx.push(name)
        handle: Any = None
        if self._use_rf:
            if _FAST_RECORD_FUNCTION is not None:
                # ~1 µs per range against ~30 µs through the dispatcher op (torch 2.13, CPU)
                handle = _FAST_RECORD_FUNCTION(name)
                handle.__enter__()
            else:
                handle = torch.ops.profiler._record_function_enter_new(name, None)
        self._stacks.setdefault(threading.get_ident(), []).append(handle)

    def pop(self) -> None:
        stack = self._stacks.get(threading.get_ident())
        if not stack:
            return
        handle = stack.pop()
        if handle is not None:
            if _FAST_RECORD_FUNCTION is not None:
                handle.__exit__(None, None, None)
            else:
                torch.ops.profiler._record_function_exit._RecordFunction(handle)
        if self._nvtx is not None:
            self._nvtx.pop()

    def mark(self, name: str) -> None:
        if self._nvtx is not None:
            self._nvtx.mark(name)

    def close_all(self) -> None:
        """Balance what an exception left open on this thread; another thread's open ranges (a generation
        thread still running, or one whose step failed) cannot be closed from here and are forgotten."""
        own = self._stacks.pop(threading.get_ident(), [])
        self._stacks.clear()
        self._stacks[threading.get_ident()] = own
        while own:
            self.pop()
