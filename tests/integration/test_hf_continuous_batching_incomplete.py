"""transformers' continuous batching runs that `kvtrace diagnose` reads incomplete: a process that died with
every request still in the engine (each counted at its max_new_tokens, which its `waiting` line records), and
a run copied without its engine.json.

A real `generate_batch` on the tiny random Llama 3 (2 layers, 2 KV heads, head_dim 16, float32) with a pool
of 8 usable 4-token blocks for three requests that grow to 17, 16 and 14 KV tokens: the scheduler takes one
out at step 7. Expected figures come from the block arithmetic and the raw files, never from the code under
test."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import kvtrace
from kvtrace.cli import main
from tests.cb_versions import SECTOR_POOL

pytestmark = SECTOR_POOL

LAYERS, KV_HEADS, PAGE, NEW_TOKENS, USABLE = 2, 2, 4, 12, 8
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14]]
DIES_AT = 10  # the engine step in which the process dies, with no request finished
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_traces"

# Step DIES_AT (argv[2], the step in which the process dies) - 1 lasts longer than the engine files' 0.1 s
# flush, so its end writes every step up to it; then the process exits in step DIES_AT as a kill -9 (or the
# OOM killer) would: no exception, no teardown.
_DIES = textwrap.dedent(
    f"""
    import json, os, sys, time
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    import transformers.generation.continuous_batching.continuous_api as api
    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    model = build_model(tiny_size({LAYERS}, {KV_HEADS}), dtype=torch.float32)
    step, steps = api.ContinuousBatchProcessor._generation_step, [0]

    dies_at = int(sys.argv[2])

    def dying(self, model):
        steps[0] += 1
        if steps[0] == dies_at - 1:
            time.sleep(0.15)
        if steps[0] == dies_at:
            os._exit(1)
        return step(self, model)

    api.ContinuousBatchProcessor._generation_step = dying
    generation = GenerationConfig(max_new_tokens={NEW_TOKENS}, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks={USABLE}, page_size={PAGE}, max_batch_tokens=64)
    with kvtrace.record(sys.argv[1], model=model, profiler=False):
        prompts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {PROMPTS}
        model.generate_batch(prompts, generation_config=generation, continuous_batching_config=batching,
                             progress_bar=False)
    """
)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _diagnose(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    capsys.readouterr()
    assert main(["diagnose", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["diagnose", str(run)]) == 0
    return result, capsys.readouterr().out


def _record_dying_at(run: Path, dies_at: int, prompts: list[list[int]] | None = None) -> None:
    """The workload recorded in a child process that kills itself in step `dies_at` (exit status 1)."""
    extra = [json.dumps(prompts)] if prompts is not None else []
    done = subprocess.run(
        [sys.executable, "-c", _DIES, str(run), str(dies_at), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr


def _record(path: Path, model: torch.nn.Module, num_blocks: int) -> None:
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=num_blocks, page_size=PAGE, max_batch_tokens=64)
    with kvtrace.record(path, model=model, profiler=False):
        model.generate_batch(
            PROMPTS, generation_config=generation, continuous_batching_config=batching, progress_bar=False
        )


def test_a_run_that_died_with_requests_unfinished_counts_them_at_their_max_new_tokens(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose process died in step 10, after the pool took a request out at step 7
    run = tmp_path / "died"
    _record_dying_at(run, DIES_AT)
    assert json.loads((run / "manifest.json").read_text())["ended"] == {"status": "running"}
    requests = _lines(run / "engine_requests.jsonl")
    assert [s["step"] for s in _lines(run / "engine_steps.jsonl")] == list(range(1, DIES_AT))
    assert not [e for e in requests if e["event"] == "finished"]  # 0 of 3 finished
    assert [e["step"] for e in requests if e["event"] == "preempted"] == [7]
    # what they held at the lengths they had reached (every token so far has KV: none had finished)
    reached: dict[str, int] = {}
    for e in requests:
        blocks = math.ceil((e["prompt_tokens"] + e["output_tokens"]) / PAGE)
        reached[e["request_id"]] = max(reached.get(e["request_id"], 0), blocks)
    at_least = sum(reached.values())
    assert at_least == 4 + 4 + 3  # 13, 13 and 9 tokens
    # each `waiting` line says its prompt and max_new_tokens: the most each may reach, prompt + 12 - 1
    # tokens (the last sampled token gets no KV): 5 + 4 + 4 blocks
    asked = {e["request_id"]: e for e in requests if e["event"] == "waiting"}
    assert {e["max_tokens"] for e in asked.values()} == {NEW_TOKENS}
    final = sum(math.ceil((e["prompt_tokens"] + e["max_tokens"] - 1) / PAGE) for e in asked.values())
    assert final == sum(math.ceil((len(p) + NEW_TOKENS - 1) / PAGE) for p in PROMPTS) == 13 > at_least

    # WHEN it is diagnosed
    diagnosis, text = _diagnose(run, capsys)

    # THEN the demand counts each unfinished request at its max_new_tokens: an upper bound, the num_blocks
    # named (it was the lengths reached, at least 11, and no num_blocks)
    assert (diagnosis["kind"], diagnosis["demand_blocks"]) == ("preemption", final)
    assert diagnosis["unfinished_requests"] == len(PROMPTS)
    sentence = diagnosis["sentence"]
    assert (
        f"The run stopped with {len(PROMPTS)} request(s) unfinished (its process died), each counted at its "
        "max_new_tokens (prompt + max_new_tokens - 1 tokens, the most it may reach). Had none been taken "
        f"out, the requests would have needed at most {final} blocks of {PAGE} tokens "
        f"(ContinuousBatchingConfig(num_blocks={final}) counts usable blocks alike)."
    ) in sentence
    assert "at least" not in text and "cannot be told" not in text
    assert text.rstrip().endswith(
        "note: the run never finished (the process died): read up to its last flushed step"
    )

    # AND that is right: the whole workload in a pool of the lengths reached still takes a request out,
    # while the num_blocks named takes none
    _record(tmp_path / "at_least", cb_model, at_least)
    assert [e for e in _lines(tmp_path / "at_least" / "engine_requests.jsonl") if e["event"] == "preempted"]
    _record(tmp_path / "final", cb_model, final)
    assert not [e for e in _lines(tmp_path / "final" / "engine_requests.jsonl") if e["event"] == "preempted"]


def test_a_run_that_died_before_taking_a_request_out_does_not_say_nothing_ran_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose process died in step 5, before the pool took any request out (it would at step 7)
    run, dies_at = tmp_path / "died_early", 5
    _record_dying_at(run, dies_at)
    steps = _lines(run / "engine_steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, dies_at))
    requests = _lines(run / "engine_requests.jsonl")
    assert not [e for e in requests if e["event"] in ("finished", "preempted")]
    peak = max(s["blocks_used"] for s in steps)
    peak_step = next(s["step"] for s in steps if s["blocks_used"] == peak)
    # the three prompts have grown by 3 tokens each by step 4: 9, 8 and 6 KV tokens in 4-token blocks
    assert (peak, peak_step) == (3 + 2 + 2, 4)

    # WHEN it is diagnosed
    diagnosis, text = _diagnose(run, capsys)

    # THEN it says no request was taken out before it stopped, with its requests unfinished: whether the pool
    # would have sufficed is unknown, so "nothing ran out" is not said
    assert (diagnosis["kind"], diagnosis["unfinished_requests"]) == ("no_preemption", len(PROMPTS))
    sentence = (
        f"transformers-cb {transformers.__version__} took no request out of its pool before the "
        f"run stopped, with {len(PROMPTS)} request(s) unfinished (its process died): whether the pool "
        f"would have sufficed cannot be told from this run (peak {peak} of {USABLE} usable blocks at step "
        f"{peak_step})."
    )
    assert diagnosis["sentence"] == sentence
    assert "nothing ran out" not in text
    assert text.splitlines() == [
        f"kvtrace diagnose: {run}: {sentence}",
        "  note: the run never finished (the process died): read up to its last flushed step",
    ]


def test_a_request_still_queued_when_the_process_died_is_a_request_and_part_of_the_demand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a 16-token prompt beside the three: 4 + 2 + 1 of the 8 usable blocks at step 1 leave no room
    # for the 6-token one, which is still queued when the process dies in step 4 (req_2 taken out at step 3)
    prompts = [*PROMPTS, list(range(20, 36))]
    run, dies_at = tmp_path / "died_queued", 4
    _record_dying_at(run, dies_at, prompts)
    steps = _lines(run / "engine_steps.jsonl")
    assert [(s["step"], s["running"], s["waiting"]) for s in steps] == [(1, 3, 1), (2, 3, 1), (3, 2, 2)]
    requests = _lines(run / "engine_requests.jsonl")
    # THEN every request submitted has its line, the one never scheduled its `waiting` line alone
    events: dict[str, list[str]] = {}
    for e in requests:
        events.setdefault(e["request_id"], []).append(e["event"])
    assert sorted(events) == [f"req_{i}" for i in range(len(prompts))]
    assert events["req_0"] == ["waiting"]
    queued = next(e for e in requests if e["request_id"] == "req_0")
    assert (queued["step"], queued["prompt_tokens"], queued["max_tokens"]) == (1, 6, NEW_TOKENS)
    # the others at the lengths they reached (every token so far has KV: none finished): 17, 5 and 5 tokens
    reached: dict[str, int] = {}
    for e in requests:
        blocks = math.ceil((e["prompt_tokens"] + e["output_tokens"]) / PAGE)
        reached[e["request_id"]] = max(reached.get(e["request_id"], 0), blocks)
    assert reached == {"req_0": 2, "req_1": 2, "req_2": 2, "req_3": 5}

    # WHEN it is reported and diagnosed
    capsys.readouterr()
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    engine = json.loads(capsys.readouterr().out)["engine"]
    diagnosis, _ = _diagnose(run, capsys)

    # THEN the queued request is one of the 4 requests, and each is counted at its max_new_tokens (the lengths
    # reached were 5 + 2 + 2 + 2 = 11; without its line: 3 requests, 9 blocks): prompt + 12 - 1 tokens,
    # cdiv(27, 4) + cdiv(17, 4) + cdiv(16, 4) + cdiv(14, 4) = 7 + 5 + 4 + 4
    asked = sum(math.ceil((len(p) + NEW_TOKENS - 1) / PAGE) for p in prompts)
    assert asked == 20 > sum(reached.values()) == 11
    assert engine["requests"] == len(prompts) == 4
    assert (diagnosis["kind"], diagnosis["unfinished_requests"]) == ("preemption", 4)
    assert diagnosis["demand_blocks"] == asked
    assert "at most 20 blocks of 4 tokens" in diagnosis["sentence"]


@pytest.mark.parametrize("engine", ["transformers-cb", "vllm"])
def test_a_pool_read_without_engine_json_is_priced_in_no_generate_remedy(
    engine: str, tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real engine run (recorded here, or vLLM's sample) copied without its engine.json
    whole = tmp_path / "whole"
    if engine == "transformers-cb":
        _record(whole, cb_model, USABLE)
    else:
        shutil.copytree(SAMPLES / "vllm_preempt", whole)
    pool = json.loads((whole / "engine.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(whole, copy)
    (copy / "engine.json").unlink()
    events = _lines(copy / "kv_events.jsonl")
    (cache,) = {e["cache"] for e in events}
    assert {e["source"] for e in events if e["event"] == "created"} == {engine}  # the pool's
    assert cache == {"transformers-cb": 3100, "vllm": 3000}[engine]

    # WHEN it is diagnosed
    diagnosis, text = _diagnose(copy, capsys)

    # THEN the pool's bytes are the KV, but its blocks are not read as a batch, and no generate() cache's
    # remedy (a smaller batch, a shorter context, a window) is priced on it: a note says why, naming the file
    assert diagnosis["kv_bytes"] == pool["kv_cache_bytes"]
    assert (diagnosis["batch"], diagnosis["tokens_held"], diagnosis["remedies"]) == (None, None, [])
    named = {
        "transformers-cb": "transformers' continuous batching pool (transformers-cb)",
        "vllm": "vLLM's pool",
    }
    note = (
        f"cache {cache} in the KV log is {named[engine]}, read without engine.json: its blocks, requests "
        "and preemptions are unknown, and the pool is allocated whole at the engine's start, so a smaller "
        "batch, a shorter context, a window or a quantized cache would not change its size: no remedy is "
        "priced (restore engine.json for the engine's diagnosis in its blocks)"
    )
    assert note in diagnosis["notes"]
    assert "batch x tokens" not in text and "remedies: none priced" in text and f"note: {note}" in text
