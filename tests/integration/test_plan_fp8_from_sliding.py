"""`kvtrace plan --from-run RUN --cache fp8` of a sliding-window run lands on what the fp8 cache's recording
of the same generate() peaks at, byte for byte. The fp8 cache peaks inside its last step's last layer's
update; the sliding run's KV peaked as its window first slid (its prompt is longer than the window), in its
first layer, holding a position's hidden states fewer (the last layer's input beside the embeddings) and no
mask over the context. Before, the plan priced the fp8 update beside that moment: 2,048 B under the
recording (8 rows x 64 x 4 B), 3,000 B with a padded prompt, whose mask over the 119 keys (a bool each) the
fp8 step makes; the demo's Llama (`kvtrace demo --cache sliding --window 16`, 8 rows) was 2,584 B under.
`kvtrace diagnose`'s fp8 remedy lands there too: before, it priced the window's tokens at 8 bits."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.hf_versions import HAS_FP8_CACHE, needs_fp8_cache
from tests.tiny import record_generate, tiny_size

# a prompt longer than the window, and enough new tokens that the fp8 run peaks in an update
BATCH, PROMPT, NEW, WINDOW = 8, 20, 100, 8


@pytest.fixture(scope="module", params=[0, 3], ids=["unpadded", "padded"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() of the tiny Llama with a sliding cache and with an fp8 one, its first row's
    first `request.param` ids padding."""
    import torch

    folder = tmp_path_factory.mktemp("fp8_from_sliding")
    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2)).eval()
    found = {name: folder / name for name in ("sliding", "fp8")}
    record_generate(model, found["sliding"], BATCH, PROMPT, NEW, "sliding", WINDOW, padded=request.param)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8"], BATCH, PROMPT, NEW, "fp8", padded=request.param)
    return found


@needs_fp8_cache
def test_a_sliding_run_planned_on_fp8_is_priced_at_the_fp8_last_update(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 recording, peaking inside its last step's last update: both layers' 8-bit KV over the
    # 119 tokens fed, with a float32 scale for each layer's K and V, beside the last layer's old K and V
    report = report_json(runs["fp8"], capsys)
    layer_token = 2 * 2 * 16  # a layer's K and V elements a token: 2 KV heads of 16
    fed = PROMPT + NEW - 1  # the last token is never fed
    held = 2 * (BATCH * layer_token * fed + 2 * 4) + BATCH * layer_token * (fed - 1)
    assert report["categories_at_peak"]["kv"] == held
    measured = report["peak_allocated_bytes"]
    # WHEN the sliding run is planned on an fp8 cache at its own batch and context
    plan = plan_json(runs["sliding"], capsys, "--cache", "fp8")
    # THEN the plan is the recording's peak, to the byte
    assert plan["peak_bytes"] == measured


# a prompt longer than the window and few new tokens: both runs peak at their prefill, the sliding cache
# holding its whole prompt's KV there (as a dynamic one does), its final window's far less
PREFILL_BATCH, PREFILL_PROMPT, PREFILL_NEW, PREFILL_WINDOW = 4, 40, 20, 16


@pytest.fixture(scope="module")
def prefill_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A greedy generate() of the tiny Llama peaking at its prefill, with a sliding cache and an fp8 one."""
    import torch

    folder = tmp_path_factory.mktemp("fp8_from_sliding_prefill")
    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2)).eval()
    found = {name: folder / name for name in ("sliding", "fp8")}
    shape = (PREFILL_BATCH, PREFILL_PROMPT, PREFILL_NEW)
    record_generate(model, found["sliding"], *shape, "sliding", PREFILL_WINDOW)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8"], *shape, "fp8")
    return found


@needs_fp8_cache
def test_a_sliding_run_peaking_at_its_prefill_is_planned_on_fp8_there(
    prefill_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 recording, peaking at its prefill: both layers' 8-bit prompt KV and their scales
    report = report_json(prefill_runs["fp8"], capsys)
    layer_token = 2 * 2 * 16  # a layer's K and V elements a token: 2 KV heads of 16
    assert report["categories_at_peak"]["kv"] == 2 * (PREFILL_BATCH * PREFILL_PROMPT * layer_token + 2 * 4)
    # AND the sliding run's decode steps, which held far less beside their KV than its prefill
    sliding = plan_json(prefill_runs["sliding"], capsys)["request"]["recorded"]
    assert sliding["phase"] == "prefill"
    assert sliding["decode_activations_bytes"] < sliding["activations_bytes"]
    # WHEN the sliding run is planned on an fp8 cache
    plan = plan_json(prefill_runs["sliding"], capsys, "--cache", "fp8")
    # THEN the plan is the recording's peak, to the byte: before, its decode steps' end was priced beside the
    # prefill's activations and the prompt's KV beyond the window (the peak less the weights and the final
    # window's KV), +58,880 B (+5.9%)
    assert plan["peak_bytes"] == report["peak_allocated_bytes"]


@needs_fp8_cache
def test_diagnose_prices_a_sliding_runs_fp8_remedy_over_its_whole_context(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 recording of the same generate(), whose QuantizedCache kept every token
    measured = report_json(runs["fp8"], capsys)["peak_allocated_bytes"]
    # WHEN the sliding run is diagnosed
    diagnosis = cli_json(["diagnose", str(runs["sliding"]), "--json"], capsys)
    (fp8,) = [r for r in diagnosis["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 8]
    # THEN its fp8 remedy puts the run's peak at the recording's, to the byte, as plan does: before, it priced
    # the window's 8 tokens at 8 bits, saving 3/4 of the window's KV and never the context's update
    assert diagnosis["allocated_bytes"] - fp8["saved_bytes"] == measured
    assert "keeps every token" in fp8["sentence"]
