"""`kvtrace plan --config` counts the prefill's activations of mixture-of-experts layers (Mixtral, Qwen2-MoE,
Qwen3-MoE) and of up/down MLPs without a gate (GPT-NeoX, Phi, StarCoder2, Arcee), checked against the
recorder on tiny random-weight models of each whose MLP or experts make the prefill the peak.

Before, a plan from their config counted none: a note said so and, with `--reserve 0`, the plan was the
weights and the KV alone (the Qwen3-MoE here: 1.35 MB planned, 4.54 MB recorded). Now each is within 64 B of
its recording. Transformers' default experts (`grouped_mm`) run S = R x k rows (R = rows x prompt tokens, k
experts a token) whatever the router chose, so no figure here depends on the random routing. A Qwen3-MoE with
dense layers too peaks in the last layer of the kind that holds most, with the KV of the layers up to it (its
plan priced both kinds as the last layer: up to 511,976 B over); experts a config runs eagerly are not priced
as grouped_mm's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from analyzers.planning.hf_config import geometry_from_config
from analyzers.planning.prefill_activations import prefill_activations
from tests.cli_json import cli_json, report_json
from tests.tiny import record_generate

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERTS = 64, 2, 4, 2, 16, 4
BATCH, PROMPT, NEW = 2, 500, 2
ROWS = BATCH * PROMPT  # R
FP32, BF16, INT64 = 4, 2, 8
SCALARS = 64  # the recording holds a few scalars more than the plan (24 to 52 B measured)
_LLAMA = {
    "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "vocab_size": 1000,
}  # fmt: skip


def _held(s: int, rotary: int = HEAD_DIM) -> int:
    """Across the layers: the embeddings, the rotary cos and sin, generate()'s two int64 position tensors."""
    return ROWS * (HIDDEN * s + 2 * rotary * s + 2 * INT64)


def _stream(s: int) -> int:
    """Beside the last layer's MLP or experts: its input, its residual and its normed input."""
    return 3 * ROWS * HIDDEN * s


def _routing(s: int, w: int, k: int) -> int:
    """Held through the experts: the router's logits (R x experts), its top-k weights (in w bytes) and int64
    indices, the tokens' sorted expert ids and their permutation (int64), the sorted weights, histc's 4-byte
    copy of the ids, and its per-expert counts and offsets (4 B each)."""
    pairs = ROWS * k
    return ROWS * EXPERTS * s + ROWS * k * (w + INT64) + pairs * (2 * INT64 + w + 4) + EXPERTS * 2 * 4


def _expert_outputs(k: int) -> int:
    """The experts after their down projection, fp32: the S = R x k gathered rows, their down projections,
    those times the routing weights and those reordered (4 x S x hidden), the inverse permutation (S
    int64)."""
    pairs = ROWS * k
    return 4 * pairs * HIDDEN * FP32 + pairs * INT64


