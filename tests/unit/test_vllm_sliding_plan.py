"""vLLM's KV arithmetic for layers that slide, worked out by hand from vllm 0.32's code:

* `SlidingWindowSpec.max_admission_blocks_per_request`: cdiv(min(window - 1 + in_flight, max_model_len),
  block_size) + 1 blocks, in_flight = max_num_batched_tokens x (2 under async scheduling, else 1);
* `FullAttentionSpec`: cdiv(max_model_len, block_size);
* `_get_kv_cache_groups_uniform_page_size` (hybrid): groups of the smaller kind's count of layers (the
  larger's when under 1.5 times it), a block one page of each layer of a group;
* the start check compares one request with the KV memory less one block (the null block); the estimate is
  the bisection's largest length that fits; concurrency = blocks / blocks one request holds.

The tiny Mistral: 4 layers, 2 KV heads of 64, bf16, window 64: a page of 32 tokens is 2 x 32 x 2 x 64 x 2
= 16 KiB, a block of all layers 64 KiB, 16 of them in 1 MiB, 15 beside the null block (983,040 B)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from analyzers.planning.presets import ModelGeometry
from analyzers.planning.vllm_diagnose import RefusedDiagnosis, diagnose_engine
from analyzers.planning.vllm_plan import VllmPlanRequest, plan_vllm
from analyzers.readers.engine_files import read_engine
from analyzers.render.vllm_diagnosis import vllm_diagnosis_to_text
from analyzers.render.vllm_plan import format_vllm_text
from kvtrace.cli import main
from tests.engine_files import refused_engine, write_engine_run

MIB = 2**20
PAGE = 2 * 32 * 2 * 64 * 2  # one layer, one block of 32 tokens
MISTRAL = ModelGeometry("tiny-mistral", 4, 4, 2, 64, 256, 512, 1000, False, sliding_window=64)


def _sliding(window: int, block: int, in_flight: int, max_len: int) -> int:
    return math.ceil(min(window - 1 + in_flight, max_len) / block) + 1


def _request(**fields: object) -> VllmPlanRequest:
    base: dict[str, object] = {
        "geometry": MISTRAL,
        "kv_cache_memory_bytes": MIB,
        "block_size": 32,
        "max_model_len": 1024,
        "device": "cpu",
    }
    return VllmPlanRequest(**{**base, **fields})  # type: ignore[arg-type]


def test_every_layer_sliding_holds_the_window_and_the_batch() -> None:
    # GIVEN the tiny Mistral on CPU with max_num_batched_tokens 128: 63 + 128 tokens, 7 blocks a request
    result = plan_vllm(_request(max_num_batched_tokens=128))
    assert _sliding(64, 32, 128, 1024) == 7
    # THEN vLLM's own log: 16 blocks, "KV cache size: 2,340 tokens", 2.29x (full attention: 512, 0.50x)
    assert result.num_blocks == MIB // (4 * PAGE) == 16
    assert result.blocks_per_request == 7 and result.needed_bytes == 7 * 4 * PAGE
    assert result.max_concurrency == pytest.approx(16 / 7)
    assert result.kv_tokens == int(16 / 7 * 1024) == 2340
    assert result.starts and result.estimated_max_model_len is None
    assert result.kv_groups.kind == "sliding" and result.max_in_flight_tokens == 128
    text = format_vllm_text(result)
    assert "2,340 tokens" in text and "2.29x" in text and "would refuse" not in text


def test_a_sliding_start_refused_estimates_as_vllm() -> None:
    # GIVEN max_num_batched_tokens 512: 63 + 512 = 575 tokens, 19 blocks of 64 KiB = 1,245,184 B
    result = plan_vllm(_request(max_num_batched_tokens=512))
    assert result.needed_bytes == _sliding(64, 32, 512, 1024) * 4 * PAGE == 1_245_184
    assert result.check_bytes == MIB - 4 * PAGE == 983_040
    # THEN vLLM refuses and estimates 448: 15 blocks hold cdiv(L, 32) + 1 <= 15, L <= 448 (not 480)
    assert not result.starts and result.estimated_max_model_len == 448


def test_async_scheduling_keeps_two_batches_in_flight() -> None:
    # GIVEN a GPU (async scheduling, vLLM's default there) and max_num_batched_tokens 128
    on = plan_vllm(_request(max_num_batched_tokens=128, device="cuda"))
    off = plan_vllm(_request(max_num_batched_tokens=128, device="cuda", async_scheduling=False))
    # THEN 63 + 256 tokens: 11 blocks a request; without it, 7
    assert on.max_in_flight_tokens == 256 and on.blocks_per_request == _sliding(64, 32, 256, 1024) == 11
    assert off.blocks_per_request == 7


def test_vllms_default_batch_can_make_a_window_cost_a_block_more() -> None:
    # GIVEN no max_num_batched_tokens on an 80 GiB GPU: vLLM 0.32's LLM() default 16384, two in flight
    result = plan_vllm(_request(device="cuda"))
    # THEN the window is capped by max_model_len and one block is added: 33 blocks, full attention's 32 + 1
    assert result.max_num_batched_tokens == 16384 and result.max_in_flight_tokens == 32768
    assert result.blocks_per_request == 1024 // 32 + 1 == 33
    assert any("16,384" in note and "default" in note for note in result.notes)
    # on CPU, 4096 a rank, one in flight: still past max_model_len
    assert plan_vllm(_request()).max_num_batched_tokens == 4096
    # a GPU under 70 GiB: 8192
    assert plan_vllm(_request(device="cuda", gpu_memory_bytes=24 * 2**30)).max_num_batched_tokens == 8192


@pytest.mark.parametrize(
    ("layers", "sliding", "size", "full_groups", "sliding_groups"),
    [
        (6, 5, 1, 1, 5),  # Gemma 3's 5:1: one layer a group
        (25, 12, 13, 1, 1),  # gpt-oss-20b + eagle's 12 sw + 13 full: 13 a group, one padding layer
        (12, 8, 4, 1, 2),  # 4 full and 8 sliding
    ],
)
def test_a_hybrid_model_is_grouped_as_vllms_hybrid_manager(
    layers: int, sliding: int, size: int, full_groups: int, sliding_groups: int
) -> None:
    geometry = replace(MISTRAL, num_layers=layers, sliding_layers=sliding)
    result = plan_vllm(
        _request(geometry=geometry, kv_cache_memory_bytes=64 * MIB, max_num_batched_tokens=128)
    )
    groups = result.kv_groups
    assert (groups.kind, groups.layers_per_group) == ("hybrid", size)
    assert (groups.full_groups, groups.sliding_groups) == (full_groups, sliding_groups)
    assert result.bytes_per_block == size * PAGE
    per_request = full_groups * (1024 // 32) + sliding_groups * 7
    assert result.blocks_per_request == per_request
    assert result.num_blocks == 64 * MIB // (size * PAGE)
    assert result.max_concurrency == pytest.approx(result.num_blocks / per_request)


def test_sliding_layers_of_another_width_are_counted_as_full() -> None:
    # GIVEN Gemma 4's shape: full layers of their own head_dim, pages of two sizes vLLM groups otherwise
    geometry = replace(MISTRAL, sliding_layers=3, global_head_dim=128)
    result = plan_vllm(_request(geometry=geometry, max_num_batched_tokens=128))
    assert result.kv_groups.kind == "full" and result.blocks_per_request == 32
    assert any("not modelled" in note for note in result.notes)


def test_plan_cli_takes_the_batch_and_async_scheduling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 1000,
        "max_position_embeddings": 4096,
        "sliding_window": 64,
    }
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    argv = [
        "plan",
        "--engine",
        "vllm",
        "--config",
        str(tmp_path / "config.json"),
        "--kv-cache-memory",
        "1MiB",
    ]
    argv += ["--block-size", "32", "--max-model-len", "1024", "--max-num-batched-tokens", "128"]
    assert main([*argv, "--no-async-scheduling", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["num_blocks"], data["blocks_per_request"], data["kv_tokens"]) == (16, 7, 2340)
    assert data["kv_groups"]["window"] == 64
    # with async scheduling (a GPU's default): 11 blocks a request, still fits
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks_per_request"] == 11


def _refused_mistral(tmp_path: Path, recorded_window: bool) -> RefusedDiagnosis:
    """The tester's refused start (max_num_batched_tokens 512, on CPU), with vLLM's own figures."""
    engine = refused_engine(
        max_model_len=1024, needed_bytes=1_245_184, available_bytes=983_040, estimated_max_model_len=448
    )
    engine["model"].update(num_attention_heads=4)
    if recorded_window:
        engine["model"].update(sliding_window=64, sliding_layers=4)
    engine["config"].update(
        max_model_len=1024, block_size=32, max_num_batched_tokens=512, max_num_seqs=4, async_scheduling=False
    )
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine, steps=[], requests=[]))
    assert run is not None
    d = diagnose_engine(run)
    assert isinstance(d, RefusedDiagnosis)
    return d


@pytest.mark.parametrize("recorded_window", [True, False])
def test_a_refused_sliding_start_is_diagnosed_with_vllms_figures(
    tmp_path: Path, recorded_window: bool
) -> None:
    d = _refused_mistral(tmp_path, recorded_window)
    # THEN the headline is vLLM's: 19 blocks, 1,245,184 B, short by 256 KiB, largest 448
    assert (d.needed_bytes, d.needed_blocks, d.bytes_per_block) == (1_245_184, 19, 4 * PAGE)
    assert d.needed_bytes - d.available_bytes == 262_144
    assert d.estimated_max_model_len == 448
    remedies = {r.knob: r for r in d.remedies}
    assert (remedies["max_model_len"].setting, remedies["max_model_len"].fits) == (448, True)
    # one request and the null block: (19 + 1) x 64 KiB
    assert remedies["kv_cache_memory_bytes"].setting == 20 * 4 * PAGE == 1_310_720
    # fp8: 19 blocks of 32 KiB = 608 KiB beside 1 MiB - 32 KiB
    assert remedies["kv_cache_dtype"].fits is True
    assert (remedies["tensor_parallel_size"].setting, remedies["tensor_parallel_size"].fits) == (2, True)
    text = vllm_diagnosis_to_text(d)
    assert "1.19 MiB" in text and "256.00 KiB" in text and "480" not in text


def test_a_refused_sliding_start_prices_a_smaller_batch(tmp_path: Path) -> None:
    d = _refused_mistral(tmp_path, recorded_window=True)
    remedy = {r.knob: r for r in d.remedies}["max_num_batched_tokens"]
    # 15 blocks beside the null block: cdiv(63 + m, 32) + 1 <= 15, so 63 + m <= 448: m = 385
    assert _sliding(64, 32, 385, 1024) == 15 and _sliding(64, 32, 386, 1024) == 16
    assert (remedy.setting, remedy.fits) == (385, True)
    assert not d.notes or all("vLLM reported" not in note for note in d.notes)
