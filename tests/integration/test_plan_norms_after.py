"""`kvtrace plan --config` of a model whose layers norm their attention's and MLP's outputs, not their inputs
(OLMo 2 and 3, EXAONE 4: `post_attention_layernorm` and `post_feedforward_layernorm`, no
`input_layernorm`): the attention and the MLP take the residual stream itself, so the prefill holds no
normed input beside it. Before, the plan counted one, a Llama's: the tiny OLMo 3 below (2 rows of a
98-token prompt) was planned 50,136 B over its recording, a hidden state of R x 64 float32 (50,176 B) less
the recording's scalars."""

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
SCALARS = 64  # what the recording holds beside the plan's tensors: a few scalars (32 to 40 B measured)
SHAPE = {
    "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": 1000,
}  # fmt: skip
SLIDING = {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}
# (config, rotary cos and sin pairs, whether a sliding layer's bool mask is held across the layers)
MODELS = {
    "olmo3": (lambda: transformers.Olmo3Config(**SHAPE, **SLIDING), 2, True),
    "olmo2": (lambda: transformers.Olmo2Config(**SHAPE), 1, False),
    "exaone4": (lambda: transformers.Exaone4Config(**SHAPE, **SLIDING), 1, True),
}


@pytest.mark.parametrize("family", list(MODELS))
def test_a_layer_norming_its_outputs_holds_no_normed_input(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny model of the family, recorded on this CPU
    make, tables, window_mask = MODELS[family]
    config = make()
    config.save_pretrained(tmp_path / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW)
    report = report_json(tmp_path / "run", capsys)
    # WHEN its config is planned at the run's shape, no reserve
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(PROMPT + NEW), "--prompt", str(PROMPT), "--reserve", "0", "--json"]
    planned = cli_json([*argv, *shape], capsys)
    # THEN its prefill peaks at the last layer's MLP: across the layers the embeddings, the rotary cos and
    # sin, the positions and a window's bool mask; in the layer its input and the residual the MLP takes (no
    # normed input), and the MLP's three tensors
    held = (
        ROWS * (HIDDEN + tables * 2 * HEAD_DIM) * FP32 + ROWS * 16 + (PROMPT * PROMPT if window_mask else 0)
    )
    mlp = ROWS * (2 * HIDDEN + 3 * INTER) * FP32
    assert planned["prefill_activations_bytes"] == held + mlp
    (note,) = [n for n in planned["notes"] if n.startswith("prefill activations:")]
    assert "beside 3 hidden states of R x 64 (the embeddings, the layer's input and its residual)" in note
    # AND the plan is the recording's peak within a few scalars (before: a hidden state, 50,176 B, over)
    assert report["categories_at_peak"]["kv"] == planned["kv_at_peak_bytes"]
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS
