"""`kvtrace plan --from-run` of a run that peaked at its prefill, at fewer rows: its decode steps' ends hold
the logits processors' vectors over the vocabulary, which no row count changes, so at one row a step's end
can outweigh the prefill's activations scaled down. Before, only the peak's moment was scaled: the demo's
Llama with a static cache, recorded at 8 rows and planned at 1, said 55,172,433 B where the batch-1
recording peaked at a step's end at 55,879,783 (1.3% under)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import SIZES, build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import record_generate

ROWS, PROMPT, NEW, PADDED = 8, 20, 64, 5
TOKEN_ROW = 4 * 2 * 8 * 256 * 4  # the demo's 4 layers' K and V, 8 KV heads of 256, float32: a token of a row


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same greedy generate() on a static cache at 8 rows, the first left-padded (its prefill's sdpa mask
    makes that the peak), and at 1, unpadded."""
    model = build_model(SIZES["demo"]).eval()
    folder = tmp_path_factory.mktemp("prefill_peak_rows")
    found = {}
    for rows in (ROWS, 1):
        found[rows] = folder / f"static{rows}"
        record_generate(model, found[rows], rows, PROMPT, NEW, "static", padded=PADDED if rows > 1 else 0)
    return found


def test_fewer_rows_than_a_prefill_peak_plan_the_step_end(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the 8-row run, which peaked at its static prefill, and the 1-row recording, which peaked later
    assert cli_json(["diagnose", str(runs[ROWS]), "--json"], capsys)["step_phase"] == "prefill"
    measured = report_json(runs[1], capsys)
    kv = TOKEN_ROW * (PROMPT + NEW - 1)
    assert measured["categories_at_peak"]["kv"] == kv
    peak = measured["peak_allocated_bytes"]
    # WHEN the 8-row run is planned at one row
    plan = plan_json(runs[ROWS], capsys, "--batch", "1")
    # THEN its KV is the arithmetic's and its peak bounds the recording's, within 0.1%
    assert plan["kv_bytes"] == kv
    assert peak <= plan["peak_bytes"] <= peak * 1.001, (plan["peak_bytes"], peak)
