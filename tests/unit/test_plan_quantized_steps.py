"""A quanto or HQQ QuantizedCache's KV peak in a plan: the decode steps that can hold the most of the cache's
own storages at once. Every figure is worked out here from the backends' layouts, never read back."""

from __future__ import annotations

import pytest

from analyzers.planning.plan import PlanRequest, plan
from analyzers.planning.presets import ModelGeometry

# The tour's tiny Llama 3: 2 layers, 2 KV heads of 16, float32 (a layer's K is 32 values a row)
TINY_LLAMA = ModelGeometry("tiny", 2, 4, 2, 16, 64, 128, 1000, False)
HEAD_DIM, KV_HEADS, LAYERS, FP32 = 16, 2, 2, 4


def _quantized(values: int, bits: int, group: int) -> int:
    """One layer's quantized K (or V) of `values` values, HQQ's layout: `bits` a value packed, and a float32
    scale and zero-point for each group of `group` values, the groups running over the flattened tensor."""
    return values * bits // 8 + values // group * 2 * FP32


@pytest.mark.parametrize(
    ("bits", "group", "residual", "rows", "new"),
    [
        (4, 64, 8, 3, 9),  # recorded (hqq and quanto): 14,976 B; planned 14,112 before
        (2, 64, 8, 3, 9),  # recorded 14,208; planned 12,768
        (4, 64, 8, 2, 12),  # recorded 9,984; planned 9,408
    ],
)
def test_a_quantized_plans_kv_peak_prices_the_step_that_fills_the_residual(
    bits: int, group: int, residual: int, rows: int, new: int
) -> None:
    # GIVEN an 8-token prompt and residual_length 8: the cache requantizes at 16 tokens, and the step before,
    # at 15, grows each layer's residual to its fullest, 7 tokens, the last layer's cat making its new V
    # beside the old one of 6 (every earlier layer already grown)
    req = PlanRequest(
        geometry=TINY_LLAMA, weights_dtype="fp32", batch=rows, context=8 + new, prompt=8, cache="quantized",
        kv_dtype=f"int{bits}", quant_group_size=group, residual_length=residual, reserve_bytes=0,
    )  # fmt: skip
    # WHEN it is planned
    result = plan(req)
    # THEN its KV peak is that step's storages: every layer's prompt quantized and 7 residual tokens of K
    # and V, and the old V of 6 (a later step's shorter residual, or the requantizing step, holds less)
    row_token = rows * KV_HEADS * HEAD_DIM  # values of one layer's K (or V), one token, every row
    layer = _quantized(8 * row_token, bits, group) + 7 * row_token * FP32
    assert result.kv_peak_bytes == LAYERS * 2 * layer + 6 * row_token * FP32


def _packed(values: int, bits: int, group: int, backend: str) -> int:
    """One tensor's packed bytes. HQQ: the values as they are, `bits` each. quanto (transformers' axis=0):
    the tensor grouped into (values / group, group) and packed along the groups, 8 / bits of them a byte row
    (optimum.quanto.tensor.packed.pack_weights), so ceil(groups / (8 / bits)) x group bytes: a whole number
    of 2 groups at int4, of 4 at int2."""
    groups, per_byte = values // group, 8 // bits
    return values * bits // 8 if backend == "hqq" else -(-groups // per_byte) * group


@pytest.mark.parametrize("backend", ["quanto", "hqq", None])
def test_a_quantized_plan_pads_quantos_packed_groups(backend: str | None) -> None:
    # GIVEN int4, groups of 32, residual 5, 3 rows, an 8-token prompt and 9 new (16 held): 13 quantized
    # tokens, a tensor of 3 x 2 x 13 x 16 = 1,248 values, 39 groups; 3 in the float32 residual
    req = PlanRequest(
        geometry=TINY_LLAMA, weights_dtype="fp32", batch=3, context=17, prompt=8, cache="quantized",
        kv_dtype="int4", quant_group_size=32, residual_length=5, reserve_bytes=0, quant_backend=backend,
    )  # fmt: skip
    # WHEN planned: THEN each of its 4 tensors packs 20 x 32 = 640 B with quanto, or where the backend is not
    # known (the larger), and 624 B with HQQ (recorded: 8,416 B quanto, 8,352 B hqq; planned 8,352 for both)
    row_token = 3 * KV_HEADS * HEAD_DIM
    packed = _packed(13 * row_token, 4, 32, backend or "quanto")
    assert packed == (624 if backend == "hqq" else 640)
    tensor = packed + 13 * row_token // 32 * 2 * FP32 + 3 * row_token * FP32
    assert plan(req).kv_bytes == LAYERS * 2 * tensor == (8_352 if backend == "hqq" else 8_416)


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_a_quantized_plans_kv_peak_pads_quantos_packed_groups(backend: str) -> None:
    # GIVEN int2, groups of 32, residual 5, 2 rows, an 8-token prompt and 12 new: its KV peak is the step to
    # 17 tokens, 13 of them quantized (a tensor of 2 x 2 x 13 x 16 = 832 values, 26 groups), 4 in the residual
    req = PlanRequest(
        geometry=TINY_LLAMA, weights_dtype="fp32", batch=2, context=20, prompt=8, cache="quantized",
        kv_dtype="int2", quant_group_size=32, residual_length=5, reserve_bytes=0, quant_backend=backend,
    )  # fmt: skip
    # WHEN planned: THEN quanto packs those 26 groups in 7 rows of 4, 224 B a tensor, HQQ in 208 B; with
    # every tensor's scales and residual, and the last layer's old V of 3 tokens (recorded: quanto 6,592 B,
    # hqq 6,528 B; planned 6,528 for both)
    row_token = 2 * KV_HEADS * HEAD_DIM
    tensor = _packed(13 * row_token, 2, 32, backend) + 13 * row_token // 32 * 2 * FP32 + 4 * row_token * FP32
    assert plan(req).kv_peak_bytes == LAYERS * 2 * tensor + 3 * row_token * FP32
    assert plan(req).kv_peak_bytes == (6_592 if backend == "quanto" else 6_528)
