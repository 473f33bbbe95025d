"""`kvtrace plan` of mixture-of-experts models beyond the first four (tests/integration/
test_plan_moe_prefill.py): GLM-4-MoE's prefill (DeepSeek-V3's router and shared experts), and the experts'
forward a recorded run ran (`experts_implementation`), which its manifest now says and `plan --from-run`
reads.

Before, a GLM-4-MoE's plan counted no prefill activations ("not estimated": the tiny one here planned at
1,121,600 B, recorded at 2,997,432); and a run's manifest did not say whether its experts ran grouped_mm
(k expert rows a token) or eager's loop (the tokens the router sent each expert), which its model_config.json
does not hold either, so `plan --from-run` of an eager run said nothing of it.

Also two plans that were under their recordings: a shorter prompt shrank the prefill's most beside the KV
(the eager Qwen3-MoE's first layer) where the run peaked in another layer, and at a longer prompt a run whose
rows x prompt make the vocabulary kept its per-token tensors, taken for vectors over the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import record_generate

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, K = 64, 2, 4, 2, 16, 4, 2
BATCH, PROMPT, NEW = 2, 300, 2
ROWS = BATCH * PROMPT  # R (not the vocabulary's 1,000, which a run's vectors over it are told apart by)
PAIRS = ROWS * K  # S: a row per token and chosen expert
FP32, INT64 = 4, 8
SCALARS = 64  # the recording holds a few scalars more than the plan (24 B measured)
_SMALL = {
    "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": 1000,
}  # fmt: skip


def _glm4_moe(**fields: Any) -> Any:
    """A GLM-4-MoE of 4 experts (16 wide, 2 a token, one group) and one shared expert as wide, every layer
    MoE but where `fields` say; RoPE turns half of each head (its default partial_rotary_factor)."""
    given = {
        "intermediate_size": 128, "moe_intermediate_size": 16, "n_routed_experts": EXPERTS,
        "num_experts_per_tok": K, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 0,
    } | fields  # fmt: skip
    return transformers.Glm4MoeConfig(**_SMALL, **given)


def _held() -> int:
    """Across the layers: the embeddings, cos and sin (8 wide: half the head), two int64 position tensors."""
    return ROWS * (HIDDEN * FP32 + 2 * 8 * FP32 + 2 * INT64)


def _stream() -> int:
    """Beside the last layer's MoE: its input, its residual and its normed input."""
    return 3 * ROWS * HIDDEN * FP32


def _router_outputs() -> int:
    """Kept to the MoE block's end: the router's float32 logits (R x experts), its float32 top-k weights and
    int64 indices (R x k each)."""
    return ROWS * EXPERTS * FP32 + ROWS * K * (FP32 + INT64)


def _record(config: Any, folder: Path, dtype: str, capsys: pytest.CaptureFixture[str]) -> tuple[Any, Any]:
    """`config`'s model (seed 0) recorded through generate() of BATCH rows of a PROMPT-token prompt, and
    its config planned at that shape with no reserve: (report, plan) as JSON."""
    config.save_pretrained(folder / "config")
    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    record_generate(model, folder / "run", BATCH, PROMPT, NEW)
    argv = ["plan", "--config", str(folder / "config"), "--dtype", dtype, "--batch", str(BATCH)]
    shape = ["--context", str(PROMPT + NEW), "--prompt", str(PROMPT), "--reserve", "0", "--json"]
    return report_json(folder / "run", capsys), cli_json([*argv, *shape], capsys)


