"""Process and device memory, CPU and GPU use: cheap figures that need no profiler.

The CUDA allocator's figures are read every step (in-process counters, no system call). The host's (RSS,
CPU %) and NVML's are read at the start and end of a run, and in between every `HOST_INTERVAL_S` (100 ms,
as the writer thread flushes the log) by that thread (`sample_host`): each is a system call or a driver
ioctl, 5-60 us between model steps (issue 11), more than all the KV bookkeeping of a short step. Off the
model's thread they are not free either: each call that releases the GIL hands it back and forth with the
model's thread, and on an H200 under gVisor reads every 20 ms cost the model's thread more than the KV log
did (benchmarks/gpu_overhead_probe.py, docs/benchmarks.md). NVML averages GPU utilization over 1/6 s or
more, so reading it faster adds nothing. Samples without them leave the keys out.

CPU % is this process's CPU time (user + system, all threads) over the wall time since the previous
sample, so 100 is one core kept busy. GPU utilization and device memory come from NVML (the
`nvidia-ml-py` package), imported only when the run is on CUDA; elsewhere the sampler says why they are
absent (`MemorySampler.nvml_status`), once, for the manifest.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import torch

HOST_INTERVAL_S = 0.100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# /proc/self/statm kept open and re-read with pread: ~0.5 us against ~10-40 us for open+read+close, paid
# once per step. A forked child forgets it (it would otherwise read its parent's figures): no getpid() per
# sample.
_STATM: list[int] = []  # [fd] once opened
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_STATM.clear)


def rss_bytes() -> int:
    """Resident set size from /proc (Linux); 0 where unavailable. Cheaper than psutil and no dependency."""
    try:
        if not _STATM:
            _STATM.append(os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        return int(os.pread(_STATM[0], 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


_CUDA_AVAILABLE: list[bool] = []  # torch.cuda.is_available() once: ~2 us a call, and it cannot change


def _cuda_ready() -> bool:
    if not _CUDA_AVAILABLE:
        _CUDA_AVAILABLE.append(torch.cuda.is_available())
    return _CUDA_AVAILABLE[0] and torch.cuda.is_initialized()


def _cpu_seconds() -> float:
    """User + system CPU time of the process, all threads (one clock read, finer than os.times' ticks)."""
    return time.process_time()


def _cuda_fields(device: int | None = None) -> dict[str, Any]:
    """The caching allocator's figures of CUDA device `device` (None: the thread's current device, which
    `model.to("cuda:1")` does not change and a new thread starts at 0). `max_memory_allocated` is the
    device's peak since the process started or since the last `torch.cuda.reset_peak_memory_stats()`, which
    kvtrace does not call (it would reset the user's own figure): not the recorded block's peak.

    One read of the allocator's stats per sample (once per step): `torch.cuda.memory_allocated` and its
    siblings each take `memory_stats`, which flattens the allocator's ~120 nested figures in Python, three
    times a step (issue 11; `benchmarks/recorder_overhead.py --cuda-sample`). None of these syncs."""
    if not _cuda_ready():
        return {}
    if device is None:
        device = torch.cuda.current_device()
    stats = torch.cuda.memory_stats_as_nested_dict(device)
    allocated = stats.get("allocated_bytes", {}).get("all", {})
    return {
        "cuda_device": device,
        "cuda_allocated_bytes": allocated.get("current", 0),
        "cuda_reserved_bytes": stats.get("reserved_bytes", {}).get("all", {}).get("current", 0),
        "cuda_peak_allocated_bytes": allocated.get("peak", 0),
    }


class _Nvml:
    """One NVML device handle; every failure becomes a reason string, never an exception in the run."""

    def __init__(self, cuda_index: int) -> None:
        import pynvml  # nvidia-ml-py: imported on CUDA only

        self._nvml = pynvml
        pynvml.nvmlInit()
        handle = None
        try:
            uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:  # older torch without .uuid, MIG UUIDs: NVML's own index order
            handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
        self._handle = handle

    def read(self) -> dict[str, Any]:
        util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return {
            "gpu_utilization_percent": int(util.gpu),
            "gpu_memory_used_bytes": int(memory.used),
            "gpu_memory_total_bytes": int(memory.total),
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


class MemorySampler:
    """Samples memory, CPU % and (CUDA) NVML figures of the run's device; `cuda_index` None means the run is
    not on CUDA."""

    def __init__(self, cuda_index: int | None, clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self._cuda_index = cuda_index
        self._host_elsewhere = False
        # A step's sample is its time, step and phase only: no allocator to read, the host read elsewhere
        self.bare_steps = False
        self._last_wall = clock()
        # CPU % over the span between two host reads, on a clock read beside the CPU time (never a caller's
        # earlier stamp), under a lock: the writer thread and the model's thread both read the host
        self._cpu_lock = threading.Lock()
        self._last_cpu = (time.perf_counter(), _cpu_seconds())
        self._nvml: _Nvml | None = None
        if cuda_index is None:
            self.nvml_status: dict[str, Any] = {
                "status": "absent",
                "reason": "the run is not on CUDA",
            }
            return
        try:
            self._nvml = _Nvml(cuda_index)
            self.nvml_status = {"status": "ok", "cuda_device": cuda_index}
        except Exception as exc:  # ImportError (no nvidia-ml-py), NVMLError (no driver access)
            reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            self.nvml_status = {"status": "absent", "reason": reason}

    @property
    def host_elsewhere(self) -> bool:
        """True while a writer thread reads the host's figures (`sample_host`)."""
        return self._host_elsewhere

    @host_elsewhere.setter
    def host_elsewhere(self, value: bool) -> None:
        self._host_elsewhere = value
        if not _CUDA_AVAILABLE:
            _CUDA_AVAILABLE.append(torch.cuda.is_available())
        self.bare_steps = value and not _CUDA_AVAILABLE[0]

    def sample(self, host: bool = True, now: float | None = None) -> dict[str, Any]:
        """Device allocator figures always; host and NVML figures when `host`, or when `HOST_INTERVAL_S`
        passed and no other thread reads them (`host_elsewhere`). `now`: the caller's reading of `clock`
        for this sample (the time it stamps the sample with)."""
        # Runs once per step, cold, between model steps: every call and lookup saved shows (issue 11).
        wall = self._clock() if now is None else now
        record: dict[str, Any] = {}
        if not _CUDA_AVAILABLE or _CUDA_AVAILABLE[0]:
            record.update(_cuda_fields(self._cuda_index))
        if not host and (self._host_elsewhere or wall - self._last_wall < HOST_INTERVAL_S):
            return record
        return self._read_host(record, wall)

    def sample_host(self, now: float | None = None) -> dict[str, Any]:
        """Host and NVML figures only, for a thread other than the model's (the model's thread reads the
        allocator's, between its steps)."""
        return self._read_host({}, self._clock() if now is None else now)

    def _read_host(self, record: dict[str, Any], wall: float) -> dict[str, Any]:
        with self._cpu_lock:
            now, cpu = time.perf_counter(), _cpu_seconds()
            last_now, last_cpu = self._last_cpu
            self._last_cpu = (now, cpu)
            self._last_wall = max(self._last_wall, wall)
        elapsed = now - last_now
        percent = 100.0 * (cpu - last_cpu) / elapsed if elapsed > 0 else 0.0
        record["rss_bytes"] = rss_bytes()
        record["cpu_percent"] = round(max(percent, 0.0), 1)
        if self._nvml is not None:
            try:
                record.update(self._nvml.read())
            except Exception as exc:
                self.nvml_status = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                self._nvml.close()
                self._nvml = None
        return record

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None


def sample_memory() -> dict[str, Any]:
    """One sample without CPU % or NVML (no previous sample to measure from)."""
    record: dict[str, Any] = {"rss_bytes": rss_bytes()}
    record.update(_cuda_fields())
    return record
