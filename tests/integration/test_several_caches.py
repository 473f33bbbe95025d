"""Two cache objects alive at once (an assistant model's draft cache, two generate() outputs still held,
another model's cache): each cache's layers are its own rows, the bytes per token divide a cache's bytes by
its own tokens, and the headline's cache is the recorded model's."""

from __future__ import annotations

import gc
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer

import kvtrace
from analyzers.render.kv_heatmap import MAX_CACHES_AS_ROWS
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.integration.kvlog_math import (
    assert_addresses_freed_before_reuse,
    assert_well_ordered,
    kv_bytes,
)
from tests.plotly_figures import page_figure
from tests.tiny import HEAD_DIM, cache_arg, tiny_size
from tests.writer_drain import flush_after_each_update

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
    # AND the draft cache, made inside the model's own generate(), is not taken for another model's
    manifest = json.loads((run / "manifest.json").read_text())
    assert "other_caches" not in manifest and not any("updated outside the forwards" in n for n in notes)

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

    # AND diagnose prices a token of context at the model's cache's figure plus the draft cache's, which
    # holds the same sequence (a shorter context shrinks both), per cache and layer
    diagnosis = _cli_json(["diagnose", str(run)], capsys)
    # the model's cache's tokens at the end of the diagnosed step, from the raw log
    held = [
        e.tokens
        for e in read_run(run).kv_events
        if e.cache == model_cache and e.part == "data" and e.event != "freed" and e.step <= diagnosis["step"]
    ][-1]
    assert diagnosis["tokens_held"] == held
    (context,) = [r for r in diagnosis["remedies"] if r["kind"] == "context"]
    cut = held - PROMPT  # no budget: the shortest context, the prompt and one new token, frees the new ones
    draft_token = draft_bytes / by_id[draft_cache]["tokens"]
    assert draft_token == DRAFT_LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32
    assert context["saved_bytes"] == round((_storage_bytes(cache) / tokens + draft_token) * cut)
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


def test_many_generate_calls_heatmap_sums_each_layer_over_the_caches_held(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN more generate() calls than caches that get rows of their own, 2 new tokens each: a cache per
    # call, dropped when its call returns
    calls = MAX_CACHES_AS_ROWS + 4
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        for _ in range(calls):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, do_sample=False
            )
    assert len(_caches_in_log(run)) == calls

    # WHEN the HTML timeline is written
    page = tmp_path / "report.html"
    assert main(["report", str(run), "--no-export", "-q", "-o", str(page)]) == 0
    capsys.readouterr()
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")
    (heatmap,) = [t for t in traces if t["type"] == "heatmap"]

    # THEN a row is a layer summed over the caches held at each step (one at a time here), and a column a
    # step named with its phase: layers x steps cells, no per-cell text (a row per cache and layer grew
    # with calls x steps)
    assert heatmap["y"] == [f"all caches L{layer}" for layer in range(LAYERS)]
    assert heatmap["x"] == [
        f"{2 * call + step} {phase}"
        for call in range(calls)
        for step, phase in ((1, "prefill"), (2, "decode"))
    ]
    assert "text" not in heatmap and "customdata" not in heatmap
    titles = [a["text"] for a in layout["annotations"]]
    assert f"summed over the caches held then ({calls} caches, at most 1 at once)" in " ".join(titles)
    # AND each cell is the layer's live KV at the step's end: K + V of the prompt at prefill, one more
    # position after the decode step (the cache's storage of the torch.cat), in KiB (the colour bar's unit)
    assert heatmap["colorbar"]["title"]["text"] == "KiB"
    per_layer = [2 * kv_bytes(KV_HEADS, HEAD_DIM, tokens, 1, FP32) for tokens in (PROMPT, PROMPT + 1)]
    assert per_layer == [3072, 3328]
    assert [[cell * 1024 for cell in row] for row in heatmap["z"]] == [per_layer * calls] * LAYERS


