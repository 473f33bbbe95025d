"""`kvtrace plan --from-run RUN --cache fp8` and `kvtrace diagnose RUN`'s fp8 remedy price a dynamic cache's
run on transformers' fp8 QuantizedCache with one formula (`analyzers.planning.fp8_update`), and both land
on what a recording with that cache peaks at, byte for byte, where the peak is inside a layer's update.
Before, the plan was over by one token: its float32 copies over the context rather than the tokens the
layer holds (the last is never fed), generate()'s ids likewise, less the new token's 8-bit K and V it left
out; the README demo's Llama said 80.87 MiB where diagnose and the fp8 recording said 80.71 MiB."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
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
