"""transformers' continuous batching that fails requests: a pool that cannot hold its one request (the
scheduler can place nothing and offload nothing, raises in `prepare_next_batch`, and transformers fails the
request with the tokens it made); a forward that raises on a token past the vocabulary (every request
fails); a request refused on its own while the others run on. In each the block ends `ok`
(`generate_batch` returns the failed requests), so the engine files, the manifest and the reports must say
which requests failed and why.

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
from tests.cb_versions import SECTOR_POOL

pytestmark = SECTOR_POOL

LAYERS, KV_HEADS, PAGE = 2, 2, 4
USABLE = 3  # ContinuousBatchingConfig(num_blocks=...) counts usable blocks
PROMPT = list(range(1, 11))  # 10 tokens
MAX_NEW = 6
# The KV fills the usable blocks: USABLE x PAGE tokens held after the last step that ran; prefill yields 1
GENERATED = USABLE * PAGE - len(PROMPT) + 1  # 3
FAILED_STEP = 1 + (USABLE * PAGE - len(PROMPT)) + 1  # prefill, 2 decodes, then the step it cannot schedule: 4
NEEDED = math.ceil((len(PROMPT) + GENERATED) / PAGE)  # the KV for its next token: 13 tokens, 4 blocks


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
    assert events == [("waiting", None), ("scheduled", None), ("finished", "error")]
    assert lines[0]["max_tokens"] == MAX_NEW
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
    assert manifest["engine"]["failed_requests"] == 1
    assert lines[-1]["error"] == failure["error"]
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


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "engine_requests.jsonl").read_text().splitlines()]


def test_a_request_refused_on_its_own_is_failed_while_the_run_goes_on(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN three requests to a manager started in the block, the middle one with a logits-processor argument
    # transformers cannot apply: it fails that request alone (ValueError) and runs the two others to their end
    run = tmp_path / "run"
    generation = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    prompts = {"good_0": [1, 2, 3, 4, 5], "bad_1": [6, 7, 8], "good_2": [9, 10, 11, 12]}
    with kvtrace.record(run, model=cb_model, profiler=False):
        manager = cb_model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        manager.start()
        for request_id, prompt in prompts.items():
            extra = {"bogus_kwarg": 1} if request_id == "bad_1" else {}
            manager.add_request(prompt, request_id=request_id, **extra)
        outputs: dict[str, Any] = {}
        while len(outputs) < len(prompts):
            result = manager.get_result(timeout=10)
            assert result is not None
            if result.is_finished():
                outputs[result.request_id] = result
        manager.stop(block=True)
    # transformers' own word: one failed, with no token, two ran to MAX_NEW tokens
    assert {rid for rid, out in outputs.items() if out.error is not None} == {"bad_1"}
    assert [len(outputs[rid].generated_tokens) for rid in prompts] == [MAX_NEW, 0, MAX_NEW]

    # THEN the request log has it leave the engine, failed, with its error, never scheduled
    lines = _records(run)
    finished = {x["request_id"]: x for x in lines if x["event"] == "finished"}
    assert set(finished) == set(prompts)
    bad = finished["bad_1"]
    assert (bad["finish_reason"], bad["blocks"], bad["output_tokens"]) == ("error", 0, 0)
    assert bad["prompt_tokens"] == len(prompts["bad_1"])
    assert bad["error"].startswith("ValueError: Unknown logit_processor_kwargs: {'bogus_kwarg'}")
    assert [x["event"] for x in lines if x["request_id"] == "bad_1"] == ["finished"]
    assert [finished[rid]["output_tokens"] for rid in ("good_0", "good_2")] == [MAX_NEW, MAX_NEW]
    assert "finish_reason" not in finished["good_0"] and "finish_reason" not in finished["good_2"]
    # the block and the engine ended ok (the run went on), and the manifest counts and names the failure
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "ok"
    assert manifest["engine"]["status"] == "ok" and "failure" not in manifest["engine"]
    assert manifest["engine"]["failed_requests"] == 1
    (said,) = [w for w in manifest["warnings"] if "failed on their own" in w]
    assert said.startswith("continuous batching: 1 request(s) failed on their own and the run went on")
    assert "bad_1 (ValueError: Unknown logit_processor_kwargs" in said

    # THEN the report counts it, in text and JSON, and its notes say which
    report = _json(["report", str(run), "--no-export"], capsys)
    assert report["engine"]["finish_reasons"] == {"error": 1}
    assert report["engine"]["requests"] == 3
    assert said in report["notes"]
    capsys.readouterr()
    assert main(["report", str(run), "--no-export"]) == 0
    text = capsys.readouterr().out
    assert "3 requests (2 completed, 1 failed)" in text
    assert "note: continuous batching: 1 request(s) failed on their own" in text
    # and diagnose, which found nothing run out, names the request that failed and why
    diagnosis = _json(["diagnose", str(run)], capsys)
    assert diagnosis["kind"] == "no_preemption"
    assert diagnosis["failed_requests"] == ["bad_1"]
    alone = "1 request(s) failed on their own and the run went on: bad_1 (ValueError: Unknown"
    assert alone in diagnosis["sentence"]


def test_a_forward_that_raises_fails_every_request_and_says_why(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two prompts, the second with a token past the 1000-token vocabulary: the batch's first forward
    # raises in its embedding, and transformers fails both requests, none with a token
    run = tmp_path / "run"
    generation = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    with kvtrace.record(run, model=cb_model, profiler=False):
        outputs = cb_model.generate_batch(
            [[1, 2, 3], [4, 5000, 6]],
            generation_config=generation,
            continuous_batching_config=batching,
            progress_bar=False,
        )
    assert sorted(outputs) == ["req_0", "req_1"]
    assert all(out.error is not None and not out.generated_tokens for out in outputs.values())

    # THEN both leave the engine failed at step 1, with the error, and the manifest says so
    failed = {x["request_id"]: x for x in _records(run) if x["event"] == "finished"}
    assert sorted(failed) == ["req_0", "req_1"]
    assert {(x["finish_reason"], x["step"], x["output_tokens"]) for x in failed.values()} == {("error", 1, 0)}
    assert {x["error"] for x in failed.values()} == {"IndexError: index out of range in self"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "ok"
    engine = manifest["engine"]
    assert (engine["status"], engine["failed_requests"], engine["engine_steps"]) == ("failed", 2, 0)
    assert engine["failure"]["reason"] == "error" and engine["failure"]["step"] == 1
    assert engine["failure"]["error"] == "IndexError: index out of range in self"
    assert sorted(engine["failure"]["requests"]) == ["req_0", "req_1"]
    stopped = (
        "stopped the run at engine step 1 (IndexError: index out of range in self) and failed 2 request(s)"
    )
    assert any(stopped in w for w in manifest["warnings"])

    # THEN diagnose names the failure and the requests, and does not say that nothing ran out
    diagnosis = _json(["diagnose", str(run)], capsys)
    assert sorted(diagnosis["failed_requests"]) == ["req_0", "req_1"]
    assert "nothing ran out" not in diagnosis["sentence"]
    assert (
        "transformers failed the run at engine step 1 (IndexError: index out of range in self): 2 request(s)"
        in diagnosis["sentence"]
    )
    report = _json(["report", str(run), "--no-export"], capsys)
    assert report["engine"]["finish_reasons"] == {"error": 2}
