"""`kvtrace diagnose` on a run whose weights alone reach the budget it was recorded for: the remedies open
with smaller weights, priced on the weights the run measured, since no KV remedy can make it fit.

A tiny Llama 3 in float32 records generate() without the profiler under budgets below and above its
weights; every expected figure is arithmetic on the model's own parameter bytes and the KV log's.
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

import kvtrace
from analyzers.planning.size_text import parse_device_memory
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import tiny_size, weights_bytes

LAYERS, BATCH, PROMPT, NEW = 2, 2, 8, 4


def _diagnosis(run: Path, budget: int, model: Any) -> dict[str, Any]:
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, gpu_memory=budget):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["diagnose", str(run), "--json"]) == 0
    return json.loads(out.getvalue())


def test_weights_over_the_budget_lead_the_remedies_at_the_first_dtype_that_fits(tmp_path: Path) -> None:
    # GIVEN a float32 model recorded for a device three quarters of its weights
    model = build_model(tiny_size(LAYERS))
    weights = weights_bytes(model)
    budget = weights * 3 // 4

    # WHEN it is diagnosed
    run = tmp_path / "run"
    d = _diagnosis(run, budget, model)

    # THEN the first remedy is 16-bit weights: half the weights, more than the shortfall (a quarter of them
    # and the KV at the peak), and the sentence names the plan that prices the whole run so
    first = d["remedies"][0]
    assert (first["kind"], first["setting"], first["saved_bytes"], first["fits"]) == (
        "weights", 16, weights - weights // 2, True,
    )  # fmt: skip
    assert d["shortfall_bytes"] == d["allocated_bytes"] - budget < weights // 2
    plan = re.search(
        r"`kvtrace plan --from-run (\S+) --gpu-memory (\S+) --dtype bf16` plans it whole", first["sentence"]
    )
    assert plan is not None and plan.group(1) == str(run)
    assert parse_device_memory(plan.group(2), "--gpu-memory") == budget  # the budget, as plan reads it
    assert all(r["kind"] != "weights" for r in d["remedies"][1:])


def test_weights_far_over_the_budget_get_int4_marked_not_enough(tmp_path: Path) -> None:
    # GIVEN a budget of an eighth of the weights: even 4-bit weights leave an eighth and the KV over it
    model = build_model(tiny_size(LAYERS))
    weights = weights_bytes(model)
    d = _diagnosis(tmp_path / "run", weights // 8, model)

    first = d["remedies"][0]
    assert (first["kind"], first["setting"], first["saved_bytes"], first["fits"]) == (
        "weights", 4, weights - weights // 8, False,
    )  # fmt: skip
    assert "not enough for the" in first["sentence"]


def test_weights_under_the_budget_get_no_weights_remedy(tmp_path: Path) -> None:
    # GIVEN a budget above the weights, crossed by the KV and the weights together
    model = build_model(tiny_size(LAYERS))
    d = _diagnosis(tmp_path / "run", weights_bytes(model) + 1024, model)

    assert d["event"] == "budget"
    assert d["remedies"] and all(r["kind"] != "weights" for r in d["remedies"])
