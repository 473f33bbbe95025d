"""DeepSeek-V4's KV cache as transformers 5.25 holds it (modeling_deepseek_v4.py), at a batch, a prompt and
a number of new tokens: the config's layer kinds, and the bytes each kind of state takes. Pure arithmetic.

Every layer keeps a sliding window of one K = V head (`values = keys`: one storage, counted once; a plain
`sliding_attention` layer is a DynamicSlidingWindowLayer, whose K and V are two). As in any
DynamicSlidingWindowLayer, the window's storage is the whole prompt until the first decode step, then
min(written, window) tokens. Beside it, after `written` tokens:

- a compressed layer (CSA every `csa_rate` tokens, HCA every `hca_rate`) holds written // rate compressed
  entries of head_dim, grown by torch.cat; a CSA layer's indexer as many compressed keys of index_head_dim;
- the compressor's pending tokens (`buffer_kv`, `buffer_gate`: the tokens since the last entry, kv and gate
  projections, CSA's of 2 x head_dim and 2 x index_head_dim, HCA's of head_dim): a view of the last
  forward's projections or their cat, so the prompt's whole projections after the prefill, then
  written % rate tokens, or rate once the buffer is drained (the empty view keeps its storage);
- a CSA layer's overlap state, once an entry is made: the last window's first half (rate x head_dim, and
  x index_head_dim for the indexer), kv in the model's dtype and the gate in float32 (the gate plus the
  float32 `position_bias`; before 5.25, `GATE_FP32_SINCE`, in the model's dtype). With the buffers, the
  plan's "compressor_state".

The peak (`compressed_sizes`) is bounded, not replayed token by token: at a decode step each layer
rewrites its window and buffers (and, where an entry is made, its compressed state), each new storage made
before its old one is let go of (`_step_bound`), the layers before it updated, those after it not yet.
Taken at the first decode step (the prompt let go of), the last step, and the last step of each rate that
makes an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from analyzers.planning.presets import CompressedShape, dtype_bytes_for
from kvtrace.errors import KvtraceError

__all__ = ["PART_NAMES", "CompressedSizes", "compressed_growth_bytes", "compressed_shape", "compressed_sizes"]

# DeepseekV4Config's defaults (transformers 5.25)
_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_KINDS = {
    "sliding_attention": "sliding",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
_LEGACY_RATIOS = {
    0: "sliding",
    4: "csa",
    128: "hca",
}  # `compress_ratios`: per-layer ints of older checkpoints
_FP32 = 4  # the overlap gate's bytes an element: float32 whatever the model's dtype
# The first transformers that keeps the CSA overlap gate in float32: 5.17 keeps it in the model's dtype (a
# bf16 plan from its run was 384 B over the tiny DeepSeek-V4's 14,528 B); the releases between are unmeasured
GATE_FP32_SINCE = (5, 25)

# The parts of the cache a plan lists, in this order (`CompressedSizes.parts`)
PART_NAMES = ("window", "compressed_entries", "indexer_keys", "compressor_state")


def compressed_shape(
    fields: dict[str, Any],
    model_type: str,
    layers: int,
    positive_int: Callable[[str, Any], int],
    transformers_version: tuple[int, int] | None = None,
) -> CompressedShape | None:
    """The layer kinds and rates of a DeepSeek-V4 config, as DeepseekV4Config derives them: `layer_types`,
    else the legacy per-layer `compress_ratios` (0, 4, 128), else two HCA layers then CSA and HCA alternating
    (CSA on odd i of the rest); `compress_rates` (legacy `compress_rate_csa` / `compress_rate_hca` win);
    the overlap gate's dtype as `transformers_version` (major, minor; None: the newest) keeps it. None for
    any other model."""
    if model_type != "deepseek_v4":
        return None
    get = fields.get
    rates: dict[str, Any] = dict(_RATES)
    given = get("compress_rates")
    if isinstance(given, dict):
        rates.update(given)
    for key, name in (
        ("compress_rate_csa", "compressed_sparse_attention"),
        ("compress_rate_hca", "heavily_compressed_attention"),
    ):
        if get(key) is not None:
            rates[name] = get(key)
    types = get("layer_types")
    legacy = get("compress_ratios")
    if isinstance(types, list):
        unknown = [kind for kind in types if kind not in _KINDS]
        if unknown:
            raise KvtraceError(f"layer_types: {unknown[0]!r} is not a DeepSeek-V4 layer type")
        kinds = [_KINDS[kind] for kind in types]
    elif isinstance(legacy, list):
        unknown = [ratio for ratio in legacy if ratio not in _LEGACY_RATIOS]
        if unknown:
            raise KvtraceError(f"compress_ratios: {unknown[0]!r} is not 0, 4 or 128")
        kinds = [_LEGACY_RATIOS[ratio] for ratio in legacy]
    else:
        kinds = ["hca"] * min(layers, 2) + ["csa" if i % 2 else "hca" for i in range(max(layers - 2, 0))]
    if len(kinds) < layers:
        raise KvtraceError(f"layer_types lists {len(kinds)} layers of the {layers}")
    return CompressedShape(
        layer_kinds=tuple(kinds[:layers]),
        csa_rate=positive_int("compress_rates", rates["compressed_sparse_attention"]),
        hca_rate=positive_int("compress_rates", rates["heavily_compressed_attention"]),
        index_head_dim=positive_int("index_head_dim", get("index_head_dim", 128)),
        gate_fp32=transformers_version is None or transformers_version >= GATE_FP32_SINCE,
    )


def _rate(shape: CompressedShape, kind: str) -> int:
    return shape.csa_rate if kind == "csa" else shape.hca_rate


def _layer(
    shape: CompressedShape, kind: str, head_dim: int, window: int, written: int, prefill: bool
) -> dict[str, tuple[int, int]]:
    """One layer's state per row after `written` tokens, the last forward the prefill or a decode step:
    each part's (elements in the model's dtype, float32 elements)."""
    kept = written if prefill else min(written, window)
    if kind == "sliding":
        return {"window": (2 * kept * head_dim, 0)}  # its own K and V
    rate = _rate(shape, kind)
    entries = written // rate
    pending = written if prefill else (written % rate or rate)
    index = shape.index_head_dim if kind == "csa" else 0
    width = head_dim if kind == "hca" else 2 * (head_dim + index)  # CSA's projections: two series each
    overlap = rate * (head_dim + index) if entries and kind == "csa" else 0
    return {
        "window": (kept * head_dim, 0),
        "compressed_entries": (entries * head_dim, 0),
        "indexer_keys": (entries * index, 0),
        "buffers": (2 * pending * width, 0),  # kv and gate
        "overlap": (overlap, overlap) if shape.gate_fp32 else (2 * overlap, 0),  # kv, then gate
    }


def _state(
    shape: CompressedShape, head_dim: int, window: int, written: int, prefill: bool, batch: int, dtype: str
) -> list[dict[str, int]]:
    """Each layer's parts in bytes, in order."""

    def size(part: tuple[int, int]) -> int:
        return dtype_bytes_for(dtype, batch * part[0]) + _FP32 * batch * part[1]

    return [
        {name: size(part) for name, part in _layer(shape, kind, head_dim, window, written, prefill).items()}
        for kind in shape.layer_kinds
    ]