def test_many_generate_outputs_held_text_report_sums_each_layer_over_the_caches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN more generate() calls than caches that get rows of their own, every output held: call i (0 to
    # 11) on a prompt of 23 - i tokens, 2 new tokens, so its cache holds 24 - i positions (the last token is
    # never written back), the first call's the biggest, the last call's (the main cache) the smallest
    calls = MAX_CACHES_AS_ROWS + 4
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    ids = torch.randint(3, 1000, (1, PROMPT + calls), generator=torch.Generator().manual_seed(4))
    run = tmp_path / "run"
    held = []
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        for call in range(calls):
            prompt = ids[:, : PROMPT + calls - 1 - call]
            held.append(
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=2,
                    min_new_tokens=2,
                    do_sample=False,
                    return_dict_in_generate=True,
                )
            )
    tokens = [PROMPT + calls - call for call in range(calls)]  # 24 down to 13
    assert [out.past_key_values.get_seq_length() for out in held] == tokens
    ids_in_log = list(dict.fromkeys(e.cache for e in read_run(run).kv_events))  # in the order of the calls
    assert len(ids_in_log) == calls
    k_or_v = [kv_bytes(KV_HEADS, HEAD_DIM, n, 1, FP32) for n in tokens]  # 128 B a position
    assert [2 * LAYERS * b for b in k_or_v] == [1024 * n for n in tokens]  # a cache: 1 KiB a position

    # WHEN the terminal report is printed
    assert main(["report", str(run), "--no-export"]) == 0
    text = capsys.readouterr().out

    # THEN the per-layer table has a row per layer, K and V summed over the 12 caches: 128 B x (24 + 23 +
    # ... + 13 = 222 positions) = 28,416 B each, 12 caches holding 13 to 24 positions a row
    assert sum(tokens) == 222 and sum(k_or_v) == 28_416
    assert "    per layer, summed over the 12 caches (--json has each cache's rows):" in text
    assert "    layer      K bytes      V bytes  caches  tokens/row  evicted (all rows)" in text
    for layer in range(LAYERS):
        assert f"    {layer:>5} {28_416:>12,} {28_416:>12,} {calls:>7} {'13-24':>11} {0:>19}" in text
    # ... and no row per cache and layer
    assert "cache layer" not in text
    # AND the caches are one line of how many, held how much (222 KiB), then the main one and the 3 biggest
    assert (
        f"    caches: {calls}, {calls} of them held at the end (222.00 KiB), --json lists every one; the "
        "headline figures are the main cache's. The main one and the 3 biggest others:"
    ) in text
    named = [(ids_in_log[-1], " main", 13), *((ids_in_log[call], "", 24 - call) for call in range(3))]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    caches: "))
    assert lines[start + 1 : start + 5] == [
        f"    {cache:>5}{role:<5} {LAYERS} layers, {n}.00 KiB held, {n} tokens x 1 rows, "
        f"{PER_TOKEN:,}.0 bytes per token"
        for cache, role, n in named
    ]
    assert lines[start + 5].startswith("    per layer, summed")

    # AND --json keeps every cache's figures and every cache's layer row
    kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]
    assert [(c["cache"], c["final_bytes"]) for c in kv["caches"]] == [
        (cache, 1024 * n) for cache, n in zip(ids_in_log, tokens, strict=True)
    ]
    assert [(r["cache"], r["layer"], r["k_bytes"], r["v_bytes"], r["tokens"]) for r in kv["per_layer"]] == [
        (cache, layer, b, b, n)
        for cache, b, n in zip(ids_in_log, k_or_v, tokens, strict=True)
        for layer in range(LAYERS)
    ]


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
            first = model.generate(prompt(1, 20, 1), **cache_arg(chat), **kwargs)  # chat: 21 positions
            other = model.generate(prompt(3, 30, 2), return_dict_in_generate=True, **kwargs)
            dropped = weakref.ref(other.past_key_values)
            del other
            gc.collect()
            assert dropped() is None
            next_turn = torch.cat([first, prompt(1, 38, 3)], 1)  # 60 tokens, 21 of them held
            model.generate(next_turn, **cache_arg(chat), **kwargs)  # chat: 61 positions
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


