"""Reports explain what they cannot attribute: the bytes no rule matched, and how to get KV figures from a
bare torch.profiler trace (which attributes 100% to "other")."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from kvtrace.cli import main
from kvtrace.memory_samples import MemorySampler

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _out(argv: list[str]) -> str:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


def test_a_bare_profiler_trace_says_how_to_get_kv_attribution() -> None:
    # GIVEN the profiler trace of a recorded HF run, read alone (no KV log beside it)
    trace = next((SAMPLES / "dynamic_b2" / "profiler").iterdir())
    text = _out(["report", str(trace)])
    data = json.loads(_out(["report", str(trace), "--json"]))
    # THEN it says nothing marks KV, and how to fix that
    assert data["kv"]["measured_from"] == "none"
    hint = data["kv"]["how_to_attribute"]
    assert "kvtrace.record" in hint and "with_stack=True" in hint
    assert "no KV attribution" in text and "with_stack=True" in text
    # and the unattributed bytes are named for what they are, not "attributed by: none"
    assert "attributed by: none" not in text and "not attributed, counted as other" in text


def test_a_recorded_run_needs_no_hint() -> None:
    data = json.loads(_out(["report", str(SAMPLES / "dynamic_b2"), "--json", "-q", "--no-export"]))
    assert data["kv"]["measured_from"] == "kv_log" and data["kv"]["how_to_attribute"] is None


def test_nvml_absent_without_a_driver_is_a_reason_not_an_error() -> None:
    # GIVEN a sampler asked for CUDA device 0 on a machine where NVML cannot start (no GPU driver here)
    sampler = MemorySampler(0)
    try:
        sample = sampler.sample()
    finally:
        sampler.close()
    if sampler.nvml_status["status"] == "ok":  # a machine with a GPU: the figures are there
        assert sample["gpu_memory_total_bytes"] > 0 and 0 <= sample["gpu_utilization_percent"] <= 100
    else:
        status = sampler.nvml_status
        assert status["status"] == "absent" and "NVML unavailable" in status["reason"]
        assert not any(key.startswith("gpu_") for key in sample)
    assert sample["cpu_percent"] >= 0
