"""Process and device memory, sampled once per step: cheap figures that need no profiler."""

from __future__ import annotations

import os
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size from /proc (Linux); 0 where unavailable. Cheaper than psutil and no dependency."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def sample_memory() -> dict[str, Any]:
    record: dict[str, Any] = {"rss_bytes": rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        record.update(
            cuda_device=device,
            cuda_allocated_bytes=torch.cuda.memory_allocated(device),
            cuda_reserved_bytes=torch.cuda.memory_reserved(device),
            cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
        )
    return record
