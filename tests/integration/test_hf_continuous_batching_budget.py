"""transformers' continuous batching against a memory budget, a pool freed inside the block, and a run that
ended before its first engine step: what `report` and `diagnose` say of each.

A real `generate_batch` on the tiny random Llama 3 of test_hf_continuous_batching.py (2 layers, 2 KV heads,
head_dim 16, float32, 4-token blocks: one block = one sector = 2048 B, and the pool is num_blocks + 2 trash
sectors). Expected figures come from that arithmetic and from the model's own storages, never from the code
under test; the num_blocks that diagnose prices is checked by recording with it."""

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
from analyzers.units import a_or_an, human_bytes
from kvtrace.cli import main
from tests.cb_versions import SECTOR_POOL
from tests.engine_page import pool_table
from tests.tiny import HEAD_DIM, weights_bytes

pytestmark = SECTOR_POOL

LAYERS, KV_HEADS, PAGE, FLOAT32 = 2, 2, 4, 4
BLOCK_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * PAGE * FLOAT32  # 2048, also transformers' sector
TRASH = 2  # transformers' trash sectors, before the data sectors
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]


def _run(run: Path, model: torch.nn.Module, num_blocks: int, budget: int | None = None) -> None:
    generation = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=num_blocks, page_size=PAGE, max_batch_tokens=64)
    with kvtrace.record(run, model=model, profiler=False, gpu_memory=budget):
        model.generate_batch(
            PROMPTS, generation_config=generation, continuous_batching_config=batching, progress_bar=False
        )


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(_cli([*argv, "--json"], capsys))


