"""Assisted decoding (`assistant_model=`): the assistant's draft cache sits beside the model's, and
transformers builds it without the model's cache_implementation or cache_config (candidate_generator sets
the assistant's to None; its config has its own sliding_window). So a window, a quantized or an offloaded
cache is priced on the model's cache alone, the draft cache held besides it, while a shorter context
shrinks both (the assistant holds the same sequence).

Every figure is the arithmetic: a token of a tiny Llama's KV is 4 layers x 2 (K, V) x 2 KV heads x 16 x
4 bytes (fp32) = 1 KiB, 256 B a layer; both models are tiny Llamas, so the draft cache's token is too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model

LAYER_TOKEN = 2 * 2 * 16 * 4  # one layer's K and V of a token: 256 B
TOKEN = 4 * LAYER_TOKEN  # 1 KiB
PROMPT, NEW = 9, 8
SHORT = 17 * TOKEN + 85  # the shortfall the budget leaves: more than the model's cache's fp8 saving


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


def test_remedies_on_the_models_cache_leave_the_assistants_draft_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny Llama 3 generating 8 tokens after a 9-token prompt with a tiny Llama assistant
    torch.manual_seed(0)
    model, assistant = build_model("tiny"), build_model("tiny", seed=1)
    ids = torch.tensor([list(range(1, PROMPT + 1))])
    run = tmp_path / "run"
    with kvtrace.record(run, model=model, profiler=False):
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
            pad_token_id=0, eos_token_id=None, assistant_model=assistant,
        )  # fmt: skip
    peak = _json(["diagnose", str(run), "--json"], capsys)["allocated_bytes"]

    # WHEN it is diagnosed against a budget SHORT below its peak
    d = _json(["diagnose", str(run), "--budget", f"{peak - SHORT}B", "--json"], capsys)

    # THEN the KV at the peak is both caches': the model's 16 tokens (prompt + 8 new, less the last) with a
    # 2-token copy of its first layer (the growth's torch.cat), and the draft cache's 15 tokens
    assert d["shortfall_bytes"] == SHORT
    by_cache: dict[int, int] = {}
    for row in d["top_layers"]:
        by_cache[row["cache"]] = by_cache.get(row["cache"], 0) + row["kv_bytes"]
    model_kv, draft_kv = 16 * TOKEN + 2 * TOKEN, 15 * TOKEN
    assert sorted(by_cache.values()) == [draft_kv, model_kv]
    assert d["kv_bytes"] == model_kv + draft_kv
    remedies = {(r["kind"], r["setting"]): r for r in d["remedies"]}

    # AND fp8 saves three quarters of the model's cache alone (32 -> 8 bits of its 18 KiB) less the float32
    # scale the fp8 cache keeps for each of its 4 layers' K and V: short
    fp8 = remedies[("quantized_kv", 8)]
    assert fp8["saved_bytes"] == model_kv * 3 // 4 - 4 * 2 * 4 < SHORT
    assert fp8["fits"] is False
    assert "of the 18.00 KiB the model's cache holds at 32 bits" in fp8["sentence"]
    assert "The other 15.00 KiB of KV at this moment is in other caches" in fp8["sentence"]

    # AND no window fits: even 2 tokens (the smallest a sliding cache slides at) leave the model's cache its
    # 10-token first forward (the prompt and the draft token verified with it) on every layer until its first
    # decode step, plus the new window of its first layer, and the draft cache as it is
    window = remedies[("sliding_window", 2)]
    window_peak = 10 * TOKEN + 2 * LAYER_TOKEN
    assert window["saved_bytes"] == model_kv + draft_kv - window_peak - draft_kv < SHORT
    assert window["fits"] is False
    assert window["sentence"].startswith("No sliding window fits, even of 2 tokens")
    assert "with the 15.00 KiB of KV in other caches" in window["sentence"]

    # AND a shorter context shrinks both caches, a token costing 1 KiB in each: 9 tokens fewer would cover
    # it, but the moment holds 7 new tokens beside the 9-token prompt (before: "A context of 8 tokens",
    # shorter than the prompt), so none fits
    context = remedies[("context", None)]
    assert (context["saved_bytes"], context["fits"]) == (7 * 2 * TOKEN, False)
    shortest = "even 10 tokens (the 9-token prompt and one new token) instead of 17 (prompt + new tokens, as "
    assert shortest in context["sentence"]
    price = "frees only 14.00 KiB of KV (2.00 KiB per token across the batch; 1.00 KiB of it in the assistant"
    assert price in context["sentence"]
