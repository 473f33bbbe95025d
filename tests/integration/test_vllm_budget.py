"""A memory budget on the committed real vLLM run (sample_traces/vllm_preempt): the weights vLLM loaded before
the trace began count against it, and `diagnose` prices the pool that fits in vLLM's own knobs. Runs in the
main environment: no vLLM needed. Expected figures come from engine.json, never from the code under test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main

PREEMPT = Path(__file__).resolve().parents[2] / "sample_traces" / "vllm_preempt"
MIB = 1 << 20

pytestmark = pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")


def _json_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _recorded_with_budget(tmp_path: Path, budget: int) -> Path:
    """The sample as `kvtrace.record(..., gpu_memory=budget)` would have written it: the option in the
    manifest, nothing else changed."""
    run = tmp_path / "run"
    shutil.copytree(PREEMPT, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["options"]["gpu_memory"] = budget
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _held_pool_block(engine: dict[str, Any]) -> tuple[int, int, int]:
    """What the engine held beside its pool (the weights and vLLM's own buffers: rotary cache, ...; runs
    recorded before kvtrace kept the buffers apart have none, their weights figure holds them), the pool,
    and a block's bytes."""
    profile = engine["memory_profile"]
    held = profile["weights_bytes"] + (profile.get("buffers_bytes") or 0)
    return held, engine["kv_cache_bytes"], engine["bytes_per_block"]


