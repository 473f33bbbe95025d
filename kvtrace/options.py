"""Recording options: what each one captures, and what it costs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class RecordOptions:
    """Options of `kvtrace.record()`.

    The KV log, NVTX ranges and per-step memory samples are always on and cost about nothing (see
    benchmarks/recorder_overhead.py). The profiler is what costs: memory events alone ~1.3x, with
    shapes and stacks ~2x and tens of MB of trace per hundred tokens on a tiny model.
    """

    profiler: bool = True
    """Run torch.profiler and write its Chrome trace under `profiler/` (TensorBoard's plugin reads it)."""
    profile_memory: bool = True
    """Allocator events in the trace: needed to join KV storages to allocations."""
    record_shapes: bool = False
    """Operator input shapes in the trace (more trace, a little slower)."""
    with_stack: bool = False
    """Python stacks on every op and allocation: lets the analyzers attribute bare traces; ~1.6x slower."""
    nvtx: bool = True
    """NVTX ranges in the `kvtrace` domain (prefill, decode N, kv_update L, eviction) for Nsight Systems."""
    snapshots: bool = True
    """CUDA allocator history and snapshot pickles at exit and at OOM (CUDA only; said once elsewhere)."""
    max_snapshot_entries: int = 200_000
    """Ring-buffer size of the CUDA allocator history: more entries, more host memory."""
    gzip_trace: bool = False
    """Write the profiler trace as .json.gz (5-10x smaller, both TensorBoard and kvtrace read it)."""
    cache_attrs: dict[str, str] | None = None
    """Attribute names of custom caches -> "k"/"v" (default: cache_k/cache_v, k_cache/v_cache, ...)."""
    overwrite: bool = False
    """Replace an existing run in the same directory instead of refusing."""
    clock: Callable[[], int] = field(default=time.time_ns, repr=False, compare=False)
    """Unix-epoch nanoseconds; injected by tests."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("clock")
        return data
