"""Async scheduling, vLLM's default on GPUs (the engine core steps through `step_with_batch_queue`, two
batches in flight): the recorded steps, requests and preemptions still equal vLLM's own figures, and a
request's blocks are counted for the token of the batch in flight, which holds a slot before it is sampled.

vLLM's CPU platform turns async scheduling off (`CpuPlatform.check_and_update_config`: "not required on
CPU"); the engine runs it here when that one choice is put back, the rest of the engine as vLLM builds it.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from kvtrace import format as fmt
from kvtrace.cli import main
from tests.vllm.workload import (
    BLOCK_SIZE,
    NEW_TOKENS,
    PROMPT_TOKENS,
    REQUESTS,
    blocks_held_by_requests,
    make_llm,
    metric,
    run_workload,
)


@contextlib.contextmanager
def _async_scheduling_on_cpu() -> Iterator[None]:
    """vLLM's CPU platform with its `async_scheduling = False` undone, for the engines built here."""
    from vllm.platforms.cpu import CpuPlatform

    update = CpuPlatform.__dict__["check_and_update_config"]

    def keep_async(cls: Any, vllm_config: Any) -> None:
        update.__func__(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    CpuPlatform.check_and_update_config = classmethod(keep_async)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        CpuPlatform.check_and_update_config = update  # type: ignore[method-assign]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with _async_scheduling_on_cpu():
        llm = make_llm(tiny_model_dir, async_scheduling=True)
    core = llm.llm_engine.engine_core.engine_core
    assert core.batch_queue is not None and core.step_fn == core.step_with_batch_queue
    run_dir = tmp_path_factory.mktemp("vllm-async") / "run"
    with kvtrace.record(run_dir, model=llm, profiler=False):
        outputs = run_workload(llm)
    preemptions = metric(llm, "vllm:num_preemptions")
    # an engine collected while another runs tears down vLLM's process-wide parallel groups (the other then
    # fails: "pipeline model parallel group is not initialized"): this one goes now, before the next starts
    del llm, core
    gc.collect()
    return {
        "dir": run_dir,
        "outputs": outputs,
        "engine": json.loads((run_dir / fmt.ENGINE).read_text()),
        "steps": _jsonl(run_dir / fmt.ENGINE_STEPS),
        "requests": _jsonl(run_dir / fmt.ENGINE_REQUESTS),
        "preemptions": preemptions,
    }


def test_the_run_says_it_was_async_scheduled(recorded: dict[str, Any]) -> None:
    assert recorded["engine"]["config"]["async_scheduling"] is True


def test_preemptions_and_work_equal_vllms_own(recorded: dict[str, Any]) -> None:
    steps, requests = recorded["steps"], recorded["requests"]
    preempted = [e for e in requests if e["event"] == "preempted"]
    # GIVEN a pool that cannot hold every request THEN vLLM preempted, and kvtrace saw each one
    assert recorded["preemptions"] > 0
    assert len(preempted) == sum(len(s["preempted"]) for s in steps) == recorded["preemptions"]
    # every request ran to its max_tokens, and the tokens scheduled are the work plus the recompute
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in recorded["outputs"])
    assert sum(e["event"] == "finished" for e in requests) == REQUESTS
    recomputed = sum(e.get("recomputed_tokens", 0) for e in requests if e["event"] == "resumed")
    assert (
        sum(s["tokens_scheduled"] for s in steps) == REQUESTS * (PROMPT_TOKENS + NEW_TOKENS - 1) + recomputed
    )


def test_blocks_used_is_what_the_requests_hold(recorded: dict[str, Any]) -> None:
    steps = recorded["steps"]
    assert [s["blocks_used"] for s in steps] == blocks_held_by_requests(steps, recorded["requests"])


def test_a_requests_blocks_are_counted_for_its_token_in_flight(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from analyzers.planning.vllm_diagnose import request_kv_tokens
    from analyzers.readers.engine_files import read_engine

    # GIVEN async scheduling: a request's blocks are allocated for prompt + output + the token in flight
    # (vLLM's blocks, from its block lists; prompts share no prefix, every layer is full attention)
    grew = [e for e in recorded["requests"] if e["event"] == "blocks"]
    assert grew and all(e["tokens"] == e["prompt_tokens"] + e["output_tokens"] + 1 for e in grew)
    # THEN the KV tokens the diagnosis counts for each event fill exactly the blocks vLLM gave the request
    # (they were prompt + output: one block short each time a request's token in flight opened a block)
    run = read_engine(recorded["dir"])
    assert run is not None
    for e in run.requests:
        if e.event in ("scheduled", "blocks", "resumed"):
            assert -(-request_kv_tokens(e) // BLOCK_SIZE) == e.blocks, e
    # AND the diagnosis says which held tokens are in flight
    assert main(["diagnose", str(recorded["dir"]), "--json"]) == 0
    held = json.loads(capsys.readouterr().out)["held_at_first"]
    assert any(h["tokens"] == h["prompt_tokens"] + h["output_tokens"] + 1 for h in held)
    assert main(["diagnose", str(recorded["dir"])]) == 0
    assert "+ 1 in flight)" in capsys.readouterr().out


def test_a_step_that_only_collects_the_batch_in_flight_is_idle(recorded: dict[str, Any]) -> None:
    steps, requests = recorded["steps"], recorded["requests"]
    # GIVEN async scheduling: some engine steps schedule nothing and only collect the batch in flight
    collecting = {s["step"] for s in steps if s["tokens_scheduled"] == 0}
    assert collecting
    # THEN those are `idle` (they were `decode`), and the prefills are the steps that took requests in
    assert {s["step"] for s in steps if s["phase"] == "idle"} == collecting
    took_in = {e["step"] for e in requests if e["event"] in ("scheduled", "resumed")}
    assert {s["step"] for s in steps if s["phase"] == "prefill"} == took_in
    # AND the step's memory sample says the same phase
    samples = _jsonl(recorded["dir"] / fmt.MEMORY_SAMPLES)
    phases = {s["step"]: s["phase"] for s in samples if s["phase"] not in ("host", "start", "end")}
    assert {step: phases[step] for step in collecting} == dict.fromkeys(collecting, "idle")
