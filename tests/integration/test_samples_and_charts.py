"""Per-step samples carry the process's CPU % (and, on CUDA, NVML's GPU figures, else the reason they
are absent); the HTML timeline shows them, draws bytes in binary units and marks a memory budget."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pytest
import torch

import kvtrace
from analyzers.render.html import report_to_html
from analyzers.report import build_report
from kvtrace.memory_samples import HOST_INTERVAL_S

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def run_dir(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("samples") / "run"
    ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    # a budget between the weights (~33 MiB) and the peak: the run crosses it
    with torch.no_grad(), kvtrace.record(out, model=tiny_model, gpu_memory="32MiB"):
        tiny_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        # The writer thread reads the host's figures every HOST_INTERVAL_S whatever the model does: a pause
        # of a few intervals gives host samples between the start and the end however fast the steps ran
        time.sleep(3.5 * HOST_INTERVAL_S)
    return out


def _samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]


def test_samples_carry_cpu_percent_and_say_why_nvml_is_absent(run_dir: Path) -> None:
    samples = _samples(run_dir)
    steps = [s for s in samples if s["phase"] != "host"]
    # start, one per forward (prefill + NEW_TOKENS - 1 decodes), end
    assert [s["phase"] for s in steps] == ["start", "prefill"] + ["decode"] * (NEW_TOKENS - 1) + ["end"]
    cores = os.cpu_count() or 1
    # Host figures (RSS, CPU %) at the start and end, and in between every HOST_INTERVAL_S from the
    # writer thread (phase "host", with the step in progress); never in a step's own sample.
    host = [s for s in samples if "cpu_percent" in s]
    assert samples[0] in host and samples[-1] in host
    assert [s["phase"] for s in host[1:-1]] == ["host"] * (len(host) - 2) and len(host) > 3
    assert all(("rss_bytes" in s) == ("cpu_percent" in s) for s in samples)
    assert not any("rss_bytes" in s for s in steps[1:-1])
    for sample in host:
        assert isinstance(sample["cpu_percent"], float | int) and sample["rss_bytes"] > 0
        assert 0 <= sample["cpu_percent"] <= 100 * cores + 50  # a process can keep every core busy
    gaps = [b["t_ns"] - a["t_ns"] for a, b in itertools.pairwise(host[:-1])]  # the end is always read
    assert all(gap >= 0.9 * HOST_INTERVAL_S * 1e9 for gap in gaps)
    assert [s["step"] for s in host] == sorted(s["step"] for s in host)
    # a forward pass computes: the steps are not idle
    assert max(s["cpu_percent"] for s in host[1:-1]) > 1
    assert not any(key.startswith("gpu_") for s in samples for key in s)
    nvml = json.loads((run_dir / "manifest.json").read_text())["monitors"]["nvml"]
    assert nvml["status"] == "absent" and "not on CUDA" in nvml["reason"]


def test_html_timeline_binary_units_budget_and_cpu(run_dir: Path) -> None:
    source, report = build_report(run_dir)
    page = report_to_html(source, report)
    plot = page.split("kvtrace-timeline", 1)[1]
    # the memory axis is titled in a binary unit and plots values in it, not SI ticks of raw bytes
    assert '"yaxis":{"anchor":"x","domain"' in plot and '"title":{"text":"MiB"}' in plot
    assert '"tickformat":"~s"' not in plot and '"KV (KiB)"' in plot
    assert "budget 32.00 MiB" in page and "runs out here" in page
    assert "process CPU %" in page
    assert "GPU utilization and device memory (NVML) are absent" in page


def test_report_html_explains_the_crossing(run_dir: Path, tmp_path: Path) -> None:
    from kvtrace.cli import main

    out = tmp_path / "t.html"
    assert main(["report", str(run_dir), "-o", str(out), "-q", "--no-export"]) == 0
    page = out.read_text()
    assert "id='kvtrace-diagnosis'" in page and "would run out of memory on a 32.00 MiB device" in page
