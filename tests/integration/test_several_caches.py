"""Two cache objects alive at once (an assistant model's draft cache, two generate() outputs still held):
each cache's layers are its own rows, and the bytes per token divide a cache's bytes by its own tokens."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

import kvtrace
from kvtrace.cli import main
from kvtrace.format import read_run
from kvtrace.llama import build_model
from tests.integration.kvlog_math import assert_addresses_freed_before_reuse, kv_bytes
from tests.tiny import HEAD_DIM, tiny_size

LAYERS, DRAFT_LAYERS, KV_HEADS, PROMPT, NEW_TOKENS = 4, 2, 2, 12, 10
FP32 = 4
PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32  # 1024 B per position and row: the arithmetic


def _storage_bytes(cache: Any) -> int:
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _caches_in_log(run: Path) -> dict[int, set[int]]:
    """cache id -> the layers it logged, counted from the raw log."""
    layers: dict[int, set[int]] = {}
    for event in read_run(run).kv_events:
        layers.setdefault(event.cache, set()).add(event.layer)
    return layers


def test_an_assistant_models_cache_is_not_summed_into_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN assisted generation: the recorded model (4 layers) and a draft model with a cache of its own
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    draft = build_model(tiny_size(DRAFT_LAYERS, KV_HEADS), seed=1)
    draft.generation_config.num_assistant_tokens = 5
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            assistant_model=draft,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
        )
    cache = out.past_key_values
    tokens = cache.get_seq_length()
    logged = _caches_in_log(run)
    (model_cache,) = [c for c, layers in logged.items() if layers == set(range(LAYERS))]
    (draft_cache,) = [c for c, layers in logged.items() if layers == set(range(DRAFT_LAYERS))]

    # WHEN it is reported
    kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]

    # THEN each cache's layers are rows of their own, the model's with its cache object's storages
    rows = {(row["cache"], row["layer"]): row for row in kv["per_layer"]}
    slots = {(model_cache, i) for i in range(LAYERS)} | {(draft_cache, i) for i in range(DRAFT_LAYERS)}
    assert set(rows) == slots
    for i, layer in enumerate(cache.layers):
        row = rows[(model_cache, i)]
        assert (row["k_bytes"], row["v_bytes"]) == (
            layer.keys.untyped_storage().nbytes(),
            layer.values.untyped_storage().nbytes(),
        )
        assert row["tokens"] == tokens
    # AND tokens held and bytes per token are the model's cache's alone: its bytes over its own tokens
    assert (kv["main_cache"], kv["tokens_held"], kv["batch"]) == (model_cache, tokens, 1)
    assert kv["bytes_per_token_measured"] == _storage_bytes(cache) / tokens
    assert kv["bytes_per_token_expected"] == PER_TOKEN
    by_id = {c["cache"]: c for c in kv["caches"]}
    assert by_id[model_cache]["final_bytes"] == _storage_bytes(cache) and by_id[model_cache]["main"]
    draft_rows = [rows[(draft_cache, i)] for i in range(DRAFT_LAYERS)]
    draft_bytes = sum(row["k_bytes"] + row["v_bytes"] for row in draft_rows)
    assert by_id[draft_cache]["final_bytes"] == draft_bytes and not by_id[draft_cache]["main"]
    assert kv["final_bytes"] == _storage_bytes(cache) + draft_bytes  # the device holds both
    notes = _cli_json(["report", str(run), "--no-export"], capsys)["notes"]
    assert any("2 KV caches were held at the end" in note for note in notes)

    # AND the terminal table has a cache column, and the HTML names each cache's layers
    assert main(["report", str(run), "--no-export"]) == 0
    text = capsys.readouterr().out
    assert "cache layer      K bytes" in text
    assert f"of cache {model_cache})" in text
    page = tmp_path / "report.html"
    assert main(["report", str(run), "-o", str(page)]) == 0
    capsys.readouterr()
    html = page.read_text()
    assert f"cache {model_cache} (main)" in html and f"cache {draft_cache} L0" in html

    # AND diagnose prices a token of context at the model's cache's figure, per cache and layer
    diagnosis = _cli_json(["diagnose", str(run)], capsys)
    # the model's cache's tokens at the end of the diagnosed step, from the raw log
    held = [
        e.tokens
        for e in read_run(run).kv_events
        if e.cache == model_cache and e.part == "data" and e.event != "freed" and e.step <= diagnosis["step"]
    ][-1]
    assert diagnosis["tokens_held"] == held
    (context,) = [r for r in diagnosis["remedies"] if r["kind"] == "context"]
    cut = max(held // 4, 1)
    assert context["saved_bytes"] == round(_storage_bytes(cache) / tokens * cut)
    assert {row["cache"] for row in diagnosis["top_layers"]} == {model_cache, draft_cache}


def test_two_generate_outputs_held_are_two_caches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN two generate() calls whose outputs (and caches) are both held when the block ends
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    run = tmp_path / "run"
    kwargs: dict[str, Any] = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True}
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        first = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        second = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    caches = (first.past_key_values, second.past_key_values)
    tokens = PROMPT + 5 - 1  # the last generated token is never written back

    # WHEN it is reported
    kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]

    # THEN both caches are held, each with its own rows, and a token costs the arithmetic, not twice it
    assert [c.get_seq_length() for c in caches] == [tokens, tokens]
    assert kv["final_bytes"] == sum(_storage_bytes(c) for c in caches)
    assert len(kv["per_layer"]) == 2 * LAYERS and len({row["cache"] for row in kv["per_layer"]}) == 2
    assert all(row["tokens"] == tokens for row in kv["per_layer"])
    assert kv["tokens_held"] == tokens and kv["batch"] == 1
    assert kv["bytes_per_token_measured"] == _storage_bytes(caches[1]) / tokens == PER_TOKEN
    assert [c["bytes_per_token_measured"] for c in kv["caches"]] == [PER_TOKEN, PER_TOKEN]
    assert kv_bytes(KV_HEADS, HEAD_DIM, tokens, 1, FP32) == kv["per_layer"][0]["k_bytes"]


@pytest.mark.parametrize("profiler", [False, True], ids=["light", "full"])
def test_a_cache_dropped_before_a_reused_caches_next_call_is_freed_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], profiler: bool
) -> None:
    # GIVEN a chat's cache reused by a later generate() call (its next turn), and a call in between that
    # made its own cache (3 rows) and dropped it: the allocator may give its storages' addresses to the
    # chat's prefill, or not, so the old log order overstated the peak by a different amount each run
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)

    def prompt(rows: int, tokens: int, seed: int) -> torch.Tensor:
        return torch.randint(3, 1000, (rows, tokens), generator=torch.Generator().manual_seed(seed))

    kwargs: dict[str, Any] = {"max_new_tokens": 2, "min_new_tokens": 2, "do_sample": False}

    def k_or_v(tokens: int, rows: int) -> int:
        return kv_bytes(KV_HEADS, HEAD_DIM, tokens, rows, FP32)

    # The other call's last growth (30 -> 31 positions), at the last layer's V copy, the chat (21) held
    other_peak = 2 * LAYERS * k_or_v(21, 1) + 2 * LAYERS * k_or_v(31, 3) + k_or_v(30, 3)
    # The next turn's last growth (60 -> 61), the other call's cache gone
    turn_peak = 2 * LAYERS * k_or_v(61, 1) + k_or_v(60, 1)
    assert other_peak > turn_peak

    for attempt in range(3):  # stable, whichever addresses the allocator hands out
        run = tmp_path / f"run{attempt}"
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
            chat = DynamicCache()
            first = model.generate(prompt(1, 20, 1), cache=chat, **kwargs)  # chat: 21 positions
            other = model.generate(prompt(3, 30, 2), return_dict_in_generate=True, **kwargs)
            dropped = weakref.ref(other.past_key_values)
            del other
            gc.collect()
            assert dropped() is None
            next_turn = torch.cat([first, prompt(1, 38, 3)], 1)  # 60 tokens, 21 of them held
            model.generate(next_turn, cache=chat, **kwargs)  # chat: 61 positions
        assert chat.get_seq_length() == 61

        # WHEN it is reported
        kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]

        # THEN the dropped cache's storages are all freed before the chat's next line, and the peak is the
        # other call's (its cache was never live beside the next turn's)
        events = read_run(run).kv_events
        chat_id, other_id = events[0].cache, next(e.cache for e in events if e.cache != events[0].cache)
        last_write = max(e.seq for e in events if e.cache == other_id and e.event != "freed")
        chat_next = min(e.seq for e in events if e.cache == chat_id and e.seq > last_write)
        made = [e.seq for e in events if e.cache == other_id and e.event in ("created", "grown")]
        frees = [e.seq for e in events if e.cache == other_id and e.event == "freed"]
        assert len(frees) == len(made) and max(frees) < chat_next
        assert_addresses_freed_before_reuse(events)
        assert kv["peak_bytes"] == other_peak
        assert kv["final_bytes"] == 2 * LAYERS * k_or_v(61, 1)
