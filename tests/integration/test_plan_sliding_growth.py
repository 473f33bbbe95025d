"""`kvtrace plan --from-run` of a sliding-window run counts what still grows where every layer slides, and
plans a full cache from it at the run's own activations. Before, on the tiny Llama (2 layers, batch 2, a
3-token prompt, a window of 8): planned from context 12 at 206, the sliding plan said 618,004 B where the
recording peaked at 624,212 (-6,208 B: generate()'s int64 ids and mask, 2 rows x 194 tokens x 16 B); a
dynamic cache planned from the sliding run at its own context said 640,262 B for a recording of 621,076
(+19,186 B, +3.1%: all activations grown by context / (window + 1)), and at context 206, 2,221,664 B for
839,960 (+164.5%). Under transformers 5.17, whose sliding run peaks at generate()'s concatenation of the ids
and mask (old pair and new live), the dynamic plan at 206 counted that pair at the growth copy too: 845,768 B
for a recording of 843,192 (+0.31%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.geometry import transformers_version
from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import record_generate, tiny_size

BATCH, PROMPT, WINDOW, SHORT, LONG = 2, 3, 8, 12, 206
ID_AND_MASK = 8 + 8  # generate()'s input_ids and attention mask: an int64 each, a row and token
# Under transformers 5.17 a sliding run peaks where generate() grows its ids and mask by concatenation, the
# step's old pair (a token shorter) still live beside the new: twice the pair a row and token (measured at
# 5.17; 5.25 peaks past it)
PEAK_TOKEN_BYTES = ID_AND_MASK if (transformers_version() or (5, 25)) >= (5, 25) else 2 * ID_AND_MASK


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() with a sliding and a dynamic cache, at contexts 12 and 206."""
    model = build_model(tiny_size(2, 2)).eval()
    folder = tmp_path_factory.mktemp("sliding_growth")
    found = {}
    for cache in ("sliding", "dynamic"):
        for context in (SHORT, LONG):
            found[f"{cache}{context}"] = folder / f"{cache}{context}"
            new = context - PROMPT
            record_generate(model, found[f"{cache}{context}"], BATCH, PROMPT, new, cache, WINDOW)
    return found


def test_a_sliding_plan_at_a_longer_context_counts_generates_ids_and_mask(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sliding run at context 12, and its recording at 206, higher by the ids and mask alone
    short = report_json(runs[f"sliding{SHORT}"], capsys)["peak_allocated_bytes"]
    measured = report_json(runs[f"sliding{LONG}"], capsys)["peak_allocated_bytes"]
    assert measured - short == BATCH * (LONG - SHORT) * PEAK_TOKEN_BYTES
    # WHEN the short run is planned at context 206
    plan = plan_json(runs[f"sliding{SHORT}"], capsys, "--context", str(LONG))
    # THEN the window caps its KV, but the plan peaks where the recording did
    assert plan["peak_bytes"] == measured
    assert plan["request"]["recorded"]["token_row_bytes"] == PEAK_TOKEN_BYTES


def test_a_full_cache_planned_from_a_sliding_run_keeps_its_activations(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for context in (SHORT, LONG):
        # GIVEN the dynamic cache's recording at the sliding run's context
        measured = report_json(runs[f"dynamic{context}"], capsys)["peak_allocated_bytes"]
        # WHEN the dynamic cache is planned from the sliding run
        plan = plan_json(runs[f"sliding{context}"], capsys, "--cache", "dynamic")
        # THEN at context 12 (a step-end peak, its logits, ids and mask as the sliding run's) it is the
        # recording; at 206 (the growth copy's, beside the ids the sliding run held at its early KV peak)
        # within a tenth of a percent
        if context == SHORT:
            assert plan["peak_bytes"] == measured
        assert abs(plan["peak_bytes"] - measured) <= measured * 0.001, (context, plan["peak_bytes"], measured)
