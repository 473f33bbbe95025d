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
quanto (transformers' axis=0) then packs the (groups, q_group_size) values along the groups, 8 / bits
groups a byte row (optimum.quanto.tensor.packed.pack_weights): a tensor's packed bytes are
ceil(groups / (8 / bits)) x q_group_size, a whole number of 2 groups at int4, of 4 at int2 (39 groups of 32
at int4: 20 x 32 = 640 B, not 624); HQQ packs the values as they are (`QuantoPadding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_RESIDUAL_LENGTH",
    "QuantizedBytes",
    "QuantoPadding",
    "group_scale_bytes",
    "quantized_cache_bytes",
    "quantized_kv_peak",
    "quantized_step_bytes",
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


@dataclass(frozen=True)
class QuantoPadding:
    """The bytes quanto's packing adds to a QuantizedCache's packed data: it packs each K or V tensor's
    groups 8 / bits to a byte row, padding the last row with whole groups. None of it for HQQ; where the
    backend is not known a plan counts it, the larger of the two."""

    tensors: int  # K and V tensors, every layer
    tensor_values: float  # values of one of them a token, every row
    group_size: int
    bits: int

    def of_tensor(self, tokens: int) -> int:
        """Padding bytes of one tensor of `tokens` quantized tokens."""
        values = tokens * self.tensor_values
        groups, per_byte = math.ceil(values / self.group_size), 8 // self.bits
        return round(math.ceil(groups / per_byte) * self.group_size - values * self.bits / 8)

    def of_cache(self, tokens: int) -> int:
        """Padding bytes of every tensor holding `tokens` quantized tokens."""
        return self.tensors * self.of_tensor(tokens)


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
    padding: QuantoPadding | None = None,
) -> QuantizedBytes:
    """Bytes of a quantized cache holding `tokens` positions, `residual` of them unquantized. The per-token
    figures cover every layer, K and V, and the rows counted (a plan's batch, a run's): the packed data and
    the scales of a quantized token, and a residual token in the compute dtype."""
    quantized = tokens - residual
    return QuantizedBytes(
        quantized_tokens=quantized,
        residual_tokens=residual,
        data_bytes=round(quantized * data_per_token) + (padding.of_cache(quantized) if padding else 0),
        scale_bytes=round(quantized * scale_per_token),
        residual_bytes=round(residual * full_per_token),
    )


def quantized_step_bytes(
    per_token: tuple[float, float, float], layer_share: float, layer_full_bytes: int, residual_length: int,
    prompt: int, tokens: int, padding: QuantoPadding | None = None,
) -> tuple[int, int]:  # fmt: skip
    """(the cache's storages at their worst, the update's copies beside them) in the decode step that makes
    the cache hold `tokens` a row. `per_token`: a token's packed data, scales and full-precision bytes, every
    layer and row; `layer_share`: one layer's K (or V, the widest) of a token's elements; `layer_full_bytes`:
    that K a token in the compute dtype, every row. One layer's update at a time, all alike.

    A step that keeps the new token in the residual: the last layer's, its residual's cat making the new V
    beside the old (the old K is gone by then); outside the cache, its dequantized K and V of the quantized
    tokens and the K and V it returns (all `tokens`). A step that requantizes: the first layer's, the others
    still holding their residual, its new quantized K and V made before its old V is let go of (its old K
    goes as the new one is bound), a bound for the recorder's part-by-part view; its copies priced at the
    dequantized and returned pairs of every token, a bound for the backend's own temporaries."""
    before = residual_tokens(tokens - 1, residual_length, prompt)  # the residual it starts from
    residual = residual_tokens(tokens, residual_length, prompt)
    if residual:
        held = quantized_cache_bytes(tokens, residual, *per_token, padding).total_bytes
        copies = layer_full_bytes * (2 * (tokens - 1 - before) + 2 * tokens)
        return held + layer_full_bytes * before, copies
    held = quantized_cache_bytes(tokens - 1, before, *per_token, padding).total_bytes
    data, scales, _ = per_token
    new_pair = 2 * layer_share * tokens * (data + scales) + (2 * padding.of_tensor(tokens) if padding else 0)
    old_k = layer_share * (tokens - 1 - before) * (data + scales)
    old_k += padding.of_tensor(tokens - 1 - before) if padding else 0
    copies = layer_full_bytes * (2 * (tokens - 1) + 2 * tokens)
    return held + round(new_pair - old_k), copies


def quantized_kv_peak(
    per_token: tuple[float, float, float], layer_share: float, layer_full_bytes: int, residual_length: int,
    prompt: int, written: int, padding: QuantoPadding | None = None,
) -> tuple[int, int]:  # fmt: skip
    """(the most the cache's storages hold at once, the most with the update's copies beside them) over a
    run that quantizes a `prompt`-token prompt and writes up to `written` tokens a row, one a decode step
    (arguments as `quantized_step_bytes`). The end, the last decode step, the last that requantized and the
    one before it, which grew the residual to its fullest: its last layer's cat holds the old V beside the
    new while every layer holds residual_length - 1 tokens at full precision, more than a later, shorter
    residual (recorded: hqq int4, group 64, residual 8, 2 rows, 8 + 12 tokens: 9,984 B at 15 tokens, the
    last step's 19 fewer); the steps that came after the prompt. A run one token shorter can peak higher:
    it may end on the step that requantizes."""
    residual = residual_tokens(written, residual_length, prompt)
    peak = with_copies = quantized_cache_bytes(written, residual, *per_token, padding).total_bytes
    if written > prompt:
        requantized = written - residual
        steps = {
            tokens
            for tokens in (written, requantized, requantized - 1)
            if tokens == written or tokens > prompt
        }
        for tokens in steps:
            held, copies = quantized_step_bytes(
                per_token, layer_share, layer_full_bytes, residual_length, prompt, tokens, padding
            )
            peak, with_copies = max(peak, held), max(with_copies, held + copies)
    return peak, with_copies
