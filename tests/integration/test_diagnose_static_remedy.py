"""`kvtrace diagnose`'s static cache remedy is priced against the run's whole peak: a StaticCache allocates
every position of max_cache_len, every layer and row, at its first update, so where a dynamic run peaked at
its prefill it raises the peak; and under beam search each step's reorder still copies a layer's K whole,
which a static cache does not remove. Before, it promised the dynamic cache's KV peak less its final KV (a
decode step's torch.cat copy) whatever the moment, and a run already static under beam search was offered
a static cache for its reorder's transient. Each figure is checked against the static run recorded."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from analyzers.units import human_bytes
from kvtrace.llama import ModelSize, build_model
from tests.cli_json import cli_json, report_json
from tests.tiny import cache_arg, record_generate

LAYERS, KV_HEADS, HEAD_DIM, ROWS, PROMPT, NEW = 3, 2, 32, 3, 10, 12
# the walkthrough's Llama 3: 4 heads of 32, 2 KV heads, an MLP of 256; its prefill is its peak at 3 rows
SIZE = ModelSize(
    hidden_size=128, intermediate_size=256, num_layers=LAYERS, num_heads=4, num_kv_heads=KV_HEADS,
    vocab_size=1000,
)  # fmt: skip
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32
PROMPTS, BEAMS, BEAM_NEW = 2, 2, 6
# The static run recorded holds a few bytes more beside its KV than the dynamic run did (generate()'s own
# small tensors): the remedy's peak may be below it by at most this
SLACK = 256


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Greedy runs (3 rows, a 10-token prompt, 12 new tokens, unpadded) with a dynamic and a static cache,
    and a beam search (2 prompts x 2 beams, 6 new tokens) with each."""
    model = build_model(SIZE).eval()
    folder = tmp_path_factory.mktemp("static_remedy")
    found = {name: folder / name for name in ("dynamic", "static", "beams", "beams_static")}
    record_generate(model, found["dynamic"], ROWS, PROMPT, NEW)
    record_generate(model, found["static"], ROWS, PROMPT, NEW, "static")
    ids = torch.randint(3, 1000, (PROMPTS, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)  # alive to the block's end: the run tells its prompts were not padded
    for name in ("beams", "beams_static"):
        given: dict[str, Any] = {}
        if name == "beams_static":  # generate() sizes its own so: the last new token is never fed back
            from transformers import StaticCache

            given = cache_arg(StaticCache(config=model.config, max_cache_len=PROMPT + BEAM_NEW - 1))
        gc.collect()
        with torch.no_grad(), kvtrace.record(found[name], model=model):
            model.generate(
                ids, attention_mask=mask, max_new_tokens=BEAM_NEW, min_new_tokens=BEAM_NEW,
                num_beams=BEAMS, do_sample=False, pad_token_id=0, **given,
            )  # fmt: skip
    return found


def _static_remedy(
    run: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diagnose's JSON, its static_cache remedy)."""
    data = cli_json(["diagnose", str(run), "--json", *flags], capsys)
    (static,) = [r for r in data["remedies"] if r["kind"] == "static_cache"]
    return data, static


def test_a_static_cache_raises_a_peak_at_the_prefill(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic run, which peaks at its prefill (3 rows x 10 tokens of KV), under a budget it misses
    peak = report_json(runs["dynamic"], capsys)["peak_allocated_bytes"]
    static_peak = report_json(runs["static"], capsys)["peak_allocated_bytes"]
    # WHEN diagnosed
    data, static = _static_remedy(runs["dynamic"], capsys, "--budget", f"{peak - 1024}B")
    # THEN the moment is the prefill, holding the prompt's KV
    assert data["step_phase"] == "prefill" and data["kv_bytes"] == ROWS * PROMPT * TOKEN_ROW
    # AND a static cache's KV, all 21 positions of every layer for the 3 rows, replaces it: the peak rises
    # by the difference (no attention over the cache's length: sdpa on unpadded prompts makes none)
    static_kv = ROWS * (PROMPT + NEW - 1) * TOKEN_ROW
    assert static["saved_bytes"] == ROWS * PROMPT * TOKEN_ROW - static_kv < 0
    assert static["fits"] is False
    raised = human_bytes(static_kv - data["kv_bytes"])
    assert static["sentence"].startswith(
        f"A static cache (cache_implementation='static') would raise the peak by {raised}"
    )
    assert f"{human_bytes(static_kv)} of KV" in static["sentence"]
    # AND that is the static run recorded, within generate()'s own few bytes
    assert 0 <= static_peak - (peak - static["saved_bytes"]) <= SLACK


def test_a_static_run_under_beam_search_is_not_offered_a_static_cache(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the beam search with a StaticCache, whose KV peak holds the reorder's copy of a layer's K
    data, static = _static_remedy(runs["beams_static"], capsys)
    reorder = PROMPTS * BEAMS * (PROMPT + BEAM_NEW - 1) * TOKEN_ROW // LAYERS // 2
    assert data["kv_peak_bytes"] - data["kv_final_bytes"] == reorder
    # THEN it saves nothing and says the transient is beam search's reorder, not a torch.cat copy
    assert static["saved_bytes"] == 0
    assert "torch.cat" not in static["sentence"]
    assert static["sentence"] == (
        f"The cache already is a StaticCache, written in place: the {human_bytes(reorder)} transient at its "
        f"KV peak is beam search's reorder (num_beams={BEAMS}: each step copies a layer's K and V by "
        "index_select), which a static cache makes too."
    )


def test_a_static_cache_under_beam_search_keeps_the_reorder_transient(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic beam search and the static one recorded
    peak = report_json(runs["beams"], capsys)["peak_allocated_bytes"]
    static_peak = report_json(runs["beams_static"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic one is diagnosed
    data, static = _static_remedy(runs["beams"], capsys)
    # THEN the static cache's peak keeps the reorder's copy of a layer's K over all 15 positions of the 4
    # rows beside its preallocated KV: what the static run recorded, within generate()'s own few bytes
    rows = PROMPTS * BEAMS
    reorder = rows * (PROMPT + BEAM_NEW - 1) * TOKEN_ROW // LAYERS // 2
    kept = f"beam search's reorder still copies a layer's K (or V) whole beside it ({human_bytes(reorder)})"
    assert kept in static["sentence"]
    assert 0 <= static_peak - (peak - static["saved_bytes"]) <= SLACK
    assert data["beams"] == BEAMS


def test_a_static_run_within_its_budget_is_not_marked_as_a_remedy_that_fits(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the static run under a budget 1 MiB over its peak: it fits as recorded
    peak = report_json(runs["static"], capsys)["peak_allocated_bytes"]
    data, static = _static_remedy(runs["static"], capsys, "--budget", f"{peak + 2**20}B")
    assert data["shortfall_bytes"] < 0 and static["saved_bytes"] == 0
    # WHEN the diagnosis is read as text
    from kvtrace.cli import main

    assert main(["diagnose", str(runs["static"]), "--budget", f"{peak + 2**20}B"]) == 0
    text = capsys.readouterr().out
    # THEN the static cache, which it is already, saves nothing and is marked so, not "[static_cache, fits]"
    (line,) = [ln for ln in text.splitlines() if "[static_cache" in ln]
    assert line.endswith("[static_cache, no] " + static["sentence"]) and "already writes in place" in line
