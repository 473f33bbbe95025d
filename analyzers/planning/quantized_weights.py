"""What a plan of quantized weights (`--dtype int4`, `int8`, `fp8`) counts and what a real checkpoint adds.

The plan weighs every parameter at the quantized width (`param_count.parameter_bytes`), a lower bound: the
common checkpoints keep the token embeddings and the lm_head at 16 bits (AWQ and GPTQ quantize the decoder
layers' linear layers alone, bitsandbytes skips the lm_head and the embeddings) and store scales beside the
packed weights. The plan's figure is left as it is (the layout depends on the quantizer); the note gives the
figure with the embeddings and lm_head at bf16, from the geometry, and for int4 the group scales of GPTQ and
AWQ's usual layout. Pure arithmetic, no torch.
"""

from __future__ import annotations

import math

from analyzers.planning.param_count import buffer_bytes, end_params, param_count
from analyzers.planning.presets import DTYPE_BITS, ModelGeometry, dtype_bytes_for

__all__ = ["GPTQ_GROUP_SIZE", "kept_bf16_weights_bytes", "quantized_weights_note"]

# the quantizers that keep the embeddings and lm_head at 16 bits, by the weights' dtype
_QUANTIZERS = {
    "int4": "AWQ, GPTQ and bitsandbytes' nf4",
    "int8": "GPTQ and bitsandbytes' LLM.int8()",
    "fp8": "FBGEMM's and compressed-tensors' fp8",
}
# GPTQ's and AWQ's usual group: an fp16 scale and a packed 4-bit zero point for every 128 weights
GPTQ_GROUP_SIZE = 128
_GROUP_BYTES = 2.5


def _kept_params(geom: ModelGeometry) -> int:
    """The parameters a quantized checkpoint keeps at 16 bits: the embeddings and lm_head (0 where tied)."""
    embeddings, _, lm_head = end_params(geom)
    return embeddings + lm_head


def kept_bf16_weights_bytes(geom: ModelGeometry, dtype: str) -> int:
    """The weights as the plan counts them at `dtype`, but with the embeddings and lm_head at bf16."""
    kept = _kept_params(geom)
    quantized = param_count(geom) - geom.fp32_parameters - kept
    return (
        dtype_bytes_for(dtype, quantized)
        + dtype_bytes_for("bf16", kept)
        + 4 * geom.fp32_parameters
        + buffer_bytes(geom, dtype)
    )


def quantized_weights_note(geom: ModelGeometry, dtype: str) -> str | None:
    """The note of a plan whose weights are the geometry's at a quantized `dtype`; None for a float one."""
    from analyzers.units import human_bytes

    if dtype not in _QUANTIZERS:
        return None
    params, kept = param_count(geom), _kept_params(geom)
    with_kept = kept_bf16_weights_bytes(geom, dtype)
    width = DTYPE_BITS[dtype] / 8
    held = "embed_tokens (the lm_head shares it)" if geom.tie_word_embeddings else "embed_tokens and lm_head"
    if dtype == "int4":
        groups = math.ceil((params - geom.fp32_parameters - kept) / GPTQ_GROUP_SIZE)
        scales = (
            f", and their group scales about {human_bytes(math.ceil(groups * _GROUP_BYTES))} more (an fp16 "
            f"scale and a 4-bit zero for every {GPTQ_GROUP_SIZE} weights)"
        )
    else:
        scales = ", and their scales beside (a float per output channel or tensor)"
    return (
        f"weights: all {params:,} parameters counted at {dtype} ({width:g} B each), with no quantization "
        f"scales, a lower bound: real {dtype} checkpoints keep {held} at bf16, as {_QUANTIZERS[dtype]} "
        f"do ({kept:,} parameters): {human_bytes(with_kept)} ({with_kept:,} B) with them kept so{scales}"
    )
