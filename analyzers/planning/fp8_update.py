"""What one layer's update in transformers' fp8 `QuantizedCache` (`Fp8QuantizedLayer.update`) holds beside
the cache at its worst moment: the one formula behind `kvtrace diagnose`'s fp8 remedy and `kvtrace plan
--cache fp8`, so that the two price the same run alike. Pure arithmetic, no torch.

The update quantizes the new token's K and V (a byte a value), concatenates each onto the layer's 8-bit K
and V, and dequantizes the result to float32 while its locals still hold the old K and V and the new
token's: the layer's 8-bit K and V over all its tokens beside their torch.cat copy. Dequantizing makes
`quant.float()`, then `* scale`; with the returned K kept, V's pair makes three float32 copies of one side
live at once. Both figures run over the tokens the layer holds after the update (at a generate()'s last
step, the context less the token it never feeds).
"""

from __future__ import annotations

__all__ = ["FP8_DEQUANTIZED_COPIES", "fp8_update_bytes"]

FP8_DEQUANTIZED_COPIES = 3  # float32 copies of a layer's K (or V) live at once inside its update
_FLOAT32_BYTES = 4


def fp8_update_bytes(layer_elements: float, side_elements: float, tokens: int) -> tuple[int, int]:
    """(the updated layer's old 8-bit K and V with the new token's, its float32 copies) in bytes, beside
    the cache's own 8-bit KV with the layer already grown. `layer_elements`: K and V elements of one
    position of the layer over every row; `side_elements`: those of its wider side (K or V); `tokens`: the
    layer's tokens after the update."""
    held = round(layer_elements * tokens)
    copies = round(FP8_DEQUANTIZED_COPIES * side_elements * _FLOAT32_BYTES * tokens)
    return held, copies
