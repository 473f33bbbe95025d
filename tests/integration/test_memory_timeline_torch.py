"""torch.profiler's own memory timelines, written here by torch on the CPU, read as kvtrace reads them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from analyzers.report import load_source
from analyzers.summary import summarize


@pytest.fixture(scope="module")
def timelines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """Two SGD steps of a small MLP, exported raw and coalesced; the model's parameter bytes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs = torch.randn(16, 64)
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for _ in range(2):
            model(inputs).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("timeline")
    raw, coalesced = folder / "memory_timeline.raw.json.gz", folder / "memory_timeline.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of snapshots, still written
        prof.export_memory_timeline(str(raw), device="cpu")
        prof.export_memory_timeline(str(coalesced), device="cpu")
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return raw, coalesced, parameter_bytes


@pytest.mark.parametrize("form", ["raw", "coalesced"])
def test_parameters_are_the_weights(timelines: tuple[Path, Path, int], form: str) -> None:
    raw, coalesced, parameter_bytes = timelines

    (dev,) = summarize(load_source(raw if form == "raw" else coalesced)).devices

    # The parameters live through the whole profile: they are the weights at the peak, the rest is other.
    assert dev.categories_at_peak["weights"] == parameter_bytes == (64 * 128 + 128 + 128 * 8 + 8) * 4
    assert dev.categories_at_peak["kv"] == 0
