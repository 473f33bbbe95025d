"""The memory samples' CUDA allocator figures are the run's device's: the model's GPU, not the thread's
current device. `torch.cuda.memory_stats_as_nested_dict(device)` (what `memory_allocated` and its siblings
read, each through a Python flatten of every figure) gives the figures of the device it is passed; without
one, of `torch.cuda.current_device()` (torch/cuda/memory.py), which `model.to("cuda:1")` leaves at 0 and
which a new thread starts at 0. No GPU here: torch.cuda's per-device stats are a stand-in, in the layout
torch's allocator gives them; the sampler is the real one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kvtrace.memory_samples as memory_samples
from kvtrace.memory_samples import MemorySampler

GIB = 1 << 30


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> dict[int | None, list[str]]:
    """torch.cuda as a machine with two GPUs would answer: the model's 16 GiB on device 1, nothing on device 0
    (the current device). Returns the devices each counter was asked about."""
    allocated = {0: (0, 0), 1: (16 * GIB, 17 * GIB)}  # (current, peak)
    reserved = {0: 0, 1: 18 * GIB}
    asked: dict[int | None, list[str]] = {}

    def stat(current: int, peak: int) -> dict[str, int]:
        return {"current": current, "peak": peak, "allocated": peak, "freed": peak - current}

    def nested(device: int | None = None) -> dict[str, Any]:
        asked.setdefault(device, []).append("memory_stats_as_nested_dict")
        index = 0 if device is None else device
        pools = ("all", "small_pool", "large_pool")
        return {
            "num_ooms": 0,
            "allocated_bytes": {pool: stat(*allocated[index]) for pool in pools},
            "reserved_bytes": {pool: stat(reserved[index], reserved[index]) for pool in pools},
        }

    def flattened(name: str) -> Any:
        def read(device: int | None = None) -> int:
            asked.setdefault(device, []).append(name)
            raise AssertionError(f"{name} flattens every allocator figure: the sampler reads them once")

        return read

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", nested)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "memory_stats"):
        monkeypatch.setattr(torch.cuda, name, flattened(name))
    monkeypatch.setattr(memory_samples, "_CUDA_AVAILABLE", [])
    return asked


def test_a_sample_reads_the_models_gpu_not_the_current_device(two_gpus: dict[int | None, list[str]]) -> None:
    # GIVEN the sampler of a run whose model is on cuda:1 (the recorder passes the model's device index)
    sampler = MemorySampler(1)
    try:
        # WHEN the model's thread samples a step
        sample = sampler.sample(host=False)
    finally:
        sampler.close()
    # THEN every allocator figure is device 1's, asked of device 1
    assert sample == {
        "cuda_device": 1,
        "cuda_allocated_bytes": 16 * GIB,
        "cuda_reserved_bytes": 18 * GIB,
        "cuda_peak_allocated_bytes": 17 * GIB,
    }
    # ... in one read of the allocator's stats
    assert two_gpus == {1: ["memory_stats_as_nested_dict"]}