# Two models served in one block, `record(model=m1)`: m1 writes 1 row x (5 + 6 - 1) tokens, m2 (the same
# shape, other weights) 3 rows x (9 + 3 - 1)
M1_ROWS, M1_PROMPT, M1_NEW, M2_ROWS, M2_PROMPT, M2_NEW = 1, 5, 6, 3, 9, 3
M1_TOKENS, M2_TOKENS = M1_PROMPT + M1_NEW - 1, M2_PROMPT + M2_NEW - 1
OTHER_MODEL = "was updated outside the forwards and generate() calls of the model passed to record()"


def _two_models() -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    m1, m2 = (
        build_model(tiny_size(LAYERS, KV_HEADS), seed=0),
        build_model(tiny_size(LAYERS, KV_HEADS), seed=1),
    )
    a = torch.randint(3, 1000, (M1_ROWS, M1_PROMPT), generator=torch.Generator().manual_seed(1))
    b = torch.randint(3, 1000, (M2_ROWS, M2_PROMPT), generator=torch.Generator().manual_seed(2))
    return m1, m2, a, b


def _generate(model: Any, ids: torch.Tensor, new: int, **kwargs: Any) -> Any:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        **kwargs,
    )


def _rows_of_caches(run: Path) -> dict[int, int]:
    """cache id -> the batch rows of its KV tensors, from the raw log."""
    return {e.cache: e.shape[0] for e in read_run(run).kv_events if e.shape}


def _check_another_models_cache(run: Path, kept: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """The report of a run where m2 generated beside the recorded m1: m1's cache is the headline's, m2's is
    counted in the totals and named in a warning."""
    rows = _rows_of_caches(run)
    (m1_cache,) = [c for c, n in rows.items() if n == M1_ROWS]
    (m2_cache,) = [c for c, n in rows.items() if n == M2_ROWS]
    m1_bytes, m2_bytes = PER_TOKEN * M1_TOKENS * M1_ROWS, PER_TOKEN * M2_TOKENS * M2_ROWS  # 10,240, 33,792
    data = _cli_json(["report", str(run), "--no-export"], capsys)
    kv = data["kv"]
    # THEN the headline's cache is m1's: its tokens, its batch, its bytes per token
    assert data["steps"] == M1_NEW
    assert (kv["main_cache"], kv["tokens_held"], kv["batch"]) == (m1_cache, M1_TOKENS, M1_ROWS)
    # AND m2's KV, which the process held at the end, is in the totals
    by_id = {c["cache"]: c for c in kv["caches"]}
    assert by_id[m2_cache]["final_bytes"] == m2_bytes and not by_id[m2_cache]["main"]
    if kept:  # both outputs held: both caches at the end
        assert kv["final_bytes"] == m1_bytes + m2_bytes
        assert kv["bytes_per_token_measured"] == PER_TOKEN
        held = [n for n in data["notes"] if "2 KV caches were held at the end" in n]
        assert held and f"are cache {m1_cache}'s ({LAYERS} layers, given to the recorded model's" in held[0]
    else:  # m1's output dropped before m2 generated: its cache was freed, m2's held at the end
        assert by_id[m1_cache]["final_bytes"] == 0
        assert kv["final_bytes"] == m2_bytes
        assert kv["bytes_per_token_measured"] is None  # m1's cache holds nothing to measure at the end
    # AND the manifest and every report say which cache was another model's, and that it is counted
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["model_caches"], manifest["other_caches"]) == ([m1_cache], [m2_cache])
    (warning,) = [n for n in data["notes"] if OTHER_MODEL in n]
    assert warning.startswith(f"transformers cache {m2_cache} ")
    assert "Its KV is counted in the KV totals and the memory figures" in warning
    diagnosis = _cli_json(["diagnose", str(run)], capsys)
    assert any(OTHER_MODEL in note for note in diagnosis["notes"])


