"""transformers' continuous batching that cancels requests (`cancel_request`: a client gone). The scheduler
drops a cancelled request, waiting or running, and frees its blocks when it prepares the next batch; it
delivers no output for it. The request log must say it left the engine aborted (`finished`, reason
`abort`, as vLLM's aborted requests), and report and compare must count it apart from the completed ones.

A real manager on the tiny random Llama 3 (2 layers, 2 KV heads, head_dim 16, float32, 4-token blocks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import kvtrace
from tests.cb_versions import SECTOR_POOL
from tests.cli_json import cli_json, report_json

pytestmark = SECTOR_POOL

LAYERS, KV_HEADS, PAGE = 2, 2, 4
MAX_NEW = 6
LONG = 1000  # a request that cannot end on its own before it is cancelled
PROMPTS = {"kept": [1, 2, 3, 4, 5], "running": [6, 7, 8], "waiting": [9, 10]}


def _configs() -> tuple[GenerationConfig, ContinuousBatchingConfig]:
    """Greedy MAX_NEW tokens a request (no EOS), and a pool of 64 blocks of PAGE tokens: none preempted."""
    generation = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    return generation, ContinuousBatchingConfig(num_blocks=64, page_size=PAGE, max_batch_tokens=64)


def test_cancelled_requests_leave_the_engine_aborted_and_are_counted_apart(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    model = cb_model
    run = tmp_path / "run"
    generation, batching = _configs()
    # GIVEN three requests: "waiting" cancelled before the loop starts (dropped from the waiting queue before
    # it is ever scheduled), "running" cancelled while it decodes (once "kept" has completed)
    with kvtrace.record(run, model=model, profiler=False):
        manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        manager.add_request(PROMPTS["kept"], request_id="kept")
        manager.add_request(PROMPTS["running"], request_id="running", max_new_tokens=LONG)
        manager.add_request(PROMPTS["waiting"], request_id="waiting")
        manager.cancel_request("waiting")
        manager.start()
        while True:
            result = manager.get_result(timeout=10)
            assert result is not None
            if result.request_id == "kept" and result.is_finished():
                break
        manager.cancel_request("running")
        deadline = time.monotonic() + 60
        while "running" in manager.batch_processor.scheduler.active_requests:
            assert time.monotonic() < deadline, "the scheduler never dropped the cancelled request"
            time.sleep(0.01)
        manager.stop(block=True)
    assert len(result.generated_tokens) == MAX_NEW  # transformers' own count for the one that completed

    # THEN each cancelled request leaves the engine once, aborted, with no blocks held
    lines = [json.loads(x) for x in (run / "engine_requests.jsonl").read_text().splitlines()]
    finished = {x["request_id"]: x for x in lines if x["event"] == "finished"}
    assert set(finished) == set(PROMPTS)
    # never scheduled: the line the scheduler's queue took it in with (its whole ask), then its abort
    waited = [x for x in lines if x["request_id"] == "waiting"]
    assert [x["event"] for x in waited] == ["waiting", "finished"]
    assert (waited[0]["max_tokens"], waited[0]["prompt_tokens"], waited[0]["blocks"]) == (MAX_NEW, 2, 0)
    # every request has its waiting line first, with its own max_new_tokens
    asks = {x["request_id"]: x["max_tokens"] for x in lines if x["event"] == "waiting"}
    assert asks == {"kept": MAX_NEW, "running": LONG, "waiting": MAX_NEW}
    assert all(lines[[x["request_id"] for x in lines].index(r)]["event"] == "waiting" for r in PROMPTS)
    assert (finished["waiting"]["finish_reason"], finished["waiting"]["output_tokens"]) == ("abort", 0)
    assert finished["waiting"]["prompt_tokens"] == len(PROMPTS["waiting"])
    running = finished["running"]
    assert (running["finish_reason"], running["blocks"], running["tokens"]) == ("abort", 0, 0)
    # it had decoded at least as long as "kept" (scheduled together), and was stopped long before its end
    assert MAX_NEW <= running["output_tokens"] < LONG
    assert "finish_reason" not in finished["kept"]
    assert finished["kept"]["output_tokens"] == MAX_NEW
    # engine.json says the log names every cancelled request; the manifest counts them
    assert json.loads((run / "engine.json").read_text())["aborted_requests_logged"] is True
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["engine"]["aborted_requests"], manifest["engine"]["failed_requests"]) == (2, 0)

    # THEN report and compare count them apart from the completed one
    report = report_json(run, capsys)
    assert report["engine"]["finish_reasons"] == {"abort": 2}
    assert (report["engine"]["requests"], report["engine"]["requests_aborted"]) == (3, 2)
    compared = cli_json(["compare", str(run), str(run), "--json"], capsys)
    engine = compared["runs"][0]["engine"]
    assert (engine["requests"], engine["aborted_requests"], engine["failed_requests"]) == (3, 2, 0)
    assert not any("aborted requests unknown" in note for note in compared["runs"][0]["notes"])


def test_a_run_recorded_before_cancellations_were_logged_says_its_aborted_count_unknown(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run that cancelled nothing, its engine.json made as kvtrace wrote it before it followed
    # cancellations (no `aborted_requests_logged`)
    run = tmp_path / "run"
    generation, batching = _configs()
    with kvtrace.record(run, model=cb_model, profiler=False):
        cb_model.generate_batch(
            [PROMPTS["kept"]],
            generation_config=generation,
            continuous_batching_config=batching,
            progress_bar=False,
        )
    compared = cli_json(["compare", str(run), str(run), "--json"], capsys)
    assert compared["runs"][0]["engine"]["aborted_requests"] == 0  # this kvtrace: none cancelled, none
    engine_json = json.loads((run / "engine.json").read_text())
    del engine_json["aborted_requests_logged"]
    (run / "engine.json").write_text(json.dumps(engine_json))
    # THEN compare cannot count its aborted requests, and says why
    compared = cli_json(["compare", str(run), str(run), "--json"], capsys)
    assert compared["runs"][0]["engine"]["aborted_requests"] is None
    (note,) = [n for n in compared["runs"][0]["notes"] if "aborted requests unknown" in n]
    assert "recorded before kvtrace logged the requests transformers' continuous batching cancelled" in note
    assert report_json(run, capsys)["engine"]["requests_aborted"] is None
