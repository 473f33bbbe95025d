"""`kvtrace plan --from-run` of a run that peaked at its prefill, at fewer rows: its decode steps' ends hold
the logits processors' vectors over the vocabulary, which no row count changes, so at one row a step's end
can outweigh the prefill's activations scaled down. Before, only the peak's moment was scaled: the demo's
Llama with a static cache, recorded at 8 rows and planned at 1, said 55,172,433 B where the batch-1
recording peaked at a step's end at 55,879,783 (1.3% under). `kvtrace diagnose`'s batch remedy had the same
blind spot: under a budget of 53 MiB it said "Batch 1 instead of 8 frees 59.23 MiB, enough to fit", the
prefill at 1 row, where the 1-row recording's step's end is 53.29 MiB."""

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


def _activations_row(run: Path, capsys: pytest.CaptureFixture[str], batch: int) -> str:
    """The text plan's activations row of `run` planned at `batch` rows."""
    from kvtrace.cli import main

    assert main(["plan", "--from-run", str(run), "--batch", str(batch)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  activations ")]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_activations_row_names_the_decode_step_end_it_priced(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the 1-row recording, which peaked at a step's end: what it held there beside its weights and KV
    measured = report_json(runs[1], capsys)
    beside = measured["categories_at_peak"]["other"]
    # WHEN the 8-row run, which peaked at its prefill, is planned at one row
    plan = plan_json(runs[ROWS], capsys, "--batch", "1")
    row = _activations_row(runs[ROWS], capsys, 1)
    # THEN its activations are a decode step's end, said in the JSON and the text (which called them "the
    # run's at the peak's moment, scaled to this plan": its prefill's scaled were 3.36 MiB, these 4.04),
    # and they bound the recording's at its step's end within 0.1%
    assert "peak's moment, scaled to this plan" not in row
    assert (
        "(the run's at a decode step's end, the most its decode steps held, moved from its 8 rows to 1" in row
    )
    assert plan["activations_moment"] == "decode_step_end"
    assert plan["peak_bytes"] == plan["weights_bytes"] + plan["kv_at_peak_bytes"] + plan["activations_bytes"]
    assert beside <= plan["activations_bytes"] <= beside * 1.001, (plan["activations_bytes"], beside)


@pytest.mark.parametrize("batch", [ROWS, ROWS - 1])
def test_a_plan_at_the_prefill_keeps_the_peak_moment_wording(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str], batch: int
) -> None:
    # GIVEN the 8-row run, planned at its own rows, or at 7, where its prefill scaled (23.01 MiB) still
    # outweighs a decode step's end (21.66 MiB)
    plan = plan_json(runs[ROWS], capsys, "--batch", str(batch))
    row = _activations_row(runs[ROWS], capsys, batch)
    # THEN the activations are the run's peak moment's, and the row says so as it did
    assert "(the run's at the peak's moment, scaled to this plan; beside the weights and the KV cache)" in row
    assert plan["activations_moment"] == "run_peak"


@pytest.mark.parametrize("over", [-1, 2048])
def test_diagnose_batch_remedy_prices_the_step_end_at_fewer_rows(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str], over: int
) -> None:
    # GIVEN the 1-row recording's peak, at a step's end, and a budget a byte under it or 2 KiB over it
    peak = report_json(runs[1], capsys)["peak_allocated_bytes"]
    budget = peak + over
    # WHEN the 8-row run, which peaked at its prefill, is diagnosed under that budget
    found = cli_json(["diagnose", str(runs[ROWS]), "--gpu-memory", str(budget), "--json"], capsys)
    assert found["step_phase"] == "prefill" and found["batch"] == ROWS
    batch = next(remedy for remedy in found["remedies"] if remedy["kind"] == "batch")
    # THEN its batch 1 is priced at the step's end, the byte plan prices it at (within 0.1% over the
    # recording's: the decode steps' most beside the weights and KV, their batch-first share freed), so that
    # batch 1 fits over the recording's peak and not under it. Before, batch 1 fit both budgets: priced at
    # its prefill, 55,172,432 B
    planned = plan_json(runs[ROWS], capsys, "--batch", "1")["peak_bytes"]
    assert found["allocated_bytes"] - batch["saved_bytes"] == planned
    assert peak <= planned <= peak * 1.001, (planned, peak)
    assert batch["fits"] is (over > 0)
    assert batch["setting"] == (1 if over > 0 else None)
    said = "decode step's end" in batch["sentence"] and "vectors over the vocabulary" in batch["sentence"]
    assert said, batch["sentence"]
