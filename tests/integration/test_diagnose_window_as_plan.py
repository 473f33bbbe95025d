"""`kvtrace diagnose`'s sliding-window remedy prices the window with `kvtrace plan`'s arithmetic
(analyzers.planning.dynamic_kv), so its figures are `plan --from-run RUN --cache sliding --window N`'s, byte
for byte, and a recording's. Before, diagnose kept a formula of its own, which stored a window longer than
the prompt from the prefill on: on the tiny Llama below (2 rows, an 8-token prompt whose every position's
logits the prefill keeps, 72 new tokens), 30,000 B short, it proposed a window of 43 priced at 778,404 B
where the plan and the recording say 739,224 B, and the largest window that fits is 55 (776,056 B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.llama import build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, ROWS, PROMPT, NEW = 2, 4, 2, 8, 72
SHORT_BY = 30_000  # bytes the budget is below the dynamic run's peak
LAYER_ROW = 2 * KV_HEADS * HEAD_DIM * 4  # one layer's K and V of one token of one row, float32
TOKEN = LAYERS * LAYER_ROW * ROWS  # a token of every layer, across the rows


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


def test_the_window_diagnose_proposes_is_priced_as_plan_prices_it_and_as_it_records(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a dynamic run whose prefill keeps the logits of every prompt position (the prefill is a large
    # moment beside a short prompt), diagnosed 30,000 B short of its peak, a decode step's
    run = tmp_path / "dynamic"
    record_generate(model, run, ROWS, PROMPT, NEW, logits_to_keep=0)
    budget = report_json(run, capsys)["peak_allocated_bytes"] - SHORT_BY
    diagnosis = cli_json(["diagnose", str(run), "--json", "--budget", f"{budget}B"], capsys)
    (remedy,) = [r for r in diagnosis["remedies"] if r["kind"] == "sliding_window"]
    window = remedy["setting"]
    # WHEN the window it proposes is planned from the run
    plan = plan_json(run, capsys, "--cache", "sliding", "--window", str(window))
    # THEN a window longer than the prompt fits, and the run it prices is the plan's, byte for byte
    assert remedy["fits"] is True, remedy["sentence"]
    assert window > PROMPT
    priced = diagnosis["allocated_bytes"] - remedy["saved_bytes"]
    assert priced == plan["peak_bytes"] <= budget
    # AND its KV figures are the plan's and the arithmetic's: the window on every layer once generation
    # passes it; at its peak, one layer's new window made beside every layer's old one
    assert plan["kv_bytes"] == window * TOKEN
    assert plan["kv_peak_bytes"] == window * TOKEN + window * LAYER_ROW * ROWS
    held, peak = human_bytes(plan["kv_bytes"]), human_bytes(plan["kv_peak_bytes"])
    said = f"holds {held} of KV at most once generation passes {window:,} tokens, {peak} at its peak"
    assert said in remedy["sentence"]
    # AND it is the largest window the plan fits in the budget
    assert plan_json(run, capsys, "--cache", "sliding", "--window", str(window + 1))["peak_bytes"] > budget
    # AND the recording of that window peaks there
    record_generate(model, tmp_path / "proposed", ROWS, PROMPT, NEW, "sliding", window, logits_to_keep=0)
    assert report_json(tmp_path / "proposed", capsys)["peak_allocated_bytes"] == priced


def _beam_search(model: Any, run: Path, cache: Any = None) -> None:
    """A recorded beam search of 2 beams on 2 prompts (4 rows) of 10 tokens, 30 new tokens each."""
    import torch

    import kvtrace
    from tests.tiny import cache_arg

    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    given = cache_arg(cache) if cache is not None else {}
    with torch.no_grad(), kvtrace.record(run, model=model):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30, do_sample=False,
            pad_token_id=0, num_beams=2, **given,
        )  # fmt: skip


def test_under_beam_search_the_window_is_priced_at_a_steps_end_as_it_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.llama import make_cache

    model = build_model(tiny_size(LAYERS, 2)).eval()
    rows, token = 4, LAYERS * 2 * 2 * HEAD_DIM * 4  # a token of every layer of a row, 2 KV heads, float32
    # GIVEN a beam search on a dynamic cache, diagnosed with no budget
    _beam_search(model, tmp_path / "dynamic")
    diagnosis = cli_json(["diagnose", str(tmp_path / "dynamic"), "--json"], capsys)
    (remedy,) = [r for r in diagnosis["remedies"] if r["kind"] == "sliding_window"]
    window = remedy["setting"]
    # WHEN the window it proposes is planned from the run, and recorded
    plan = plan_json(tmp_path / "dynamic", capsys, "--cache", "sliding", "--window", str(window))
    made, _ = make_cache("sliding", model, rows, 40, window=window)
    _beam_search(model, tmp_path / "sliding", made)
    # THEN diagnose, plan and the recording peak alike, at a step's end: every layer's window beside the
    # beams' scores, before the step's reorder compacts it to its last window - 1 tokens (before, plan and
    # recording were a token of every layer and row apart, 2,048 B)
    priced = diagnosis["allocated_bytes"] - remedy["saved_bytes"]
    recorded = report_json(tmp_path / "sliding", capsys)
    assert priced == plan["peak_bytes"] == recorded["peak_allocated_bytes"]
    assert recorded["categories_at_peak"]["kv"] == window * token * rows
    assert plan["kv_bytes"] == (window - 1) * token * rows  # what the cache holds once the last reorder ran
    assert f"holds {human_bytes(window * token * rows)} of KV at most" in remedy["sentence"]