def _step_bound(
    shape: CompressedShape, before: list[dict[str, int]], after: list[dict[str, int]], written: int
) -> int:
    """The most one decode step to `written` tokens can hold (the module's doc). A layer rewrites its parts
    one after another, each new one made beside its old one: while part p is made, the parts before it are
    new and those after it old, at most each part's larger size plus p's smaller one."""
    totals_before = [sum(layer.values()) for layer in before]
    totals_after = [sum(layer.values()) for layer in after]
    peak = 0
    for i, kind in enumerate(shape.layer_kinds):
        made = kind != "sliding" and written % _rate(shape, kind) == 0
        rewritten = ("window", "buffers") + (
            ("compressed_entries", "indexer_keys", "overlap") if made else ()
        )
        larger = sum(max(before[i][name], after[i][name]) for name in after[i])
        making = max(min(before[i][name], after[i][name]) for name in rewritten if name in after[i])
        peak = max(peak, sum(totals_after[:i]) + larger + making + sum(totals_before[i + 1 :]))
    return peak


@dataclass(frozen=True)
class CompressedSizes:
    """The cache at the end (`parts`, bytes by `PART_NAMES`; `final_bytes` their sum), once the prompt is
    in, and its bounded peak."""

    parts: tuple[tuple[str, int], ...]
    final_bytes: int
    prefill_bytes: int
    peak_bytes: int


def compressed_sizes(
    shape: CompressedShape, head_dim: int, window: int, batch: int, prompt: int, new: int, dtype: str
) -> CompressedSizes:
    """DeepSeek-V4's cache of `batch` rows after a `prompt`-token prefill and new - 1 decode steps (generate()
    never feeds its last new token back), its tensors in `dtype`."""
    written = prompt + new - 1

    def state(tokens: int, prefill: bool) -> list[dict[str, int]]:
        return _state(shape, head_dim, window, tokens, prefill, batch, dtype)

    final = state(written, new == 1)
    prefilled = state(prompt, True)
    prefill_bytes = sum(sum(layer.values()) for layer in prefilled)
    peak = prefill_bytes
    if new >= 2:
        steps = {prompt + 1, written}
        for rate in {_rate(shape, kind) for kind in shape.layer_kinds if kind != "sliding"}:
            last = written - written % rate  # the last step that made an entry
            if last > prompt + 1:
                steps.add(last)
        for step in steps:
            before = prefilled if step == prompt + 1 else state(step - 1, False)
            peak = max(peak, _step_bound(shape, before, state(step, False), step))
    totals = {name: sum(layer.get(name, 0) for layer in final) for name in PART_NAMES}
    totals["compressor_state"] = sum(layer.get("buffers", 0) + layer.get("overlap", 0) for layer in final)
    final_bytes = sum(totals.values())
    return CompressedSizes(tuple(totals.items()), final_bytes, prefill_bytes, max(peak, final_bytes))


def compressed_growth_bytes(shape: CompressedShape, head_dim: int, dtype: str) -> float:
    """Bytes a row's cache grows by per token written, on average: the compressed entries and indexer keys,
    one every rate tokens (the window and the compressor's state do not grow)."""
    elements = 0.0
    for kind in shape.layer_kinds:
        if kind == "csa":
            elements += (head_dim + shape.index_head_dim) / shape.csa_rate
        elif kind == "hca":
            elements += head_dim / shape.hca_rate
    return dtype_bytes_for(dtype, 8) / 8 * elements
