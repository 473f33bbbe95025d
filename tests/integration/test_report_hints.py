"""Reports explain what they cannot attribute: the bytes no rule matched, and how to get KV figures from a
bare torch.profiler trace (which attributes 100% to "other")."""

from __future__ import annotations

import io
import json
import threading
from contextlib import redirect_stdout
from pathlib import Path

import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.memory_samples import MemorySampler
from tests.tiny import tiny_size

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



def test_a_run_that_shows_no_kv_update_says_why_it_may_be(tmp_path: Path) -> None:
    # GIVEN generate() without a cache: every forward recomputes, no KV update is ever made
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))
    with torch.no_grad(), kvtrace.record(tmp_path / "run2", model=model, profiler=False):
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False)
    data = json.loads(_out(["report", str(tmp_path / "run2"), "--json", "--no-export"]))
    # THEN the report and diagnose say that none was seen in its 5 forward passes, and what that can mean
    said = "no KV cache update was seen in 5 forward passes: use_cache=False"
    assert any(note.startswith(said) for note in data["notes"])
    assert said in _out(["diagnose", str(tmp_path / "run2")])


def test_forward_passes_on_another_thread_are_counted(tmp_path: Path) -> None:
    # GIVEN generate() on a worker thread (as beside a TextIteratorStreamer), the profiler on
    model = build_model(tiny_size(2))
    ids = torch.ones(1, 7, dtype=torch.long)
    with kvtrace.record(tmp_path / "run", model=model):
        worker = threading.Thread(
            target=model.generate,
            args=(ids,),
            kwargs={"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0},
        )
        worker.start()
        worker.join()
    data = json.loads(_out(["report", str(tmp_path / "run"), "--json", "--no-export"]))
    # THEN the report says the profiler's trace misses those 4 forward passes, and the KV log does not
    assert any(note.startswith("4 of 4 forward passes ran on another thread") for note in data["notes"])
    assert data["kv"]["tokens_held"] == 7 + 4 - 1


def test_a_bare_profiler_trace_taken_with_stacks_attributes_the_kv(tmp_path: Path) -> None:
    # GIVEN torch.profiler's own trace of generate(), with_stack=True, no kvtrace at all
    model = build_model(tiny_size(2))
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    activities = [torch.profiler.ProfilerActivity.CPU]
    profiler = torch.profiler.profile(activities=activities, profile_memory=True, with_stack=True)
    with torch.no_grad(), profiler:
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    trace = tmp_path / "plain.pt.trace.json"
    profiler.export_chrome_trace(str(trace))
    data = json.loads(_out(["report", str(trace), "--json"]))
    # THEN the cache's allocations are found by their stacks: the KV peak is the arithmetic of the last step,
    # 2 rows x 13 tokens in 2 layers x (K, V) x 2 KV heads x 16 x 4 bytes, and one layer's old K of 12 tokens
    # alive beside its copy; the cache was dropped by the end
    one_side = 2 * 16 * 4  # one layer's K (or V), one token, one row
    assert data["kv"]["measured_from"] == "stack_rule"
    assert data["kv"]["peak_bytes"] == 2 * 13 * (2 * 2 * one_side) + 2 * 12 * one_side
    assert data["kv"]["final_bytes"] == 0
