"""`kvtrace plan --from-run` at a longer context, of a run that peaked at its prefill: that moment's
activations (the prompt's hidden states and logits) follow the rows and the prompt, which `--context` keeps,
not the context, and the run tells no bytes a token of the context adds there (its `context_token_bytes` are
a decode peak's). Before, they grew in proportion to the context: on the tiny Llama (2 layers, batch 2, a
40-token prompt, 4 new tokens) planned from context 44 at 206 the plan said 1,606,175 B where the recording
peaked at 840,504 (+91%; at 400, +134%), and with eager attention, whose last decode step's copies of the KV
were priced beside those grown activations, 2,305,491 B for 1,012,460 (+128%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import record_generate, tiny_size

BATCH, PROMPT, NEW, LONG = 2, 40, 4, 206
WITHIN = 0.03  # a plan from a short run may be over its recording by this share, never under


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same greedy generate() at contexts 44 and 206, with the attention the param names."""
    model = build_model(tiny_size(2, 2)).eval()
    model.config._attn_implementation = request.param
    folder = tmp_path_factory.mktemp(f"prefill_peak_{request.param}")
    short, long = folder / "short", folder / "long"
    record_generate(model, short, BATCH, PROMPT, NEW)
    record_generate(model, long, BATCH, PROMPT, LONG - PROMPT)
    return short, long


def test_a_prefill_peak_planned_at_a_longer_context_bounds_its_recording_closely(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    short, long = runs
    # GIVEN a run that peaked at its prefill, and the same generate() recorded at a longer context, which
    # peaks at a decode step
    assert cli_json(["diagnose", str(short), "--json"], capsys)["step_phase"] == "prefill"
    assert cli_json(["diagnose", str(long), "--json"], capsys)["step_phase"] == "decode"
    measured = report_json(long, capsys)["peak_allocated_bytes"]
    # WHEN the short run is planned at the longer context
    plan = plan_json(short, capsys, "--context", str(LONG))
    # THEN the plan bounds the recording, tightly
    assert measured <= plan["peak_bytes"] <= measured * (1 + WITHIN), (plan["peak_bytes"], measured)
    # AND at the run's own context it is the run's peak, as measured
    own = plan_json(short, capsys)
    assert own["peak_bytes"] == report_json(short, capsys)["peak_allocated_bytes"]