@pytest.mark.parametrize("kept", [True, False], ids=["outputs-kept", "outputs-dropped"])
def test_another_model_generating_after_the_recorded_one_is_not_its_main_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kept: bool
) -> None:
    # GIVEN record(model=m1), and m2 (another model, same shape) generating after it in the same block
    m1, m2, a, b = _two_models()
    run = tmp_path / "run"
    outputs = []
    with torch.no_grad(), kvtrace.record(run, model=m1, profiler=False):
        first = _generate(m1, a, M1_NEW)
        if kept:
            outputs.append(first)
        del first
        gc.collect()
        outputs.append(_generate(m2, b, M2_NEW))
    # WHEN it is reported THEN m1's cache is the headline's, m2's counted in the totals and named
    assert [o.past_key_values.get_seq_length() for o in outputs][-1] == M2_TOKENS
    _check_another_models_cache(run, kept, capsys)


def test_a_cache_dropped_before_another_models_known_cache_goes_on_is_freed_once_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN record(model=m1): m2's cache prefilled (9 tokens), m1's generate() making its own cache and
    # dropping it, then m2's generate() going on with its cache, already known: no step of m1 nor new cache
    # comes to retire m1's, whose released storages the allocator may hand to m2's new ones (the writer's
    # drain after every update, as it may fall there by chance). Before, m1's storages stayed in their
    # slots: a storage was logged freed at each new storage of m2 at its address (twice, in 4 of 5 runs),
    # or after one (a new storage over one still live)
    m1, m2, a, b = _two_models()
    more = torch.cat([b, torch.full((M2_ROWS, 1), 5)], 1)  # the prefill's 9 tokens are cached
    m1_made = LAYERS * 2 * M1_NEW  # a K and a V per layer and step: created at prefill, grown after
    m1_bytes = sum(PER_TOKEN * tokens * M1_ROWS for tokens in range(M1_PROMPT, M1_PROMPT + M1_NEW))
    m2_tokens = M2_PROMPT + 1 + M2_NEW - 1
    for attempt in range(3):  # stable, whichever addresses the allocator hands out
        run = tmp_path / f"run{attempt}"
        cache = DynamicCache(config=m2.config)
        with torch.no_grad(), kvtrace.record(run, model=m1, profiler=False) as recording:
            flush_after_each_update(recording)
            m2(b, attention_mask=torch.ones_like(b), use_cache=True, **cache_arg(cache))
            dropped = weakref.ref(_generate(m1, a, M1_NEW).past_key_values)
            gc.collect()
            assert dropped() is None
            _generate(m2, more, M2_NEW, **cache_arg(cache))
        assert cache.get_seq_length() == m2_tokens

        # WHEN its log is read and it is reported
        events = read_run(run).kv_events
        kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]

        # THEN every storage is freed once at most, and m1's, each freed, before m2's next line
        rows = _rows_of_caches(run)
        (m1_cache,) = [c for c, n in rows.items() if n == M1_ROWS]
        (m2_cache,) = [c for c, n in rows.items() if n == M2_ROWS]
        # (a `freed` with no storage live under its cache, layer, K/V and address: the same storage's twice)
        assert_well_ordered(events)
        made = [e for e in events if e.cache == m1_cache and e.event in ("created", "grown")]
        freed = [e for e in events if e.cache == m1_cache and e.event == "freed"]
        m1_last = max(e.seq for e in made)
        m2_next = min(e.seq for e in events if e.cache == m2_cache and e.seq > m1_last)
        assert len(made) == len(freed) == m1_made
        assert max(e.seq for e in freed) < m2_next
        assert_addresses_freed_before_reuse(events)
        # AND the bytes are the arithmetic's (4 layers x K and V x 2 KV heads x 16 dims x float32): m1's
        # storages freed, 1 row of 5..10 tokens (46,080 B in all), none held at the end; m2's 3 rows of 12
        # tokens held (36,864 B)
        assert sum(e.storage_bytes for e in freed) == sum(e.storage_bytes for e in made) == m1_bytes == 46_080
        by_id = {c["cache"]: c for c in kv["caches"]}
        assert by_id[m1_cache]["final_bytes"] == 0
        assert (
            by_id[m2_cache]["final_bytes"] == kv["final_bytes"] == PER_TOKEN * m2_tokens * M2_ROWS == 36_864
        )


class _PausingStreamer(BaseStreamer):
    """Holds generate() after its first new token until `resume` is set, saying so by `paused`."""

    def __init__(self) -> None:
        self.paused, self.resume = threading.Event(), threading.Event()
        self.puts = 0

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:  # the prompt, then the prefill's token
            self.paused.set()
            assert self.resume.wait(60)

    def end(self) -> None:
        self.paused.set()


