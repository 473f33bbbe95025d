"""A transformers StaticCache given to generate() with room for more tokens than the run writes.

Its storages are [batch, kv_heads, max_cache_len, head_dim], allocated at its first update for the batch it
is given and written in place: its bytes follow max_cache_len and the rows, not the tokens written. So the
report's bytes per token divide by its slots (max_cache_len x rows), which is the arithmetic figure, and
`diagnose` prices a shorter context as a smaller max_cache_len (a shorter prompt frees nothing), and an int4
or fp8 QuantizedCache, which grows with the tokens, at the run's end against the whole buffer it would
replace. Every figure is arithmetic: layers x (K, V) x
kv_heads x head_dim x positions x rows x 4 bytes (float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import StaticCache

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, cache_arg, tiny_size

LAYERS, KV_HEADS, ROWS, PROMPT, NEW_TOKENS, MAX_CACHE_LEN = 3, 2, 2, 7, 9, 64
SLOT = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # bytes of one position of one row, every layer's K and V
ELEMENTS = SLOT // 4 * ROWS  # KV values of one position, every row and layer
WRITTEN = PROMPT + NEW_TOKENS - 1  # the last token generated is not written back
# transformers' QuantizedCache at the run's end: the prompt in int4 (a scale and a zero-point in float32 per
# 64 values), the tokens after it in float32 until residual_length=128 are due
INT4_AT_THE_END = PROMPT * (ELEMENTS // 2 + ELEMENTS // 64 * 2 * 4) + (WRITTEN - PROMPT) * ELEMENTS * 4


@pytest.fixture(scope="module")
def static_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = torch.randint(3, 1000, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=MAX_CACHE_LEN)
    run = tmp_path_factory.mktemp("static") / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_arg(cache),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    held = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == SLOT * MAX_CACHE_LEN * ROWS  # the cache as transformers holds it
    return run


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_its_bytes_per_token_are_over_its_slots(static_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kv = _json(["report", str(static_run), "--no-export"], capsys)["kv"]
    whole = SLOT * MAX_CACHE_LEN * ROWS
    assert (kv["final_bytes"], kv["peak_bytes"]) == (whole, whole)
    assert (kv["capacity_of"], kv["capacity_tokens"], kv["capacity_rows"]) == ("static_cache", 64, ROWS)
    # the last token generated is not written back
    assert (kv["tokens_held"], kv["batch"]) == (PROMPT + NEW_TOKENS - 1, ROWS)
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == SLOT

    assert main(["report", str(static_run), "--no-export"]) == 0
    text = capsys.readouterr().out
    assert f"the StaticCache's {MAX_CACHE_LEN} positions x {ROWS} rows (max_cache_len x batch)" in text


def test_diagnose_prices_a_shorter_context_as_a_smaller_max_cache_len(
    static_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    diagnosis = _json(["diagnose", str(static_run)], capsys)
    remedies = {(r["kind"], r["setting"]): r for r in diagnosis["remedies"]}
    whole = SLOT * MAX_CACHE_LEN * ROWS
    written = PROMPT + NEW_TOKENS - 1  # the most tokens a row of the run wrote: the smallest that still runs
    # max_cache_len cut to what the run wrote frees the positions beyond it, every row and layer
    context = remedies[("context", written)]
    assert context["saved_bytes"] == SLOT * ROWS * (MAX_CACHE_LEN - written)
    idle = "A shorter context frees no KV: the StaticCache holds max_cache_len=64 positions"
    assert idle in context["sentence"]
    assert f"max_cache_len={written} instead of 64" in context["sentence"]
    assert remedies[("sliding_window", written)]["saved_bytes"] == context["saved_bytes"]
    # a row dropped frees its share, as for any cache: the StaticCache is made for the batch it is given
    assert remedies[("batch", ROWS - 1)]["saved_bytes"] == whole // ROWS
    # int4 replaces the whole buffer, which the StaticCache holds from its first update (the moment is the
    # prefill, its allocation); a QuantizedCache grows, so it is priced at the run's end, holding every
    # token written: the 7 of the prompt in int4 (a scale and a zero-point in float32 per 64 elements), the
    # 8 after it in float32 until residual_length=128 are due
    assert remedies[("quantized_kv", 4)]["saved_bytes"] == whole - INT4_AT_THE_END
    # AND fp8 (QuantizedCache's fp8 backend: a byte a value, every token) too, at the run's end
    assert remedies[("quantized_kv", 8)]["saved_bytes"] == whole - ELEMENTS * written


def test_diagnose_says_an_int4_cache_does_not_fit_where_the_prompt_alone_would(
    static_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a budget whose shortfall the int4 cache of the prompt alone (the moment's 7 tokens) would cover,
    # but not the int4 cache the run ends with
    whole = SLOT * MAX_CACHE_LEN * ROWS
    prompt_only = PROMPT * (ELEMENTS // 2 + ELEMENTS // 64 * 2 * 4)
    allocated = _json(["diagnose", str(static_run)], capsys)["allocated_bytes"]
    need = (whole - INT4_AT_THE_END + whole - prompt_only) // 2
    # WHEN it is diagnosed under it
    diagnosis = _json(["diagnose", str(static_run), "--budget", f"{allocated - need}B"], capsys)
    assert diagnosis["shortfall_bytes"] == need
    # THEN int4 does not fit, and says it holds every token written by the run's end
    (int4,) = [r for r in diagnosis["remedies"] if (r["kind"], r["setting"]) == ("quantized_kv", 4)]
    assert (int4["saved_bytes"], int4["fits"]) == (whole - INT4_AT_THE_END, False)
    assert f"by the run's end it holds its {WRITTEN} tokens in " in int4["sentence"]