@pytest.mark.parametrize(
    ("fields", "own"),
    [
        # narrow experts: they peak after their down projections (2 x S x hidden, and those weighted by the
        # float32 top-k weights and reordered), beside the router's outputs and the sort's tensors
        (
            {},
            lambda: _router_outputs() + PAIRS * (2 * INT64 + FP32 + 4) + EXPERTS * 2 * 4
            + 4 * PAIRS * HIDDEN * FP32 + PAIRS * INT64,
        ),
        # a shared expert 1,024 wide (64 x 16) peaks after the routed ones: its three tensors beside the
        # router's outputs and the routed experts' sum (R x hidden)
        ({"n_shared_experts": 64}, lambda: 3 * ROWS * 1024 * FP32 + _router_outputs() + ROWS * HIDDEN * FP32),
    ],
    ids=["routed-experts", "shared-expert-after"],
)  # fmt: skip
def test_glm4_moe_prefill_is_planned_as_recorded(
    fields: dict[str, Any], own: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny GLM-4-MoE, recorded and its config planned at the run's shape
    report, planned = _record(_glm4_moe(**fields), tmp_path, "fp32", capsys)
    # THEN the plan counts its prefill at the last MoE layer, where it counted none ("not estimated")
    activations = _held() + _stream() + own()
    assert planned["prefill_activations_bytes"] == activations
    at_peak = report["categories_at_peak"]
    assert 0 <= at_peak["other"] - activations <= SCALARS
    assert planned["kv_at_peak_bytes"] == at_peak["kv"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32 * ROWS
    assert planned["weights_bytes"] == at_peak["weights"]
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS
    assert not [note for note in planned["notes"] if note.startswith("prefill activations are not")]


@pytest.mark.parametrize(
    ("fields", "dtype"),
    [
        ({"num_experts_per_tok": 1}, "bf16"),  # one expert a token: the float32 sum cast back to bf16
        ({"first_k_dense_replace": 1, "intermediate_size": 1024}, "fp32"),  # a wide dense layer 0 peaks
    ],
    ids=["bf16-one-expert", "dense-first"],
)
def test_glm4_moe_other_moments_are_planned_within_scalars(
    fields: dict[str, Any], dtype: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a GLM-4-MoE whose peak is another moment (the experts' sum, a dense layer's MLP)
    report, planned = _record(_glm4_moe(**fields), tmp_path, dtype, capsys)
    # THEN its plan is its recording's, but for the few scalars the recording holds more
    assert planned["prefill_activations_bytes"] is not None
    assert 0 <= report["categories_at_peak"]["other"] - planned["prefill_activations_bytes"] <= SCALARS
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS


# A latent attention whose query and value heads are alike wide (24 + 8 = 32), so that a CPU's sdpa runs its
# flash kernel, as a GPU's kernels hold no prompt x prompt scores (with v != d a CPU runs the math kernel)
NOPE, ROPE, V, LATENT = 24, 8, 32, 16
_LATENT = {
    "head_dim": ROPE, "num_key_value_heads": HEADS, "kv_lora_rank": LATENT, "qk_nope_head_dim": NOPE,
    "qk_rope_head_dim": ROPE, "v_head_dim": V, "intermediate_size": 128, "n_routed_experts": EXPERTS,
    "n_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
}  # fmt: skip


def _latent_attention(complex_rotary: bool = False) -> int:
    """Across the layers and beside the last layer's attention as sdpa returns (mla_prefill's docstring): the
    embeddings, the rotary tables (DeepSeek-V3's cos and sin, ROPE each; V2's complex64 freqs_cis, ROPE / 2),
    the positions; the layer's input and normed input; its query projection, the rotated part, the
    concatenated query, the latent projection, kv_b_proj's output, the keys, sdpa's output and its transposed
    copy."""
    rotary = ROPE // 2 * 8 if complex_rotary else 2 * ROPE * FP32
    held = ROWS * (HIDDEN * FP32 + rotary + 2 * INT64)
    d = NOPE + ROPE
    own = 2 * HEADS * d + HEADS * ROPE + LATENT + ROPE + HEADS * (NOPE + V) + HEADS * d + 2 * HEADS * V
    return held + 2 * ROWS * HIDDEN * FP32 + ROWS * own * FP32


@pytest.mark.parametrize(
    ("kind", "fields", "activations"),
    [
        # narrow experts (4 wide, 1 a token): the last layer's attention peaks (2,716,800 B)
        ("deepseek_v3", {"q_lora_rank": None, "moe_intermediate_size": 4, "num_experts_per_tok": 1},
         lambda: _latent_attention()),
        # DeepSeek-V2: its router's softmax, its complex rotary table; a query bottleneck freed by then
        ("deepseek_v2", {"q_lora_rank": 16, "moe_intermediate_size": 4, "num_experts_per_tok": 1,
                         "n_group": None, "topk_group": None},
         lambda: _latent_attention(complex_rotary=True)),
        # a shared expert 1,024 wide peaks after the routed ones, as GLM-4-MoE's (2 experts a token)
        ("glm4_moe_lite", {"q_lora_rank": 16, "moe_intermediate_size": 16, "num_experts_per_tok": K,
                           "n_shared_experts": 64},
         lambda: ROWS * (HIDDEN * FP32 + 2 * ROPE * FP32 + 2 * INT64) + _stream() + 3 * ROWS * 1024 * FP32
         + _router_outputs() + ROWS * HIDDEN * FP32),
    ],
    ids=["deepseek-v3-attention", "deepseek-v2-attention", "glm4-moe-lite-shared-expert"],
)  # fmt: skip
def test_latent_attention_prefill_is_planned_as_recorded(
    kind: str, fields: dict[str, Any], activations: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny latent-attention mixture of experts, recorded and its config planned at the run's shape
    config = transformers.AutoConfig.for_model(kind, **_SMALL | _LATENT | fields)
    report, planned = _record(config, tmp_path, "fp32", capsys)
    # THEN the plan counts its prefill, where it said "not estimated" (its latent attention; V2's router too)
    assert planned["prefill_activations_bytes"] == activations()
    at_peak = report["categories_at_peak"]
    assert 0 <= at_peak["other"] - activations() <= SCALARS
    # AND the KV beside it is the latent's, every layer's
    assert planned["kv_at_peak_bytes"] == at_peak["kv"] == LAYERS * (LATENT + ROPE) * FP32 * ROWS
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS
    assert not [note for note in planned["notes"] if note.startswith("prefill activations are not")]


@pytest.mark.parametrize("attention", ["eager", "padded"])
def test_latent_attentions_eager_and_padded_prefills_are_estimated_as_recorded(
    attention: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the DeepSeek-V3 above whose attention peaks, run under eager attention or with a padded prompt
    fields = {"q_lora_rank": None, "moe_intermediate_size": 4, "num_experts_per_tok": 1}
    config = transformers.DeepseekV3Config(**_SMALL | _LATENT | fields)
    config.save_pretrained(tmp_path / "config")
    if attention == "eager":
        config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW, padded=3 if attention == "padded" else 0)
    from analyzers.planning.hf_config import geometry_from_config
    from analyzers.planning.prefill_activations import cpu_flash_thread_bytes, prefill_activations

    geometry = geometry_from_config(tmp_path / "config", (5, 25))
    padded = attention == "padded"
    estimate = prefill_activations(geometry, "fp32", BATCH, PROMPT, "eager" if not padded else "sdpa", padded)
    assert estimate is not None
    at_return = _latent_attention()
    pairs = BATCH * PROMPT * PROMPT
    if padded:
        # THEN a padded prompt's masked sdpa holds, inside the kernel, the bool mask (every row's) and its
        # float32 copy, one output, not two, and the float32 log-sum-exp (rows x heads x prompt)
        expected = at_return + pairs + pairs * FP32 - ROWS * HEADS * V * FP32 + ROWS * HEADS * FP32
        cpu = cpu_flash_thread_bytes(PROMPT, NOPE + ROPE, FP32)  # the CPU kernel's blocks, one thread
    else:
        # THEN eager holds its float32 mask, the scores and their softmax (8 B a head and pair), no outputs
        expected = at_return + pairs * FP32 + pairs * HEADS * 8 - 2 * ROWS * HEADS * V * FP32
        cpu = 0
    assert estimate.peak_bytes == expected
    other = report_json(tmp_path / "run", capsys)["categories_at_peak"]["other"]
    assert 0 <= other - cpu - expected <= SCALARS


def _qwen3_moe(implementation: str) -> Any:
    """A tiny Qwen3-MoE (4 experts, 16 wide, 2 a token), seed 0, its experts run as `implementation`."""
    config = transformers.Qwen3MoeConfig(
        **_SMALL, intermediate_size=128, num_experts=EXPERTS, num_experts_per_tok=K, moe_intermediate_size=16
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
    assert model.config._experts_implementation == implementation
    return model.eval()


@pytest.mark.parametrize(
    ("implementation", "over"),
    [
        # grouped_mm's rows are k a token whatever the routing: the prefill grows with the rows exactly
        ("grouped_mm", SCALARS),
        # eager's loop holds what the router sends each expert, which 4 rows route otherwise: the plan scales
        # the 2 rows' measured loop, 3.8% over the 4-row recording here (seed 0), an estimate
        ("eager", 160_000),
    ],
)
def test_a_runs_experts_implementation_is_recorded_and_planned_from(
    implementation: str, over: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny Qwen3-MoE loaded with experts_implementation=`implementation` (not in its config.json)
    model = _qwen3_moe(implementation)
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW)
    # THEN the run's manifest says which experts it ran, where its model_config.json does not
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["experts_implementation"] == implementation
    assert "experts_implementation" not in json.loads((tmp_path / "run" / "model_config.json").read_text())
    # AND its plan at its own shape is its recording's peak
    own = plan_json(tmp_path / "run", capsys, "--reserve", "0")
    assert own["peak_bytes"] == report_json(tmp_path / "run", capsys)["peak_allocated_bytes"]
    # AND a plan of twice the rows bounds the recording of that shape, run the same way
    record_generate(model, tmp_path / "rows", 2 * BATCH, PROMPT, NEW)
    recorded = report_json(tmp_path / "rows", capsys)["peak_allocated_bytes"]
    planned = plan_json(tmp_path / "run", capsys, "--batch", str(2 * BATCH), "--reserve", "0")
    assert 0 <= planned["peak_bytes"] - recorded <= over
    # AND the plan says when its experts are not grouped_mm's, which `plan --config` prices
    said = [note for note in planned["notes"] if note.startswith("experts:")]
    if implementation == "grouped_mm":
        assert not said
    else:
        (note,) = said
        assert "ran experts_implementation='eager' (a loop over the experts" in note
        assert (
            "grouped_mm (k expert rows a token whatever the routing), is what `kvtrace plan --config`" in note
        )


def test_a_dense_models_manifest_names_no_experts(tmp_path: Path) -> None:
    # GIVEN a Llama, whose config says experts_implementation "eager" though it has no experts
    config = transformers.LlamaConfig(**_SMALL, intermediate_size=128)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.config._experts_implementation == "eager"
    record_generate(model, tmp_path / "run", 1, 8, 2)
    # THEN its manifest names none
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "experts_implementation" not in manifest["model"]


def test_a_shorter_prompt_is_planned_from_the_peaks_own_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the eager Qwen3-MoE, whose prefill peaks in its last layer (both layers' KV), while its first
    # layer's MoE held the most beside the KV (the router sent it more rows)
    model = _qwen3_moe("eager")
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW)
    report = report_json(tmp_path / "run", capsys)
    assert report["categories_at_peak"]["kv"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32 * ROWS
    # WHEN it is planned at half its prompt, and recorded so
    short = PROMPT // 2
    planned = plan_json(tmp_path / "run", capsys, "--prompt", str(short), "--reserve", "0")
    record_generate(model, tmp_path / "short", BATCH, short, NEW)
    recorded = report_json(tmp_path / "short", capsys)["peak_allocated_bytes"]
    # THEN the plan bounds it: the peak's own layer shrinks, not the first layer's (25,944 B under before),
    # over it by the step's ids, mask and positions, which the plan keeps at the run's prompt
    assert 0 <= planned["peak_bytes"] - recorded <= 3 * BATCH * PROMPT * INT64 + SCALARS


def test_diagnoses_shorter_prompt_is_priced_from_the_peaks_own_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the eager Qwen3-MoE above, which peaks in its last layer at 2,254,604 B, diagnosed on a budget
    # a shorter prompt meets
    model = _qwen3_moe("eager")
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW)
    budget = 1_700_000
    diagnosis = cli_json(["diagnose", str(tmp_path / "run"), "--json", "--budget", f"{budget}B"], capsys)
    (shorter,) = [r for r in diagnosis["remedies"] if r["kind"] == "prompt"]
    assert shorter["fits"] and 1 <= shorter["setting"] < PROMPT
    # WHEN recorded at the prompt it says fits
    record_generate(model, tmp_path / "short", BATCH, shorter["setting"], NEW)
    recorded = report_json(tmp_path / "short", capsys)["peak_allocated_bytes"]
    # THEN the recording fits under the peak it priced (before, the first layer's shrink said 196 tokens
    # peak at 1,697,192 B, and they peaked at 1,705,128, over the budget)
    assert recorded <= diagnosis["allocated_bytes"] - shorter["saved_bytes"] <= budget


@pytest.mark.parametrize("model_kind", ["qwen3-moe", "llama"])
def test_tokens_as_many_as_the_vocabulary_grow_with_the_prompt(
    model_kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run of 2 rows x 500 tokens, as many as its vocabulary's 1,000 ids: its int64 positions and
    # ids over the tokens (the MoE's float32 top-2 weights too), 8,000 B each, as long as an int64 vector
    # over the vocabulary, which a longer prompt would keep
    if model_kind == "llama":
        config = transformers.LlamaConfig(**_SMALL, intermediate_size=128)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    else:
        model = _qwen3_moe("grouped_mm")
    vocab, prompt = _SMALL["vocab_size"], 500
    assert BATCH * prompt == vocab
    record_generate(model, tmp_path / "run", BATCH, prompt, NEW)
    # WHEN planned at twice the prompt, and recorded so
    longer = ["--prompt", str(2 * prompt), "--context", str(2 * prompt + NEW), "--reserve", "0"]
    planned = plan_json(tmp_path / "run", capsys, *longer)
    record_generate(model, tmp_path / "longer", BATCH, 2 * prompt, NEW)
    recorded = report_json(tmp_path / "longer", capsys)["peak_allocated_bytes"]
    # THEN those grow with the prompt: the plan is the recording's peak but for a few scalars (before, 39,944
    # B under for the MoE's five, 15,960 for the Llama's two)
    assert 0 <= planned["peak_bytes"] - recorded <= SCALARS