def test_another_model_generating_on_another_thread_during_the_recorded_generate_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN m1 recorded on a worker thread, and m2 generating on the main thread while m1's generate() is in
    # progress (held after its prefill): a server hosting two models
    m1, m2, a, b = _two_models()
    run = tmp_path / "run"
    streamer = _PausingStreamer()
    outputs: dict[str, Any] = {}

    def worker() -> None:
        with torch.no_grad(), kvtrace.record(run, model=m1, profiler=False):
            outputs["m1"] = _generate(m1, a, M1_NEW, streamer=streamer)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert streamer.paused.wait(60)
        with torch.no_grad():
            outputs["m2"] = _generate(m2, b, M2_NEW)
    finally:
        streamer.resume.set()
        thread.join()
    assert outputs["m1"].past_key_values.get_seq_length() == M1_TOKENS
    # WHEN it is reported THEN m1's cache is the headline's, m2's counted in the totals and named
    _check_another_models_cache(run, True, capsys)


SPIKE_BYTES = 64 << 20  # a tensor the recording thread allocates last: the run's peak, far above activations
UNTRACED = "first used on another thread than the one that entered record()"


def test_another_model_on_another_thread_has_its_kv_in_the_traced_memory_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN record(model=m1) with the profiler on, and m2 generating on a second thread while m1 generates
    # on the recording thread (torch.profiler records that thread's memory events only); both outputs are
    # kept, and the recording thread then allocates 64 MiB, the run's peak, with both caches held
    m1, m2, a, b = _two_models()
    run = tmp_path / "run"
    outputs: dict[str, Any] = {}

    def other() -> None:
        with torch.no_grad():
            outputs["m2"] = _generate(m2, b, M2_NEW)

    with torch.no_grad(), kvtrace.record(run, model=m1):
        thread = threading.Thread(target=other)
        thread.start()
        outputs["m1"] = _generate(m1, a, M1_NEW)
        thread.join()
        spike = torch.empty(SPIKE_BYTES, dtype=torch.uint8)
        del spike
    assert outputs["m2"].past_key_values.get_seq_length() == M2_TOKENS
    rows = _rows_of_caches(run)
    (m1_cache,) = [c for c, n in rows.items() if n == M1_ROWS]
    (m2_cache,) = [c for c, n in rows.items() if n == M2_ROWS]
    m1_bytes, m2_bytes = PER_TOKEN * M1_TOKENS * M1_ROWS, PER_TOKEN * M2_TOKENS * M2_ROWS  # 10,240, 33,792

    # WHEN it is reported
    data = _cli_json(["report", str(run), "--no-export"], capsys)

    # THEN the manifest says which other cache the trace cannot show
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model_caches"] == [m1_cache]
    assert manifest["other_caches"] == manifest["other_caches_on_other_threads"] == [m2_cache]
    # AND the KV at the peak and at the end is both caches', as the KV section has it (m2's from the log)
    (device,) = data["devices"]
    assert device["peak_allocated_bytes"] >= SPIKE_BYTES
    assert data["categories_at_peak"]["kv"] == m1_bytes + m2_bytes == data["kv"]["final_bytes"]
    _source, report = build_report(run)
    (timeline,) = report.timelines
    assert int(timeline.by_category["kv"][-1]) == m1_bytes + m2_bytes
    # AND the warning no longer says its memory is in the figures; the reader's note says what is
    (warning,) = [n for n in data["notes"] if OTHER_MODEL in n]
    assert "Its KV is counted in the KV totals (the process held it)," in warning
    assert f"Cache {m2_cache} was {UNTRACED}" in warning and "memory figures (the process" not in warning
    (note,) = [n for n in data["notes"] if n.startswith("the profiler's trace has no allocation of cache")]
    storages = sum(
        1 for s in read_run(run).kv_events if s.cache == m2_cache and s.event in ("created", "grown")
    )
    assert f"cache {m2_cache} (another model's, {UNTRACED}" in note
    assert f"its KV ({storages} storages, from the KV log, at the log's times) is added" in note
    assert "that model's activations are in none of them" in note
    # AND diagnose takes the peak as a lower bound
    diagnosis = _cli_json(["diagnose", str(run)], capsys)
    assert (
        diagnosis["peak_leaves_out"] == f"another model's activations (cache {m2_cache}'s, on another thread)"
    )


