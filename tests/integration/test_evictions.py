"""Evictions by code that rebinds a cache layer's keys/values (as eviction libraries do), in the main
environment; kvpress itself is tested in its own environment (tests/kvpress)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.format import read_run
from kvtrace.llama import build_model
from tests.tiny import tiny_size

LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT, KEEP = 2, 2, 16, 2, 17, 8
SIZE = tiny_size(LAYERS, KV_HEADS)


@contextmanager
def keep_last(model: Any, keep: int, contiguous: bool) -> Iterator[None]:
    """A minimal StreamingLLM-like press: after each attention forward at prefill, keep the last tokens."""

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        cache = kwargs.get("past_key_values") or kwargs.get("cache")
        layer = cache.layers[module.layer_idx]
        if layer.keys.shape[-2] > keep:
            keys, values = layer.keys[:, :, -keep:, :], layer.values[:, :, -keep:, :]
            layer.keys = keys.contiguous() if contiguous else keys
            layer.values = values.contiguous() if contiguous else values

    handles = [
        m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if hasattr(m, "layer_idx")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(tmp_path: Path, *, grad: bool, contiguous: bool) -> dict[str, Any]:
    from transformers import DynamicCache

    model = build_model(SIZE)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    run = tmp_path / "run"
    cache = DynamicCache()
    with torch.set_grad_enabled(grad), kvtrace.record(run, model=model), keep_last(model, KEEP, contiguous):
        output = model(input_ids=ids, past_key_values=cache, use_cache=True)
    del output
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(run), "--json", "-q"]) == 0
    return json.loads(out.getvalue())


def test_eviction_under_no_grad_frees_the_old_storage(tmp_path: Path) -> None:
    data = _run(tmp_path, grad=False, contiguous=True)
    evicted_per_row = PROMPT - KEEP
    assert [layer["evicted_tokens"] for layer in data["kv"]["per_layer"]] == [
        evicted_per_row * BATCH
    ] * LAYERS
    assert data["kv"]["evicted_tokens"] == LAYERS * evicted_per_row * BATCH
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH  # one token, all rows, K or V
    ev = data["kv"]["evictions"]
    assert ev["claimed_bytes"] == LAYERS * 2 * evicted_per_row * row_bytes
    assert ev["freed_bytes"] == LAYERS * 2 * PROMPT * row_bytes  # the whole old storage is released
    # ... and the kept tokens' new copies take their own: the net release is what was claimed
    assert ev["new_storage_bytes"] == LAYERS * 2 * KEEP * row_bytes
    assert ev["released_bytes"] == ev["claimed_bytes"]
    assert ev["freed_nothing"] == []
    assert data["kv"]["final_bytes"] == LAYERS * 2 * KEEP * row_bytes


def test_eviction_with_grad_enabled_frees_nothing_and_says_why(tmp_path: Path) -> None:
    data = _run(tmp_path, grad=True, contiguous=True)
    ev = data["kv"]["evictions"]
    assert ev["freed_bytes"] == 0
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH
    assert ev["released_bytes"] == -LAYERS * 2 * KEEP * row_bytes  # the copies add to the kept old storage
    assert {item["reason"] for item in ev["freed_nothing"]} == {"grad_enabled"}
    assert len(ev["freed_nothing"]) == LAYERS * 2


def test_slicing_to_a_view_frees_nothing(tmp_path: Path) -> None:
    data = _run(tmp_path, grad=False, contiguous=False)
    ev = data["kv"]["evictions"]
    assert ev["freed_bytes"] == 0
    assert {item["reason"] for item in ev["freed_nothing"]} == {"view"}
    # the memory still held is the whole prompt's storage
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH
    assert data["kv"]["final_bytes"] == LAYERS * 2 * PROMPT * row_bytes
    events = read_run(tmp_path / "run").kv_events
    views = [e for e in events if e.event == "evicted"]
    assert all(e.view_offset == (PROMPT - KEEP) * HEAD_DIM * 4 for e in views)


@pytest.mark.parametrize("grad", [False])
def test_eviction_nvtx_ranges_and_markers(tmp_path: Path, grad: bool) -> None:
    from analyzers.report import build_report

    _run(tmp_path, grad=grad, contiguous=True)
    source, _ = build_report(tmp_path / "run")
    marks = [m for m in source.markers if m.kind == "eviction"]
    assert len(marks) == LAYERS
    assert all(m.detail["evicted_tokens"] == PROMPT - KEEP for m in marks)


def test_a_crop_after_a_press_is_counted_too(tmp_path: Path) -> None:
    from transformers import DynamicCache

    # GIVEN a prefill whose press keeps KEEP tokens, then a crop of CROP more
    crop = 3
    model = build_model(SIZE)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    cache = DynamicCache()
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        with keep_last(model, KEEP, contiguous=True):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.crop(-crop)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(tmp_path / "run"), "--json", "-q", "--no-export"]) == 0
    kv = json.loads(out.getvalue())["kv"]

    # THEN each layer counts both, over every row, and so do the totals by kind
    press, cropped = (PROMPT - KEEP) * BATCH, crop * BATCH
    assert [(layer["evicted_tokens"], layer["evicted_by_reason"]) for layer in kv["per_layer"]] == [
        (press + cropped, {"press": press, "crop": cropped})
    ] * LAYERS
    assert kv["evicted_tokens"] == LAYERS * (press + cropped)
    assert kv["evictions_by_reason"] == {"press": LAYERS * press, "crop": LAYERS * cropped}
    assert [layer["tokens"] for layer in kv["per_layer"]] == [KEEP - crop] * LAYERS
