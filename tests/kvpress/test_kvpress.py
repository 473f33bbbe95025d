"""NVIDIA kvpress evictions, recorded by kvtrace: every token evicted, and what it really freed.

kvpress pins transformers<5.3, so this file runs in its own environment (see .ci/run); elsewhere it skips.
Tiny Llama 3 with random weights, sdpa attention, CPU. Expected figures are computed here from each
press's documented rule (compression ratio, budgets), never read back from kvtrace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

kvpress = pytest.importorskip("kvpress")

import torch  # noqa: E402

import kvtrace  # noqa: E402
from analyzers.render.json import report_to_json  # noqa: E402
from analyzers.report import build_report  # noqa: E402
from kvtrace.integrations.presses import make_press  # noqa: E402
from kvtrace.llama import build_model  # noqa: E402
from kvtrace.run_reader import read_run  # noqa: E402
from tests.tiny import tiny_size  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, CONTEXT = 4, 2, 16, 513
SIZE = tiny_size(LAYERS, KV_HEADS)
TOKEN_BYTES = KV_HEADS * HEAD_DIM * 4  # one token of K (or V), one row, float32


def _model() -> Any:
    model = build_model(SIZE)
    model.config._attn_implementation = "sdpa"
    return model


def _prefill(tmp_path: Path, press: Any, grad: bool = False, profiler: bool = False, rows: int = 1) -> Path:
    from transformers import DynamicCache

    model = _model()
    torch.manual_seed(3)
    ids = torch.randint(3, 1000, (rows, CONTEXT))
    run = tmp_path / "run"
    with torch.set_grad_enabled(grad), kvtrace.record(run, model=model, profiler=profiler), press(model):
        output = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    del output
    return run


def _json(run: Path) -> dict[str, Any]:
    return report_to_json(build_report(run)[1])


def _kept(compression: float, k_len: int = CONTEXT) -> int:
    return max(1, int(k_len * (1 - compression)))  # kvpress keeps int(k_len * (1 - ratio))


@pytest.mark.parametrize("name", ["streaming_llm", "knorm", "snapkv", "expected_attention"])
def test_scoring_presses_evict_257_keep_256_per_layer(tmp_path: Path, name: str) -> None:
    run = _prefill(tmp_path, make_press(name, 0.5))
    data = _json(run)
    kept = _kept(0.5)
    assert (kept, CONTEXT - kept) == (256, 257)
    assert [layer["evicted_tokens"] for layer in data["kv"]["per_layer"]] == [CONTEXT - kept] * LAYERS
    assert data["kv"]["evicted_tokens"] == LAYERS * (CONTEXT - kept)
    # K+V storage per layer goes from the 513-token cat result to the 256-token gather result
    assert [(layer["k_bytes"], layer["v_bytes"]) for layer in data["kv"]["per_layer"]] == [
        (kept * TOKEN_BYTES, kept * TOKEN_BYTES)
    ] * LAYERS
    evictions = data["kv"]["evictions"]
    assert evictions["claimed_bytes"] == LAYERS * 2 * (CONTEXT - kept) * TOKEN_BYTES
    assert evictions["freed_bytes"] == LAYERS * 2 * CONTEXT * TOKEN_BYTES
    assert evictions["freed_nothing"] == []


def test_with_grad_enabled_the_eviction_frees_nothing(tmp_path: Path) -> None:
    run = _prefill(tmp_path, make_press("knorm", 0.5), grad=True)
    evictions = _json(run)["kv"]["evictions"]
    assert evictions["freed_bytes"] == 0
    assert {item["reason"] for item in evictions["freed_nothing"]} == {"grad_enabled"}
    assert len(evictions["freed_nothing"]) == LAYERS * 2


def test_pyramidkv_kept_counts_differ_per_layer(tmp_path: Path) -> None:
    press = make_press("pyramidkv", 0.5)
    run = _prefill(tmp_path, press)
    data = _json(run)
    # PyramidKV's budget (its documented formula), computed here for each layer
    window, beta, ratio = press.window_size, press.beta, 0.5
    capacity = window + CONTEXT * (1 - ratio)
    min_num = (capacity - window) / beta
    max_num = (capacity - window) * 2 - min_num
    if max_num >= CONTEXT - window:
        max_num = CONTEXT - window
        min_num = (capacity - window) * 2 - max_num
    steps = (max_num - min_num) / (LAYERS - 1)
    expected_kept = [round(max_num - layer * steps) for layer in range(LAYERS)]
    assert len(set(expected_kept)) == LAYERS
    assert [layer["tokens"] for layer in data["kv"]["per_layer"]] == expected_kept
    assert [layer["evicted_tokens"] for layer in data["kv"]["per_layer"]] == [
        CONTEXT - k for k in expected_kept
    ]
    assert [layer["k_bytes"] for layer in data["kv"]["per_layer"]] == [k * TOKEN_BYTES for k in expected_kept]


def test_decoding_press_evicts_every_interval_down_to_target(tmp_path: Path) -> None:
    interval, target, prompt, new = 4, 64, 70, 13
    model = _model()
    ids = torch.randint(3, 1000, (1, prompt))
    run = tmp_path / "run"
    with (
        torch.no_grad(),
        kvtrace.record(run, model=model, profiler=False),
        make_press("decoding", 0.0, interval=interval, target_size=target)(model),
    ):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    # Simulate the rule: each decode forward adds a token; every `interval`-th compresses to `target`.
    expected: list[tuple[int, int]] = []  # (decode step, evicted tokens)
    held = prompt
    for decode_step in range(1, new):
        held += 1
        if decode_step % interval == 0 and held > target:
            expected.append((decode_step, held - target))
            held = target
    events = [e for e in read_run(run).kv_events if e.event == "evicted" and e.kv == "k" and e.part == "data"]
    for layer in range(LAYERS):
        seen = [(e.step - 1, e.evicted_tokens) for e in events if e.layer == layer]  # step 1 is the prefill
        assert seen == expected, layer
        assert all(e.tokens == target for e in events if e.layer == layer)


def test_adakv_masks_without_freeing(tmp_path: Path) -> None:
    # GIVEN AdaKV at 0.3 on a 2-row prefill: it hides, per row, KV_HEADS x (CONTEXT - kept) (head, token)
    # entries across heads (its documented rule), and leaves K and V whole
    rows, compression = 2, 0.3
    run = _prefill(tmp_path, make_press("adakv", compression), rows=rows)
    data = _json(run)
    masked_entries = rows * KV_HEADS * (CONTEXT - _kept(compression))
    assert masked_entries == 2 * 2 * 154
    evictions = data["kv"]["evictions"]
    # THEN each layer's K and V are both said masked, claiming what the hidden entries hold, freeing nothing
    entry_bytes = HEAD_DIM * 4  # float32
    assert sorted((item["layer"], item["kv"]) for item in evictions["freed_nothing"]) == [
        (layer, kv) for layer in range(LAYERS) for kv in "kv"
    ]
    assert {item["reason"] for item in evictions["freed_nothing"]} == {"masked"}
    assert {item["claimed_bytes"] for item in evictions["freed_nothing"]} == {masked_entries * entry_bytes}
    assert evictions["events"] == LAYERS * 2
    assert evictions["claimed_bytes"] == LAYERS * 2 * masked_entries * entry_bytes
    assert evictions["freed_bytes"] == 0
    assert evictions["released_bytes"] == 0
    assert [layer["claimed_bytes"] for layer in evictions["per_layer"]] == [
        2 * masked_entries * entry_bytes
    ] * LAYERS
    # the tokens are hidden, not evicted: every layer still holds the whole prompt in K and V
    assert data["kv"]["evicted_tokens"] == 0
    assert [(layer["k_bytes"], layer["tokens"]) for layer in data["kv"]["per_layer"]] == [
        (rows * CONTEXT * TOKEN_BYTES, CONTEXT)
    ] * LAYERS


def test_kv_log_frees_are_the_profiler_frees(tmp_path: Path) -> None:
    run = _prefill(tmp_path, make_press("knorm", 0.5), profiler=True)
    trace_path = next((run / "profiler").glob("*.pt.trace.json"))
    trace = json.loads(trace_path.read_text())
    frees = {
        (e["args"]["Addr"], -e["args"]["Bytes"])
        for e in trace["traceEvents"]
        if e.get("name") == "[memory]" and e["args"].get("Bytes", 0) < 0
    }
    events = read_run(run).kv_events
    evicted = [e for e in events if e.event == "evicted" and e.part == "data"]
    storage = {e.addr: e.storage_bytes for e in events if e.event == "created"}
    assert len(evicted) == LAYERS * 2
    for event in evicted:
        assert (event.prev_addr, storage[event.prev_addr]) in frees
    assert sum(storage[e.prev_addr] for e in evicted) == _json(run)["kv"]["evictions"]["freed_bytes"]


def test_each_layer_is_compressed_before_the_next_one_writes(tmp_path: Path) -> None:
    # GIVEN a press, which compresses each layer in its attention module's forward hook
    run = _prefill(tmp_path, make_press("knorm", 0.5))
    events = read_run(run).kv_events
    # THEN each layer's eviction and the frees of its old storages come before the next layer's update
    # (whose new K may take the address the old K freed), both copies made before either old one goes
    per_layer = [("created", "k"), ("created", "v"), ("evicted", "k"), ("evicted", "v"), ("freed", "k")]
    per_layer.append(("freed", "v"))
    expected = [(event, layer, kv) for layer in range(LAYERS) for event, kv in per_layer]
    assert [(e.event, e.layer, e.kv) for e in events if e.step == 1] == expected
    # ... so the peak is the last layer's full K and V beside their copies and the compressed layers
    kept = _kept(0.5)
    peak = (LAYERS - 1) * 2 * kept * TOKEN_BYTES + 2 * CONTEXT * TOKEN_BYTES + 2 * kept * TOKEN_BYTES
    assert peak == 3 * 2 * 256 * 128 + 2 * 513 * 128 + 2 * 256 * 128 == 393472
    assert _json(run)["kv"]["peak_bytes"] == peak
