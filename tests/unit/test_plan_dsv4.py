"""`kvtrace plan --config` of DeepSeek-V4's config.json: its cache as transformers 5.25 holds it
(DeepseekV4HCACache / DeepseekV4CSACache), each figure from the layer arithmetic by hand. A tiny recorded
run checks the same planner against the storages a real cache holds (tests/integration/
test_aux_cache_state.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from kvtrace.geometry import installed_transformers_version

# DeepSeek-V4's shape: 43 layers, one K = V head of 512, a 128-token window, CSA every 4 tokens with indexer
# keys of 128, HCA every 128; no layer_types, so DeepseekV4Config's rule: HCA, HCA, then HCA and CSA
# alternating (CSA on the odd ones of the other 41: 20 CSA, 23 HCA)
V4_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "sliding_window": 128,
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    "index_head_dim": 128, "index_n_heads": 64, "q_lora_rank": 1024, "o_lora_rank": 1024, "o_groups": 8,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 6,
    "torch_dtype": "bfloat16",
}  # fmt: skip
CSA, HCA, HEAD, INDEX, WINDOW, BF16, F32 = 20, 23, 512, 128, 128, 2, 4
# The overlap gate's bytes an element as the installed transformers keeps it (a plan of a config is laid
# out as it): float32 (5.25), the model's bf16 before (5.17)
GATE = F32 if (installed_transformers_version() or (5, 25)) >= (5, 25) else BF16


def _plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, Any], *args: str) -> Any:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    main(["plan", "--config", str(path), "--json", *args])
    return json.loads(capsys.readouterr().out)


def test_plan_counts_v4_window_once_and_its_compressed_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN DeepSeek-V4 at batch 1, a 1,000-token prompt and a context of 131,072 (131,071 tokens written)
    plan = _plan(tmp_path, capsys, V4_CONFIG, "--batch", "1", "--context", "131072", "--prompt", "1000")
    written = 131071
    # THEN the window is one K = V head of the last 128 tokens a layer (was K and V apart, 127 tokens:
    # 43 x 2 x 127 x 512 x 2 B = 11,182,592 B in all, the KV per token 88,064 B)
    window = 43 * WINDOW * HEAD * BF16
    # AND every CSA layer holds written // 4 entries of 512 and as many indexer keys of 128, every HCA layer
    # written // 128 entries
    entries = (CSA * (written // 4) + HCA * (written // 128)) * HEAD * BF16
    indexer = CSA * (written // 4) * INDEX * BF16
    # AND the compressor's pending tokens (kv and gate; CSA's two series of 512 and of 128: 131,071 % 4 = 3
    # tokens, HCA's 131,071 % 128 = 127) and CSA's overlap state (4 tokens of 512 + 128, kv bf16, gate fp32)
    pending = CSA * 3 * 2 * 2 * (HEAD + INDEX) * BF16 + HCA * 127 * 2 * HEAD * BF16
    overlap = CSA * 4 * (HEAD + INDEX) * (BF16 + GATE)
    assert plan["kv_parts"] == {
        "window": window,
        "compressed_entries": entries,
        "indexer_keys": indexer,
        "compressor_state": pending + overlap,
    }
    assert plan["kv_bytes"] == window + entries + indexer + pending + overlap
    # AND a token adds (512 + 128) / 4 elements a CSA layer and 512 / 128 an HCA one
    assert plan["kv_bytes_per_token"] == (CSA * (HEAD + INDEX) // 4 + HCA * HEAD // 128) * BF16 == 6584
    # AND after the prefill, its window and compressor projections hold the whole prompt in every layer
    prompt = 1000
    prefill = (
        43 * prompt * HEAD
        + (CSA * (prompt // 4) + HCA * (prompt // 128)) * HEAD
        + CSA * (prompt // 4) * INDEX
        + CSA * prompt * 2 * 2 * (HEAD + INDEX)
        + HCA * prompt * 2 * HEAD
    ) * BF16 + overlap
    assert plan["kv_prefill_bytes"] == prefill
    # AND a longer context always costs more: no context is "any"
    assert plan["max_context"] is not None


@pytest.mark.parametrize("cache", [["--cache", "static"], ["--cache", "quantized"], ["--window", "8"]])
def test_plan_refuses_caches_v4_does_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cache: list[str]
) -> None:
    # GIVEN DeepSeek-V4, whose compressor needs its own cache layers (a StaticCache's have no
    # store_compression_weights) WHEN another cache is planned THEN it is refused, not planned as K and V
    path = tmp_path / "config.json"
    path.write_text(json.dumps(V4_CONFIG))
    args = ["--cache", "sliding", *cache] if cache[0] == "--window" else cache
    assert main(["plan", "--config", str(path), *args]) == 2
    assert "DeepSeek-V4" in capsys.readouterr().err


def test_plan_reads_v4_layer_kinds_from_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN V4 configs of 3 layers: listed layer_types, and the legacy per-layer compress_ratios (0: sliding)
    small = {**V4_CONFIG, "num_hidden_layers": 3}
    listed = {
        **small,
        "layer_types": ["sliding_attention", "compressed_sparse_attention", "sliding_attention"],
    }
    legacy = {**small, "compress_ratios": [0, 4, 0]}
    at = ("--batch", "2", "--context", "1001", "--prompt", "500")
    # WHEN planned THEN a sliding layer holds its own K and V (a DynamicSlidingWindowLayer's), and only the
    # CSA layer grows: 250 entries of 512 + 128 for the 1,000 tokens written, two rows
    for config in (listed, legacy):
        parts = _plan(tmp_path, capsys, config, *at)["kv_parts"]
        assert parts["window"] == 2 * (2 * 2 + 1) * WINDOW * HEAD * BF16
        assert parts["compressed_entries"] == 2 * 250 * HEAD * BF16
        assert parts["indexer_keys"] == 2 * 250 * INDEX * BF16
