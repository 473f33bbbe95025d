"""torch.profiler's own memory timelines, written here by torch on the CPU, read as kvtrace reads them."""

from __future__ import annotations

import gzip
import json
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


def test_both_forms_peak_at_the_same_instant(timelines: tuple[Path, Path, int]) -> None:
    raw, coalesced, _ = timelines
    rows = json.loads(gzip.decompress(raw.read_bytes()))
    level = sum(r[2] for r in rows if r[1] == 1)
    peak, peak_ns = level, None
    for ts_ns, action, nbytes, _category in rows:
        if action != 1:
            level += nbytes
            if level > peak:
                peak, peak_ns = level, ts_ns
    assert peak_ns is not None

    (from_raw,) = summarize(load_source(raw)).devices
    (from_coalesced,) = summarize(load_source(coalesced)).devices

    # torch's coalesced form keeps whole µs (int(ns / 1000)); the raw form has the ns.
    assert from_raw.peak_time == pytest.approx(peak_ns / 1000, abs=0.5)  # float64 spacing at 1.8e15 µs: 0.25
    # torch's own rounding: float division, then truncation (1796151696395921988 ns -> ...922 µs, not ...921)
    assert from_coalesced.peak_time == int(peak_ns / 1000)
    assert from_raw.peak_allocated_bytes == from_coalesced.peak_allocated_bytes == peak
