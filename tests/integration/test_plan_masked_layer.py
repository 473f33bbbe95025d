"""`kvtrace plan --config` of a model whose sliding layers come before its full ones puts sdpa's masked moment
in its last sliding layer: unpadded, only a sliding layer takes a mask (a full one runs `is_causal`), so
that moment holds the KV of the layers up to it and its own input, not the last layer's. Before, it was
always priced in the last layer: the tiny Gemma 3 below (a sliding layer 0, a full layer 1, 2 rows of a
198-token prompt) was planned 15,792 B over its recording, its layer 0's mask, expanded K and V beside both
layers' KV and layer 1's input, where the recording peaked at layer 1's MLP; at 400 tokens its layer 0's
sdpa is the peak, holding layer 0's KV alone, and the plan put a layer's KV and a hidden state more there
(409,600 B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from analyzers.units import human_bytes
from tests.cli_json import cli_json, report_json
from tests.tiny import record_generate

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 2, 64, 128, 4, 2, 16, 16
BATCH, NEW = 2, 2
FP32 = 4
SCALARS = 64  # what the recording holds beside the plan's tensors: a few scalars (48 B measured)
# torch's CPU flash kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): queries split by 64 from a
# 192-token prompt, the keys by 512
QUERY_SPLIT = 64


def _recorded_and_planned(
    folder: Path, prompt: int, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tiny Gemma 3 of a sliding layer 0 and a full layer 1, recorded on this CPU at `prompt` tokens, and
    its config planned at the run's shape, no reserve."""
    config = transformers.Gemma3TextConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=1000, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    config.save_pretrained(folder / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    record_generate(model, folder / "run", BATCH, prompt, NEW)
    report = report_json(folder / "run", capsys)
    argv = ["plan", "--config", str(folder / "config"), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(prompt + NEW), "--prompt", str(prompt), "--reserve", "0", "--json"]
    return report, cli_json([*argv, *shape], capsys)


def _held(prompt: int) -> int:
    """Across the layers: the embeddings, two pairs of rotary cos and sin, the positions, the window's bool
    mask over the prompt."""
    rows = BATCH * prompt
    return rows * (HIDDEN + 2 * 2 * HEAD_DIM) * FP32 + rows * 16 + prompt * prompt


def _masked(prompt: int) -> int:
    """A masked sdpa's own tensors: the mask in float32 for every row, the rotated q and the output, K and V
    expanded to the 4 heads, the log-sum-exp."""
    rows = BATCH * prompt
    return BATCH * prompt * prompt * FP32 + 4 * rows * HEADS * HEAD_DIM * FP32 + BATCH * HEADS * prompt * FP32


def test_a_full_last_layer_takes_no_mask_so_its_mlp_is_the_peak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the Gemma 3 recorded at 198 tokens, its config planned at that shape
    prompt = 198
    rows = BATCH * prompt
    report, planned = _recorded_and_planned(tmp_path, prompt, capsys)
    # THEN its prefill peaks at layer 1's MLP: its input, residual and normed input, the MLP's three tensors
    # (layer 0's masked sdpa, with its normed input and layer 0's KV alone, holds less than that with both's)
    mlp = rows * (3 * HIDDEN + 3 * INTER) * FP32
    assert planned["prefill_activations_bytes"] == _held(prompt) + mlp
    one_layer_kv = rows * 2 * KV_HEADS * HEAD_DIM * FP32
    assert rows * HIDDEN * FP32 + _masked(prompt) < mlp + one_layer_kv
    # AND the plan is the recording's peak, every layer's KV, within a few scalars (before: 15,792 B over,
    # its mask moment priced in layer 1)
    assert report["categories_at_peak"]["kv"] == planned["kv_at_peak_bytes"] == LAYERS * one_layer_kv
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS


def test_the_sliding_layer_0_masked_moment_holds_its_own_kv_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the Gemma 3 recorded at 400 tokens, where its sliding layer's masked sdpa outweighs the MLP
    prompt = 400
    rows = BATCH * prompt
    report, planned = _recorded_and_planned(tmp_path, prompt, capsys)
    # THEN the plan's prefill peaks in layer 0: its normed input (the embeddings are its input) beside the
    # masked sdpa's tensors, and layer 0's prompt KV alone, layer 1 not yet run
    assert planned["prefill_activations_bytes"] == _held(prompt) + rows * HIDDEN * FP32 + _masked(prompt)
    one_layer_kv = rows * 2 * KV_HEADS * HEAD_DIM * FP32
    assert report["categories_at_peak"]["kv"] == planned["kv_at_peak_bytes"] == one_layer_kv
    # AND its note names that layer, and prices the CPU flash kernel's blocks a thread: 64 queries x (400
    # keys + max + sum + 16 output)
    thread = QUERY_SPLIT * (prompt + 2 + HEAD_DIM) * FP32
    (note,) = [n for n in planned["notes"] if n.startswith("prefill activations:")]
    assert "Its last sliding layer's sdpa (layer 0 of 2) holds its mask" in note
    assert f"holds {human_bytes(thread)} ({thread:,} B) more for each of its threads beside" in note
    # AND with this CPU's threads' blocks, the plan is the recording within a few scalars (before: the plan
    # put layer 1's KV and input beside the mask, 409,552 B over with the blocks)
    beside = report["peak_allocated_bytes"] - planned["peak_bytes"] - torch.get_num_threads() * thread
    assert 0 <= beside <= SCALARS, (report["peak_allocated_bytes"], planned["peak_bytes"], thread)
