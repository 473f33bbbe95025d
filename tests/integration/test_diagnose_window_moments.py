"""`kvtrace diagnose`'s sliding-window remedy prices each of the sliding cache's KV figures beside its own
moment, as `kvtrace plan --from-run RUN --cache sliding --window N` does: the whole prompt's KV (held on
every layer until the first decode step) beside what the run held at its prefill, the KV peak beside what
it held at a cache update, the window beside the diagnosed moment's memory. Before, the KV peak (the prompt
on every layer plus a new window) went beside the diagnosed moment's activations, a decode step's end
holding its logits over a 32,000-token vocabulary: a moment no run holds. The demo's Llama at a 76 MiB
budget was told "No sliding window fits, even of 2 tokens" where a window of 10 records 74.74 MiB, and at
96 MiB offered a window of 43 where 54 records 95.67 MiB, within it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtrace.llama import ModelSize, build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import record_generate

ROWS, PROMPT, NEW, WINDOW = 4, 24, 8, 6  # a window far shorter than the prompt
SIZE = ModelSize(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=32000,
    head_dim=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> Any:
    import torch

    torch.manual_seed(0)
    return build_model(SIZE).eval()


@pytest.fixture(scope="module")
def runs(model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() on a dynamic cache, and on a sliding one of window 6."""
    folder = tmp_path_factory.mktemp("window_moments")
    found = {name: folder / name for name in ("dynamic", "sliding")}
    record_generate(model, found["dynamic"], ROWS, PROMPT, NEW)
    record_generate(model, found["sliding"], ROWS, PROMPT, NEW, "sliding", window=WINDOW)
    return found


def _window(diagnosis: dict[str, Any]) -> dict[str, Any]:
    return next(remedy for remedy in diagnosis["remedies"] if remedy["kind"] == "sliding_window")


def test_the_window_remedy_prices_the_window_a_recording_fits(
    model: Any, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a budget that the sliding cache's recording at window 6 just fits (it peaks at its prefill)
    budget = report_json(runs["sliding"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is diagnosed at that budget
    diagnosis = cli_json(["diagnose", str(runs["dynamic"]), "--budget", str(budget), "--json"], capsys)
    remedy = _window(diagnosis)
    # THEN a window fits, no smaller than the one recorded to fit (before: "No sliding window fits")
    assert remedy["fits"] is True, remedy["sentence"]
    window = remedy["setting"]
    assert window >= WINDOW
    # AND the run it prices is the plan's at that window, the largest window the plan fits in the budget
    priced = diagnosis["allocated_bytes"] - remedy["saved_bytes"]
    assert (
        priced
        == plan_json(runs["dynamic"], capsys, "--cache", "sliding", "--window", str(window))["peak_bytes"]
    )
    assert priced <= budget
    above = plan_json(runs["dynamic"], capsys, "--cache", "sliding", "--window", str(window + 1))
    assert above["peak_bytes"] > budget
    # AND the recording of that window peaks there
    record_generate(model, tmp_path / "proposed", ROWS, PROMPT, NEW, "sliding", window=window)
    assert report_json(tmp_path / "proposed", capsys)["peak_allocated_bytes"] == priced


def test_without_a_budget_the_window_is_priced_as_its_recording(
    model: Any, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic run diagnosed with no budget: the window proposed is a quarter of the context fewer
    diagnosis = cli_json(["diagnose", str(runs["dynamic"]), "--json"], capsys)
    remedy = _window(diagnosis)
    window = remedy["setting"]
    # THEN what it frees is the run's peak less the plan's at that window (before: the KV peak beside the
    # step's end's logits, less than it frees)
    plan = plan_json(runs["dynamic"], capsys, "--cache", "sliding", "--window", str(window))
    assert remedy["saved_bytes"] == diagnosis["allocated_bytes"] - plan["peak_bytes"]
