"""`kvtrace plan --config` estimates the prefill's activations of Phi-3 and GLM as their layers hold them, not
as a Llama's: a fused `gate_up_proj` keeps its output (2 x R x intermediate_size) beside the activation and
the product, a fused `qkv_proj` keeps its output until the attention returns, and GLM's rotary cos and sin
turn half of each head. Checked against the recorder on tiny random-weight models whose prefill is the peak.

Before, both were planned as Llamas: the Phi-3 and GLM below (2 rows of a 500-token prompt, a 1,024-wide MLP,
fp32) were planned 4,096,000 B under their recordings (one R x 1,024 tensor), GLM's cos and sin 64,000 B
over; a Phi-3 whose layers slide was planned as the Mistral of its shape, 102,400 B under its recording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.cli_json import cli_json, report_json
from tests.tiny import record_generate

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 64, 4, 2, 16, 1000
BATCH, NEW = 2, 2
FP32 = 4
POSITIONS = 16  # generate()'s two int64 position tensors, a row and token
# How much more a recording holds at its prefill than the plan: a few scalars (40 B measured)
SCALARS = 64
_SHAPE = {
    "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
    "max_position_embeddings": 1024, "pad_token_id": 0,
}  # fmt: skip


def _record_and_plan(
    config: Any, folder: Path, prompt: int, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`config`'s model (fp32, sdpa, seed 0) recorded generating NEW tokens after BATCH rows of `prompt`
    tokens, and its config planned at that shape with no reserve: the report's JSON and the plan's."""
    config.save_pretrained(folder / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.config._attn_implementation == "sdpa"
    record_generate(model, folder / "run", BATCH, prompt, NEW)
    argv = ["plan", "--config", str(folder / "config"), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(prompt + NEW), "--prompt", str(prompt), "--reserve", "0", "--json"]
    return report_json(folder / "run", capsys), cli_json([*argv, *shape], capsys)


@pytest.mark.parametrize(
    ("make", "rotary_dim"),
    [
        (lambda inter: transformers.Phi3Config(**_SHAPE, intermediate_size=inter), HEAD_DIM),
        (lambda inter: transformers.GlmConfig(**_SHAPE, intermediate_size=inter), HEAD_DIM // 2),
        (lambda inter: transformers.Glm4Config(**_SHAPE, intermediate_size=inter), HEAD_DIM // 2),
    ],
    ids=["phi3", "glm", "glm4"],
)
def test_a_fused_gate_up_mlp_holds_four_intermediate_tensors_at_the_prefill(
    make: Any, rotary_dim: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 2 rows of a 500-token prompt through a 1,024-wide MLP, which makes the last layer's MLP the peak
    inter, prompt = 1024, 500
    rows = BATCH * prompt
    report, plan = _record_and_plan(make(inter), tmp_path, prompt, capsys)
    # THEN the plan's activations are the arithmetic: the fused gate and up projection's output (2 x R x
    # 1,024), the gate's activation and the product (R x 1,024 each); the embeddings, the layer's input, its
    # residual and the normed input (4 x R x 64); the rotary cos and sin, R x the part of a head RoPE turns
    # (GLM's half: 8), and the position ids
    activations = rows * ((4 * inter + 4 * HIDDEN + 2 * rotary_dim) * FP32 + POSITIONS)
    assert plan["prefill_activations_bytes"] == activations
    # AND within a few scalars of what the recording held beside its weights and the prompt's KV
    at_peak = report["categories_at_peak"]
    assert at_peak["kv"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32 * rows
    assert 0 <= at_peak["other"] - activations <= SCALARS
    assert plan["peak_bytes"] == at_peak["weights"] + at_peak["kv"] + activations


def test_a_fused_qkv_projection_is_held_through_a_masked_attention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Phi-3 and Mistral of one shape, every layer sliding at 8 tokens, a narrow MLP (64), 2 rows of a
    # 100-token prompt: the peak is the last layer's sdpa, under the window's mask
    inter, prompt, window = 64, 100, 8
    rows = BATCH * prompt
    shape = {**_SHAPE, "intermediate_size": inter, "sliding_window": window}
    phi3, phi3_plan = _record_and_plan(transformers.Phi3Config(**shape), tmp_path / "phi3", prompt, capsys)
    mistral, mistral_plan = _record_and_plan(
        transformers.MistralConfig(**shape), tmp_path / "mistral", prompt, capsys
    )
    # THEN Phi-3 holds its fused projection of q, k and v there, R x (4 + 2 x 2) x 16, where Mistral's
    # separate projections are gone: in the plan and in the recordings alike
    qkv = rows * (HEADS + 2 * KV_HEADS) * HEAD_DIM * FP32
    assert phi3_plan["prefill_activations_bytes"] - mistral_plan["prefill_activations_bytes"] == qkv
    assert phi3["categories_at_peak"]["other"] - mistral["categories_at_peak"]["other"] == qkv
    assert phi3["categories_at_peak"]["weights"] == mistral["categories_at_peak"]["weights"]
