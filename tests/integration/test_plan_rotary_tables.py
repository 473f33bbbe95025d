"""`kvtrace plan --config` of a Gemma 3 counts a rotary cos and sin for each kind of layer its prefill holds:
Gemma3TextModel keeps a RoPE table for its sliding layers and one for its full ones, and computes
`position_embeddings[layer_type]` of each before its layers run. Before, the plan counted one pair, as a
Llama's: the tiny Gemma 3 below (a sliding and a full layer, 2 rows of a 98-token prompt) was planned
25,136 B under its recording, 25,088 B of them the second pair (2 x 196 tokens x 16 x 4 B)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tests.cli_json import cli_json, report_json
from tests.tiny import record_generate

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 2, 64, 128, 4, 2, 16, 16
BATCH, PROMPT, NEW = 2, 98, 2
ROWS = BATCH * PROMPT
FP32 = 4
SCALARS = 64  # what the recording holds beside the plan's tensors: a few scalars (48 B measured)


def test_a_gemma_3_prefill_holds_a_rotary_pair_for_each_kind_of_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny Gemma 3 of a sliding and a full layer, its prompt longer than its window, recorded
    config = transformers.Gemma3TextConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=1000, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    config.save_pretrained(tmp_path / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW)
    report = report_json(tmp_path / "run", capsys)
    # WHEN its config is planned at the run's shape, no reserve
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(PROMPT + NEW), "--prompt", str(PROMPT), "--reserve", "0", "--json"]
    planned = cli_json([*argv, *shape], capsys)
    # THEN its prefill holds, across the layers, the embeddings, two pairs of rotary cos and sin (the
    # sliding layers' and the full layers'), the positions and the sliding layer's bool mask over the prompt;
    # in the last layer its input, residual and normed input and the MLP's three tensors
    held = ROWS * (HIDDEN + 2 * 2 * HEAD_DIM) * FP32 + ROWS * 16 + PROMPT * PROMPT
    mlp = ROWS * (3 * HIDDEN + 3 * INTER) * FP32
    assert planned["prefill_activations_bytes"] == held + mlp
    assert planned["request"]["geometry"]["rotary_tables"] == 2
    # AND the plan is the recording's peak, its prefill, within a few scalars (before: 25,136 B under)
    assert report["categories_at_peak"]["kv"] == planned["kv_at_peak_bytes"]
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS
