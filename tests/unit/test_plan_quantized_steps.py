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
