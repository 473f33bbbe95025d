"""`kvtrace plan --config` counts the prefill's activations, as transformers' generate() holds them over the
whole prompt, and its answers (peak, fits, max batch, headroom) follow: checked against the recorder on a
tiny Llama 3 whose long prompt and wide MLP make the prefill the peak.

Before, a plan from a config counted none (the 10% reserve stood for them): this model at batch 2, a
2,000-token prompt, fp32, was planned at its weights and KV, 8.62 MB with no reserve, where the recording
peaked at 209.98 MB, 201.28 MB of it the prefill's activations; on a 100 MiB GPU it said "fits". Now the plan
is within 64 B of the recording (the measured prefill holds a few scalars more: 40 B here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from analyzers.planning.hf_config import geometry_from_config
from analyzers.planning.prefill_activations import prefill_activations
from kvtrace.llama import ModelSize, llama3_config
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import record_generate

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 4096, 4, 2, 16
BATCH, PROMPT, NEW = 2, 2000, 4
CONTEXT = PROMPT + NEW
FP32 = 4
ROWS = BATCH * PROMPT
# The prefill's activations at the last layer's MLP, by hand (transformers 5.25, sdpa: no mask, no T x T):
# the gate's activation, the up projection, their product (3 x R x 4,096), the embeddings, the layer's input,
# its residual and the normed input (4 x R x 64), the rotary cos and sin (2 x R x 16), all float32, and
# generate()'s two int64 position tensors (2 x R x 8): 201,280,000 B
ACTIVATIONS = ROWS * (3 * INTER * FP32 + 4 * HIDDEN * FP32 + 2 * HEAD_DIM * FP32 + 2 * 8)
PROMPT_KV = LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32 * ROWS  # every layer's K and V of the prompt
# How much more the recording holds at its prefill than the plan: a few scalars (40 B measured)
SCALARS = 64


def _model(attention: str, inter: int = INTER) -> Any:
    """The tiny Llama 3 with a wide MLP (4,096, 64 times its hidden size), fp32, random weights."""
    size = ModelSize(HIDDEN, inter, LAYERS, HEADS, KV_HEADS, vocab_size=1000)
    config = llama3_config(size)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sdpa_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The run (2 rows of a 2,000-token prompt, 4 new tokens, sdpa) and its model's config folder."""
    folder = tmp_path_factory.mktemp("prefill_sdpa")
    model = _model("sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.config.save_pretrained(folder / "config")
    record_generate(model, folder / "run", BATCH, PROMPT, NEW)
    return folder / "run", folder / "config"


def test_the_plan_from_the_config_is_the_recorded_prefill_peak(
    sdpa_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = sdpa_run
    # GIVEN the recording, which peaks at its prefill: the prompt's KV beside the activations
    report = report_json(run, capsys)
    recorded = report["peak_allocated_bytes"]
    at_peak = report["categories_at_peak"]
    assert at_peak["kv"] == PROMPT_KV
    # WHEN the model's config is planned at the run's shape, on the GPU the recording fills, no reserve
    argv = ["plan", "--config", str(config), "--dtype", "fp32", "--batch", str(BATCH), "--context"]
    shape = [*argv, str(CONTEXT), "--prompt", str(PROMPT), "--reserve", "0"]
    planned = cli_json([*shape, "--gpu-memory", str(recorded), "--json"], capsys)
    # THEN its prefill activations are the arithmetic's, within a few scalars of what the run held
    assert planned["prefill_activations_bytes"] == ACTIVATIONS == 201_280_000
    assert 0 <= at_peak["other"] - ACTIVATIONS <= SCALARS
    # AND its peak is the prefill's: the weights as built, the prompt's KV and the activations, the moment
    # the run peaked at (before: the weights and the KV, 8.62 MB)
    assert (planned["kv_at_peak_bytes"], planned["activations_bytes"]) == (PROMPT_KV, ACTIVATIONS)
    assert planned["weights_bytes"] == at_peak["weights"]
    assert planned["peak_bytes"] == planned["weights_bytes"] + PROMPT_KV + ACTIVATIONS
    assert 0 <= recorded - planned["peak_bytes"] <= SCALARS
    # AND its answers follow: it fits the recording's GPU with that headroom, and a third row does not
    assert planned["fits"] and planned["headroom_bytes"] == recorded - planned["peak_bytes"]
    assert planned["max_batch"] == BATCH
    # AND on a 100 MiB GPU it does not fit, where it said it did (peak 18.78 MiB with the reserve)
    small = cli_json(
        [*argv, str(CONTEXT), "--prompt", str(PROMPT), "--gpu-memory", "100MiB", "--json"], capsys
    )
    assert not small["fits"] and small["max_batch"] == 0
    assert small["peak_bytes"] == planned["peak_bytes"] + small["reserve_bytes"]


def test_the_plan_from_the_run_and_from_its_config_agree(
    sdpa_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = sdpa_run
    # GIVEN the run planned from its recording (measured activations) and from its config (estimated)
    from_run = plan_json(run, capsys, "--gpu-memory", "1GiB")
    argv = ["plan", "--config", str(config), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(CONTEXT), "--prompt", str(PROMPT), "--reserve", "0", "--gpu-memory", "1GiB"]
    from_config = cli_json([*argv, *shape, "--json"], capsys)
    # THEN both peak at the prefill, holding the prompt's KV, with activations a few scalars apart
    assert from_run["kv_at_peak_bytes"] == from_config["kv_at_peak_bytes"] == PROMPT_KV
    assert 0 <= from_run["activations_bytes"] - from_config["activations_bytes"] <= SCALARS
    assert 0 <= from_run["peak_bytes"] - from_config["peak_bytes"] <= SCALARS
    assert from_run["prefill_activations_bytes"] is None  # measured, not estimated
    # AND the largest batch each finds on that GPU is the same
    assert from_run["max_batch"] == from_config["max_batch"]


def test_eager_attention_adds_its_mask_and_scores_as_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN one row of a 1,500-token prompt through a narrower MLP (512) under eager attention, whose scores
    # over prompt x prompt make the peak
    model = _model("eager", inter=512)
    model.config.save_pretrained(tmp_path / "config")
    prompt = 1500
    record_generate(model, tmp_path / "run", 1, prompt, NEW)
    other = report_json(tmp_path / "run", capsys)["categories_at_peak"]["other"]
    # WHEN its prefill is estimated for eager attention
    geometry = geometry_from_config(str(tmp_path / "config"), (5, 25))
    eager = prefill_activations(geometry, "fp32", 1, prompt, "eager")
    assert eager is not None and eager.moment == "scores"
    # THEN it is the arithmetic: across the layers, the embeddings, cos and sin, positions and the float32
    # causal mask (a pair); in the last layer, its input and normed input, the rotated q, K and V expanded
    # to the 4 heads, and at the softmax the masked scores and their float32 softmax (8 B a head and pair)
    pairs = prompt * prompt
    held = prompt * (HIDDEN * FP32 + 2 * HEAD_DIM * FP32 + 16) + pairs * FP32
    layer = prompt * (2 * HIDDEN + 3 * HEADS * HEAD_DIM) * FP32 + pairs * HEADS * 8
    assert eager.peak_bytes == held + layer
    # AND within a few scalars of the recording, which sdpa's estimate is far below (no T x T)
    assert 0 <= other - eager.peak_bytes <= SCALARS
    sdpa = prefill_activations(geometry, "fp32", 1, prompt)
    assert sdpa is not None and sdpa.peak_bytes < other / 2


def test_the_h200_llama_3_8b_prefill_is_planned_from_its_preset(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the H200's recording of the Llama 3 8B shape (transformers 5.17, bf16, sdpa, flash attention),
    # 24 rows of an 8,192-token prompt, which peaked at its prefill
    run = Path(__file__).resolve().parents[2] / "sample_traces" / "h200" / "dynamic_b24"
    from_run = plan_json(run, capsys)
    measured = from_run["activations_bytes"]
    assert from_run["kv_at_peak_bytes"] == 24 * 8192 * 131_072  # the prompt's KV
    # WHEN the preset is planned at that shape, on that GPU, without a reserve
    shape = ["--batch", "24", "--context", "8200", "--prompt", "8192", "--reserve", "0"]
    gpu = ["--gpu-memory", str(from_run["request"]["gpu_memory_bytes"])]
    planned = cli_json(["plan", "--preset", "llama-3-8b", *shape, *gpu, "--json"], capsys)
    # THEN its activations are Llama 3 8B's a row and prompt token (3 x 14,336 + 4 x 4,096 + 2 x 128 in bf16,
    # and 16 B of positions: 119,312 B), within 0.2% of the GPU's: below it by cuBLAS's 32 MiB workspace and
    # 5 MiB that transformers 5.17 held beside them
    assert planned["prefill_activations_bytes"] == 24 * 8192 * 119_312 == 23_457_693_696
    assert 0 < measured - planned["activations_bytes"] < 0.002 * measured
    assert 0 < from_run["peak_bytes"] - planned["peak_bytes"] < 0.002 * from_run["peak_bytes"]


def test_a_rotary_peak_counts_the_last_layers_kv_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an MLP narrower than a head (16), whose prefill peaks at the last layer's rotary embedding, before
    # that layer's cache update: 2 rows of a 200-token prompt
    model = _model("sdpa", inter=16)
    model.config.save_pretrained(tmp_path / "config")
    prompt = 200
    rows = BATCH * prompt
    record_generate(model, tmp_path / "run", BATCH, prompt, NEW)
    report = report_json(tmp_path / "run", capsys)
    layer_kv = 2 * KV_HEADS * HEAD_DIM * FP32 * rows  # one layer's K and V of the prompt
    assert report["categories_at_peak"]["kv"] == (LAYERS - 1) * layer_kv  # the last layer's not yet cached
    # WHEN its config is planned at that shape, no reserve
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(prompt + NEW), "--prompt", str(prompt), "--reserve", "0", "--json"]
    planned = cli_json([*argv, *shape], capsys)
    # THEN its activations are the embeddings, cos and sin, positions, the layer's input and normed input and
    # q four times (4 heads x 16); its k and v projections are the last layer's KV, counted once with every
    # layer's (before, twice: the plan was 102,400 B over the recording)
    held = rows * (HIDDEN * FP32 + 2 * HEAD_DIM * FP32 + 16)
    assert planned["prefill_activations_bytes"] == held + rows * (2 * HIDDEN + 4 * HEADS * HEAD_DIM) * FP32
    assert planned["kv_at_peak_bytes"] == LAYERS * layer_kv
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS
