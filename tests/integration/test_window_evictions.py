"""Sliding-window caches evict at prefill and at every decode step once full (issue 10, item 1).

A window is the built-in kind of KV eviction: every token that leaves it is counted, per layer and step,
with reason `window`, apart from evictions by a press (kvpress, or any code rebinding keys/values). The
expected counts are worked out here from how transformers 5.x keeps a window:
- `DynamicSlidingWindowLayer` keeps a view of the last `W - 1` tokens of `cat(held, new)`;
- `StaticSlidingWindowLayer` keeps the last `min(W, max_cache_len)` tokens in place.
Over a run, per batch row and layer, the tokens that entered the cache are `P + N - 1` (the last new token
is never fed back) and the tokens evicted are those minus what the window holds at the end.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import llama3_config, make_cache
from kvtrace.run_reader import read_run
from tests.tiny import cache_arg, tiny_size

LAYERS, BATCH, PROMPT, NEW, WINDOW = 2, 2, 13, 6, 8
SIZE = tiny_size(LAYERS)


@pytest.fixture(scope="module")
def sliding_model(watched_models: list[torch.nn.Module]) -> Any:
    """The tiny Llama 3 shape with Mistral-style sliding attention on every layer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama3_config(SIZE, sliding_window=WINDOW)).eval()
    watched_models.append(model)
    return model


def _expected_per_step(
    kept: Callable[[int], int], press_keep: int | None = None
) -> dict[int, tuple[int, int]]:
    """Per step: (tokens the window evicted, tokens the press evicted), per row and layer.

    `kept(n)` is what the window keeps of `n` tokens; the press (prefill only) keeps the last `press_keep`."""
    held = 0
    per_step: dict[int, tuple[int, int]] = {}
    for step in range(1, NEW + 1):
        entering = PROMPT if step == 1 else 1
        after = kept(held + entering)
        window = held + entering - after
        press = 0
        if step == 1 and press_keep is not None and after > press_keep:
            press, after = after - press_keep, press_keep
        per_step[step] = (window, press)
        held = after
    return per_step


def _generate(model: Any, run: Path, cache: Any = None) -> None:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    kwargs = cache_arg(cache) if cache is not None else {}
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def _report(run: Path, *extra: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(run), "-q", *extra]) == 0
    return out.getvalue()


