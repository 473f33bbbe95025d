"""`kvtrace diagnose` names a shorter context as `kvtrace plan --context` takes it: prompt + new tokens, one
more than the cache holds (generate() never feeds back its last token), so that the figure plans as typed.
Before, it counted the tokens the cache held: on the demo's run of a 20-token prompt and 32 new tokens it
said "A context of 41 tokens instead of 51" where plan said context 52 and "Shorten the context to 42"."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW = 2, 2, 2, 3, 49  # a short prompt: the peak is the last step's
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32
SHORT_BY = 10_000  # bytes the budget is below the run's peak: 10 tokens of KV across the batch


def test_diagnose_names_the_context_that_plan_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run of a 3-token prompt and 49 new tokens (context 52, the cache holding 51 at its end), on a
    # budget 10,000 B below its peak, its last decode step's
    run = tmp_path / "run"
    record_generate(build_model(tiny_size(LAYERS, KV_HEADS)).eval(), run, BATCH, PROMPT, NEW)
    budget = report_json(run, capsys)["peak_allocated_bytes"] - SHORT_BY
    # WHEN diagnosed on that budget
    diagnosis = cli_json(["diagnose", str(run), "--json", "--budget", f"{budget}B"], capsys)
    assert diagnosis["tokens_held"] == PROMPT + NEW - 1
    (context,) = [r for r in diagnosis["remedies"] if r["kind"] == "context"]
    # THEN its context is prompt + new tokens less the tokens whose KV covers the shortfall, its bytes those
    cut = math.ceil(SHORT_BY / (TOKEN_ROW * BATCH))
    assert (context["setting"], context["saved_bytes"]) == (PROMPT + NEW - cut, cut * TOKEN_ROW * BATCH)
    assert f"A context of {PROMPT + NEW - cut} tokens instead of {PROMPT + NEW} " in context["sentence"]
    # AND typed into plan at that budget, it holds one token fewer in its cache, and fits
    typed = plan_json(run, capsys, "--gpu-memory", f"{budget}B", "--context", str(context["setting"]))
    assert typed["kv_bytes"] == TOKEN_ROW * BATCH * (PROMPT + NEW - cut - 1)
    assert typed["fits"]
    # AND plan of the run on that budget names the same context
    plan = plan_json(run, capsys, "--gpu-memory", f"{budget}B")
    (remedy,) = [r for r in plan["remedies"] if r["kind"] == "context"]
    assert remedy["setting"] == plan["max_context"] == context["setting"]
