"""A config planned as the transformers that runs it lays it out: 5.25 (the newest kvtrace knows, and what a
plan with no version assumes) or 5.17 (kvtrace's GPU users), where the two differ. Each figure is arithmetic
on the config; tests/integration (test_aux_cache_state, test_plan_families, test_other_architectures) checks
the same against the real models under 5.17."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from analyzers.planning.compressed_kv import compressed_sizes
from analyzers.planning.hf_config import geometry_from_config
from kvtrace.cli import main

OLD, NEW = (5, 17), (5, 25)
_DSA: dict[str, Any] = {
    "model_type": "deepseek_v32", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12,
    "head_dim": 8, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
}  # fmt: skip
_GLM4_MOE: dict[str, Any] = {
    "model_type": "glm4_moe", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
}  # fmt: skip
_DSV4: dict[str, Any] = {
    "model_type": "deepseek_v4", "vocab_size": 1000, "hidden_size": 64, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
    "q_lora_rank": 16, "num_experts_per_tok": 2, "n_routed_experts": 4, "sliding_window": 4,
    "index_head_dim": 16,
    "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
    "layer_types": ["heavily_compressed_attention"] * 3 + ["compressed_sparse_attention"],
}  # fmt: skip
_GPTJ: dict[str, Any] = {
    "model_type": "gptj", "vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
    "rotary_dim": 8,
}  # fmt: skip


def _geometry(tmp_path: Path, config: dict[str, Any], version: tuple[int, int] | None) -> Any:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return geometry_from_config(path, version)


def test_dsa_caches_the_latent_in_5_25_and_each_heads_k_and_v_in_5_17(tmp_path: Path) -> None:
    # 5.25 (and no version named): the latent (16) with the indexer key (16) as K, the rotary key (8) as V
    assert _geometry(tmp_path, _DSA, NEW).kv_widths == (16 + 16, 8)
    assert _geometry(tmp_path, _DSA, None).kv_widths == (16 + 16, 8)
    # 5.17: each of the 4 heads' K (nope 16 + rope 8) with the indexer key, and V (12): 160 elements a layer
    assert _geometry(tmp_path, _DSA, OLD).kv_widths == (4 * (16 + 8) + 16, 4 * 12)
    # ... and 5.17's own name for the layers, deepseek_sparse_attention, still counts the indexer keys
    listed = {**_DSA, "layer_types": ["deepseek_sparse_attention"] * 4}
    assert _geometry(tmp_path, listed, OLD).kv_widths == (4 * (16 + 8) + 16, 4 * 12)


def test_dsv4_overlap_gate_is_float32_in_5_25_and_the_models_dtype_in_5_17(tmp_path: Path) -> None:
    # GIVEN the CSA layer's overlap state after 47 tokens at bf16, batch 2: 2 tokens (rate 2) of the
    # compressor's 32 and the indexer's 16, kv and gate
    def state(version: tuple[int, int]) -> int:
        geom = _geometry(tmp_path, _DSV4, version)
        assert geom.compressed is not None
        sizes = compressed_sizes(geom.compressed, 32, 4, batch=2, prompt=7, new=41, dtype="bf16")
        return dict(sizes.parts)["compressor_state"]

    # THEN 5.25's gate is 4 B an element, 5.17's 2: 2 rows x 2 tokens x 48 x 2 B apart (384 B)
    assert state(NEW) - state(OLD) == 2 * 2 * (32 + 16) * (4 - 2) == 384


def test_routers_are_float32_in_5_25_and_in_the_models_dtype_in_5_17(tmp_path: Path) -> None:
    # GLM-4-MoE's one MoE layer's router, 4 experts x 64: float32 parameters in 5.25, none apart in 5.17
    assert _geometry(tmp_path, _GLM4_MOE, NEW).fp32_parameters == 4 * 64
    assert _geometry(tmp_path, _GLM4_MOE, OLD).fp32_parameters == 0
    # ERNIE 4.5's stays float32 in both (with its score correction)
    ernie = {
        "model_type": "ernie4_5_moe", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "moe_num_experts": 4,
        "moe_intermediate_size": 32, "moe_k": 2, "moe_layer_start_index": 0,
    }  # fmt: skip
    assert (
        _geometry(tmp_path, ernie, OLD).fp32_parameters == _geometry(tmp_path, ernie, NEW).fp32_parameters > 0
    )


def test_gptj_shares_one_sinusoidal_table_in_5_25_and_keeps_one_a_layer_in_5_17(tmp_path: Path) -> None:
    table = 128 * 8  # n_positions x rotary_dim, float32
    new = _geometry(tmp_path, _GPTJ, NEW).fp32_buffer_elements
    assert _geometry(tmp_path, _GPTJ, OLD).fp32_buffer_elements - new == table  # a second layer's own


def _plan(tmp_path: Path, capsys: Any, config: dict[str, Any], *flags: str) -> dict[str, Any]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["plan", "--config", str(path), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("typed", ["5.17", "5.17.0"])
def test_plan_transformers_names_the_release_whatever_is_installed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], typed: str
) -> None:
    # GIVEN a laptop's transformers (5.25 in the main venv) and a GPU box that runs 5.17
    # WHEN the DSA model is planned for each release (bf16)
    old = _plan(tmp_path, capsys, _DSA, "--transformers", typed)
    new = _plan(tmp_path, capsys, _DSA, "--transformers", "5.25")
    # THEN a token costs each release's cache in its 4 layers: 5.17 each of the 4 heads' K (16 + 8) and V
    # (12) with the indexer key (16), 5.25 the latent (16), indexer key (16) and rotary key (8)
    assert old["kv_bytes_per_token"] == 4 * (4 * (16 + 8) + 4 * 12 + 16) * 2 == 1280
    assert new["kv_bytes_per_token"] == 4 * (16 + 16 + 8) * 2 == 320
    # AND the plan says which release's layout it used
    assert (old["request"]["transformers_layout"], new["request"]["transformers_layout"]) == ("5.17", "5.25")
    path = tmp_path / "config.json"
    assert main(["plan", "--config", str(path), "--transformers", typed]) == 0
    assert re.search(r"^  layout +transformers 5\.17$", capsys.readouterr().out, re.MULTILINE)
    # AND without the flag, the installed release's (its metadata's major.minor)
    installed = ".".join(version("transformers").split(".")[:2])
    assert _plan(tmp_path, capsys, _DSA)["request"]["transformers_layout"] == installed


def test_plan_transformers_weighs_routers_as_the_release_builds_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GLM-4-MoE at bf16: 5.25 keeps its one MoE layer's router (4 experts x 64) in float32, 5.17 in bf16
    old = _plan(tmp_path, capsys, _GLM4_MOE, "--transformers", "5.17")
    new = _plan(tmp_path, capsys, _GLM4_MOE, "--transformers", "5.25")
    assert new["weights_bytes"] - old["weights_bytes"] == 4 * 64 * (4 - 2) == 512


@pytest.mark.parametrize("typed", ["five", "5", "5.17.x", ""])
def test_plan_refuses_a_transformers_that_names_no_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], typed: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_DSA))
    assert main(["plan", "--config", str(path), "--transformers", typed]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"kvtrace plan: error: --transformers {typed!r}: not a transformers release; give one as 5.17 or "
        "5.17.0\n"
    )
    # AND vLLM lays its pool out its own way: the flag is refused there
    assert main(["plan", "--engine", "vllm", "--config", str(path), "--transformers", "5.17"]) == 2
    assert "--transformers lays out transformers' caches" in capsys.readouterr().err
