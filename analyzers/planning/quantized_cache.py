"""transformers' `QuantizedCache` (quanto and HQQ backends) in bytes: the one model behind `kvtrace plan
--cache quantized` and `kvtrace diagnose`'s int4 remedy. Pure arithmetic, no torch.

A `QuantizedLayer` quantizes the whole prompt at prefill. The tokens after it stay unquantized, in the
compute dtype, in a residual of at most `residual_length - 1` tokens: the update that would make it
`residual_length` long quantizes everything held (residual and new token included) and empties it. So
after `prompt + n` tokens, one per decode step, `n % residual_length` of them are unquantized; every
quantized group of `q_group_size` elements also keeps a scale and a zero-point in the compute dtype.
Both backends group a K or V tensor's elements flattened whole (rows x heads x tokens x head_dim), not
each token's row: quanto's `_scale` of a (2, 2, 12, 16) K at groups of 64 is (12, 1), 768 / 64 groups, so
a layer 32 wide costs half a group a token, not a whole one (`group_scale_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_RESIDUAL_LENGTH",
    "QuantizedBytes",
    "group_scale_bytes",
    "quantized_cache_bytes",
    "residual_tokens",
]

DEFAULT_GROUP_SIZE = 64  # QuantizedLayer's q_group_size
DEFAULT_RESIDUAL_LENGTH = 128  # QuantizedLayer's residual_length


@dataclass(frozen=True)
class QuantizedBytes:
    """A quantized cache's bytes: the packed data and the scales of its quantized tokens, and the tokens
    of its residual at full precision."""

    quantized_tokens: int
    residual_tokens: int
    data_bytes: int
    scale_bytes: int
    residual_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.data_bytes + self.scale_bytes + self.residual_bytes


def residual_tokens(tokens: int, residual_length: int, prompt: int | None = None) -> int:
    """Of `tokens` held per row, those in the unquantized residual. With the prompt known (one token per
    decode step after it): `(tokens - prompt) % residual_length`. Without it, the worst case over prompt
    lengths: `residual_length - 1`, and never the prefill's tokens (at least one is quantized)."""
    if tokens < 1:
        return 0
    if prompt is None or not 1 <= prompt <= tokens:
        return min(residual_length - 1, tokens - 1)
    return (tokens - prompt) % residual_length


def group_scale_bytes(elements: float, group_size: int, compute_bytes: float) -> float:
    """Bytes of the scales and zero-points of `elements` quantized values: one of each per `group_size` of
    them, in the compute dtype. Per token a fraction where a layer's K is narrower than a group: the groups
    run across tokens and rows, as both backends flatten the whole tensor before grouping it."""
    return elements / group_size * 2 * compute_bytes


def quantized_cache_bytes(
    tokens: int,
    residual: int,
    data_per_token: float,
    scale_per_token: float,
    full_per_token: float,
) -> QuantizedBytes:
    """Bytes of a quantized cache holding `tokens` positions, `residual` of them unquantized. The per-token
    figures cover every layer, K and V, and the rows counted (a plan's batch, a run's): the packed data and
    the scales of a quantized token, and a residual token in the compute dtype."""
    quantized = tokens - residual
    return QuantizedBytes(
        quantized_tokens=quantized,
        residual_tokens=residual,
        data_bytes=round(quantized * data_per_token),
        scale_bytes=round(quantized * scale_per_token),
        residual_bytes=round(residual * full_per_token),
    )
