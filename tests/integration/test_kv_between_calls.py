"""A cache cropped or reordered between two generate() calls (a chat's "regenerate"). The recorder logs those
lines with the number of the last forward, after that forward's end sample: they belong to the gap before
the next step, so each step's KV figures (the exported counters and scalars, `compare`'s `kv_by_step`) are
the cache as its forward ended, and a diagnosis of a moment in a step prices what was held then. A crop
there takes back tokens the calls had generated: `compare` still counts every token each call returned,
however few it takes (one, after an assisted-decoding call whose last forward kept drafts: no draft
rejection)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model, cache_keyword
from tests.cli_json import cli_json
from tests.tiny import HEAD_DIM, cache_arg, tiny_size

LAYERS, KV_HEADS, BATCH, FP32 = 2, 2, 2, 4


def _kv_bytes(tokens: int) -> int:
    """The whole cache holding `tokens` per row: K and V of every layer."""
    return LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * BATCH * FP32


def _generate(model: Any, ids: torch.Tensor, cache: DynamicCache, new: int, **kwargs: Any) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        **cache_arg(cache),
        **kwargs,
    )


def _forward_end_tokens(model: Any) -> tuple[list[int], Any]:
    """The tokens per row the cache holds as each forward returns, read by a hook of the test's own."""
    held: list[int] = []

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        held.append(kwargs[cache_keyword()].get_seq_length())

    return held, model.register_forward_hook(after, with_kwargs=True)