def test_text_report_names_another_models_cache_once_the_models_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN m1 (recorded) generating, its output dropped, then m2 generating in the same block: only m2's
    # cache holds KV at the end, and the headline's cache (m1's) holds nothing
    m1, m2, a, b = _two_models()
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=m1, profiler=False):
        first = _generate(m1, a, M1_NEW)
        del first
        gc.collect()
        kept = _generate(m2, b, M2_NEW)
    assert kept.past_key_values.get_seq_length() == M2_TOKENS
    rows = _rows_of_caches(run)
    (m1_cache,) = [c for c, n in rows.items() if n == M1_ROWS]
    (m2_cache,) = [c for c, n in rows.items() if n == M2_ROWS]
    k_or_v = kv_bytes(KV_HEADS, HEAD_DIM, M2_TOKENS, M2_ROWS, FP32)  # 4,224 B per layer's K (or V)

    # WHEN the terminal report is printed
    assert main(["report", str(run), "--no-export"]) == 0
    text = capsys.readouterr().out

    # THEN the per-layer rows say they are m2's cache, and the caches are listed with m1's as the main one
    assert "    cache layer      K bytes      V bytes  tokens/row  evicted (all rows)" in text
    for layer in range(LAYERS):
        assert f"    {m2_cache:>5} {layer:>5} {k_or_v:>12,} {k_or_v:>12,} {M2_TOKENS:>11} {0:>19}" in text
    assert f"    {m1_cache:>5} main {LAYERS} layers, 0 B held, {M1_TOKENS} tokens x {M1_ROWS} rows" in text
    # AND m1's tokens and batch, the headline's, are said though it holds nothing to measure
    assert (
        f"bytes per token: measured - ({M1_TOKENS} tokens x {M1_ROWS} row of cache {m1_cache}, which holds "
        f"nothing at the end), arithmetic {PER_TOKEN:,}"
    ) in text
    # AND the notebook's per-layer table has the cache column too
    _source, report = build_report(run)
    assert "<th>cache</th><th>layer</th>" in report._repr_html_()


class _MetaStyleAttention(torch.nn.Module):
    """Meta's reference layout: preallocated `cache_k`/`cache_v` written in place at `start_pos`."""

    def __init__(self, max_seq: int) -> None:
        super().__init__()
        self.cache_k = torch.zeros(1, max_seq, KV_HEADS, HEAD_DIM)
        self.cache_v = torch.zeros(1, max_seq, KV_HEADS, HEAD_DIM)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:  # x: [1, seq, kv_heads, head_dim]
        self.cache_k[:, start_pos : start_pos + x.shape[1]] = x
        self.cache_v[:, start_pos : start_pos + x.shape[1]] = -x
        return x


