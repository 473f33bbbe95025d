"""`kvtrace plan` of mixture-of-experts models beyond the first four (tests/integration/
test_plan_moe_prefill.py): GLM-4-MoE's prefill (DeepSeek-V3's router and shared experts), and the experts'
forward a recorded run ran (`experts_implementation`), which its manifest now says and `plan --from-run`
reads.

Before, a GLM-4-MoE's plan counted no prefill activations ("not estimated": the tiny one here planned at
1,121,600 B, recorded at 2,997,432); and a run's manifest did not say whether its experts ran grouped_mm
(k expert rows a token) or eager's loop (the tokens the router sent each expert), which its model_config.json
does not hold either, so `plan --from-run` of an eager run said nothing of it.
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


def test_deepseek_v3_keeps_its_note_for_its_latent_attention(tmp_path: Path) -> None:
    # GIVEN a DeepSeek-V3 config, whose experts are GLM-4-MoE's but whose attention is latent
    config = transformers.DeepseekV3Config(
        **_SMALL | {"head_dim": 8}, intermediate_size=128, moe_intermediate_size=16, n_routed_experts=EXPERTS,
        num_experts_per_tok=K, n_group=1, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    from analyzers.planning.hf_config import geometry_from_config
    from analyzers.planning.prefill_activations import unplanned_reason

    # THEN its prefill is not estimated for its latent attention, no longer for its experts (its router's)
    assert unplanned_reason(geometry_from_config(tmp_path, (5, 25))) == "its latent attention"


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
