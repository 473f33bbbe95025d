"""Recording options: what each one captures, and what it costs."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvtrace.errors import KvtraceError
from kvtrace.gpu_names import gpu_names_text, named_gpu

_SIZE = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)")
_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


MAX_SIZE = 2**64  # bytes: larger is a typo (1e99), and would overflow the float arithmetic of reports


def _cache_attr_value(value: Any) -> bool:
    """`cache_attrs`' value: "k"/"v", or (kind, layout) where the layout is "bhsd" or "bshd"."""
    if isinstance(value, str):
        return value in ("k", "v")
    return (
        isinstance(value, tuple | list)
        and len(value) == 2
        and value[0] in ("k", "v")
        and value[1] in ("bhsd", "bshd")
    )


def memory_size(value: int | float | str, option: str) -> int:
    """Bytes from 8 * 2**30, "8GiB" (binary), "8GB" (decimal) or "1.5e9". Bare K/M/G are refused: they
    differ by 7% at 80 GiB depending on who reads them. A byte count must be whole: "1.5B" is refused (it
    reads as 1.5 billion to some), not one byte. Errors start with `option`, the name the user typed."""
    if isinstance(value, bool):
        raise KvtraceError(f"{option}: not a size: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # said "too large" of nan, of -inf
        raise KvtraceError(f"{option}: not a number of bytes: {value!r}")
    if isinstance(value, int | float):
        # Clamped: float() of a 400-digit int raises OverflowError; refused below as too large (or negative)
        number, unit = float(max(-1, min(value, 2 * MAX_SIZE))), ""
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if match is None or match.group(2).lower() not in _UNITS:
            raise KvtraceError(f"{option}: cannot read size {value!r}: write e.g. 8GiB, 8GB, 1.5e9 or 12345")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number) or number * _UNITS[unit] > MAX_SIZE:
        raise KvtraceError(f"{option}: size too large: {value!r} (at most 16 EiB)")
    if _UNITS[unit] == 1 and not number.is_integer():
        hint = "B means bytes: 1.5GB is 1.5e9 bytes" if unit else "or give a unit: 1.5GiB"
        raise KvtraceError(f"{option}: a size in bytes must be a whole number, got {value!r} ({hint})")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise KvtraceError(f"{option}: a memory size must be positive, got {value!r}")
    return size


def device_memory(value: int | float | str, option: str) -> int:
    """A device's memory: a GPU's name ("H100", "4090": `gpu_names.named_gpu`), or a size as `memory_size`
    reads it."""
    if isinstance(value, str):
        try:
            gpu = named_gpu(value)
        except KvtraceError as named:
            raise KvtraceError(f"{option}: {named}") from None
        if gpu is not None:
            return gpu.bytes
    try:
        return memory_size(value, option)
    except KvtraceError as exc:
        shaped = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        if not isinstance(value, str) or (shaped is not None and shaped.group(2).lower() in _UNITS):
            raise  # a size, refused as a size ("0", "1e99GiB")
        raise KvtraceError(f"{exc}, or a GPU's name: {gpu_names_text()}") from None


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
    cache_attrs: dict[str, str | tuple[str, str]] | None = None
    """Attribute names of custom caches -> "k"/"v", or ("k", "bhsd") to say the layout too (default:
    cache_k/cache_v, k_cache/v_cache, ...). A wrong layout reads the heads as positions."""
    overwrite: bool = False
    """Replace an existing run in the same directory instead of refusing."""
    gpu_memory: int | str | None = None
    """A device memory budget ("8GiB" or bytes; stored in bytes). Costs nothing while recording: the report
    marks the step, layer and allocation where the run would have run out on a device of that size."""
    clock: Callable[[], int] = field(default=time.time_ns, repr=False, compare=False)
    """Unix-epoch nanoseconds; injected by tests."""

    def __post_init__(self) -> None:
        # A wrong type would be stored in the manifest as given (profiler="no" turned the profiler on).
        for name in (
            "profiler",
            "profile_memory",
            "record_shapes",
            "with_stack",
            "nvtx",
            "snapshots",
            "gzip_trace",
            "overwrite",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise KvtraceError(f"record({name}=...): True or False, got {value!r}")
        entries = self.max_snapshot_entries
        if isinstance(entries, bool) or not isinstance(entries, int) or entries <= 0:
            raise KvtraceError(f"record(max_snapshot_entries=...): a positive integer, got {entries!r}")
        attrs = self.cache_attrs
        if attrs is not None and (
            not isinstance(attrs, dict)
            or not all(isinstance(k, str) and _cache_attr_value(v) for k, v in attrs.items())
        ):
            raise KvtraceError(
                "record(cache_attrs=...): a dict of attribute names to 'k' or 'v', or to ('k', 'bhsd') "
                f"with a layout ('bhsd' or 'bshd'), got {attrs!r}"
            )
        if self.gpu_memory is not None:
            object.__setattr__(self, "gpu_memory", device_memory(self.gpu_memory, "record(gpu_memory=...)"))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("clock")
        return data
