"""`kvtrace diagnose`'s quantized KV remedies on a run whose cache grows by torch.cat price the quantized
cache's own peak, a cache update: inside each layer's update, transformers' `Fp8QuantizedLayer`
dequantizes the layer's whole K and V through float32 while the layer's old K and V, and the new token's,
are still held; the int4 QuantizedCache (quanto) dequantizes and concatenates beside its storages too.
Before, they promised the KV saving alone (three quarters of an fp32 cache for fp8), and on a budget just
under the quantized recording's peak said it fits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvtrace.llama import ModelSize, build_model
from tests.cli_json import cli_json, report_json
from tests.hf_versions import HAS_FP8_CACHE, needs_fp8_cache
from tests.tiny import record_generate

ROWS, PROMPT, NEW = 4, 8, 24
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64
TOKENS = PROMPT + NEW - 1  # the cache's at the last step: the last new token is never fed back
# a wide KV (head_dim 64 on a 64-wide residual stream) and a small vocabulary: the peak is a cache update
SIZE = ModelSize(
    hidden_size=64, intermediate_size=128, num_layers=LAYERS, num_heads=4, num_kv_heads=KV_HEADS,
    vocab_size=1000, head_dim=HEAD_DIM,
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() with a dynamic cache and with an fp8 QuantizedCache."""
    import torch

    folder = tmp_path_factory.mktemp("fp8_update")
    torch.manual_seed(0)
    model = build_model(SIZE).eval()
    found = {name: folder / name for name in ("dynamic", "fp8", "quanto")}
    record_generate(model, found["dynamic"], ROWS, PROMPT, NEW)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8"], ROWS, PROMPT, NEW, "fp8")
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        record_generate(model, found["quanto"], ROWS, PROMPT, NEW, "quanto")
    return found


@needs_fp8_cache
def test_the_fp8_remedy_prices_the_fp8_cache_update(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic run, which peaks inside its last layer update, and the fp8 run of the same call
    dynamic = report_json(runs["dynamic"], capsys)
    assert dynamic["categories_at_peak"]["kv"] == dynamic["kv"]["peak_bytes"]  # its peak is its KV peak
    beside = dynamic["categories_at_peak"]["weights"] + dynamic["categories_at_peak"]["other"]
    fp8_peak = report_json(runs["fp8"], capsys)["peak_allocated_bytes"]
    # the fp8 run's peak by arithmetic: beside what the dynamic run held at that update, the whole cache
    # at a byte a value with a float32 scale for each layer's K and V, the updated layer's old K and V and
    # the new token's (a layer's K and V over the tokens, a byte a value) and three float32 copies of one
    # layer's K or V, dequantized
    layer_kv = ROWS * 2 * KV_HEADS * HEAD_DIM  # a layer's K and V values a token, every row
    held = LAYERS * layer_kv * TOKENS + LAYERS * 2 * 4
    copies = 3 * (layer_kv // 2) * 4 * TOKENS
    assert fp8_peak == beside + held + layer_kv * TOKENS + copies
    # WHEN the dynamic run is diagnosed against a budget a byte under the fp8 run's peak
    diagnosis = cli_json(["diagnose", str(runs["dynamic"]), "--budget", str(fp8_peak - 1), "--json"], capsys)
    # THEN its fp8 remedy lands on the fp8 run's peak, which does not fit, and names the copies
    (fp8,) = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 8]
    assert diagnosis["allocated_bytes"] - fp8["saved_bytes"] == fp8_peak
    assert fp8["fits"] is False
    assert "three float32 copies of its K or V" in fp8["sentence"]


def test_the_int4_remedy_prices_the_quantized_cache_update(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optimum.quanto")
    # GIVEN the int4 QuantizedCache's (quanto) recording of the same call
    quanto_peak = report_json(runs["quanto"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is diagnosed against a budget a byte under it
    diagnosis = cli_json(
        ["diagnose", str(runs["dynamic"]), "--budget", str(quanto_peak - 1), "--json"], capsys
    )
    # THEN its int4 remedy lands on the int4 run's peak, which does not fit
    (int4,) = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 4]
    assert diagnosis["allocated_bytes"] - int4["saved_bytes"] == quanto_peak
    assert int4["fits"] is False
