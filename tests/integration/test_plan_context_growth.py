"""`kvtrace plan --from-run` at a longer context grows only the activations over the context (generate()'s
ids and mask, attention's over the context), the rest by the rows alone. Before, it grew them all in
proportion to the context: on the tiny Llama (2 layers, batch 2, a 3-token prompt) the dynamic cache
planned from context 12 at 206 said 1,758,499 B where the recording peaked at 839,960 (+109.4%: the step's
logits grown 206 / 12 times); and a sliding cache (window 8) planned from the dynamic run at 206 said
596,472 B for a recording of 624,212 (-4.4%: the logits of its step's end, unseen at its growth-copy peak)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import record_generate, tiny_size

BATCH, PROMPT, WINDOW, SHORT, LONG = 2, 3, 8, 12, 206
WITHIN = 0.03  # a plan from a short run may be over its recording by this share, never under


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() with a dynamic cache at contexts 12 and 206, and a sliding one at 206."""
    model = build_model(tiny_size(2, 2)).eval()
    folder = tmp_path_factory.mktemp("context_growth")
    found = {}
    for cache, context in (("dynamic", SHORT), ("dynamic", LONG), ("sliding", LONG)):
        found[f"{cache}{context}"] = folder / f"{cache}{context}"
        record_generate(model, found[f"{cache}{context}"], BATCH, PROMPT, context - PROMPT, cache, WINDOW)
    return found


def test_a_longer_context_keeps_the_steps_logits(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic run at context 12, and its recording at 206
    measured = report_json(runs[f"dynamic{LONG}"], capsys)["peak_allocated_bytes"]
    # WHEN the short run is planned at context 206
    plan = plan_json(runs[f"dynamic{SHORT}"], capsys, "--context", str(LONG))
    # THEN the plan is an upper bound of the recording, a tight one
    assert measured <= plan["peak_bytes"] <= measured * (1 + WITHIN), (plan["peak_bytes"], measured)


def test_a_sliding_cache_from_a_dynamic_run_counts_its_steps_end(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sliding cache's recording at 206, which peaks at a step's end holding its logits
    measured = report_json(runs[f"sliding{LONG}"], capsys)["peak_allocated_bytes"]
    # WHEN it is planned from the dynamic run at 206, which peaked inside a cache update
    plan = plan_json(runs[f"dynamic{LONG}"], capsys, "--cache", "sliding", "--window", str(WINDOW))
    # THEN the step's end the dynamic run held (its peak less its weights and final KV) bounds it
    assert measured <= plan["peak_bytes"] <= measured * (1 + WITHIN), (plan["peak_bytes"], measured)
