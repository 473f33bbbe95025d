"""Speculative decoding (vLLM's n-gram proposer, which runs on its CPU build): each step schedules a request's
drafts beside its next token, and every draft takes a KV slot before it is accepted, so a request holds
blocks past its length. The run says so (engine.json's config), the KV tokens counted fill exactly the blocks
vLLM gave, and the diagnosis prices the blocks the requests were logged holding, not their lengths'."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.cli import main
from tests.vllm.workload import BLOCK_SIZE, REQUESTS, make_llm, record_drafting, sampling

DRAFTS = 3
PROMPT, NEW = 40, 25  # 40 + 25 - 1 = 64 KV tokens kept: exactly 2 blocks, the drafts' slots take a third
SPECULATIVE = {
    "method": "ngram",
    "num_speculative_tokens": DRAFTS,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}


def _repeating_prompts() -> list[Any]:
    """Prompts that repeat a 5-token pattern, so that the n-gram proposer finds drafts in them."""
    from vllm.inputs import TokensPrompt

    return [
        TokensPrompt(prompt_token_ids=[(row * 7 + col % 5) % 990 + 5 for col in range(PROMPT)])
        for row in range(REQUESTS)
    ]


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    llm = make_llm(tiny_model_dir, speculative_config=SPECULATIVE)
    run_dir = tmp_path_factory.mktemp("vllm-spec") / "run"
    figures = record_drafting(llm, run_dir, _repeating_prompts(), sampling(NEW))
    del llm
    gc.collect()  # before the next module's engine starts (an engine collected while another runs breaks it)
    return figures


def test_the_run_says_how_many_drafts_a_step_may_take(recorded: dict[str, Any]) -> None:
    config = recorded["engine"]["config"]
    assert config["speculative_method"] == "ngram"
    assert config["num_speculative_tokens"] == DRAFTS
    assert config["num_lookahead_tokens"] == 0  # the n-gram proposer writes no KV of its own
    assert recorded["drafts"] > 0  # and the workload drafted


def test_each_events_kv_tokens_fill_the_blocks_vllm_gave(recorded: dict[str, Any]) -> None:
    from analyzers.planning.vllm_diagnose import request_kv_tokens
    from analyzers.readers.engine_files import read_engine

    run = read_engine(recorded["dir"])
    assert run is not None
    assert all(len(o.outputs[0].token_ids) == NEW for o in recorded["outputs"])
    assert sum(e.event == "preempted" for e in run.requests) == recorded["preemptions"] > 0
    held = [e for e in run.requests if e.event in ("scheduled", "blocks", "resumed")]
    for e in held:
        assert -(-request_kv_tokens(e) // BLOCK_SIZE) == e.blocks, e
    # drafts in flight past the kept tokens (prompt + output): what took each request into its third block
    assert max(e.tokens - e.prompt_tokens - e.output_tokens for e in held) == DRAFTS
    assert max(e.blocks for e in held) == 3 > -(-(PROMPT + NEW - 1) // BLOCK_SIZE)


def test_the_diagnosis_prices_the_blocks_the_drafts_took(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", str(recorded["dir"]), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    # each request held 3 blocks at its end, where its length alone needs 2: 8 x 3 + the null block
    assert diagnosis["demand_bound_blocks"] == REQUESTS * 3
    assert diagnosis["blocks_needed"] == REQUESTS * 3 + 1
    assert (
        f"speculative decoding (ngram) gives up to {DRAFTS} draft tokens a step their slots"
        in (diagnosis["model"])
    )


def test_a_step_that_schedules_drafts_is_a_decode_step(recorded: dict[str, Any]) -> None:
    run = recorded["dir"]
    steps = [json.loads(line) for line in (run / fmt.ENGINE_STEPS).read_text().splitlines()]
    requests = [json.loads(line) for line in (run / fmt.ENGINE_REQUESTS).read_text().splitlines()]
    # GIVEN decode steps that schedule each running request's drafts beside its next token
    assert any(s["tokens_scheduled"] > s["running"] > 0 for s in steps)
    # THEN the prefills are the steps that took requests in (new or recomputed) and no others: "more than
    # one token a request" read every drafting step as a prefill
    took_in = {e["step"] for e in requests if e["event"] in ("scheduled", "resumed")}
    assert {s["step"] for s in steps if s["phase"] == "prefill"} == took_in
    assert {s["phase"] for s in steps if s["step"] not in took_in} <= {"decode", "idle"}