def test_a_budget_the_pool_crosses_names_the_pool_and_prices_num_blocks(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the weights and a pool of 32 usable blocks, under a budget that fits the weights, not the pool
    weights = weights_bytes(cb_model)
    pool = (32 + TRASH) * BLOCK_BYTES
    budget = weights + 30 * BLOCK_BYTES + 1000
    run = tmp_path / "run"
    _run(run, cb_model, num_blocks=32, budget=budget)

    # WHEN reported THEN the crossing is the pool's allocation before the first step, on top of the weights
    crossing = _json(["report", str(run), "--no-export", "-q"], capsys)["budget"]
    assert crossing["crossed"] and crossing["before_first_step"] and crossing["step"] == 0
    assert (crossing["request_bytes"], crossing["request_category"]) == (pool, "kv")
    assert crossing["allocated_before_bytes"] == weights < budget
    text = _cli(["report", str(run), "--no-export"], capsys)
    line = next(line for line in text.splitlines() if line.startswith("  budget "))
    assert "exceeded before the first step by the transformers-cb KV pool" in line
    assert "weights and what the process held before" not in line
    # AND the charts' "runs out here" mark says so too (it read "step 0 (None)"), at the pool's level
    from analyzers.tb_plugin.run_store import RunStore

    (mark,) = [m for m in RunStore(tmp_path).timeline("run")["markers"] if m["kind"] == "budget"]
    assert mark["bytes"] == weights + pool
    device = a_or_an(human_bytes(budget))
    assert mark["label"].startswith(f"would run out on {device} device: before the first step")
    assert mark["label"].endswith(f", {a_or_an(human_bytes(pool))} request") and "None" not in mark["label"]

    # WHEN diagnosed THEN the budget is explained: the pool crossed it, by the peak's excess
    diagnosis = _json(["diagnose", str(run)], capsys)
    said = diagnosis["budget"]
    assert said["crossed"] and said["crossed_by"] == "pool"
    assert (said["peak_bytes"], said["over_bytes"]) == (weights + pool, weights + pool - budget)
    assert (said["pool_bytes"], said["other_bytes"], said["room_bytes"]) == (pool, weights, budget - weights)
    # AND priced in num_blocks: the most blocks whose pool (+ the trash sectors) fits beside the weights
    blocks = (budget - weights) // BLOCK_BYTES - TRASH
    remedies = {r["knob"]: r for r in said["remedies"]}
    assert (remedies["num_blocks"]["setting"], remedies["num_blocks"]["fits"]) == (blocks, True) == (28, True)
    # and max_memory_percent: that share of the device's memory free after the weights is the room, or less
    total = json.loads((run / "manifest.json").read_text())["device"]["total_memory_bytes"]
    percent = remedies["max_memory_percent"]["setting"]
    assert percent * (total - weights) <= budget - weights < percent * 1.01 * (total - weights)
    text = _cli(["diagnose", str(run)], capsys)
    assert "would run out of memory on a" in text and "its KV pool" in text
    assert f"ContinuousBatchingConfig(num_blocks={blocks})" in text
    assert "nothing ran out" not in text

    # THEN recording with the priced num_blocks fits the budget, and one block more does not
    _run(tmp_path / "fits", cb_model, num_blocks=blocks, budget=budget)
    _run(tmp_path / "over", cb_model, num_blocks=blocks + 1, budget=budget)
    fits = _json(["report", str(tmp_path / "fits"), "--no-export", "-q"], capsys)["budget"]
    over = _json(["report", str(tmp_path / "over"), "--no-export", "-q"], capsys)["budget"]
    assert not fits["crossed"] and fits["peak_bytes"] == weights + (blocks + TRASH) * BLOCK_BYTES
    assert over["crossed"] and over["request_bytes"] == (blocks + 1 + TRASH) * BLOCK_BYTES


def test_a_pool_freed_before_the_last_step_is_not_the_final_kv(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN generate_batch, then a generate() without a KV cache: its steps see the pool freed (generate_batch
    # returned), and nothing holds KV at the end of the last step
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    ids = torch.tensor([PROMPTS[0]])
    run = tmp_path / "run"
    with kvtrace.record(run, model=cb_model, profiler=False):
        cb_model.generate_batch(PROMPTS, generation_config=generation, continuous_batching_config=batching)
        cb_model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=generation, use_cache=False
        )
    events = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    freed = [e for e in events if e["cache"] == 3100 and e["event"] == "freed"]
    assert len(freed) == 1 and freed[0]["phase"] != "end"  # seen in a step, not at the block's teardown

    # WHEN reported THEN the KV at the end is 0, as the device's final is the weights alone
    report = _json(["report", str(run), "--no-export", "-q"], capsys)
    kv, (device,) = report["kv"], report["devices"]
    pool = (32 + TRASH) * BLOCK_BYTES
    assert kv["peak_bytes"] == pool and kv["final_bytes"] == 0
    assert device["final_allocated_bytes"] == weights_bytes(cb_model)
    assert {c["cache"]: c["final_bytes"] for c in kv["caches"]} == {3100: 0}
    assert [(row["k_bytes"], row["v_bytes"]) for row in kv["per_layer"]] == [(0, 0)] * LAYERS


def test_a_run_that_ended_before_its_first_engine_step(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a forward that raises at once: transformers fails the requests after making the pool, before
    # any engine step, and the user's code raises on the failed outputs inside the block
    def raises(module: Any, args: Any) -> None:
        raise RuntimeError("boom")

    handle = cb_model.model.layers[0].register_forward_pre_hook(raises)
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=8, page_size=PAGE, max_batch_tokens=64)
    run = tmp_path / "run"
    try:
        with (
            pytest.raises(RuntimeError, match="requests failed"),
            kvtrace.record(run, model=cb_model, profiler=False),
        ):
            outputs = cb_model.generate_batch(
                PROMPTS, generation_config=generation, continuous_batching_config=batching, progress_bar=False
            )
            if any(output.error for output in outputs.values()):
                raise RuntimeError("requests failed")
    finally:
        handle.remove()
    assert (run / "engine_steps.jsonl").read_text().strip() == ""
    usable = math.ceil(8 * BLOCK_BYTES / BLOCK_BYTES)

    # WHEN reported THEN no step is named "None": the run ended before its first step
    text = _cli(["report", str(run), "--no-export"], capsys)
    assert "step None" not in text
    assert f"no engine step ran: the run ended before its first step, none of {usable} usable blocks" in text
    # AND its page shows the pool the text describes, with no chart of steps it never ran
    page = tmp_path / "report.html"
    assert main(["report", str(run), "--no-export", "-q", "-o", str(page)]) == 0
    rows = pool_table(page.read_text())
    blocks = 8 + TRASH
    assert rows["blocks"] == (
        f"{blocks} blocks of {PAGE} tokens ({TRASH} of the {blocks} blocks are transformers' trash sectors, "
        "never handed out)"
    )
    assert rows["engine steps"] == "0"
    assert rows["pool"] == f"{(8 + TRASH) * BLOCK_BYTES / 1024:.2f} KiB (float32)"
    assert rows["peak"] == (
        f"no engine step ran: the run ended before its first step, none of {usable} usable blocks used"
    )
    assert rows["preemptions"] == "none" and 'id="kvtrace-engine-pool"' not in page.read_text()

    # WHEN diagnosed THEN it says so, and that the block raised
    text = _cli(["diagnose", str(run)], capsys)
    assert "step None" not in text and "ran no engine step: the run ended before its first step" in text
    assert "note: the recorded block raised RuntimeError: requests failed" in text
    diagnosis = _json(["diagnose", str(run)], capsys)
    assert diagnosis["notes"] == [
        "the recorded block raised RuntimeError: requests failed: the figures cover the run up to then"
    ]


@pytest.mark.parametrize("engine", [[], ["--engine", "vllm"]], ids=["plain", "engine-vllm"])
def test_plan_from_a_continuous_batching_run_names_its_engine_and_pool_not_vllm(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str], engine: list[str]
) -> None:
    # GIVEN a generate_batch run with a pool of 32 usable 4-token blocks, plus transformers' trash sectors
    run = tmp_path / "run"
    _run(run, cb_model, num_blocks=32)
    usable_bytes = 32 * BLOCK_BYTES  # 32 x 4 tokens x 2 layers x K and V x 2 KV heads x 16 x 4 B = 64 KiB

    # WHEN planned from the run, as the refusal of a vLLM run advised (--engine vllm) or not
    capsys.readouterr()
    code = main(["plan", *engine, "--from-run", str(run)])
    out, err = capsys.readouterr()

    # THEN one line refuses it as transformers' continuous batching, with its own pool, and sends to diagnose;
    # it used to say "a vLLM run", then plan 34 blocks by vLLM's rules and refuse an 8,192-token request
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert f"{run}: a transformers continuous-batching run (transformers-cb)" in err
    pool = f"its pool 32 usable {PAGE}-token blocks ({usable_bytes / 1024:.2f} KiB) + {TRASH} trash sectors"
    assert pool in err
    assert f"kvtrace diagnose {run} --gpu-memory SIZE" in err
    assert "vLLM run" not in err and "max_model_len" not in err and "Traceback" not in err
