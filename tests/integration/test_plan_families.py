"""Families the planner once weighed as Llamas (GLM, GLM-4, GLM-4-MoE and its Lite, SmolLM3, Ministral,
InternLM3, HunYuan, dots1, ERNIE 4.5, DBRX): their weights are the model transformers builds from the
config, and their KV what its cache holds, where a published config.json leaves out what the family's
config class fills in (GLM's 128-wide heads, Ministral's window, dots1's full layers below
`max_window_layers`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from kvtrace.cli import main
from tests.hf_versions import needs_internlm3
from tests.tiny import cache_arg, plan_weighs_as_built

_LLAMA = {
    "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "head_dim": 16,
}  # fmt: skip
_DEEPSEEK_MOE = {
    "n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
}  # fmt: skip
_LATENT = {
    "q_lora_rank": 24, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
}  # fmt: skip
_ERNIE_MOE = {"moe_num_experts": 4, "moe_intermediate_size": 32, "moe_k": 2, "moe_num_shared_experts": 1}
_DBRX = {
    "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256, "max_seq_len": 128,
    "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
    "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
}  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        # GLM and GLM-4: a fused gate-up MLP, q, k and v biased by default; GLM-4 two norms more a layer
        transformers.GlmConfig(**_LLAMA, pad_token_id=0),
        transformers.Glm4Config(**_LLAMA, pad_token_id=0),
        transformers.Glm4Config(**_LLAMA, pad_token_id=0, attention_bias=False),
        # SmolLM3, InternLM3: Llama's layout with `attention_bias` and `mlp_bias`; Ministral: Llama's
        transformers.SmolLM3Config(**_LLAMA, pad_token_id=0, attention_bias=True, mlp_bias=True),
        pytest.param(
            transformers.InternLM3Config(**_LLAMA, attention_bias=True, mlp_bias=True)
            if hasattr(transformers, "InternLM3Config")
            else None,
            marks=needs_internlm3,
        ),
        transformers.MinistralConfig(**_LLAMA),
        # HunYuan: q and k RMSNorms of head_dim; its MoE a shared MLP, a float32 router every layer
        transformers.HunYuanDenseV1Config(**_LLAMA, attention_bias=True),
        transformers.HunYuanMoEV1Config(**_LLAMA, num_experts=4, moe_topk=2),
        # dots1, GLM-4-MoE (and its latent-attention Lite): DeepSeek-V3's experts, float32 router and
        # score correction; dots1's q and k norms, GLM-4-MoE's when asked and its q, k and v biases
        transformers.Dots1Config(**_LLAMA, **_DEEPSEEK_MOE, attention_bias=True),
        transformers.Glm4MoeConfig(**_LLAMA, **_DEEPSEEK_MOE, attention_bias=True, use_qk_norm=True),
        transformers.Glm4MoeLiteConfig(
            **{**_LLAMA, "num_key_value_heads": 4}, **_DEEPSEEK_MOE, **_LATENT, attention_bias=True
        ),
        # ERNIE 4.5: `use_bias` on every projection (the MoE's lm_head too); its experts from
        # moe_layer_start_index, every moe_layer_interval-th, a float32 router and score correction
        transformers.Ernie4_5Config(**_LLAMA, use_bias=True),
        transformers.Ernie4_5_MoeConfig(**_LLAMA, **_ERNIE_MOE, use_bias=True),
        transformers.Ernie4_5_MoeConfig(
            **{**_LLAMA, "num_hidden_layers": 4}, **_ERNIE_MOE, moe_layer_interval=2, moe_layer_start_index=0
        ),
        # DBRX: its widths in attn_config and ffn_config, a fused qkv, experts every layer
        transformers.DbrxConfig(**_DBRX),
    ],
    ids=[
        "glm", "glm4", "glm4-no-attention-bias", "smollm3-biases", "internlm3-biases", "ministral",
        "hunyuan-dense-attention-bias", "hunyuan-moe", "dots1-attention-bias", "glm4-moe-qk-norm-bias",
        "glm4-moe-lite-attention-bias", "ernie4_5-bias", "ernie4_5-moe-bias", "ernie4_5-moe-interval", "dbrx",
    ],
)  # fmt: skip
def test_plan_weighs_these_families_as_transformers_builds_them(
    config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a config as transformers saves it, and the model it builds from it in fp32 and in bf16
    # WHEN it is planned in that dtype
    # THEN the weights are every distinct storage of its parameters and buffers, each at its own dtype
    # (routers and score corrections float32 in bf16 too), and the plan does not call them an estimate
    plan_weighs_as_built(config, tmp_path / "config", capsys)


_PUBLISHED = {k: v for k, v in _LLAMA.items() if k != "head_dim"}  # heads 16 wide by hidden_size / heads


@pytest.mark.parametrize(
    "raw",
    [
        # GlmConfig, Glm4Config, InternLM3Config, Ernie4_5Config: head_dim 128 when a config leaves it out
        {"model_type": "glm", **_PUBLISHED, "pad_token_id": 0},
        {"model_type": "glm4", **_PUBLISHED, "pad_token_id": 0},
        pytest.param({"model_type": "internlm3", **_PUBLISHED}, marks=needs_internlm3),
        {"model_type": "ernie4_5", **_PUBLISHED},
        # MinistralConfig: every layer slides over a window of 4096 when a config leaves it out
        {"model_type": "ministral", **_LLAMA},
        # Dots1Config: only the layers from max_window_layers on slide
        {"model_type": "dots1", **_LLAMA, **_DEEPSEEK_MOE, "sliding_window": 8, "max_window_layers": 1},
        # MistralConfig, Gemma2Config, Gemma3TextConfig, Cohere2Config, Exaone4Config, GptOssConfig: a
        # window (4096; gpt-oss's 128) when a config leaves it out, on the layers each family slides
        {"model_type": "mistral", **_LLAMA},
        {"model_type": "gemma2", **_LLAMA},
        {"model_type": "gemma3_text", **_LLAMA},
        {"model_type": "cohere2", **_LLAMA},
        {"model_type": "exaone4", **_LLAMA},
    ],
    ids=[
        "glm", "glm4", "internlm3", "ernie4_5", "ministral-window", "dots1-layer-types", "mistral-window",
        "gemma2-window", "gemma3-window", "cohere2-window", "exaone4-window",
    ],
)  # fmt: skip
def test_plan_holds_the_kv_of_a_config_that_leaves_out_its_familys_defaults(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers.cache_utils import get_layer_types_and_kwargs

    # GIVEN a published-style config.json without the keys its config class fills in, read as
    # from_pretrained reads it, and the cache its model fills on a 5-token prompt
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_config(config)
    cache = transformers.DynamicCache(config=config)
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 5)), **cache_arg(cache), use_cache=True)
    # WHEN it is planned at a context of 6 (the prompt and one new token, never written)
    argv = ["plan", "--config", str(tmp_path), "--dtype", "fp32", "--context", "6", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its KV is what the cache holds: 2 layers x K and V x 5 tokens x 2 heads x head_dim x 4 B
    held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    head_dim = config.head_dim or 64 // 4
    assert planned["kv_bytes"] == sum(t.nbytes for t in held) == 2 * 2 * 5 * 2 * head_dim * 4
    # ... and the layers keeping only a window, and that window, are those its caches are built with
    from analyzers.planning.hf_config import geometry_from_config

    types, per_layer = get_layer_types_and_kwargs(config)
    if isinstance(per_layer, dict):  # the oracle is each layer's kwargs, which older releases do not give
        why = f"transformers {transformers.__version__} gives one kwargs dict for all layers, not each one's"
        pytest.skip(why)
    windows = [kwargs.get("sliding_window") for kwargs in per_layer]
    geom = geometry_from_config(tmp_path)
    slides = geom.layer_slides or (True,) * geom.layers_with_kv
    assert [geom.sliding_window is not None and slide for slide in slides] == [bool(w) for w in windows]
    assert {window for window in windows if window} <= {geom.sliding_window}
    assert len(types) == 2
