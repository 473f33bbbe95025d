"""`kvtrace diagnose`'s shorter prompt, where the prefill peaks before its last KV layer writes: a Gemma 3
whose layers 0 to 2 slide (window 8) and whose last layer keeps every token peaks at layer 2's masked sdpa,
when 3 of its 4 layers hold the prompt. A prompt token cut frees those 3 layers' KV there, not 4.

Before, it priced a token at all 4 layers' KV (4.00 KiB): "A prompt of 6 tokens instead of 11 ... lowers the
run's peak by 55.36 KiB", where the recording of that prompt peaked 2,568 B above what it said.
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

BATCH, PROMPT, NEW, KV_HEADS, HEAD_DIM, LAYERS, FP32 = 2, 11, 6, 2, 32, 4, 4
# one layer's K and V of one token of both rows: 1,024 B
LAYER_TOKEN = 2 * BATCH * KV_HEADS * HEAD_DIM * FP32


def _record(run: Path, prompt: int) -> None:
    """The Gemma 3 (fp32, seed 0, sdpa) generating NEW tokens after BATCH rows of `prompt` tokens."""
    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=256, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 200, (BATCH, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


def test_a_shorter_prompt_frees_the_kv_of_the_layers_the_prefill_had_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run, which peaks inside its prefill with the prompt in layers 0 to 2 alone
    _record(tmp_path / "run", PROMPT)
    diagnosis = _json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
    assert (diagnosis["step_phase"], diagnosis["kv_layers_live"]) == ("prefill", 3)
    assert diagnosis["kv_bytes"] == 3 * PROMPT * LAYER_TOKEN
    # WHEN it prices a shorter prompt
    prompt = next(r for r in diagnosis["remedies"] if r["kind"] == "prompt")
    # THEN a token cut frees 3 layers' K and V of both rows there, 3 x 1,024 B
    assert "3.00 KiB of KV across the batch (the 3 of 4 KV layers the step had reached)" in prompt["sentence"]
    # AND the run of the prompt it proposes peaks no higher than it says
    shorter = prompt["setting"]
    assert isinstance(shorter, int) and shorter < PROMPT
    _record(tmp_path / "shorter", shorter)
    report = _json(["report", str(tmp_path / "shorter"), "--json", "--no-export", "-q"], capsys)
    assert report["categories_at_peak"]["kv"] == 3 * shorter * LAYER_TOKEN
    assert report["peak_allocated_bytes"] <= diagnosis["allocated_bytes"] - prompt["saved_bytes"]