def _check(run: Path, per_step: dict[int, tuple[int, int]]) -> None:
    events = read_run(run).kv_events
    # THEN each (step, layer) logs the window's evictions once, on K's event, with reason "window".
    for step, (window, _) in per_step.items():
        for layer in range(LAYERS):
            logged = [e for e in events if e.step == step and e.layer == layer and e.reason == "window"]
            assert sum(e.evicted_tokens for e in logged) == window, (step, layer)
            assert all(e.kv == "k" and e.part == "data" and e.event != "evicted" for e in logged)
    # THEN the report counts every row, per layer and in total, and tells the two kinds apart.
    window_total = sum(w for w, _ in per_step.values()) * BATCH
    press_total = sum(p for _, p in per_step.values()) * BATCH
    data = json.loads(_report(run, "--json"))
    kv = data["kv"]
    assert [layer["evicted_tokens"] for layer in kv["per_layer"]] == [window_total + press_total] * LAYERS
    assert kv["evicted_tokens"] == LAYERS * (window_total + press_total)
    want = {"window": LAYERS * window_total}
    if press_total:
        want["press"] = LAYERS * press_total
    assert kv["evictions_by_reason"] == want
    for layer in kv["per_layer"]:
        assert layer["evicted_by_reason"] == {k: v // LAYERS for k, v in want.items()}
    text = _report(run)
    assert "sliding window" in text
    # a layer's tokens are per row and its evictions over every row: the labels say which
    assert f"evicted tokens (all rows and layers): {LAYERS * (window_total + press_total):,}" in text
    assert "tokens/row  evicted (all rows)" in text


def test_dynamic_sliding_window_evicts_at_prefill_and_each_full_step(sliding_model, tmp_path):
    # GIVEN the model's own cache (generate() builds DynamicSlidingWindowLayers from `layer_types`)
    _generate(sliding_model, tmp_path / "run")
    per_step = _expected_per_step(lambda n: min(n, WINDOW - 1))
    # The arithmetic of the whole run: tokens in, minus the W - 1 the window holds at the end.
    assert sum(w for w, _ in per_step.values()) == (PROMPT + NEW - 1) - (WINDOW - 1)
    assert per_step[1][0] == PROMPT - (WINDOW - 1) and all(per_step[s][0] == 1 for s in range(2, NEW + 1))
    _check(tmp_path / "run", per_step)


@pytest.fixture(scope="module")
def full_model(watched_models: list[torch.nn.Module]) -> Any:
    from kvtrace.llama import build_model

    model = build_model(SIZE)
    watched_models.append(model)
    return model


def test_demo_sliding_cache_evicts(full_model, tmp_path):
    # GIVEN `kvtrace demo --cache sliding`'s cache: a DynamicCache built from a sliding config
    cache, _ = make_cache("sliding", full_model, BATCH, PROMPT + NEW, window=WINDOW)
    _generate(full_model, tmp_path / "run", cache)
    _check(tmp_path / "run", _expected_per_step(lambda n: min(n, WINDOW - 1)))
    del cache


def test_static_sliding_window_evicts(full_model, tmp_path):
    # GIVEN `--cache static_sliding`: StaticSlidingWindowLayers of min(W, max_cache_len) positions
    cache, _ = make_cache("static_sliding", full_model, BATCH, PROMPT + NEW, window=WINDOW)
    _generate(full_model, tmp_path / "run", cache)
    per_step = _expected_per_step(lambda n: min(n, WINDOW))
    assert sum(w for w, _ in per_step.values()) == (PROMPT + NEW - 1) - WINDOW
    assert per_step[1][0] == PROMPT - WINDOW
    _check(tmp_path / "run", per_step)
    del cache


def test_full_attention_cache_evicts_nothing(full_model, tmp_path):
    model = full_model
    _generate(model, tmp_path / "run", DynamicCache(config=model.config))
    kv = json.loads(_report(tmp_path / "run", "--json"))["kv"]
    assert kv["evicted_tokens"] == 0 and kv["evictions_by_reason"] == {}
    assert all(e.evicted_tokens == 0 and e.reason == "" for e in read_run(tmp_path / "run").kv_events)


@contextmanager
def press_at_prefill(model: Any, keep: int) -> Iterator[None]:
    """A StreamingLLM-like press: after each attention forward of the prefill, rebind to the last `keep`."""

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if kwargs["hidden_states"].shape[1] == 1:
            return
        layer = (kwargs.get("past_key_values") or kwargs.get("cache")).layers[module.layer_idx]
        layer.keys = layer.keys[:, :, -keep:, :].contiguous()
        layer.values = layer.values[:, :, -keep:, :].contiguous()

    handles = [
        m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if hasattr(m, "layer_idx")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def test_window_and_press_evictions_are_told_apart(sliding_model, tmp_path):
    keep = 4
    with press_at_prefill(sliding_model, keep):
        _generate(sliding_model, tmp_path / "run")
    per_step = _expected_per_step(lambda n: min(n, WINDOW - 1), press_keep=keep)
    assert per_step[1] == (PROMPT - (WINDOW - 1), WINDOW - 1 - keep)
    events = read_run(tmp_path / "run").kv_events
    press_events = [e for e in events if e.event == "evicted" and e.kv == "k"]
    assert len(press_events) == LAYERS and all(e.reason != "window" for e in press_events)
    _check(tmp_path / "run", per_step)


def test_a_sliding_layers_transient_in_the_log_is_the_allocators(sliding_model, tmp_path):
    # GIVEN a sliding window run recorded with the profiler's allocator events (CPU)
    from analyzers.report import build_report

    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=sliding_model, snapshots=False):
        sliding_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
        )
    events = read_run(tmp_path / "run").kv_events
    # THEN each decode update logs both new storages before the frees of the old ones (the layer makes
    # both with torch.cat before it lets go of either)
    for step in range(2, NEW + 1):
        for layer in range(LAYERS):
            mine = [e for e in events if e.step == step and e.layer == layer and e.phase != "end"]
            order = [(e.event, e.kv) for e in mine]
            assert order[:2] in ([("replaced", "k"), ("replaced", "v")], [("grown", "k"), ("grown", "v")])
            assert order[2:] == [("freed", "k"), ("freed", "v")], (step, layer, order)
    # AND the KV log's peak, transient copies included, is the arithmetic of that order: at the first
    # decode of layer 0, every layer's prefill storage (cat of the PROMPT tokens) plus layer 0's new K and
    # V (cat of the WINDOW - 1 kept and the new one) are alive together (K, V freed one by one: one less)
    per_token = BATCH * SIZE.num_kv_heads * (SIZE.hidden_size // SIZE.num_heads) * 4
    prefill, decode = PROMPT * per_token, WINDOW * per_token
    _source, report = build_report(tmp_path / "run")
    assert report.kv.peak_bytes == 2 * LAYERS * prefill + 2 * decode
    # AND the allocator timeline agrees: each storage joins the allocation live when the log saw it, not a
    # later one of the same size at the same address within the clocks' tolerance (1 run in 4 did)
    kv_in_timeline = max(int(t.by_category["kv"].max()) for t in report.timelines if len(t.allocated))
    assert kv_in_timeline == report.kv.peak_bytes