def _plan_recorded(
    config: Any, folder: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> tuple[Any, Any]:
    """`config`'s model (seed 0, in `dtype`) recorded through generate() of BATCH rows of a PROMPT-token
    prompt, and its config planned at that shape with no reserve: (report, plan) as JSON."""
    config.save_pretrained(folder / "config")
    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    assert model.config._attn_implementation == "sdpa"
    record_generate(model, folder / "run", BATCH, PROMPT, NEW)
    report = report_json(folder / "run", capsys)
    argv = ["plan", "--config", str(folder / "config"), "--dtype", dtype, "--batch", str(BATCH)]
    shape = ["--context", str(PROMPT + NEW), "--prompt", str(PROMPT), "--reserve", "0", "--json"]
    return report, cli_json([*argv, *shape], capsys)


def _assert_planned_as_recorded(
    report: Any, planned: Any, activations: int, s: int = FP32, kv_layers: int = LAYERS
) -> None:
    """The plan's prefill is `activations` beside the weights and `kv_layers` layers' prompt KV (in `s`
    bytes), the moment the recording peaked at, a few scalars below it."""
    at_peak = report["categories_at_peak"]
    assert planned["prefill_activations_bytes"] == planned["activations_bytes"] == activations
    assert 0 <= at_peak["other"] - activations <= SCALARS
    assert planned["kv_at_peak_bytes"] == at_peak["kv"] == kv_layers * 2 * KV_HEADS * HEAD_DIM * s * ROWS
    assert planned["weights_bytes"] == at_peak["weights"]
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS
    assert not [note for note in planned["notes"] if note.startswith("prefill activations are not")]


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.Qwen3MoeConfig(
            **_LLAMA, head_dim=HEAD_DIM, intermediate_size=128, num_experts=EXPERTS, num_experts_per_tok=2,
            moe_intermediate_size=16,
        ),
        # OLMoE's experts are `intermediate_size` wide, its router Qwen's
        lambda: transformers.OlmoeConfig(
            **_LLAMA, intermediate_size=16, num_experts=EXPERTS, num_experts_per_tok=2
        ),
    ],
    ids=["qwen3-moe", "olmoe"],
)  # fmt: skip
def test_a_moe_prefill_peaks_at_its_experts_outputs_as_recorded(
    make: Callable[[], Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Qwen3-MoE (or OLMoE) whose experts (16 wide, 2 a token) are narrower than 3/4 of its hidden size
    config = make()
    # WHEN it is recorded and its config planned at the run's shape
    report, planned = _plan_recorded(config, tmp_path, "fp32", capsys)
    # THEN its prefill peaks in the last layer's experts, after their down projection (S = 2 R rows), beside
    # the router's and the sort's tensors: 3,320,032 B
    activations = _held(FP32) + _stream(FP32) + _routing(FP32, FP32, 2) + _expert_outputs(2)
    assert activations == 3_320_032
    # AND the plan is the recording's, where it counted none (1.35 MB planned, 4.54 MB recorded)
    _assert_planned_as_recorded(report, planned, activations)


def test_mixtrals_wide_experts_peak_at_their_gate_and_up_projections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Mixtral whose experts are 512 wide, 2 a token
    config = transformers.MixtralConfig(
        **_LLAMA, intermediate_size=512, num_local_experts=EXPERTS, num_experts_per_tok=2
    )
    report, planned = _plan_recorded(config, tmp_path, "fp32", capsys)
    # THEN its prefill peaks at the experts' gate and up projections: the gathered rows (S x hidden), the
    # fused projection (S x 2 x 512), the gate's activation and the product (S x 512 each)
    pairs = 2 * ROWS
    experts = pairs * HIDDEN * FP32 + 4 * pairs * 512 * FP32
    activations = _held(FP32) + _stream(FP32) + _routing(FP32, FP32, 2) + experts
    assert activations == 18_152_032
    _assert_planned_as_recorded(report, planned, activations)


def test_a_bf16_mixtral_of_one_expert_a_token_peaks_at_its_float32_sum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a bf16 Mixtral, one expert a token: its router keeps the top-k weights float32, so the experts'
    # weighted outputs are float32 (S = R rows)
    config = transformers.MixtralConfig(
        **_LLAMA, intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=1
    )
    report, planned = _plan_recorded(config, tmp_path, "bf16", capsys)
    # THEN its prefill peaks as the summed outputs are cast back to bf16: the gathered rows and the down
    # projections (bf16), the weighted outputs reordered and their sum (float32), the cast (bf16), the inverse
    # permutation, beside the router's and the sort's tensors (its weights float32)
    last = 2 * ROWS * HIDDEN * BF16 + 2 * ROWS * HIDDEN * FP32 + ROWS * HIDDEN * BF16 + ROWS * INT64
    activations = _held(BF16) + _stream(BF16) + _routing(BF16, FP32, 1) + last
    assert activations == 1_540_032
    _assert_planned_as_recorded(report, planned, activations, BF16)


@pytest.mark.parametrize(
    ("shared", "own"),
    [
        # a wide shared expert peaks before the router: its gate and up projections and their product
        (1024, lambda: 3 * ROWS * 1024 * FP32),
        # a narrow one's output (R x hidden) is held through the routed experts, which peak after their down
        # projections
        (32, lambda: ROWS * HIDDEN * FP32 + _routing(FP32, FP32, 2) + _expert_outputs(2)),
    ],
    ids=["shared-expert", "routed-experts"],
)
def test_qwen2_moe_holds_its_shared_expert_and_an_unread_mask_of_window_0(
    shared: int, own: Callable[[], int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Qwen2-MoE with a shared expert, its sliding window off (its config then says 0)
    config = transformers.Qwen2MoeConfig(
        **_LLAMA, intermediate_size=128, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=shared,
    )  # fmt: skip
    report, planned = _plan_recorded(config, tmp_path, "fp32", capsys)
    # THEN it holds, across its layers, the bool mask of window 0 its model makes for every prompt, which no
    # layer reads (prompt x prompt), beside the experts' moment
    activations = _held(FP32) + PROMPT * PROMPT + _stream(FP32) + own()
    _assert_planned_as_recorded(report, planned, activations)


def _qwen3_moe(layers: int, dense: list[int], dense_width: int) -> Any:
    """A Qwen3-MoE whose experts (16 wide, 2 a token) are as in the tests above, its `dense` layers a Llama
    MLP of `dense_width` (`mlp_only_layers`)."""
    return transformers.Qwen3MoeConfig(
        **_LLAMA | {"num_hidden_layers": layers}, head_dim=HEAD_DIM, intermediate_size=dense_width,
        num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=dense,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("layers", "dense", "dense_width", "kv_layers", "own"),
    [
        # a dense layer 0 of 1,024 wide peaks: its MLP's three tensors beside its residual and normed input
        # (its input is the embeddings), and layer 0's KV alone (before: 512,000 B over, the last layer's
        # stream and KV)
        (2, [0], 1024, 1, lambda: 2 * ROWS * HIDDEN * FP32 + 3 * ROWS * 1024 * FP32),
        # the middle one of three, beside the stream of a later layer, with two layers' KV (before: 256,000 B
        # over, the third layer's KV)
        (3, [1], 1024, 2, lambda: _stream(FP32) + 3 * ROWS * 1024 * FP32),
        # a narrow dense last layer: the MoE layer 0 peaks, its experts after their down projections (before:
        # 512,000 B over)
        (2, [1], 32, 1, lambda: 2 * ROWS * HIDDEN * FP32 + _routing(FP32, FP32, 2) + _expert_outputs(2)),
    ],
    ids=["dense-first", "dense-middle", "moe-first"],
)
def test_a_moe_models_dense_and_moe_layers_each_peak_in_their_own_layer(
    layers: int,
    dense: list[int],
    dense_width: int,
    kv_layers: int,
    own: Callable[[], int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a Qwen3-MoE whose layers in `dense` are a Llama MLP, the rest its experts
    report, planned = _plan_recorded(_qwen3_moe(layers, dense, dense_width), tmp_path, "fp32", capsys)
    # THEN its prefill peaks in the last layer of the kind that holds most, with the KV of the layers up to
    # it, which the plan counts there, where it counted every layer's and the last layer's stream
    activations = _held(FP32) + own()
    _assert_planned_as_recorded(report, planned, activations, kv_layers=kv_layers)


def test_experts_a_config_runs_eagerly_are_not_priced_as_grouped_mm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the Qwen3-MoE above, its config.json naming experts_implementation="eager", which transformers
    # honours when it loads the config: its experts run a loop over the experts, not grouped_mm
    config = transformers.Qwen3MoeConfig(
        **_LLAMA, head_dim=HEAD_DIM, intermediate_size=128, num_experts=EXPERTS, num_experts_per_tok=2,
        moe_intermediate_size=16,
    )  # fmt: skip
    config.save_pretrained(tmp_path / "config")
    config_file = tmp_path / "config" / "config.json"
    fields = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(fields | {"experts_implementation": "eager"}))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(loaded).eval()
    assert model.config._experts_implementation == "eager"
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW)
    other = report_json(tmp_path / "run", capsys)["categories_at_peak"]["other"]
    # THEN what it held is not grouped_mm's (3,320,032 B: the tests above): the loop holds what the router
    # sends each expert (2,026,788 B here, seed 0)
    grouped_mm = _held(FP32) + _stream(FP32) + _routing(FP32, FP32, 2) + _expert_outputs(2)
    assert abs(other - grouped_mm) > 100_000
    # AND its plan says its prefill is not estimated, and why, where it priced grouped_mm's
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(PROMPT + NEW), "--prompt", str(PROMPT), "--reserve", "0", "--json"]
    planned = cli_json([*argv, *shape], capsys)
    assert planned["prefill_activations_bytes"] is None
    (note,) = [note for note in planned["notes"] if note.startswith("prefill activations are not")]
    assert 'its experts_implementation="eager" (a loop over the experts' in note
    # AND a config that names none is planned for grouped_mm, its note saying eager is not estimated
    config_file.write_text(json.dumps(fields))
    default = cli_json([*argv, *shape], capsys)
    assert default["prefill_activations_bytes"] == grouped_mm
    (note,) = [note for note in default["notes"] if note.startswith("prefill activations:")]
    assert "Planned for transformers' default experts (grouped_mm); a model loaded with " in note


@pytest.mark.parametrize(
    ("make", "rotary", "widths"),
    [
        # gelu: the up projection and its activation; NeoX turns a quarter of each head (rotary_pct)
        (lambda: transformers.GPTNeoXConfig(**_LLAMA | {"num_key_value_heads": HEADS}), 4, 2),
        # gelu_new's tanh formula keeps two temporaries beside them; Phi turns half of each head
        (lambda: transformers.PhiConfig(**_LLAMA | {"num_key_value_heads": HEADS}), 8, 4),
        (lambda: transformers.Starcoder2Config(**_LLAMA), HEAD_DIM, 2),  # gelu_pytorch_tanh
        (lambda: transformers.ArceeConfig(**_LLAMA), HEAD_DIM, 3),  # relu2: relu, then its square
    ],
    ids=["gpt-neox", "phi", "starcoder2", "arcee"],
)
def test_an_mlp_without_a_gate_is_planned_by_its_activations_tensors(
    make: Callable[[], Any], rotary: int, widths: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an up/down MLP 1,024 wide (16 x hidden)
    config = make()
    config.intermediate_size = 1024
    kv_heads = config.num_key_value_heads or HEADS
    report, planned = _plan_recorded(config, tmp_path, "fp32", capsys)
    # THEN its prefill peaks at the last layer's activation: `widths` tensors of R x 1,024 beside the stream
    # (GPT-NeoX's and Phi's attention output, beside their MLP, where Llama keeps its residual)
    activations = _held(FP32, rotary) + _stream(FP32) + widths * ROWS * 1024 * FP32
    at_peak = report["categories_at_peak"]
    assert planned["prefill_activations_bytes"] == activations
    assert 0 <= at_peak["other"] - activations <= SCALARS
    assert planned["kv_at_peak_bytes"] == at_peak["kv"] == LAYERS * 2 * kv_heads * HEAD_DIM * FP32 * ROWS
    assert 0 <= report["peak_allocated_bytes"] - planned["peak_bytes"] <= SCALARS


@pytest.mark.parametrize(
    ("make", "rotary"),
    [
        (lambda: transformers.GPTNeoXConfig(**_LLAMA | {"num_key_value_heads": HEADS}), 4),
        (lambda: transformers.PhiConfig(**_LLAMA | {"num_key_value_heads": HEADS}), 8),
    ],
    ids=["gpt-neox", "phi"],
)
def test_gpt_neox_and_phi_keep_their_projections_through_eager_scores(
    make: Callable[[], Any], rotary: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN one row of a 400-token prompt under eager attention, an MLP of 4 x hidden: the scores peak
    config = make()
    config.intermediate_size = 4 * HIDDEN
    config._attn_implementation = "eager"
    config.save_pretrained(tmp_path / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    prompt = 400
    record_generate(model, tmp_path / "run", 1, prompt, NEW)
    other = report_json(tmp_path / "run", capsys)["categories_at_peak"]["other"]
    # WHEN its prefill is estimated for eager attention
    geometry = geometry_from_config(tmp_path / "config", (5, 25))
    eager = prefill_activations(geometry, "fp32", 1, prompt, "eager")
    assert eager is not None and eager.moment == "scores"
    # THEN across the layers: the embeddings, cos and sin (`rotary` wide), positions and the float32 causal
    # mask; in the last layer its input and normed input, the rotated q, the scores and their softmax (8 B a
    # head and pair), and 192 floats a token more: GPT-NeoX's fused q, k and v projection (3 x 64), Phi's q
    # and k projections (64 each) beside their turned parts (4 + 4 heads x 8)
    pairs = prompt * prompt
    held = prompt * (HIDDEN * FP32 + 2 * rotary * FP32 + 2 * INT64) + pairs * FP32
    layer = prompt * (2 * HIDDEN + HEADS * HEAD_DIM + 192) * FP32 + pairs * HEADS * 8
    assert eager.peak_bytes == held + layer
    assert 0 <= other - eager.peak_bytes <= SCALARS
