"""`kvtrace plan --from-run RUN --cache static` of an eager run on a dynamic cache prices the static prefill's
attention (its mask, K and V expanded to the query heads, its scores) over the cache's positions beyond the
run's prompt only: the run's own prefill made all of them over its prompt's positions, and its measured
prefill activations hold them. Before, it priced them over every position of the cache, on top of the run's
prefill that already held those over the prompt: the tiny Llama below (bf16, 8 rows, 20-token prompt, 16
new tokens) planned 1,018,232 B where the static recording of the same generate() peaked at 749,496 B,
35.9% over (the report that led here said 25.8%); 817,272 B after, 9.0%; now 749,496 B, the recording's:
its scores priced as bf16 holds them (10 bytes a head and pair, not 3 float32 copies), over the cache's 35
positions, not the context's 36, beside what the run held while its last layer attended, not its prefill's
most."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW = 2, 2, 8, 20, 16
CONTEXT = PROMPT + NEW
BF16 = 2
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * BF16  # every layer's K and V of one token of one row


@pytest.fixture(scope="module", params=["unpadded", "padded"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy eager generate() on a dynamic and on a static cache; padded: the first row's prompt
    half padding (eager's mask has the same shape either way)."""
    model = build_model(tiny_size(LAYERS, KV_HEADS), dtype=torch.bfloat16).eval()
    model.set_attn_implementation("eager")
    folder = tmp_path_factory.mktemp(f"static_from_eager_{request.param}")
    padded = PROMPT // 2 if request.param == "padded" else 0
    found = {}
    for cache in ("dynamic", "static"):
        found[cache] = folder / cache
        record_generate(model, found[cache], BATCH, PROMPT, NEW, cache, padded=padded)
    return found


def test_a_dynamic_eager_run_planned_static_prices_attention_beyond_its_prompt(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic run, which peaked at its prefill holding the prompt's KV
    dynamic = report_json(runs["dynamic"], capsys)
    assert dynamic["categories_at_peak"]["kv"] == TOKEN_ROW * BATCH * PROMPT
    # AND the static recording of the same generate(): its KV the whole cache, 35 positions a row
    static = report_json(runs["static"], capsys)
    kv = TOKEN_ROW * BATCH * (CONTEXT - 1)
    assert static["categories_at_peak"]["kv"] == kv
    # WHEN the dynamic run is planned with --cache static at its own batch and context
    plan = plan_json(runs["dynamic"], capsys, "--cache", "static")
    # THEN its KV is the recording's, and so is its peak, byte for byte (9.0% over before)
    assert plan["kv_bytes"] == kv
    assert plan["peak_bytes"] == static["peak_allocated_bytes"]
