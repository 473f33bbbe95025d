"""`kvtrace plan --from-run RUN --context N` of a run that peaked at its prefill, planned on a cache that
keeps every token at a longer context, lands on that cache's recording, byte for byte: its peak is its last
update, the last layer's old K or V beside the whole context's KV.

A sliding run planned `--cache dynamic`: before, the run's decode steps' end (110,244 B beside its KV) grew
in proportion to the context, 60 to 200 tokens (367,480 B), beside the final KV: 1,327,288 B where the
dynamic recording peaked at 1,112,984 (+19.3%). Now it grows by the bytes a row and token adds there
(generate()'s ids and mask), measured at that moment. A dynamic run planned `--cache fp8`: before, the
update's token tensors grew in proportion to the context beside the bytes a token adds, which had grown
them: 149 B over the fp8 recording (4 rows x 7/3 tokens x 16 B)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.hf_versions import HAS_FP8_CACHE, needs_fp8_cache
from tests.tiny import record_generate, tiny_size

# a prompt longer than the window and few new tokens: the short runs peak at their prefill
BATCH, PROMPT, NEW, WINDOW = 4, 40, 20, 16
CONTEXT = 200  # planned, and recorded with PROMPT and CONTEXT - PROMPT new tokens
LAYERS, LAYER_TOKEN = 2, 2 * 2 * 16  # a layer's K and V elements a token: 2 KV heads of 16


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Greedy generate()s of the tiny Llama: short ones with a sliding and a dynamic cache, and long ones
    at the planned context with a dynamic and an fp8 cache."""
    import torch

    folder = tmp_path_factory.mktemp("full_cache_longer_context")
    torch.manual_seed(0)
    model = build_model(tiny_size(LAYERS, 2)).eval()
    found = {name: folder / name for name in ("sliding", "dynamic", "dynamic_long", "fp8_long")}
    record_generate(model, found["sliding"], BATCH, PROMPT, NEW, "sliding", WINDOW)
    record_generate(model, found["dynamic"], BATCH, PROMPT, NEW)
    record_generate(model, found["dynamic_long"], BATCH, PROMPT, CONTEXT - PROMPT)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8_long"], BATCH, PROMPT, CONTEXT - PROMPT, "fp8")
    return found


def test_a_sliding_run_planned_dynamic_at_a_longer_context_is_its_recording(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sliding run, peaking at its prefill
    assert plan_json(runs["sliding"], capsys)["request"]["recorded"]["phase"] == "prefill"
    # AND the dynamic recording at the planned context, peaking inside its last update: both layers' fp32 K
    # and V over the 199 tokens fed, beside the last layer's old K or V (198 tokens)
    report = report_json(runs["dynamic_long"], capsys)
    fed = CONTEXT - 1  # the last token is never fed
    held = LAYERS * BATCH * LAYER_TOKEN * fed * 4 + BATCH * (LAYER_TOKEN // 2) * (fed - 1) * 4
    assert report["categories_at_peak"]["kv"] == held
    # WHEN the sliding run is planned on a dynamic cache at that context
    plan = plan_json(runs["sliding"], capsys, "--cache", "dynamic", "--context", str(CONTEXT))
    # THEN the plan is the recording's peak, to the byte
    assert plan["kv_at_peak_bytes"] == held
    assert plan["peak_bytes"] == report["peak_allocated_bytes"]


@needs_fp8_cache
def test_a_dynamic_run_planned_fp8_at_a_longer_context_is_its_recording(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 recording at the planned context, peaking inside its last step's last update: both
    # layers' 8-bit KV over the 199 tokens fed, with a float32 scale for each layer's K and V, beside the
    # last layer's old K and V
    report = report_json(runs["fp8_long"], capsys)
    fed = CONTEXT - 1
    held = LAYERS * (BATCH * LAYER_TOKEN * fed + 2 * 4) + BATCH * LAYER_TOKEN * (fed - 1)
    assert report["categories_at_peak"]["kv"] == held
    # WHEN the short dynamic run is planned on an fp8 cache at that context
    plan = plan_json(runs["dynamic"], capsys, "--cache", "fp8", "--context", str(CONTEXT))
    # THEN the plan is the recording's peak, to the byte
    assert plan["peak_bytes"] == report["peak_allocated_bytes"]