def test_thousands_of_caches_never_take_the_module_or_tracked_caches_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], watched_models: list[torch.nn.Module]
) -> None:
    # GIVEN a model with a Meta-style module cache (16 positions, 4 written), a tracked K of 5 tokens, and
    # 2000 transformers caches updated once with 3 tokens in layer 0, the 1000th and the 2000th still held
    hf_caches, max_seq, written, tracked_tokens, tokens = 2000, 16, 4, 5, 3
    model = _MetaStyleAttention(max_seq).eval()
    watched_models.append(model)
    run = tmp_path / "run"
    held = []
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model(torch.ones(1, written, KV_HEADS, HEAD_DIM), 0)
        tracked = torch.zeros(1, KV_HEADS, tracked_tokens, HEAD_DIM)
        kvtrace.track(tracked, layer=0, kind="k")
        for number in range(1, hf_caches + 1):
            cache = DynamicCache()
            keys = torch.zeros(1, KV_HEADS, tokens, HEAD_DIM)
            cache.update(keys, torch.zeros_like(keys), 0)
            if number in (1000, 2000):
                held.append(cache)

    # THEN the log gives each source ids of its own: the transformers caches count 1 to 2101 without 1000 to
    # 1099 (the module caches', one per cache-holding module of a layer) and 2000, the module cache is 1000
    # and the tracked tensor 2000, and nothing was evicted
    recorded = read_run(run)
    events = recorded.kv_events
    ids: dict[str, set[int]] = {}
    for event in events:
        ids.setdefault(event.source, set()).add(event.cache)
    hf_ids = [cid for cid in range(1, hf_caches + 102) if not 1000 <= cid < 1100 and cid != 2000]
    assert len(hf_ids) == hf_caches
    assert ids == {"hf": set(hf_ids), "module": {1000}, "track": {2000}}
    # ... and the manifest names the transformers caches no forward of the model was given by those ids
    assert recorded.manifest["other_caches"] == hf_ids
    assert not [e for e in events if e.event == "evicted" or e.evicted_tokens]
    tracked_bytes = kv_bytes(KV_HEADS, HEAD_DIM, tracked_tokens, 1, FP32)  # 1x2x5x16x4 = 640
    assert {(e.event, e.storage_bytes) for e in events if e.source == "track"} == {("created", tracked_bytes)}

    # AND the report holds the arithmetic: the module's two buffers, the tracked K, the two held caches
    kv = _cli_json(["report", str(run), "--no-export"], capsys)["kv"]
    buffer_bytes = max_seq * KV_HEADS * HEAD_DIM * FP32
    hf_bytes = kv_bytes(KV_HEADS, HEAD_DIM, tokens, 1, FP32)  # 1x2x3x16x4 = 384 for K, the same for V
    assert kv["evicted_tokens"] == 0
    assert kv["final_bytes"] == 2 * buffer_bytes + tracked_bytes + 2 * 2 * hf_bytes
    rows = {row["cache"]: (row["k_bytes"], row["v_bytes"], row["tokens"]) for row in kv["per_layer"]}
    assert rows == {
        1000: (buffer_bytes, buffer_bytes, written),
        hf_ids[999]: (hf_bytes, hf_bytes, tokens),  # the 1000th, 1100
        2000: (tracked_bytes, 0, tracked_tokens),
        hf_ids[-1]: (hf_bytes, hf_bytes, tokens),  # the 2000th, 2101
    }


# The recorded model's own work, never another model's: B rows of P prompt tokens, then N one-token forwards
OWN_ROWS, OWN_PROMPT, OWN_NEW = 2, 8, 5
BASE_CALLED = (
    "the KV cache was updated at layer 0 {updates} times, but never in a forward of the model passed to "
    "record() (LlamaForCausalLM): in forwards of its submodule model.model (LlamaModel), called directly, "
    "which begin no step, so the log has no steps, and per-step figures and tokens/s are left out; "
    "record(model=model.model) has them"
)


