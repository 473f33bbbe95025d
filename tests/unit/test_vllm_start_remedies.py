"""`kvtrace plan --engine vllm` of a plan vLLM refuses for its KV memory: what makes it start, each remedy
planned again with one setting changed. Figures by hand, as vLLM 0.32 sizes its pool: available =
ceil(GPU x utilization) - weights - activations - non-torch; blocks = available // (layers x page); one
request of L tokens needs cdiv(L, 16) blocks, checked against available less the null block."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest

from analyzers.planning.presets import get_preset
from analyzers.planning.vllm_plan import VllmPlanRequest, plan_vllm
from analyzers.planning.vllm_start_remedies import start_remedies
from analyzers.render.vllm_plan import format_vllm_text
from kvtrace.commands.plan import PlanCommand

GIB = 2**30
MIB = 2**20
BLOCK = 2 * MIB  # Llama 3.1 8B: 32 layers x 2 (K, V) x 8 KV heads x 128 x 2 B x 16 tokens


def _request(**changes: object) -> VllmPlanRequest:
    # Llama 3.1 8B on a 24 GiB GPU at 0.8: 19.2 GiB less 15 GiB of weights and 1 GiB of activations
    base = VllmPlanRequest(
        geometry=get_preset("llama-3.1-8b"),
        gpu_memory_bytes=24 * GIB,
        gpu_memory_utilization=0.8,
        weights_bytes=15 * GIB,
        activation_peak_bytes=1 * GIB,
        max_model_len=32768,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_each_remedy_is_the_plan_made_again() -> None:
    # GIVEN 32,768-token requests, 4 GiB a request, on 3.2 GiB of KV memory: refused
    result = plan_vllm(_request())
    available = math.ceil(24 * GIB * 0.8) - 16 * GIB
    assert result.available_kv_bytes == available and result.num_blocks == available // BLOCK
    assert result.needed_bytes == 2048 * BLOCK == 4 * GIB and not result.starts
    remedies = {remedy.flag.split()[0]: remedy for remedy in start_remedies(result)}
    # THEN the longest max_model_len: 16-token blocks of the memory less the null block
    length = remedies["--max-model-len"]
    assert length.max_model_len == (available - BLOCK) // BLOCK * 16 == result.estimated_max_model_len
    assert length.starts and plan_vllm(_request(max_model_len=length.max_model_len)).starts
    # an fp8 cache: 1 MiB blocks, twice as many; a 32,768-token request needs 2 GiB of them: it starts
    fp8 = remedies["--kv-cache-dtype"]
    assert (fp8.flag, fp8.starts, fp8.num_blocks) == ("--kv-cache-dtype fp8", True, available // MIB)
    # the smallest utilization, in hundredths, that holds 4 GiB and the null block beside 16 GiB
    wanted = (16 * GIB + 4 * GIB + BLOCK) / (24 * GIB)
    utilization = remedies["--gpu-memory-utilization"]
    assert (
        utilization.flag
        == f"--gpu-memory-utilization {math.ceil(wanted * 100) / 100:g}"
        == ("--gpu-memory-utilization 0.84")
    )
    assert utilization.starts and not plan_vllm(_request(gpu_memory_utilization=0.83)).starts
    # weights given (a run's or typed): what each rank of a tensor-parallel group loads is not known
    assert "--tensor-parallel-size" not in remedies
    text = format_vllm_text(result, start_remedies(result))
    assert "To make it start (each planned again with one setting changed):" in text
    assert "  [starts] --kv-cache-dtype fp8: 1 B a KV element, not 2: 65,536 B a token; " in text


def test_a_second_gpu_when_the_weights_are_the_geometry_s() -> None:
    # GIVEN the weights computed from the geometry (none typed): 14.96 GiB, the GPU at 0.8 of 20 GiB
    result = plan_vllm(_request(weights_bytes=None, gpu_memory_bytes=20 * GIB, activation_peak_bytes=0))
    assert not result.starts
    parallel = [remedy for remedy in start_remedies(result) if remedy.flag.startswith("--tensor")]
    # THEN two GPUs: each holds half the KV heads (65,536 B a token) and its share of the weights
    again = plan_vllm(
        _request(
            weights_bytes=None, gpu_memory_bytes=20 * GIB, activation_peak_bytes=0, tensor_parallel_size=2
        )
    )
    assert again.starts and again.kv_bytes_per_token == 65_536
    assert [(r.flag, r.starts, r.num_blocks) for r in parallel] == [
        ("--tensor-parallel-size 2", True, again.num_blocks)
    ]


def test_nothing_to_offer_where_it_starts_or_another_reason_refuses() -> None:
    assert start_remedies(plan_vllm(_request(max_model_len=8192))) == ()
    beyond = plan_vllm(
        _request(
            max_model_len=32768, geometry=replace(get_preset("llama-3-8b"), max_position_embeddings=8192)
        )
    )
    # a request of 32,768 tokens would not fit either, but vLLM refuses the length first: no memory remedy
    assert beyond.refusals and beyond.needed_bytes > beyond.check_bytes and start_remedies(beyond) == ()


def test_kv_cache_memory_bytes_names_vllm_s_flag() -> None:
    result = plan_vllm(_request(kv_cache_memory_bytes=512 * MIB, max_model_len=8192))
    memory = [remedy for remedy in start_remedies(result) if remedy.flag.startswith("--kv-cache-memory")]
    # one request of 8,192 tokens (512 blocks) and the null block
    assert [(r.flag, r.starts, r.num_blocks) for r in memory] == [
        (f"--kv-cache-memory-bytes {513 * BLOCK}", True, 513)
    ]


def test_the_command_prints_and_returns_them(capsys: pytest.CaptureFixture[str]) -> None:
    command = PlanCommand()
    parser = argparse.ArgumentParser(prog="kvtrace plan")
    command.add_arguments(parser)
    argv = ["--engine", "vllm", "--preset", "llama-3-8b", "--kv-cache-memory", "512MiB", "--json"]
    status = command.run(parser.parse_args(argv))
    payload = json.loads(capsys.readouterr().out)
    assert status == 1 and payload["starts"] is False
    flags = [remedy["flag"] for remedy in payload["start_remedies"]]
    assert flags == ["--max-model-len 4080", "--kv-cache-dtype fp8", f"--kv-cache-memory-bytes {513 * BLOCK}"]
    assert {"starts", "num_blocks", "max_model_len", "text"} <= payload["start_remedies"][0].keys()


def test_each_remedys_flag_typed_into_plan_plans_that_remedy(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a plan vLLM refuses (8,192-token requests, 512 blocks each, in 512 MiB) and its remedies, whose
    # flags are `vllm serve`'s; --kv-cache-memory-bytes was no flag of plan's ("unrecognized arguments")
    from kvtrace.cli import main

    argv = ["plan", "--engine", "vllm", "--preset", "llama-3-8b", "--max-model-len", "8192", "--json"]
    assert main([*argv, "--kv-cache-memory", "512MiB"]) == 1
    remedies = json.loads(capsys.readouterr().out)["start_remedies"]
    assert [remedy["flag"].split()[0] for remedy in remedies] == [
        "--max-model-len",
        "--kv-cache-dtype",
        "--kv-cache-memory-bytes",
    ]

    for remedy in remedies:
        # WHEN its flag is typed into the same plan (a later flag wins over the same setting's earlier one)
        again = [*argv, "--kv-cache-memory", "512MiB", *remedy["flag"].split()]
        status = main(again)
        payload = json.loads(capsys.readouterr().out)

        # THEN the plan is the remedy's: its blocks, and whether it starts (513 blocks: 8,192 tokens and the
        # null block, 513 x 2 MiB)
        assert (status == 0, payload["starts"], payload["num_blocks"]) == (
            remedy["starts"],
            remedy["starts"],
            remedy["num_blocks"],
        )
    assert remedies[2]["flag"] == f"--kv-cache-memory-bytes {513 * BLOCK}" and remedies[2]["starts"]


def test_the_l4_example_of_docs_vllm_analysis_is_the_plans(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN docs/vllm-analysis.md's example, Llama 3.1 8B on an L4 at vLLM's default length (131,072)
    from pathlib import Path

    from kvtrace.cli import main

    doc = (Path(__file__).resolve().parents[2] / "docs" / "vllm-analysis.md").read_text()
    assert "`kvtrace plan --engine vllm --preset llama-3.1-8b --gpu-memory L4`" in doc
    # the L4's nvidia-smi total less the driver's 512 MiB, at vLLM's 0.92; bf16 weights, 8,030,261,248
    # parameters on one GPU, and a tensor-parallel rank's 8,030,527,488 B (the vocabulary padded and split)
    utilized = math.ceil((23_034 - 512) * MIB * 0.92)
    # an fp8 pool: 1 MiB blocks of 16 tokens; the longest length fits in the blocks less the null block
    fp8_blocks = (utilized - 8_030_261_248 * 2) // MIB
    longest = (fp8_blocks - 1) * 16
    # tensor_parallel_size 2: 4 KV heads a rank, 1 MiB a block in bf16
    tp2_blocks = (utilized - 8_030_527_488) // MIB
    assert (longest, tp2_blocks) == (86_432, 13_061)
    # WHEN planned THEN the plan says those figures, and so does the doc
    assert main(["plan", "--engine", "vllm", "--preset", "llama-3.1-8b", "--gpu-memory", "L4"]) == 1
    text = capsys.readouterr().out
    assert f"still refused, the longest max_model_len {longest:,}" in text
    assert f"{tp2_blocks:,} blocks, one request of 131,072 tokens needs 8.00 GiB" in text
    flat = " ".join(doc.split())
    assert (
        f'still refused, the longest max_model_len {longest:,}", "[starts] --tensor-parallel-size 2: ...'
        in flat
    )
    assert f'2: ... {tp2_blocks:,} blocks")' in flat
