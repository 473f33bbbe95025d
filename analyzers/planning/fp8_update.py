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

__all__ = ["FP8_DEQUANTIZED_COPIES", "fp8_prefill_attention_bytes", "fp8_update_bytes"]

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


def fp8_prefill_attention_bytes(
    squared_at_peak: int, rows: int, prompt: int, layer_elements: float, compute_bytes: int
) -> int:
    """Bytes a run's prefill peak holds on an fp8 cache beyond the run's activations and the fp8 KV: the
    attending layer's K and V over the prompt in the compute dtype, which a dynamic run counts as its KV but
    the fp8 cache only returns (it keeps the 8-bit copy), live until the layer's attention ends. Only where
    the run's peak moment is inside a layer's attention: its bytes over prompt x prompt pairs
    (`squared_at_peak`, eager's) above the mask's (`compute_bytes` a row and pair, held across the layers),
    so that a layer's scores, made from its updated K, are live. `layer_elements`: K and V elements of one
    position of one layer, a row. 0 elsewhere (an MLP's moment, sdpa's rotary copies): the layer's K and V
    are freed or not yet made. Before, left out: the tiny Llama (2 rows, 128-token prompt, 4 KV heads,
    eager) planned fp8 131,072 B (a layer's K and V) under its fp8 recording, which peaked in its last
    layer's attention scores."""
    if squared_at_peak <= rows * prompt * prompt * compute_bytes:
        return 0
    return round(layer_elements * rows * prompt * compute_bytes)
