"""`kvtrace plan --from-run` says which moment of the run its activations are: the run's peak moved to the
plan (`run_peak`), or, where the plan's own prefill or KV peak is its worst moment, what the run held at its
prefill (`prefill`) or at its KV peak, a decode step's cache update (`last_update`). Before, both of those
were said `run_peak`, and the text's activations row called them "the run's at the peak's moment"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.cli_json import cli_json, plan_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, ROWS, PROMPT, NEW = 2, 2, 2, 11, 6
LAYER_K = KV_HEADS * HEAD_DIM * 4  # one layer's K (or V) of a token of a row, float32
TOKEN_ROW = LAYERS * 2 * LAYER_K  # every layer's K and V of a token of a row


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A greedy generate() of the tiny Llama on a dynamic cache, 2 rows of 11 tokens, 6 new: it peaks at a
    decode step."""
    model = build_model(tiny_size(LAYERS, KV_HEADS)).eval()
    found = tmp_path_factory.mktemp("activations_moment") / "dynamic"
    record_generate(model, found, ROWS, PROMPT, NEW, "dynamic")
    return found


def _activations_row(run: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """The text plan's activations row of `run` planned with `flags`."""
    main(["plan", "--from-run", str(run), *flags])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  activations ")]
    assert len(rows) == 1, rows
    return rows[0]


def _is_the_peak(plan: dict[str, Any]) -> None:
    assert plan["peak_bytes"] == plan["weights_bytes"] + plan["kv_at_peak_bytes"] + plan["activations_bytes"]


def test_the_run_itself_is_its_peak(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the run, which peaked decoding
    assert cli_json(["diagnose", str(run), "--json"], capsys)["step_phase"] == "decode"
    # WHEN it is planned as recorded
    plan = plan_json(run, capsys)
    # THEN its activations are its peak's, said so
    assert plan["activations_moment"] == "run_peak"
    assert "(the run's at the peak's moment, scaled to this plan;" in _activations_row(run, capsys)


def test_a_longer_context_names_the_last_update(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # WHEN the run is planned at context 300, whose last decode step's cache update (the growth copy of a
    # layer's K beside the whole KV) outweighs the run's peak moved there
    plan = plan_json(run, capsys, "--context", "300")
    # THEN the moment is the last update, holding that KV peak by the arithmetic, and the text says whose
    # activations those are
    assert plan["activations_moment"] == "last_update"
    assert plan["kv_at_peak_bytes"] == TOKEN_ROW * ROWS * 299 + LAYER_K * ROWS * 298
    _is_the_peak(plan)
    row = _activations_row(run, capsys, "--context", "300")
    assert (
        "(the run's at its KV peak, a decode step's cache update, scaled to this plan's last update;" in row
    )
    assert "peak's moment" not in row


def test_a_static_cache_names_the_prefill(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # WHEN the run is planned on a static cache, whose prefill holds all of its length beside what the run
    # held during its own prefill
    plan = plan_json(run, capsys, "--cache", "static")
    # THEN the moment is the prefill, holding the whole static cache, and the text says so
    assert plan["activations_moment"] == "prefill"
    assert plan["kv_at_peak_bytes"] == TOKEN_ROW * ROWS * (PROMPT + NEW - 1)
    _is_the_peak(plan)
    row = _activations_row(run, capsys, "--cache", "static")
    assert "(the run's during its prefill, the most it held there beside its weights and KV," in row
    assert "peak's moment" not in row
