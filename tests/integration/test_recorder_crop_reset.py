"""Assisted decoding (the cache is cropped after rejected draft tokens) and an explicit Cache.reset()."""

from __future__ import annotations

from pathlib import Path

import torch

import kvtrace
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.hf_versions import RESET_DROPS_STORAGE, needs_static_assisted
from tests.tiny import HEAD_DIM, cache_arg, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT = 2, 2, 1, 9


def test_assisted_decoding_crops_are_logged_and_keep_the_storage(tmp_path: Path) -> None:
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    assistant = build_model(tiny_size(1, KV_HEADS), seed=1)  # a different model: its drafts get rejected
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            assistant_model=assistant,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )
    events = read_run(run).kv_events
    crops = [e for e in events if e.event == "cropped" and e.part == "data"]
    assert crops, "assisted decoding with a disagreeing assistant must crop the cache"
    for crop in crops:
        # a crop slices to a view: same storage, fewer tokens, and the view's bytes are the arithmetic
        assert crop.shape[-2] == crop.tokens
        assert crop.logical_bytes == BATCH * KV_HEADS * crop.tokens * HEAD_DIM * 4
        assert crop.storage_bytes >= crop.logical_bytes
        assert crop.addr == crop.prev_addr


def test_reset_is_logged(tmp_path: Path) -> None:
    from transformers import DynamicCache

    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    cache = DynamicCache()
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model(input_ids=ids, **cache_arg(cache), use_cache=True)
        cache.reset()
    events = read_run(run).kv_events
    resets = [e for e in events if e.event == "reset" and e.part == "data"]
    assert sorted((e.layer, e.kv) for e in resets) == [(layer, kv) for layer in range(LAYERS) for kv in "kv"]
    freed = {e.addr for e in events if e.event == "freed"}
    created = {e.addr for e in events if e.event == "created"}
    if RESET_DROPS_STORAGE:
        assert all(e.addr == 0 and e.storage_bytes == 0 for e in resets)
        assert created <= freed  # reset drops every storage, and the allocator released them
    else:
        # transformers 5.17 zeroes the keys and values in place: every storage stays held, at the prompt
        assert all(e.addr == e.prev_addr != 0 for e in resets)
        assert all(e.storage_bytes == BATCH * KV_HEADS * PROMPT * HEAD_DIM * 4 for e in resets)
        assert not created & freed


def _layer_zero_k(run: Path) -> list[tuple[int, int, int]]:
    """(tokens, evicted tokens, address) of each of layer 0's K events, frees aside."""
    return [
        (e.tokens, e.evicted_tokens, e.addr)
        for e in read_run(run).kv_events
        if e.layer == 0 and e.kv == "k" and e.part == "data" and e.event != "freed"
    ]


@needs_static_assisted
def test_a_static_caches_crop_is_logged_as_the_dynamic_caches_is(tmp_path: Path) -> None:
    # GIVEN prompt-lookup decoding (its drafts are cropped when the model rejects them) on a repeating prompt,
    # once on a DynamicCache and once on a StaticCache, whose crop only moves its count back
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    ids = torch.tensor([[5, 6, 7, 8] * 3])
    runs = {}
    for cache in ("dynamic", "static"):
        runs[cache] = tmp_path / cache
        with torch.no_grad(), kvtrace.record(runs[cache], model=model, profiler=False):
            model.generate(
                ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                prompt_lookup_num_tokens=3, cache_implementation=None if cache == "dynamic" else "static",
            )  # fmt: skip

    # THEN the static cache logs a `cropped` event at each crop, in place, with the dynamic cache's tokens
    dynamic, static = _layer_zero_k(runs["dynamic"]), _layer_zero_k(runs["static"])
    crops = {name: [e for e in read_run(run).kv_events if e.event == "cropped"] for name, run in runs.items()}
    assert crops["dynamic"], "a random model must reject some of prompt lookup's drafts"
    assert len(crops["static"]) == len(crops["dynamic"])  # every layer's K and V at every crop
    assert [(tokens, evicted) for tokens, evicted, _ in static] == [(t, e) for t, e, _ in dynamic]
    assert {addr for _, _, addr in static} == {static[0][2]}  # one storage, written and cropped in place
    assert all(crop.addr == crop.prev_addr for crop in crops["static"])
