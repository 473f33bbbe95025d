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
