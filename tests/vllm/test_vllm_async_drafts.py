"""Async scheduling with an EAGLE drafter, as vLLM runs speculative decoding on GPUs (two batches in flight,
each request's drafts beside its next token, `num_lookahead_tokens` slots for the drafter): the recorded
steps, phases, blocks and preemptions equal vLLM's own, and two figures that counted the batch in flight's
drafts as kept KV now count what vLLM kept:

* a resumed request's `recomputed_tokens`: the preemption took `num_computed_tokens`, which under async
  scheduling counts the batch in flight's slots, its drafts too. The head here accepts none, so vLLM
  rejected them after the preemption; the resume scheduled prompt + output tokens, one of them new, and
  recomputed one less (55, not the 58 recorded before);
* `diagnose`'s pool at the first preemption: a request's output was read back from its tokens as one
  token a step (40 + 15 output + 3 drafts read as output 19); now each figure is vLLM's at a step.

vLLM 0.32 accepts the combination (`VllmConfig.__post_init__`, vllm/config/vllm.py: EAGLE, MTP, draft models);
its CPU platform turns async scheduling off, put back here as tests/vllm/test_vllm_async_scheduling.py does.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from kvtrace.cli import main
from tests.vllm.test_vllm_async_scheduling import _async_scheduling_on_cpu
from tests.vllm.test_vllm_draft_model import BLOCKS, DRAFTS, _block_bytes, _write_eagle_head
from tests.vllm.workload import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    NEW_TOKENS,
    PROMPT_TOKENS,
    REQUESTS,
    SIZE,
    blocks_held_by_requests,
    make_llm,
    metric,
    prompts,
    recorded_files,
    sampling,
)

HEAD_LAYERS = 1  # the EAGLE head's attention layers, in the target's pool


def _llm(model: Path, head: Path, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "async_scheduling": True,
        "speculative_config": {"method": "eagle", "model": str(head), "num_speculative_tokens": DRAFTS},
        "kv_cache_memory_bytes": BLOCKS * _block_bytes(SIZE.num_layers + HEAD_LAYERS),
    }
    with _async_scheduling_on_cpu():
        return make_llm(model, **(kwargs | overrides))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log_schedules(scheduler: Any) -> list[dict[str, Any]]:
    """vLLM's own figures, each `schedule()` call: the tokens it scheduled per request, and each request's
    computed and output tokens before and after it. The recorder wraps this wrapper, and puts it back."""
    calls: list[dict[str, Any]] = []
    schedule = scheduler.schedule

    def schedule_logged(*args: Any, **kwargs: Any) -> Any:
        before = {r.request_id: (r.num_computed_tokens, r.num_output_tokens) for r in scheduler.running}
        out = schedule(*args, **kwargs)
        after = {
            rid: (scheduler.requests[rid].num_computed_tokens, scheduler.requests[rid].num_output_tokens)
            for rid in out.num_scheduled_tokens
        }
        calls.append({"scheduled": dict(out.num_scheduled_tokens), "before": before, "after": after})
        return out

    scheduler.schedule = schedule_logged
    return calls


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    gc.collect()  # an engine of an earlier module collected now, not while this one runs
    head = _write_eagle_head(tmp_path_factory.mktemp("eagle-head"), HEAD_LAYERS)
    llm = _llm(tiny_model_dir, head)
    core = llm.llm_engine.engine_core.engine_core
    assert core.batch_queue is not None and core.step_fn == core.step_with_batch_queue
    calls = _log_schedules(core.scheduler)
    run_dir = tmp_path_factory.mktemp("vllm-async-eagle") / "run"
    with kvtrace.record(run_dir, model=llm, profiler=False):
        outputs = llm.generate(prompts(), sampling(), use_tqdm=False)
    figures = {
        "head": head,
        "model": tiny_model_dir,
        **recorded_files(run_dir),
        "outputs": outputs,
        "calls": calls,
        "preemptions": metric(llm, "vllm:num_preemptions"),
        "drafts": metric(llm, "vllm:spec_decode_num_draft_tokens"),
        "accepted": metric(llm, "vllm:spec_decode_num_accepted_tokens"),
    }
    del llm, core
    gc.collect()  # before the next engine starts
    return figures


def test_vllm_runs_the_drafter_async_and_kvtrace_sees_every_step(recorded: dict[str, Any]) -> None:
    config = recorded["engine"]["config"]
    assert config["async_scheduling"] is True and config["speculative_method"] == "eagle"
    assert config["num_lookahead_tokens"] == DRAFTS
    assert recorded["drafts"] > 0 and recorded["accepted"] == 0  # a random head: vLLM rejects every draft
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in recorded["outputs"])
    # THEN one step line per schedule() call, each with the tokens vLLM scheduled
    steps, calls = recorded["steps"], recorded["calls"]
    assert [s["step"] for s in steps] == list(range(1, len(calls) + 1))
    assert [s["tokens_scheduled"] for s in steps] == [sum(c["scheduled"].values()) for c in calls]


def test_preemptions_phases_and_blocks_equal_vllms(recorded: dict[str, Any]) -> None:
    from analyzers.planning.vllm_diagnose import lookahead_of, request_kv_tokens
    from analyzers.readers.engine_files import read_engine

    steps, requests = recorded["steps"], recorded["requests"]
    preempted = [e for e in requests if e["event"] == "preempted"]
    assert len(preempted) == sum(len(s["preempted"]) for s in steps) == recorded["preemptions"] > 0
    # idle: the steps that only collect the batch in flight; prefill: those that took requests in
    assert {s["step"] for s in steps if s["phase"] == "idle"} == {
        s["step"] for s in steps if s["tokens_scheduled"] == 0
    }
    took_in = {e["step"] for e in requests if e["event"] in ("scheduled", "resumed")}
    assert {s["step"] for s in steps if s["phase"] == "prefill"} == took_in
    assert [s["blocks_used"] for s in steps] == blocks_held_by_requests(steps, requests)
    run = read_engine(recorded["dir"])
    assert run is not None
    assert lookahead_of(run.info.config) == (DRAFTS, MAX_MODEL_LEN)
    for e in run.requests:
        if e.event in ("scheduled", "blocks", "resumed"):
            assert -(-request_kv_tokens(e, DRAFTS, MAX_MODEL_LEN) // BLOCK_SIZE) == e.blocks, e


def test_a_resume_recomputes_the_kv_vllm_kept_not_the_rejected_drafts(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    steps, requests, calls = recorded["steps"], recorded["requests"], recorded["calls"]
    resumed = [e for e in requests if e["event"] == "resumed"]
    assert len(resumed) == recorded["preemptions"]
    for e in resumed:
        # GIVEN the resume scheduled prompt + output tokens, all of them (no prefix-cache hit), one new
        scheduled = calls[e["step"] - 1]["scheduled"][e["request_id"]]
        assert scheduled == e["tokens"] == e["prompt_tokens"] + e["output_tokens"]
        # THEN it recomputed the rest (it was 58: the 3 drafts in flight at the preemption counted)
        assert e["recomputed_tokens"] == scheduled - 1
    # the preemption dropped the slots of the batch in flight: 1 token + 3 drafts, which vLLM then rejected
    dropped = sum(e["dropped_tokens"] for e in requests if e["event"] == "preempted")
    recomputed = sum(e["recomputed_tokens"] for e in resumed)
    assert dropped - recomputed == DRAFTS * len(resumed)
    assert sum(s["prefix_preempted_hits"] for s in steps) == 0
    assert main(["report", str(recorded["dir"]), "--json"]) == 0
    engine = json.loads(capsys.readouterr().out)["engine"]
    assert (engine["preemptions"], engine["recomputed_tokens"]) == (recorded["preemptions"], recomputed)
    assert engine["steps"] == len(calls) and engine["requests"] == REQUESTS


def test_the_pool_at_the_first_preemption_is_vllms(recorded: dict[str, Any]) -> None:
    from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, diagnose_engine
    from analyzers.readers.engine_files import read_engine

    run = read_engine(recorded["dir"])
    assert run is not None
    diagnosis = diagnose_engine(run)
    assert isinstance(diagnosis, PreemptionDiagnosis)
    first, calls = diagnosis.first_preemption_step, recorded["calls"]
    victims = {e.request_id for e in run.requests if e.event == "preempted" and e.step == first}
    assert victims and sum(h.blocks for h in diagnosis.held_at_first) == diagnosis.usable_blocks
    for h in diagnosis.held_at_first:
        # each request's (tokens, output) as vLLM had them: a victim's as it was preempted, the others
        # right after the schedule() of the step they are shown as of
        call = calls[h.as_of_step - 1]
        vllm = call["before"] if h.request_id in victims else call["after"]
        assert (h.tokens, h.output_tokens) == vllm[h.request_id], h
    # a victim held its sampled tokens and the slots of the drafts in flight (was: output 19, none in flight)
    assert {h.in_flight for h in diagnosis.held_at_first if h.request_id in victims} == {DRAFTS}


def test_the_diagnosis_remedies_hold_on_vllm(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", str(recorded["dir"]), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    block = _block_bytes(SIZE.num_layers + HEAD_LAYERS)
    assert diagnosis["preemptions"] == recorded["preemptions"]
    # each request ends at 40 + 48 - 1 = 87 KV tokens: 3 blocks, which also hold its drafts' and lookahead
    # slots (96); 8 run together
    per_request = -(-(PROMPT_TOKENS + NEW_TOKENS - 1) // BLOCK_SIZE)
    assert diagnosis["demand_bound_blocks"] == REQUESTS * per_request == 24
    assert diagnosis["kv_cache_memory_bytes_needed"] == (24 + 1) * block
    seqs = diagnosis["max_num_seqs_without_preemption"]
    assert seqs == (BLOCKS - 1) // per_request == 5
    # AND vLLM agrees: the suggested pool preempts nothing, nor the suggested max_num_seqs; one more does
    for overrides, preempts in (
        ({"kv_cache_memory_bytes": diagnosis["kv_cache_memory_bytes_needed"]}, False),
        ({"max_num_seqs": seqs}, False),
        ({"max_num_seqs": seqs + 1}, True),
    ):
        llm = _llm(recorded["model"], recorded["head"], **overrides)
        llm.generate(prompts(), sampling(), use_tqdm=False)
        assert (metric(llm, "vllm:num_preemptions") > 0) is preempts, overrides
        del llm
        gc.collect()
