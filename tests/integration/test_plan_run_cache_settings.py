"""What a run's cache chose for itself, not its model, stays the run's cache's in `kvtrace plan
--from-run` and `kvtrace diagnose`, and a typed flag of another kind leaves it behind.

Before: a run whose sliding cache (`kvtrace demo --cache sliding`) kept a window the full-attention model
lacks was planned with `--cache dynamic` or `--cache static` at that window (the demo's tiny Llama, 2 rows,
a 4-token window: KV 8,192 B where the dynamic recording held 22,528, its peak planned 10,240 B below the
recording's), and diagnose refused it an int4 QuantizedCache for the model's "4 sliding layers"; an fp8
QuantizedCache's run planned with another `--dtype` was planned as an int4 cache (28,857,856 B of KV at
100,000 tokens where fp8 holds 51,199,520)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtrace.llama import build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.hf_versions import HAS_FP8_CACHE, needs_fp8_cache
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW, WINDOW = 2, 2, 2, 6, 6, 4
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32
HELD = PROMPT + NEW - 1  # the tokens a full cache holds at the end: the last new one is never fed back
RUNS = {
    "dynamic": ("dynamic", torch.float32),
    "static": ("static", torch.float32),
    "sliding": ("sliding", torch.float32),
    "static_sliding": ("static_sliding", torch.float32),
    "fp8": ("fp8", torch.float32),
    "fp8-bf16": ("fp8", torch.bfloat16),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same generate() recorded with each cache `kvtrace demo --cache` builds (the model in float32; the
    fp8 QuantizedCache in bfloat16 too), on a model whose config gives no window."""
    folder = tmp_path_factory.mktemp("run_cache_settings")
    for name, (kind, dtype) in RUNS.items():
        if kind == "fp8" and not HAS_FP8_CACHE:
            continue
        model = build_model(tiny_size(LAYERS, KV_HEADS)).eval().to(dtype)
        assert getattr(model.config, "sliding_window", None) is None
        record_generate(model, folder / name, BATCH, PROMPT, NEW, cache=kind, window=WINDOW)
    return {name: folder / name for name in RUNS}


@pytest.mark.parametrize("source", ["sliding", "static_sliding"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_typed_full_cache_plans_without_the_runs_window(
    runs: dict[str, Path], source: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the recording of the full cache asked for, holding every token of every row
    measured = report_json(runs[kind], capsys)
    assert measured["kv"]["final_bytes"] == TOKEN_ROW * BATCH * HELD
    # WHEN a run whose cache slid is planned as that cache
    plan = plan_json(runs[source], capsys, "--cache", kind)
    # THEN the model keeps its config's full attention, no window of the run's cache's
    assert plan["request"]["cache"] == kind
    assert plan["request"]["window"] is None
    assert plan["request"]["geometry"]["sliding_window"] is None
    # AND it holds what the recording held, its KV peak too, and its peak bounds the recording's
    assert plan["kv_bytes"] == TOKEN_ROW * BATCH * HELD
    assert plan["kv_peak_bytes"] == measured["kv"]["peak_bytes"]
    assert plan["peak_bytes"] >= measured["peak_allocated_bytes"]
    assert not any("planned as a sliding cache" in note for note in plan["notes"])
    # AND a plan of the run's own cache still keeps its window
    own = plan_json(runs[source], capsys)
    assert (own["request"]["cache"], own["request"]["window"]) == (source, WINDOW)


def test_diagnose_offers_a_quantized_cache_to_a_full_attention_model_whose_cache_slid(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a sliding cache's run of a model whose config gives no window, diagnosed under its peak
    peak = report_json(runs["sliding"], capsys)["peak_allocated_bytes"]
    diagnosis = cli_json(["diagnose", str(runs["sliding"]), "--budget", f"{peak - 1024}B", "--json"], capsys)
    # WHEN its int4 remedy is read
    int4 = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 4]
    # THEN it does not say the model's layers slide (a QuantizedCache takes this model), and it leaves the
    # pricing to plan: the QuantizedCache keeps every token, which the window's held tokens do not price
    assert len(int4) == 1
    assert "sliding layer" not in int4[0]["sentence"]
    assert "keeps every token" in int4[0]["sentence"]
    assert int4[0]["saved_bytes"] is None


@needs_fp8_cache
def test_an_fp8_quantized_run_keeps_its_kv_dtype_under_another_dtype(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 QuantizedCache's recording with the model in bf16
    measured = report_json(runs["fp8-bf16"], capsys)
    # WHEN the float32 run is planned in bf16
    plan = plan_json(runs["fp8"], capsys, "--dtype", "bf16")
    # THEN its cache stays fp8, and holds what the bf16 recording held
    assert (plan["request"]["cache"], plan["request"]["kv_dtype"]) == ("quantized", "fp8")
    assert plan["kv_bytes"] == measured["kv"]["final_bytes"]
    assert plan["kv_peak_bytes"] == measured["kv"]["peak_bytes"]
    # AND at a long context it plans the bf16 run's own fp8 KV, not an int4 cache's
    long = ("--context", "100000", "--prompt", "50000")
    planned = plan_json(runs["fp8"], capsys, "--dtype", "bf16", *long)
    assert planned["kv_bytes"] == plan_json(runs["fp8-bf16"], capsys, *long)["kv_bytes"]
    # AND an explicit --kv-dtype still wins
    typed = plan_json(runs["fp8"], capsys, "--dtype", "bf16", "--kv-dtype", "int4")
    assert typed["request"]["kv_dtype"] == "int4"
