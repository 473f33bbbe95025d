"""`kvtrace plan --from-run RUN --cache fp8` and `kvtrace diagnose RUN`'s fp8 remedy price a dynamic cache's
run on transformers' fp8 QuantizedCache with one formula (`analyzers.planning.fp8_update`), and both land
on what a recording with that cache peaks at, byte for byte, where the peak is inside a layer's update.
Before, the plan was over by one token: its float32 copies over the context rather than the tokens the
layer holds (the last is never fed), generate()'s ids likewise, less the new token's 8-bit K and V it left
out; the README demo's Llama said 80.87 MiB where diagnose and the fp8 recording said 80.71 MiB."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import ModelSize, build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.hf_versions import HAS_FP8_CACHE, needs_fp8_cache
from tests.tiny import record_generate, tiny_size

BATCH, PROMPT, NEW = 8, 4, 100  # long enough that the fp8 run peaks in an update, not at its logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() of the tiny Llama with a dynamic cache and with an fp8 one."""
    import torch

    folder = tmp_path_factory.mktemp("fp8_plan")
    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2)).eval()
    found = {name: folder / name for name in ("dynamic", "fp8")}
    record_generate(model, found["dynamic"], BATCH, PROMPT, NEW)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8"], BATCH, PROMPT, NEW, "fp8")
    return found


@needs_fp8_cache
def test_plan_and_diagnose_price_the_fp8_run_as_recorded(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 cache's recording, and the dynamic run's at the same batch and context
    measured = report_json(runs["fp8"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is planned on an fp8 cache, and diagnosed against a budget it exceeds
    plan = plan_json(runs["dynamic"], capsys, "--cache", "fp8")
    diagnosis = cli_json(["diagnose", str(runs["dynamic"]), "--budget", "1MB", "--json"], capsys)
    (fp8,) = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 8]
    # THEN both say the recording's peak, to the byte
    assert plan["peak_bytes"] == measured
    assert diagnosis["allocated_bytes"] - fp8["saved_bytes"] == measured


# The tiny Llama's prefill peaks above its decode steps at these shapes; the first holds the prompt's KV of
# every layer at its peak (its last layer's MLP), the demo's Llama (64 KiB of KV a token) that of 3 of its
# 4 layers (its third layer's)
PREFILL_PEAKS = {"tiny": (8, 20, 40), "demo": (2, 128, 4)}


@pytest.fixture(scope="module", params=sorted(PREFILL_PEAKS))
def prefill_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A greedy generate() that peaks at its prefill, with a dynamic cache and with an fp8 one."""
    import torch

    batch, prompt, new = PREFILL_PEAKS[request.param]
    folder = tmp_path_factory.mktemp(f"fp8_prefill_{request.param}")
    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2) if request.param == "tiny" else "demo").eval()
    found = {name: folder / name for name in ("dynamic", "fp8")}
    record_generate(model, found["dynamic"], batch, prompt, new)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8"], batch, prompt, new, "fp8")
    return found


@needs_fp8_cache
def test_a_run_peaking_at_its_prefill_is_priced_there_on_fp8(
    prefill_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 recording, peaking in its prefill: the KV it holds there is the prompt's of the layers
    # reached, a byte a value and a float32 scale for each layer's K and V
    report = report_json(prefill_runs["fp8"], capsys)
    geometry = report["geometry"]
    layer_token = 2 * geometry["num_kv_heads"] * geometry["head_dim"]  # a layer's K and V a token, 8 bits
    batch, prompt = report["kv"]["batch"], report["kv"]["tokens_held"] - (report["steps"] - 1)
    held = report["categories_at_peak"]["kv"]
    layers = held // (batch * prompt * layer_token)
    assert 0 < layers <= geometry["num_layers"]
    assert held == layers * (batch * prompt * layer_token + 2 * 4)
    measured = report["peak_allocated_bytes"]
    # WHEN the dynamic run is planned on an fp8 cache, and diagnosed against a budget it exceeds
    plan = plan_json(prefill_runs["dynamic"], capsys, "--cache", "fp8")
    diagnosis = cli_json(["diagnose", str(prefill_runs["dynamic"]), "--budget", "1MB", "--json"], capsys)
    (fp8,) = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 8]
    # THEN both say the recording's peak, to the byte: before, the plan put the fp8 cache's KV peak (its
    # last update's) beside the prefill's activations, the tiny Llama 69,632 B over, the demo's 2,211,848;
    # diagnose left out the scales, 16 and 24 B under
    assert plan["peak_bytes"] == measured
    assert diagnosis["allocated_bytes"] - fp8["saved_bytes"] == measured


# MHA (4 KV heads of 16), a tiny MLP, eager: the prompt's 128 x 128 scores make the prefill's last layer's
# attention the fp8 run's peak, its full-precision K and V live beside the 8-bit copy the cache keeps
ATTENDING = ModelSize(
    hidden_size=64, intermediate_size=16, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=1000
)
ATTENDING_BATCH, ATTENDING_PROMPT, ATTENDING_NEW = 2, 128, 2


@pytest.fixture(scope="module")
def attending_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A greedy generate() of an eager MHA Llama peaking in its prefill's last layer's attention, with a
    dynamic cache and with an fp8 one."""
    import torch

    folder = tmp_path_factory.mktemp("fp8_attending")
    torch.manual_seed(0)
    model = build_model(ATTENDING).eval()
    model.set_attn_implementation("eager")
    found = {name: folder / name for name in ("dynamic", "fp8")}
    record_generate(model, found["dynamic"], ATTENDING_BATCH, ATTENDING_PROMPT, ATTENDING_NEW)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8"], ATTENDING_BATCH, ATTENDING_PROMPT, ATTENDING_NEW, "fp8")
    return found


@needs_fp8_cache
def test_a_prefill_peaking_in_attention_holds_the_layers_full_precision_kv_on_fp8(
    attending_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 recording, peaking while its last prefill layer attends: every layer's 8-bit prompt KV
    # and its float32 scales, beside which that layer's float32 K and V (which the dynamic run counted as
    # KV) are still live
    report = report_json(attending_runs["fp8"], capsys)
    layer_token = 2 * ATTENDING.num_kv_heads * ATTENDING.attention_head_dim  # K and V elements a token
    assert report["categories_at_peak"]["kv"] == ATTENDING.num_layers * (
        ATTENDING_BATCH * ATTENDING_PROMPT * layer_token + 2 * 4
    )
    measured = report["peak_allocated_bytes"]
    # WHEN the dynamic run is planned on an fp8 cache, and diagnosed against a budget it exceeds
    plan = plan_json(attending_runs["dynamic"], capsys, "--cache", "fp8")
    diagnosis = cli_json(["diagnose", str(attending_runs["dynamic"]), "--budget", "1MB", "--json"], capsys)
    (fp8,) = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 8]
    # THEN both say the recording's peak, to the byte: before, both left out that layer's float32 K and V,
    # 2 x 2 rows x 128 tokens x 64 x 4 B = 131,072 B under
    assert plan["peak_bytes"] == measured
    assert diagnosis["allocated_bytes"] - fp8["saved_bytes"] == measured
