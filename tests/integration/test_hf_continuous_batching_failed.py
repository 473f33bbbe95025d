"""transformers' continuous batching whose pool cannot hold its one request: the scheduler can place nothing
and offload nothing, raises in `prepare_next_batch`, and transformers fails the request with the tokens
it made.

A real `generate_batch` on the tiny random Llama 3 (2 layers, 2 KV heads, head_dim 16, float32, 4-token
blocks). Expected figures come from the block arithmetic: a 10-token prompt in 3 usable blocks (12 tokens)
prefills (1 token out), decodes until the KV holds 12 tokens (2 more), and its 13th token needs
ceil(13 / 4) = 4 blocks at step 4, which no offload can free."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import tiny_size

LAYERS, KV_HEADS, PAGE = 2, 2, 4
USABLE = 3  # ContinuousBatchingConfig(num_blocks=...) counts usable blocks
PROMPT = list(range(1, 11))  # 10 tokens
MAX_NEW = 6
# The KV fills the usable blocks: USABLE x PAGE tokens held after the last step that ran; prefill yields 1
GENERATED = USABLE * PAGE - len(PROMPT) + 1  # 3
FAILED_STEP = 1 + (USABLE * PAGE - len(PROMPT)) + 1  # prefill, 2 decodes, then the step it cannot schedule: 4
NEEDED = math.ceil((len(PROMPT) + GENERATED) / PAGE)  # the KV for its next token: 13 tokens, 4 blocks


@pytest.fixture(scope="module")
def cb_model(watched_models: list[torch.nn.Module]) -> torch.nn.Module:
    model = build_model(tiny_size(LAYERS, KV_HEADS), dtype=torch.float32)
    watched_models.append(model)
    return model


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_request_the_pool_cannot_hold_is_recorded_as_failed_for_lack_of_blocks(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a pool of 3 usable blocks and a request that outgrows it
    run = tmp_path / "run"
    generation = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=USABLE, page_size=PAGE, max_batch_tokens=64)
    # WHEN generate_batch runs it (transformers catches its scheduler's error and fails the request)
    with kvtrace.record(run, model=cb_model, profiler=False):
        outputs = cb_model.generate_batch(
            [PROMPT], generation_config=generation, continuous_batching_config=batching, progress_bar=False
        )
    (output,) = outputs.values()
    assert len(output.generated_tokens) == GENERATED  # transformers' own count, as the arithmetic says

    # THEN the request leaves the engine, failed, with the tokens that came out
    lines = [json.loads(x) for x in (run / "engine_requests.jsonl").read_text().splitlines()]
    events = [(x["event"], x.get("finish_reason")) for x in lines]
    assert events == [("scheduled", None), ("finished", "error")]
    assert lines[-1]["output_tokens"] == GENERATED
    assert (lines[-1]["blocks"], lines[-1]["step"]) == (0, FAILED_STEP)
    # the engine's status says the run failed, at the step it could not schedule, and why
    manifest = json.loads((run / "manifest.json").read_text())
    engine_json = json.loads((run / "engine.json").read_text())
    for engine in (manifest["engine"], engine_json):
        assert engine["status"] == "failed"
        failure = engine["failure"]
        assert failure["step"] == FAILED_STEP
        assert failure["reason"] == "no_blocks"
        assert failure["blocks_needed"] == NEEDED
        assert failure["usable_blocks"] == USABLE
        assert failure["requests"] == [output.request_id] == [failure["request"]]
        assert failure["error"].startswith("RuntimeError: No requests can be scheduled")
    assert manifest["engine"]["engine_steps"] == FAILED_STEP - 1
    assert any(
        f"failed at engine step {FAILED_STEP}" in w and f"{output.request_id} needed {NEEDED} blocks" in w
        for w in manifest["warnings"]
    )

    # THEN diagnose says the pool ran out, what the request needed against the usable blocks
    diagnosis = _json(["diagnose", str(run)], capsys)
    assert diagnosis["kind"] == "failed_no_blocks"
    assert (diagnosis["failed_step"], diagnosis["blocks_needed"]) == (FAILED_STEP, NEEDED)
    assert diagnosis["failed_request"] == output.request_id
    assert diagnosis["usable_blocks"] == USABLE
    assert "nothing ran out" not in diagnosis["sentence"]
    wanted = f"request {output.request_id} needed {NEEDED} blocks of {PAGE} tokens and {USABLE} are usable"
    assert wanted in diagnosis["sentence"]
    # and report and compare count the request as failed, with the tokens that came out
    report = _json(["report", str(run), "--no-export"], capsys)
    assert report["engine"]["status"] == "failed"
    assert report["engine"]["finish_reasons"] == {"error": 1}
    compared = _json(["compare", str(run), str(run)], capsys)
    assert compared["runs"][0]["engine"]["output_tokens"] == GENERATED
