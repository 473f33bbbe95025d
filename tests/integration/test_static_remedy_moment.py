"""`kvtrace diagnose`'s static cache remedy and `kvtrace plan --from-run RUN --cache static` price a dynamic
run's static cache at the moment its recording peaks: the prefill's last layer attending over every position
of the cache (its K and V expanded to the query heads and sdpa's mask over them, beside every layer's
preallocated KV), not the dynamic prefill's most (its logits at the step's end) with that attention's extra
on top, two moments never live together. Before, the demo's Llama (8 rows, a 20-token padded prompt, 64 new
tokens) was priced at "at most 122.29 MiB" where its static recording peaks at 111.87 MiB. Each figure is
checked against the static cache's recording of the same generate(), byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtrace.llama import ModelSize, build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import record_generate

# The demo's wide attention (16 heads of 256 over 2 KV heads) on a vocabulary large enough that the dynamic
# prefill holds more at its logits than while a layer attends, yet a static prefill's attention over the
# cache holds more still: the static run peaks there
SIZE = ModelSize(
    hidden_size=64, intermediate_size=256, num_layers=2, num_heads=16, num_kv_heads=2, head_dim=256,
    vocab_size=20000,
)  # fmt: skip
SHAPES = {"8x4": (8, 4, 10, 1), "6x5": (6, 5, 12, 2)}  # rows, prompt, new tokens, the first row's padding


@pytest.fixture(scope="module", params=sorted(SHAPES))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same greedy sdpa generate() on padded prompts, on a dynamic cache and on a static one."""
    rows, prompt, new, padded = SHAPES[request.param]
    model = build_model(SIZE).eval()
    folder = tmp_path_factory.mktemp(f"static_moment_{request.param}")
    found: dict[str, Any] = {"rows": rows, "prompt": prompt, "new": new}
    for cache in ("dynamic", "static"):
        found[cache] = folder / cache
        kind = None if cache == "dynamic" else cache
        record_generate(model, found[cache], rows, prompt, new, kind, padded=padded)
    return found


def _static_remedy(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diagnose's JSON, its static_cache remedy)."""
    data = cli_json(["diagnose", str(run), "--json"], capsys)
    (static,) = [r for r in data["remedies"] if r["kind"] == "static_cache"]
    return data, static


def test_the_static_recording_peaks_while_its_prefill_attends(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the static recording: its KV every position of the cache (the context less one) on both layers
    static = report_json(runs["static"], capsys)
    positions = runs["prompt"] + runs["new"] - 1
    token_row = SIZE.num_layers * 2 * SIZE.num_kv_heads * SIZE.head_dim * 4  # K and V of a token, float32
    assert static["kv"]["final_bytes"] == runs["rows"] * positions * token_row
    # THEN it peaks at its prefill, above the dynamic run's peak: the moment the remedy must price
    dynamic = report_json(runs["dynamic"], capsys)
    assert static["peak_allocated_bytes"] > dynamic["peak_allocated_bytes"]
    data, _ = _static_remedy(runs["static"], capsys)
    assert data["step_phase"] == "prefill"


def test_diagnose_prices_the_static_cache_as_recorded(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the static recording's peak
    recorded = report_json(runs["static"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is diagnosed
    data, static = _static_remedy(runs["dynamic"], capsys)
    # THEN the static cache's peak is the recording's, byte for byte (before: its logits beside the
    # attention's extra, above it)
    assert data["allocated_bytes"] - static["saved_bytes"] == recorded
    # AND the sentence says the exact figures, not a bound
    assert static["sentence"].startswith(
        "A static cache (cache_implementation='static') would raise the peak by "
    )
    assert "up to" not in static["sentence"] and "at most" not in static["sentence"]
    positions = runs["prompt"] + runs["new"] - 1
    assert f"its prefill attends over all {positions:,} positions: " in static["sentence"]


def test_plan_prices_the_static_cache_as_diagnose_does(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the static recording's peak
    recorded = report_json(runs["static"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is planned on a static cache at its own batch and context
    plan = plan_json(runs["dynamic"], capsys, "--cache", "static")
    # THEN the plan's peak is the recording's, byte for byte, the figure diagnose gives
    assert plan["peak_bytes"] == recorded
