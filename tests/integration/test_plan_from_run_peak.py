"""`kvtrace plan --from-run` counts the run's own activations: the plan of the run itself peaks where the
recording did, and a plan in another batch or context bounds (or equals) that batch's or context's own
recording. Before, its peak was weights + KV peak + a 10% reserve, whatever the run measured beside them
(`kvtrace demo --cache static`: 95.17 MiB planned, "fits", for a run that peaked at 111.87 MiB)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW = 2, 2, 4, 11, 6
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    main(argv)
    captured = capsys.readouterr()
    assert captured.out, captured.err
    return json.loads(captured.out)


def _report(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return _json(["report", str(run), "--json", "--no-export", "-q"], capsys)


def _plan(run: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    return _json(["plan", "--from-run", str(run), *flags, "--json"], capsys)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_the_plan_of_the_run_itself_peaks_where_the_recording_did(
    model: Any, cache: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() recorded with its allocator events (the profiler's), on a budget below its peak
    run = tmp_path / "run"
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    options = {"cache_implementation": cache} if cache else {}
    with torch.no_grad(), kvtrace.record(run, model=model, gpu_memory=600 << 10):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0, **options,
        )  # fmt: skip
    report = _report(run, capsys)
    peak = report["peak_allocated_bytes"]
    assert report["categories_at_peak"]["other"] > 0  # activations and logits beside weights and KV
    # WHEN it is planned from the run alone
    plan = _plan(run, capsys)
    # THEN its KV is the arithmetic's, and its peak the recording's, activations included, no reserve beside
    assert plan["kv_bytes"] == TOKEN_ROW * BATCH * (PROMPT + NEW - 1)
    assert plan["peak_bytes"] == peak
    assert plan["request"]["reserve_bytes"] == 0
    assert plan["activations_bytes"] == peak - plan["weights_bytes"] - plan["kv_peak_bytes"]
    # and it runs out of the budget the report says the run crosses
    assert report["budget"]["crossed"] and not plan["fits"]
    assert main(["plan", "--from-run", str(run)]) == 1
    assert "activations" in capsys.readouterr().out
    # a typed reserve goes on top of the measured peak
    reserved = _plan(run, capsys, "--reserve", "64KiB")
    assert reserved["peak_bytes"] == peak + (64 << 10)


def test_a_plan_in_another_batch_or_context_bounds_its_own_recording(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run, and the same generate() recorded at half and twice its rows and 3 new tokens fewer
    runs = {name: tmp_path / name for name in ("run", "half", "double", "shorter")}
    record_generate(model, runs["run"], BATCH, PROMPT, NEW)
    record_generate(model, runs["half"], BATCH // 2, PROMPT, NEW)
    record_generate(model, runs["double"], BATCH * 2, PROMPT, NEW)
    record_generate(model, runs["shorter"], BATCH, PROMPT, NEW - 3)
    measured = {name: _report(path, capsys) for name, path in runs.items()}
    peak = measured["run"]["peak_allocated_bytes"]
    # The tiny model peaks at its prefill (the logits of every prompt token): its KV then is the prompt's
    assert measured["run"]["categories_at_peak"]["kv"] == TOKEN_ROW * BATCH * PROMPT
    run = runs["run"]
    # WHEN half the batch is planned: the moment's KV falls by half, the activations are kept as measured
    half = _plan(run, capsys, "--batch", str(BATCH // 2))["peak_bytes"]
    # THEN that is the run's peak less half the prompt's KV: an upper bound of the recording (activations
    # shrink with the rows too), well under the run's own peak
    assert half == peak - TOKEN_ROW * (BATCH // 2) * PROMPT
    assert measured["half"]["peak_allocated_bytes"] <= half < peak
    # WHEN twice the batch is planned: the activations grow in proportion, an upper bound again
    double = _plan(run, capsys, "--batch", str(BATCH * 2))["peak_bytes"]
    activations = peak - measured["run"]["categories_at_peak"]["weights"] - TOKEN_ROW * BATCH * PROMPT
    assert double == peak + TOKEN_ROW * BATCH * PROMPT + activations
    assert measured["double"]["peak_allocated_bytes"] <= double
    # WHEN a shorter context on the same prompt is planned: the prefill moment is unchanged, exactly
    shorter = _plan(run, capsys, "--context", str(PROMPT + NEW - 3), "--prompt", str(PROMPT))
    assert shorter["peak_bytes"] == measured["shorter"]["peak_allocated_bytes"] == peak
    assert shorter["kv_bytes"] == TOKEN_ROW * BATCH * (PROMPT + NEW - 4)