def _per_step_exports(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[list[tuple[int, int]], list[int]]:
    """`kvtrace report`'s exports: (step, kv/total_bytes) of the TensorBoard scalars, and the totals of the
    per-layer counters of kv_counters.trace.json.gz, one per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["report", str(run), "-q"]) == 0, capsys.readouterr().err
    capsys.readouterr()  # its text, which the JSON commands after it must not read
    accumulator = EventAccumulator(str(run / "tb_scalars"))
    accumulator.Reload()
    scalars = [(event.step, int(event.value)) for event in accumulator.Scalars("kv/total_bytes")]
    trace = json.loads(gzip.decompress((run / "kv_counters.trace.json.gz").read_bytes()))
    counters = [
        sum(e["args"].values()) for e in trace["traceEvents"] if e.get("name") == "KV bytes per layer"
    ]
    return scalars, counters


@pytest.mark.parametrize("profiler", [False, True])
def test_a_crop_between_calls_leaves_the_peaks_step_holding_what_its_forward_ended_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], profiler: bool
) -> None:
    # GIVEN a generate() call of 8 tokens on a 9-token prompt (its last forward ends holding 16 tokens, the
    # run's KV peak in that forward's growth), then cache.crop(-8) and a second call of 2 tokens
    prompt, first, dropped, second = 9, 8, 8, 2
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    ids = torch.randint(3, 1000, (BATCH, prompt), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    run = tmp_path / "run"
    held, hook = _forward_end_tokens(model)
    try:
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
            seq = _generate(model, ids, cache, first)
            returned = seq.shape[1] - ids.shape[1]
            cache.crop(-dropped)
            seq = seq[:, : prompt + first - dropped + 1]  # the kept tokens and the next one fed again
            returned += _generate(model, seq, cache, second).shape[1] - seq.shape[1]
    finally:
        hook.remove()
    assert returned == first + second == 10
    peak_step = first
    tokens = [prompt + step for step in range(first)]  # 9 .. 16
    kept = prompt + first - 1 - dropped
    tokens += [kept + 2 + step for step in range(second)]  # the prefill writes 2 tokens after the crop
    assert held == tokens

    # WHEN the per-step figures are exported and the peak diagnosed
    scalars, counters = _per_step_exports(run, capsys)
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)
    row = cli_json(["compare", str(run), str(run), "--json"], capsys)["runs"][0]

    # THEN the run generated what the two calls returned per row, in each of its rows: the crop took back
    # 8 tokens, 1 of them the first call's last step's, which still generated it
    assert row["generated_tokens_per_row"] == returned
    assert row["tokens_per_second"] == pytest.approx(row["tokens_per_second_per_row"] * BATCH)
    # AND every step is the cache its forward ended with, and the peak's step held 16 tokens (not the 8
    # the crop left after it), with the 16-token cache and the 15-token tensor its last growth copied live
    expected = [_kv_bytes(count) for count in tokens]
    assert scalars == list(enumerate(expected, start=1))
    assert counters[-len(expected) :] == expected
    peak_tokens = tokens[peak_step - 1]
    one_tensor_before = KV_HEADS * HEAD_DIM * (peak_tokens - 1) * BATCH * FP32
    assert diagnosis["kv_peak_bytes"] == _kv_bytes(peak_tokens) + one_tensor_before
    assert (diagnosis["step"], diagnosis["batch"], diagnosis["tokens_held"]) == (
        peak_step,
        BATCH,
        peak_tokens,
    )
    (context,) = [r for r in diagnosis["remedies"] if r["kind"] == "context"]
    assert f"instead of {peak_tokens + 1} " in context["sentence"]  # as plan's --context


def test_a_crop_and_reorder_between_calls_count_in_the_next_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a chat: two generate() calls of 4 tokens (the second on a 3-token follow-up), then the answer
    # cut by cache.crop(-5), the rows swapped by cache.reorder_cache (a copy of every tensor), and a third
    # call of 3 tokens
    prompt, new, follow_up, dropped, last = 6, 4, 3, 5, 3
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (BATCH, prompt), generator=generator)
    cache = DynamicCache(config=model.config)
    run = tmp_path / "run"
    held, hook = _forward_end_tokens(model)
    try:
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
            seq = _generate(model, ids, cache, new)
            returned = seq.shape[1] - ids.shape[1]
            turn = torch.cat([seq, torch.randint(3, 1000, (BATCH, follow_up), generator=generator)], 1)
            seq = _generate(model, turn, cache, new)
            returned += seq.shape[1] - turn.shape[1]
            cache.crop(-dropped)
            cache.reorder_cache(torch.tensor([1, 0]))
            kept = seq[[1, 0], :-dropped]
            returned += _generate(model, kept, cache, last).shape[1] - kept.shape[1]
    finally:
        hook.remove()
    assert returned == new + new + last == 11
    tokens = [prompt + step for step in range(new)]  # 6 .. 9
    # the second call's prefill writes the last token the first returned and the follow-up
    tokens += [prompt + new + follow_up + step for step in range(new)]  # 13 .. 16
    cut = tokens[-1] - dropped  # 11 held after the crop; the reorder copies them
    tokens += [cut + 1 + step for step in range(last)]  # 12 .. 14
    assert held == tokens

    scalars, counters = _per_step_exports(run, capsys)
    report = cli_json(["compare", str(run), str(run), "--json"], capsys)
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)

    # THEN the second call's last step is the 16-token cache its forward ended with, not the 11 tokens the
    # crop and reorder left after it; those are in the next step's figure, whose prefill grew them to 12
    expected = [_kv_bytes(count) for count in tokens]
    assert scalars == list(enumerate(expected, start=1))
    assert counters[-len(expected) :] == expected
    by_step = report["runs"][0]["kv_by_step"]
    assert [by_step[str(step)] for step in range(1, len(tokens) + 1)] == expected
    peak_step = 2 * new  # the growth to 16 tokens
    assert (diagnosis["step"], diagnosis["tokens_held"]) == (peak_step, tokens[peak_step - 1])
    # AND the run generated what the three calls returned per row, in each row: the crop took back the
    # second call's last token with 4 it held before, yet that call's last step still generated it
    row = report["runs"][0]
    assert row["generated_tokens_per_row"] == returned
    assert row["tokens_per_second"] == pytest.approx(row["tokens_per_second_per_row"] * BATCH)


def test_a_one_token_crop_after_an_assisted_call_takes_no_generated_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an assisted-decoding call of 6 tokens (a 1-layer assistant; its last forward verified drafts and
    # kept them all, so generate() cropped nothing after it), then the caller's cache.crop(-1) (a
    # "regenerate" of the last token), then a greedy call of 4 tokens
    prompt, first, second = 15, 6, 4
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    assistant = build_model(tiny_size(1, KV_HEADS), seed=0)
    base = torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([base, base, base], 1)  # repeated: the assistant's drafts are accepted
    cache = DynamicCache(config=model.config)
    run = tmp_path / "run"
    held, hook = _forward_end_tokens(model)
    try:
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
            seq = _generate(model, ids, cache, first, assistant_model=assistant)
            returned = seq.shape[1] - ids.shape[1]
            first_forwards, after_first = len(held), cache.get_seq_length()
            cache.crop(-1)
            kept = seq[:, : cache.get_seq_length() + 1]  # the kept tokens and the next one fed again
            returned += _generate(model, kept, cache, second).shape[1] - kept.shape[1]
    finally:
        hook.remove()
    assert ids.shape[1] == prompt and returned == first + second == 10
    # the case: the first call's last forward grew the cache by more than its own token (a draft at least:
    # it held no more before that forward than after the one before) and kept them all, so the caller's
    # 1-token crop is no larger than those drafts
    assert held[first_forwards - 1] - held[first_forwards - 2] > 1
    assert held[first_forwards - 1] == after_first

    # WHEN the run is compared
    row = cli_json(["compare", str(run), str(run), "--json"], capsys)["runs"][0]

    # THEN it generated what the two calls returned per row: the caller's crop rejected no draft
    assert row["generated_tokens_per_row"] == returned
    # AND the crop's events say it was the caller's (made outside the model's generate() calls)
    lines = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    crops = [line for line in lines if line["event"] == "cropped"]
    assert [line["reason"] for line in crops] == ["caller"] * LAYERS * 2
    assert sum(line["evicted_tokens"] for line in crops) == LAYERS * 1