def test_the_weights_vllm_loaded_before_the_trace_count_against_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = json.loads((PREEMPT / "engine.json").read_text())
    weights, pool, _ = _held_pool_block(engine)
    # GIVEN a 2 MiB budget: the 1 MiB pool fits it, the weights and vLLM's buffers (22 MiB) do not
    assert pool < 2 * MIB < weights
    run = _recorded_with_budget(tmp_path, 2 * MIB)
    # WHEN reported THEN the budget is exceeded before the first step, by the weights alone
    crossing = _json_of(["report", str(run), "--no-export", "-q"], capsys)["budget"]
    assert crossing["crossed"] and crossing["before_first_step"] and crossing["request_bytes"] is None
    assert (crossing["unseen_bytes"], crossing["peak_bytes"]) == (weights, weights + pool)
    capsys.readouterr()
    assert main(["report", str(run), "--no-export"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  budget "))
    assert "exceeded before the first step" in line and "the engine held before the trace began" in line


def test_diagnose_prices_the_pool_that_fits_a_budget_in_vllms_knobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = json.loads((PREEMPT / "engine.json").read_text())
    weights, pool, per_block = _held_pool_block(engine)
    # GIVEN a budget the weights fit and the weights and the pool do not
    budget = (weights + pool // 2) // 1024 * 1024
    assert weights < budget < weights + pool
    for argv in (
        ["diagnose", str(PREEMPT), "--budget", f"{budget // 1024}KiB"],
        ["diagnose", str(_recorded_with_budget(tmp_path, budget))],
    ):
        # WHEN diagnosed (the budget given, or recorded) THEN the pool, allocated at vLLM's start, crossed it
        said = _json_of(argv, capsys)
        assert said["kind"] == "preemption"  # the engine's own diagnosis is still there
        over = said["budget"]
        assert over["crossed"] and over["crossed_by"] == "pool"
        assert (over["peak_bytes"], over["over_bytes"]) == (weights + pool, weights + pool - budget)
        assert (over["other_bytes"], over["room_bytes"]) == (weights, budget - weights)
        # AND kv_cache_memory_bytes is the most whole blocks that fit beside the weights
        remedies = {r["knob"]: r for r in over["remedies"]}
        fitting = (budget - weights) // per_block * per_block
        assert remedies["kv_cache_memory_bytes"]["setting"] == fitting
        assert weights + fitting <= budget < weights + fitting + per_block
        # a CPU run has no GPU total to take a share of
        assert remedies["gpu_memory_utilization"]["fits"] is None
    capsys.readouterr()
    assert main(["diagnose", str(PREEMPT), "--budget", f"{budget // 1024}KiB"]) == 0
    text = capsys.readouterr().out
    assert (
        text.startswith(f"kvtrace diagnose: {PREEMPT}: vLLM ")
        and f"would run out of memory on a {human_bytes(budget)}" in text
    )
    assert f"kv_cache_memory_bytes={fitting}" in text and "vLLM preempted 2 time(s)" in text


def _final_demands(folder: Path, block_size: int) -> list[int]:
    """Blocks each request of the run needs at its final length, from engine_requests.jsonl: its last
    sampled token gets no KV, so cdiv(prompt + output - 1, block_size)."""
    final: dict[str, int] = {}
    for line in (folder / "engine_requests.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "finished":
            tokens = event["prompt_tokens"] + event["output_tokens"] - 1
            final[event["request_id"]] = -(-tokens // block_size)
    return sorted(final.values(), reverse=True)


def test_a_preemption_remedy_that_grows_the_pool_past_the_budget_does_not_fit_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = json.loads((PREEMPT / "engine.json").read_text())
    weights, pool, per_block = _held_pool_block(engine)
    num_blocks, max_seqs = engine["num_blocks"], engine["config"]["max_num_seqs"]
    demands = _final_demands(PREEMPT, engine["block_size"])
    needed = sum(demands[:max_seqs]) + 1  # the largest max_num_seqs demands together, and the null block
    # GIVEN a budget the recorded pool fits with one block to spare, and the pool that avoids every
    # preemption does not (profiler off: the peak is the weights and the pool)
    budget = weights + pool + per_block
    assert weights + needed * per_block > budget and pool == num_blocks * per_block
    for argv in (
        ["diagnose", str(PREEMPT), "--budget", f"{budget}B"],
        ["diagnose", str(_recorded_with_budget(tmp_path, budget))],
    ):
        # WHEN diagnosed (the budget given, or recorded)
        said = _json_of(argv, capsys)
        assert said["kind"] == "preemption" and not said["budget"]["crossed"]
        remedies = {r["knob"]: r for r in said["remedies"]}
        # THEN the pool that avoids every preemption is said not to fit, with the peak it would make
        grow = remedies["kv_cache_memory_bytes"]
        assert grow["setting"] == needed * per_block and grow["fits"] is False
        over = weights + needed * per_block - budget
        assert f"over the {budget / MIB:.2f} MiB budget" in grow["sentence"]
        assert over < MIB and f"{over / 1024:.2f} KiB over" in grow["sentence"]
        # AND the largest pool within the budget is priced with the max_num_seqs that avoids them in it:
        # the most requests whose largest demands fit its usable blocks together
        blocks = (budget - weights) // per_block
        seqs = max(m for m in range(len(demands) + 1) if sum(demands[:m]) <= blocks - 1)
        both = remedies["kv_cache_memory_bytes+max_num_seqs"]
        assert both["fits"] is True and weights + blocks * per_block <= budget
        assert both["setting"] == {"kv_cache_memory_bytes": blocks * per_block, "max_num_seqs": seqs}
        # AND max_num_seqs alone keeps the recorded pool, which fits
        assert remedies["max_num_seqs"]["fits"] is True

    # GIVEN a budget the recorded pool does not fit: the remedies that keep it do not fit either
    budget = weights + pool - per_block
    said = _json_of(["diagnose", str(PREEMPT), "--budget", f"{budget}B"], capsys)
    remedies = {r["knob"]: r for r in said["remedies"]}
    assert remedies["max_num_seqs"]["fits"] is False and remedies["kv_cache_dtype"]["fits"] is False
    blocks = (budget - weights) // per_block
    seqs = max(m for m in range(len(demands) + 1) if sum(demands[:m]) <= blocks - 1)
    assert remedies["kv_cache_memory_bytes+max_num_seqs"]["setting"] == {
        "kv_cache_memory_bytes": blocks * per_block,
        "max_num_seqs": seqs,
    }
    capsys.readouterr()
    assert main(["diagnose", str(PREEMPT), "--budget", f"{budget}B"]) == 0
    text = capsys.readouterr().out
    assert f"[fits] kv_cache_memory_bytes={blocks * per_block} " in text
    assert f"with max_num_seqs={seqs}: " in text
    assert f"[no]   kv_cache_memory_bytes={needed * per_block} " in text


def test_a_pool_within_the_budget_is_weighed_as_the_diagnosis_weighs_a_pool(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the sample that preempted: its requests' worst case and their demand on the recorded schedule
    diagnosis = _json_of(["diagnose", str(PREEMPT)], capsys)
    worst, recorded = diagnosis["demand_bound_blocks"], diagnosis["recorded_peak_demand_blocks"]
    assert recorded < worst
    per_block = diagnosis["bytes_per_block"]
    other = _json_of(["diagnose", str(PREEMPT), "--budget", "1GiB"], capsys)["budget"]["other_bytes"]
    # WHEN diagnosed within budgets whose largest pool holds, beside the null block, the recorded schedule's
    # demand but not the worst case, and fewer than the recorded schedule's
    for usable, said in (
        (
            recorded,
            f"hold the {recorded} its requests needed together on the recorded schedule but are fewer than "
            f"the {worst}-block worst case: a larger pool admits more at once, so some may or may not still "
            "be taken out",
        ),
        (
            recorded - 1,
            f"are fewer than the {recorded} its requests needed together on the recorded schedule: some "
            "would likely still be taken out",
        ),
    ):
        budget = other + (usable + 1) * per_block
        assert main(["diagnose", str(PREEMPT), "--budget", f"{budget}B"]) == 0
        text = capsys.readouterr().out
        # THEN the pool's sentence says what the diagnosis says of such a pool (it said "some would still be
        # taken out" of a pool that may avoid them, as fp8's [?] does)
        assert f"its {usable} usable blocks {said}" in text, text
