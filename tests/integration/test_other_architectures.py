"""Decoder models other than Llama: their configs name the KV geometry differently (GPT-2's `n_layer`,
Falcon's `multi_query`, Qwen2-MoE's `sliding_window: 0`, Qwen3-Next's linear-attention layers). The
configs here are made and saved by transformers itself; the figures are the arithmetic
layers-with-KV x 2 x KV heads x head_dim x 4 bytes (fp32) per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import kvtrace
from kvtrace.cli import main


def _plan_per_token(config: Any, folder: Path, capsys: pytest.CaptureFixture[str]) -> int:
    config.save_pretrained(folder)
    argv = ["plan", "--config", str(folder), "--dtype", "fp32", "--context", "100", "--gpu-memory", "1GiB"]
    argv.append("--json")
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["kv_bytes"] == 100 * data["kv_bytes_per_token"]
    return int(data["kv_bytes_per_token"])


@pytest.mark.parametrize(
    ("make", "per_token"),
    [
        (lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256), 2 * 2 * 4 * 16 * 4),
        (
            lambda: transformers.GPTBigCodeConfig(
                n_embd=64, n_layer=2, n_head=4, vocab_size=256, multi_query=True
            ),
            2 * 2 * 1 * 16 * 4,
        ),
        (
            lambda: transformers.FalconConfig(
                hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=256, multi_query=True
            ),
            4 * 2 * 1 * 16 * 4,
        ),
        (
            lambda: transformers.Qwen2MoeConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=32,
            ),
            4 * 2 * 2 * 16 * 4,
        ),
        (
            lambda: transformers.Qwen3NextConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=256, full_attention_interval=2, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            ),
            2 * 2 * 2 * 32 * 4,  # 2 of its 4 layers are full attention; linear attention holds no KV
        ),
    ],
    ids=["gpt2", "gpt-bigcode-mqa", "falcon-mqa", "qwen2-moe-window-0", "qwen3-next-linear-layers"],
)  # fmt: skip
def test_plan_reads_the_kv_geometry_of_configs_transformers_writes(
    make: Any, per_token: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _plan_per_token(make(), tmp_path / "config", capsys) == per_token


def _record_generate(model: Any, run: Path) -> Any:
    """Greedy generate() of 6 tokens after an 11-token prompt, recorded into `run` (output and cache)."""
    prompt = torch.randint(3, 200, (1, 11))
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        return model.generate(
            prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True,
        )  # fmt: skip


def test_a_multi_query_falcon_run_has_one_kv_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a multi-query Falcon (4 query heads sharing 1 KV head) generating 6 tokens after 11
    config = transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=256, multi_query=True
    )
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).eval()
    run = tmp_path / "run"
    out = _record_generate(model, run)
    held = out.past_key_values.layers[0].keys
    assert held.shape[1] == 1
    # THEN the geometry and the arithmetic say 1 KV head, as the tensors do
    assert json.loads((run / "manifest.json").read_text())["model"]["num_kv_heads"] == 1
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert kv["bytes_per_token_expected"] == 4 * 2 * 1 * 16 * 4
    assert kv["final_bytes"] == 4 * 2 * 1 * 16 * 4 * 16  # 16 tokens held: 11 + 6 - 1


def _diagnose_remedies(
    model: Any, run: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, dict[str, Any]]:
    _record_generate(model, run)
    assert main(["diagnose", str(run), "--json"]) == 0
    return {r["kind"]: r for r in json.loads(capsys.readouterr().out)["remedies"]}


def test_diagnose_prices_a_shorter_context_by_the_layers_that_keep_every_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Gemma 2: layers 0 and 2 slide (window 8: they hold 7 tokens), layers 1 and 3 keep all 16
    config = transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=48, sliding_window=8, vocab_size=256, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    remedies = _diagnose_remedies(transformers.Gemma2ForCausalLM(config).eval(), tmp_path / "run", capsys)
    # THEN a context of 12 instead of 16 frees 4 tokens of the two global layers: 4 x 2 x 2 x 2 x 48 x 4 B
    context = remedies["context"]
    assert context["setting"] == 12 and context["saved_bytes"] == 4 * 2 * 2 * 2 * 48 * 4


def test_diagnose_prices_a_token_of_window_by_the_arithmetic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Mistral with a window of 8 on every layer (7 tokens visible, 8 slots per storage)
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, vocab_size=256, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    remedies = _diagnose_remedies(transformers.MistralForCausalLM(config).eval(), tmp_path / "run", capsys)
    # THEN a window one token shorter frees one token of every layer: 4 x 2 x 2 x 16 x 4 B
    window = remedies["sliding_window"]
    assert window["setting"] == 6 and window["saved_bytes"] == 4 * 2 * 2 * 16 * 4
    assert remedies["context"]["saved_bytes"] == 0


@pytest.mark.parametrize(
    ("make", "kv_bytes", "capped"),
    [
        (
            lambda: transformers.MistralConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=8, vocab_size=256,
            ),
            4 * 8 * (2 * 2 * 16 * 4),  # every layer keeps its window of 8
            True,
        ),
        (
            lambda: transformers.Gemma2Config(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=48, sliding_window=8, vocab_size=256,
            ),
            (2 * 40 + 2 * 8) * (2 * 2 * 48 * 4),  # 2 global layers keep all 40 tokens, 2 sliding ones 8
            False,
        ),
    ],
    ids=["mistral-all-sliding", "gemma2-hybrid"],
)  # fmt: skip
def test_plan_keeps_the_models_own_windows(
    make: Any, kv_bytes: int, capped: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make().save_pretrained(tmp_path / "config")
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--context", "40", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data["kv_bytes"] == kv_bytes
    assert (data["max_context"] is None) == capped  # a cache that only slides never outgrows its window


def test_the_arithmetic_of_a_latent_attention_cache_follows_its_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN DeepSeek-V3 (multi-head latent attention): its cache holds one K of kv_lora_rank + ... width and
    # one V of its own width per layer, not num_key_value_heads x head_dim of each
    config = transformers.DeepseekV3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=256, q_lora_rank=None, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    run = tmp_path / "run"
    out = _record_generate(model, run)
    layers = out.past_key_values.layers
    per_token = sum(
        (layer.keys.shape[1] * layer.keys.shape[3] + layer.values.shape[1] * layer.values.shape[3]) * 4
        for layer in layers
    )
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN the arithmetic is the tensors' widths, and the measured figure agrees with it
    assert kv["bytes_per_token_expected"] == per_token == kv["bytes_per_token_measured"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.MixtralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, num_local_experts=4,
        ),
        lambda: transformers.Qwen2MoeConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, num_experts=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, decoder_sparse_step=2,
        ),
        lambda: transformers.Qwen3MoeConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=4, moe_intermediate_size=32,
            num_experts_per_tok=2, mlp_only_layers=[0],
        ),
        lambda: transformers.DeepseekV3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
            moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
        ),
    ],
    ids=["mixtral", "qwen2-moe-sparse-step", "qwen3-moe-dense-first", "deepseek-v3-latent"],
)  # fmt: skip
def test_plan_weighs_every_expert_and_latent_projection(
    make: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a mixture-of-experts config (and DeepSeek's latent attention) as transformers saves it
    config = make()
    model = transformers.AutoModelForCausalLM.from_config(config)
    cache = transformers.DynamicCache(config=config)
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 5)), past_key_values=cache, use_cache=True)
    config.save_pretrained(tmp_path / "config")
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--context", "5", "--json"]
    # WHEN it is planned
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    # THEN the weights are the model's own parameters, every expert resident, and the KV what its cache holds
    assert data["weights_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert data["kv_bytes"] == 4 * held