def _own_ids(tokens: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 1000, (OWN_ROWS, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_cache_made_in_the_models_own_forward_is_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    # GIVEN one forward of the recorded model with no cache passed (transformers makes a DynamicCache inside
    # it): in eval mode without grad, or in train mode with its backward
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = _own_ids(OWN_PROMPT)
    run = tmp_path / "run"
    with torch.set_grad_enabled(mode == "train"), kvtrace.record(run, model=model, profiler=False):
        if mode == "train":
            model.train()
            output = model(input_ids=ids, labels=ids)
            output.loss.backward()
        else:
            output = model(input_ids=ids)
    assert output.past_key_values.get_seq_length() == OWN_PROMPT
    # WHEN it is reported
    data = _cli_json(["report", str(run), "--no-export"], capsys)
    manifest = json.loads((run / "manifest.json").read_text())
    # THEN the cache is the model's own, no other model's: no warning, listed among the model's caches
    assert manifest["warnings"] == [] and manifest["model_caches"] == [1] and "other_caches" not in manifest
    assert not any(OTHER_MODEL in note for note in data["notes"])
    # AND its KV is 1,024 B per position and row: 8 positions x 2 rows
    kv = data["kv"]
    assert (data["steps"], kv["tokens_held"], kv["batch"]) == (1, OWN_PROMPT, OWN_ROWS)
    assert kv["final_bytes"] == PER_TOKEN * OWN_PROMPT * OWN_ROWS == 16_384


def _base_model_loop(model: Any, cache: Any) -> None:
    """The decoder backbone (`model.model`) run directly: a prefill of the prompt, then OWN_NEW one-token
    forwards, on `cache`, with the cache positions a static cache needs."""
    backbone = model.model
    backbone(input_ids=_own_ids(OWN_PROMPT), **cache_arg(cache), cache_position=torch.arange(OWN_PROMPT))
    for i in range(OWN_NEW):
        position = torch.tensor([OWN_PROMPT + i])
        backbone(input_ids=_own_ids(1, seed=10 + i), **cache_arg(cache), cache_position=position)


def _cache_of(kind: str, config: Any, room: int) -> Any:
    if kind == "dynamic":
        return DynamicCache(config=config)
    return StaticCache(config=config, max_cache_len=room)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_the_base_model_called_directly_is_named_not_another_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    # GIVEN record(model=model), and its decoder backbone `model.model` run directly on a cache: a prefill of
    # 8 tokens and 5 one-token forwards
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    config = model.config
    room = 32
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        cache = _cache_of(kind, config, room)
        _base_model_loop(model, cache)
    # WHEN it is reported
    data = _cli_json(["report", str(run), "--no-export"], capsys)
    manifest = json.loads((run / "manifest.json").read_text())
    # THEN the warning names the submodule and what to pass to record(), not another model
    said = BASE_CALLED.format(updates=1 + OWN_NEW)
    assert manifest["warnings"] == [said] and said in data["notes"]
    # AND the KV figures are the cache's: 13 positions x 2 rows, a static cache's 32 slots a row
    tokens = OWN_PROMPT + OWN_NEW
    assert data["steps"] == 0
    assert data["kv"]["final_bytes"] == PER_TOKEN * (tokens if kind == "dynamic" else room) * OWN_ROWS

    # AND the remedy it says works: record(model=model.model) takes each forward for a step
    again = tmp_path / "again"
    with torch.no_grad(), kvtrace.record(again, model=model.model, profiler=False):
        cache = _cache_of(kind, config, room)
        _base_model_loop(model, cache)
    data = _cli_json(["report", str(again), "--no-export"], capsys)
    assert json.loads((again / "manifest.json").read_text())["warnings"] == []
    assert (data["steps"], data["kv"]["tokens_held"], data["kv"]["batch"]) == (1 + OWN_NEW, tokens, OWN_ROWS)


def test_a_cache_of_the_base_model_called_beside_the_models_forwards_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a forward of the recorded model (its own cache, 1), then its backbone run directly on a cache of
    # its own (2)
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        own = model(input_ids=_own_ids(OWN_PROMPT)).past_key_values
        cache = DynamicCache(config=model.config)
        _base_model_loop(model, cache)
    assert (own.get_seq_length(), cache.get_seq_length()) == (OWN_PROMPT, OWN_PROMPT + OWN_NEW)
    # WHEN it is reported
    data = _cli_json(["report", str(run), "--no-export"], capsys)
    manifest = json.loads((run / "manifest.json").read_text())
    # THEN cache 2 is named as the backbone's, called directly, not another model's
    said = (
        "transformers cache 2 (the KV log's `cache`) was updated in forwards of submodule model.model "
        "(LlamaModel) of the model passed to record() (LlamaForCausalLM), called directly: those forwards "
        "begin no step, so their updates are logged within the steps of the model's own forwards "
        "(record(model=model.model) makes them steps)"
    )
    assert manifest["warnings"] == [said] and said in data["notes"]
    assert manifest["model_caches"] == [1] and "other_caches" not in manifest
    # AND both caches' KV is counted: 8 positions x 2 rows, and 13 x 2
    assert data["kv"]["final_bytes"] == PER_TOKEN * (OWN_PROMPT + OWN_PROMPT + OWN_NEW) * OWN_ROWS
