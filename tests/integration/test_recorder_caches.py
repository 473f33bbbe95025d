"""The recorder on a real tiny Llama 3 with every cache kind that runs on a CPU.

For each kind, the live KV bytes of every layer after every step are rebuilt from the raw event log
(`kvlog_math.replay_live_bytes`) and compared with the arithmetic of that cache, worked out here from how
transformers stores K and V. Batch of 2 real prompts, left-padded, greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import (
    TEARDOWN_PHASE,
    assert_well_ordered,
    kv_bytes,
    replay_live_bytes,
)
from transformers import StaticCache

import kvtrace
from kvtrace.llama import make_cache
from kvtrace.run_reader import read_run
from tests.hf_versions import needs_fp8_cache
from tests.tiny import cache_arg

NEW_TOKENS = 5  # one prefill step and four decode steps
WINDOW = 8  # sliding window, shorter than the prompt
KV_HEADS = 2
HEAD_DIM = 64 // 4
F32 = 4


@dataclass(frozen=True)
class Expect:
    """Per layer, per step `s` (1 = prefill) of a prompt of `p` tokens: live bytes and tokens held."""

    layer_bytes: Callable[[int, int], int]
    tokens: Callable[[int, int], int]
    events: frozenset[str]
    rows_per_prompt: int = 1


def _generate(model: Any, batch: Any, out_dir: Path, cache: Any = None, **kwargs: Any) -> Any:
    if cache is not None:
        kwargs.update(cache_arg(cache))
    with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
        return model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,  # a random model may draw EOS; the arithmetic needs every step
            do_sample=False,
            **kwargs,
        )


def _check_run(out_dir: Path, model: Any, rows: int, expect: Expect, prompt_len: int) -> None:
    run = read_run(out_dir)
    events = run.kv_events
    config = model.config

    # THEN the run ended cleanly, describes the model it recorded, and its log is well ordered.
    assert run.manifest["ended"]["status"] == "ok"
    assert not run.truncated
    geometry = run.manifest["model"]
    assert geometry["num_layers"] == config.num_hidden_layers == 2
    assert geometry["num_kv_heads"] == config.num_key_value_heads == KV_HEADS
    assert geometry["num_attention_heads"] == config.num_attention_heads
    assert geometry["head_dim"] == config.hidden_size // config.num_attention_heads == HEAD_DIM
    assert geometry["hidden_size"] == config.hidden_size
    assert geometry["vocab_size"] == config.vocab_size
    assert_well_ordered(events)

    # One forward per new token: step 1 is the prefill, every later one a decode; only frees come after.
    steps = sorted({e.step for e in events if e.phase != TEARDOWN_PHASE})
    assert steps == list(range(1, NEW_TOKENS + 1))
    for event in events:
        if event.phase == TEARDOWN_PHASE:
            assert event.event == "freed", event
        else:
            assert event.phase == ("prefill" if event.step == 1 else "decode"), event
    assert events[0].phase == "prefill"
    assert {e.event for e in events} <= expect.events | {"freed"}
    assert (expect.events - {"freed"}) <= {e.event for e in events}

    # THEN the live bytes of each layer after each step are the cache's arithmetic.
    replay = replay_live_bytes(events)
    for step in steps:
        want = expect.layer_bytes(step, prompt_len)
        assert replay.per_step[step] == {0: want, 1: want}, f"step {step}"

    # THEN every event that describes the cache now says how many tokens a row holds.
    for event in events:
        if event.event != "freed" and event.part in ("data", "q.0"):
            assert event.tokens == expect.tokens(event.step, prompt_len), event
            assert event.shape[0] == rows, event


def _dynamic_bytes(rows: int) -> Callable[[int, int], int]:
    # torch.cat growth: after step s a K (and a V) storage holds exactly the p + s - 1 tokens seen so far.
    return lambda s, p: 2 * kv_bytes(KV_HEADS, HEAD_DIM, p + s - 1, rows, F32)


def test_dynamic(tiny_model, prompt_batch, tmp_path):
    rows = prompt_batch.rows
    _generate(tiny_model, prompt_batch, tmp_path / "run")
    expect = Expect(_dynamic_bytes(rows), lambda s, p: p + s - 1, frozenset({"created", "grown", "freed"}))
    _check_run(tmp_path / "run", tiny_model, rows, expect, prompt_batch.prompt_len)
    # The caller kept no reference to the cache: every storage is freed by the end.
    assert replay_live_bytes(read_run(tmp_path / "run").kv_events).final == {}


def test_static(tiny_model, prompt_batch, tmp_path):
    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    max_cache_len = prompt_len + NEW_TOKENS + 3
    cache = StaticCache(config=tiny_model.config, max_cache_len=max_cache_len)
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache)
    # Allocated once at full length on the first update, then written in place.
    expect = Expect(
        lambda s, p: 2 * kv_bytes(KV_HEADS, HEAD_DIM, max_cache_len, rows, F32),
        lambda s, p: p + s - 1,
        frozenset({"created", "written"}),
    )
    _check_run(tmp_path / "run", tiny_model, rows, expect, prompt_len)
    del cache


def test_dynamic_sliding_window(tiny_model, prompt_batch, tmp_path):
    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    assert prompt_len > WINDOW
    cache, extra = make_cache("sliding", tiny_model, rows, prompt_len + NEW_TOKENS, window=WINDOW)
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache, **extra)

    # DynamicSlidingWindowLayer.update computes full = torch.cat([held, new]) and keeps the *view*
    # full[:, :, -(W - 1):]. The memory held is the whole cat result, not the view:
    #   prefill (s = 1): held is empty, so the storage is the p prompt tokens (the view shows W - 1);
    #   decode (s > 1):  held is the previous view, min(W - 1, p + s - 2) tokens, plus 1 new token.
    # The previous storage is freed when the view is rebound, so one storage per K and V is live.
    def storage_tokens(s: int, p: int) -> int:
        return p if s == 1 else min(WINDOW - 1, p + s - 2) + 1

    expect = Expect(
        lambda s, p: 2 * kv_bytes(KV_HEADS, HEAD_DIM, storage_tokens(s, p), rows, F32),
        lambda s, p: min(WINDOW - 1, p + s - 1),
        frozenset({"created", "replaced", "freed"}),
    )
    _check_run(tmp_path / "run", tiny_model, rows, expect, prompt_len)
    # The view starts W - 1 tokens before the end of its storage.
    for event in read_run(tmp_path / "run").kv_events:
        if event.event != "freed":
            tokens_in_storage = storage_tokens(event.step, prompt_len)
            row_bytes = HEAD_DIM * F32
            assert event.view_offset == (tokens_in_storage - (WINDOW - 1)) * row_bytes, event
    del cache


def test_static_sliding_window(tiny_model, prompt_batch, tmp_path):
    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    max_cache_len = prompt_len + NEW_TOKENS
    cache, extra = make_cache("static_sliding", tiny_model, rows, max_cache_len, window=WINDOW)
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache, **extra)
    # StaticSlidingWindowLayer allocates min(W, max_cache_len) positions once and rolls them in place.
    expect = Expect(
        lambda s, p: 2 * kv_bytes(KV_HEADS, HEAD_DIM, min(WINDOW, max_cache_len), rows, F32),
        lambda s, p: min(WINDOW, p + s - 1),
        frozenset({"created", "written"}),
    )
    _check_run(tmp_path / "run", tiny_model, rows, expect, prompt_len)
    del cache


@needs_fp8_cache
def test_fp8_quantized(tiny_model, prompt_batch, tmp_path):
    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    cache, extra = make_cache("fp8", tiny_model, rows, prompt_len + NEW_TOKENS)
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache, **extra)
    # FP8 appends 1-byte elements with torch.cat and keeps one float32 per-tensor scale for K and for V;
    # no full-precision residual is kept.
    expect = Expect(
        lambda s, p: 2 * (kv_bytes(KV_HEADS, HEAD_DIM, p + s - 1, rows, 1) + 4),
        lambda s, p: p + s - 1,
        frozenset({"created", "grown", "freed"}),
    )
    _check_run(tmp_path / "run", tiny_model, rows, expect, prompt_len)
    dtypes = {(e.part, e.dtype) for e in read_run(tmp_path / "run").kv_events if e.event != "freed"}
    assert dtypes == {("q.0", "float8_e4m3fn"), ("q.1", "float32")}
    del cache


@needs_fp8_cache
def test_fp8_quantized_peak_holds_both_old_tensors(tiny_model, prompt_batch, tmp_path):
    # GIVEN an fp8 QuantizedCache run
    from analyzers.report import build_report

    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    cache, extra = make_cache("fp8", tiny_model, rows, prompt_len + NEW_TOKENS)
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache, **extra)
    events = read_run(tmp_path / "run").kv_events
    # THEN each decode update logs both new quantized storages before the frees of the old ones:
    # Fp8QuantizedLayer.update keeps the old K and V in locals until it returns, after both torch.cat
    for step in range(2, NEW_TOKENS + 1):
        for layer in range(2):
            mine = [e for e in events if e.step == step and e.layer == layer and e.part == "q.0"]
            order = [(e.event, e.kv) for e in mine]
            assert order == [("grown", "k"), ("grown", "v"), ("freed", "k"), ("freed", "v")], (step, layer)
    # AND the KV peak is the final cache plus the last layer's old K and V at the last step (the peak was
    # short by one of them): 1-byte elements, a float32 scale per K and per V that is never replaced
    held = prompt_len + NEW_TOKENS - 1
    final = 2 * 2 * (kv_bytes(KV_HEADS, HEAD_DIM, held, rows, 1) + 4)
    old = 2 * kv_bytes(KV_HEADS, HEAD_DIM, held - 1, rows, 1)
    _source, report = build_report(tmp_path / "run")
    assert report.kv.final_bytes == final
    assert report.kv.peak_bytes == final + old
    del cache


@needs_fp8_cache
def test_plan_of_an_fp8_quantized_cache_is_the_recording(tiny_model, prompt_batch, tmp_path, capsys):
    # GIVEN an fp8 QuantizedCache run of 5 new tokens after the batch's prompt
    import json

    from analyzers.report import build_report
    from kvtrace.cli import main

    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    cache, extra = make_cache("fp8", tiny_model, rows, prompt_len + NEW_TOKENS)
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache, **extra)
    recorded = replay_live_bytes(read_run(tmp_path / "run").kv_events, NEW_TOKENS)
    tiny_model.config.save_pretrained(tmp_path / "config")
    # WHEN it is planned with --cache quantized --kv-dtype fp8 (refused before: "int4 or int8")
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(rows), "--json"]
    argv += ["--prompt", str(prompt_len), "--context", str(prompt_len + NEW_TOKENS)]
    assert main([*argv, "--cache", "quantized", "--kv-dtype", "fp8"]) == 0, capsys.readouterr().err
    planned = json.loads(capsys.readouterr().out)
    # THEN its final, prefill and peak KV are the recording's ...
    assert planned["kv_bytes"] == sum(recorded.per_step[NEW_TOKENS].values())
    assert planned["kv_prefill_bytes"] == sum(recorded.per_step[1].values())
    _source, report = build_report(tmp_path / "run")
    assert (planned["kv_bytes"], planned["kv_peak_bytes"]) == (report.kv.final_bytes, report.kv.peak_bytes)
    # ... and the arithmetic: 1-byte K and V of 2 layers, a float32 scale per K and per V per layer that is
    # fixed at prefill, and at the last step the last layer's old K and V beside its new ones
    held = prompt_len + NEW_TOKENS - 1
    scales = 2 * 2 * 4
    assert planned["kv_bytes"] == 2 * 2 * kv_bytes(KV_HEADS, HEAD_DIM, held, rows, 1) + scales
    assert planned["kv_prefill_bytes"] == 2 * 2 * kv_bytes(KV_HEADS, HEAD_DIM, prompt_len, rows, 1) + scales
    old = 2 * kv_bytes(KV_HEADS, HEAD_DIM, held - 1, rows, 1)
    assert planned["kv_peak_bytes"] == planned["kv_bytes"] + old
    assert (planned["kv_scale_bytes"], planned["kv_residual_bytes"]) == (scales, 0)
    del cache


@pytest.mark.parametrize("backend", [pytest.param("quanto", marks=pytest.mark.slow), "hqq"])
def test_integer_quantized(tiny_model, prompt_batch, tmp_path, backend):
    pytest.importorskip("optimum.quanto" if backend == "quanto" else "hqq")
    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    cache, extra = make_cache(backend, tiny_model, rows, prompt_len + NEW_TOKENS)
    residual_length = cache.layers[0].residual_length if cache.layers else 128
    assert prompt_len + NEW_TOKENS < residual_length, "the test assumes no re-quantization"
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache, **extra)
    run = read_run(tmp_path / "run")
    assert run.manifest["ended"]["status"] == "ok"
    assert_well_ordered(run.kv_events)
    # The prompt is quantized once at prefill (packing is the backend's business: only its total is
    # checked to be constant and below float32); decode tokens go to a full-precision residual grown
    # by torch.cat, which holds s - 1 tokens after step s.
    residual = replay_live_bytes([e for e in run.kv_events if e.part == "data"], NEW_TOKENS)
    quantized = replay_live_bytes([e for e in run.kv_events if e.part != "data"], NEW_TOKENS)
    full_prompt = 2 * kv_bytes(KV_HEADS, HEAD_DIM, prompt_len, rows, F32)
    for step in range(1, NEW_TOKENS + 1):
        want = 2 * kv_bytes(KV_HEADS, HEAD_DIM, step - 1, rows, F32)
        assert residual.per_step.get(step, {}).get(0, 0) == want, f"step {step}"
        assert 0 < quantized.per_step[step][0] < full_prompt
        assert quantized.per_step[step] == quantized.per_step[1]
    del cache


def test_beam_search_dynamic(tiny_model, prompt_batch, tmp_path):
    rows = prompt_batch.rows * 2  # generate expands every prompt into num_beams rows before prefill
    _generate(tiny_model, prompt_batch, tmp_path / "run", num_beams=2, early_stopping=False)
    # Beam search reorders the cache with index_select after every step: a new storage of the same
    # size, the old one freed, so the live figure is the dynamic one with batch x beams rows.
    expect = Expect(
        _dynamic_bytes(rows),
        lambda s, p: p + s - 1,
        frozenset({"created", "grown", "reordered", "freed"}),
    )
    _check_run(tmp_path / "run", tiny_model, rows, expect, prompt_batch.prompt_len)


@needs_fp8_cache
def test_fp8_quantized_beam_reorder_holds_both_old_tensors(tiny_model, prompt_batch, tmp_path):
    # GIVEN an fp8 QuantizedCache run with beam search: Fp8QuantizedLayer.reorder_cache makes each layer's
    # reordered K and V (index_select) while both old tensors stay in its locals until it returns
    cache, extra = make_cache("fp8", tiny_model, prompt_batch.rows, prompt_batch.prompt_len + NEW_TOKENS)
    _generate(tiny_model, prompt_batch, tmp_path / "run", cache, num_beams=2, **extra)
    events = read_run(tmp_path / "run").kv_events
    # THEN each layer's reorder logs both new storages before the frees of the old ones (it logged new K,
    # old K freed, new V, old V freed: the KV peak was short by one old tensor)
    reordered = [e for e in events if e.event == "reordered" and e.part == "q.0"]
    assert {e.layer for e in reordered} == {0, 1}
    for step, layer in sorted({(e.step, e.layer) for e in reordered}):
        made = [e for e in reordered if (e.step, e.layer) == (step, layer)]
        old = {e.prev_addr: e.kv for e in made}
        start = made[0].seq  # (a free before it at one of these addresses is of the storage it reused)
        freed = [e for e in events if e.event == "freed" and e.seq > start and e.addr in old][:2]
        order = [(e.event, e.kv) for e in sorted(made + freed, key=lambda e: e.seq)]
        both_first = [("reordered", "k"), ("reordered", "v"), ("freed", "k"), ("freed", "v")]
        assert order == both_first, (step, layer)
    del cache
