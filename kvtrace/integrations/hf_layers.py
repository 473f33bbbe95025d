"""What a Hugging Face `transformers` cache layer holds, read from the outside: its KV parts (K, V, a
quantized layer's packed K and V, the auxiliary state some layers keep beside them), the tokens it holds,
and its kind (how its class counts tokens and replaces its tensors).

Kept apart from `kvtrace.integrations.hf_caches`, which installs the `Cache` wrappers and decides when to log:
these functions only read a layer (or compare it with the slots the tracker last logged), so what a new layer
class holds or how it counts is added here without touching the hooks. The per-update path
(`HfCacheHooks._updated`, the `Cache.update` wrapper) imports each name directly, so a call costs the same
global lookup it did when they lived in one module (issue 11).
"""

from __future__ import annotations

from typing import Any

import torch

_MISSING = object()  # an attribute a layer lacks (never identical to a tracked tensor)

# State some layer classes hold beside their K/V, growing with the context, logged as `aux.<name>` parts:
# sparse attention's indexer keys (DynamicIndexedLayer / StaticIndexedLayer: DeepSeek-V3.2, GLM-MoE-DSA) and
# their positions; DeepSeek-V4's compressed KV entries, the source tokens waiting for a full window, and CSA's
# overlap state (dicts by entry name). Their counters (`indexer_cumulative_length`, `entry_count`) are not KV.
_AUX_STATE = (
    "indexer_keys",
    "indexer_position_ids",
    "compressed_kv",
    "buffer_kv",
    "buffer_gate",
    "overlap_kv",
    "overlap_gate",
)
AUX_PREFIX = "aux."
_AUX_NAMES: dict[type, tuple[str, ...]] = {}


def aux_state_names(layer: Any) -> tuple[str, ...]:
    """The `_AUX_STATE` attributes a layer's class holds, found on its first instance seen (they are set in
    `__init__`, so the class alone does not tell), then looked up by class."""
    layer_type = type(layer)
    names = _AUX_NAMES.get(layer_type)
    if names is None:
        names = _AUX_NAMES[layer_type] = tuple(name for name in _AUX_STATE if hasattr(layer, name))
    return names


def layer_parts(layer: Any) -> dict[tuple[str, str], Any]:
    """The attributes of a cache layer that hold KV memory, by (kv, part). Auxiliary state (`_AUX_STATE`) is
    logged under K: DeepSeek-V4's compressed entries are K and V at once, and the indexer's keys are keys."""
    parts: dict[tuple[str, str], Any] = {
        ("k", "data"): getattr(layer, "keys", None),
        ("v", "data"): getattr(layer, "values", None),
    }
    if hasattr(layer, "_quantized_keys"):
        parts[("k", "q")] = layer._quantized_keys
        parts[("v", "q")] = layer._quantized_values
    for name in aux_state_names(layer):
        parts[("k", AUX_PREFIX + name)] = getattr(layer, name, None)
    return parts


def layer_tokens(layer: Any, known: int | None = None) -> int:
    """Tokens a layer holds per batch row. Static layers count in a tensor: reading it is a device sync, so
    `known` (the tracker's own count) is used instead where the caller has it."""
    cumulative = getattr(layer, "cumulative_length", None)
    if hasattr(layer, "_quantized_keys") and isinstance(cumulative, int):
        return cumulative
    keys = getattr(layer, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() >= 2:
        if getattr(layer, "max_cache_len", None) is not None and isinstance(cumulative, torch.Tensor):
            # Static layers: the storage is full length; what is held is the cumulative count, capped.
            # A static sliding layer stops updating the tensor count once full; its int count is exact.
            count = getattr(layer, "cumulative_length_int", None)
            if not isinstance(count, int):
                if known is not None:
                    return known
                count = int(cumulative)  # a sync, only for crop/reset or a cache first seen mid-run
            window = getattr(layer, "sliding_window", None) or layer.max_cache_len
            return min(count, int(window))
        return int(keys.shape[-2])
    return 0


def _signature(parts: dict[tuple[str, str], Any]) -> tuple[Any, ...]:
    """Cheap identity of a quantized layer's KV attributes: which objects, where their data is, their
    shapes and in-place write counters (an id alone can be reused by a new tensor once the old is freed)."""
    out: list[Any] = []
    for value in parts.values():
        out.append(id(value))
        if isinstance(value, torch.Tensor):
            out.append(value.data_ptr())
            out.append(value.shape)
            try:
                out.append(value._version)
            except RuntimeError:  # inference tensors have no version counter
                out.append(-1)
    return tuple(out)


# How a layer class counts its tokens after an update (decided once per class). A dynamic sliding layer
# counts like a plain one, but its update makes both new K and V (torch.cat) before it lets go of either
# old tensor: the log shows that transient (`KvTracker.update(both_first=True)`). The quantized kinds differ
# in the same way: transformers' Fp8QuantizedLayer keeps its old quantized K and V in locals until its
# update returns, after both new ones are made (`_FP8`: frees last); QuantizedLayer (quanto, HQQ) rebinds
# each attribute as it makes it, its quantized K and V before its full-precision residual (`_RESIDUAL`).
_PLAIN, _STATIC, _STATIC_SLIDING, _OTHER, _SLIDING, _FP8, _RESIDUAL = range(7)
# Added to a class's kind when its layers hold auxiliary state (`aux_state_names`): no kind above equals it,
# so the per-update tests of the plain kinds send such layers to the comparison of all their parts, and the
# common layer pays nothing for the test (issue 11). `kind - _AUX` counts its tokens.
_AUX = 16


def _kind_of(layer: Any) -> int:
    """`_layer_kind` of a layer's class, plus `_AUX` where its layers hold auxiliary state."""
    return _layer_kind(type(layer)) + (_AUX if aux_state_names(layer) else 0)


def _layer_kind(layer_type: type) -> int:
    import transformers.cache_utils as cu

    def is_a(name: str) -> bool:
        cls = getattr(cu, name, None)
        return isinstance(cls, type) and issubclass(layer_type, cls)

    if is_a("Fp8QuantizedLayer"):
        return _FP8
    if is_a("QuantizedLayer"):
        return _RESIDUAL
    if is_a("BaseQuantizedLayer") or is_a("QuantizedLayerMixin"):
        return _OTHER
    if is_a("StaticSlidingWindowLayer"):
        return _STATIC_SLIDING
    if is_a("StaticLayer"):
        return _STATIC
    if is_a("DynamicSlidingWindowLayer"):  # its keys are a view of the window
        return _SLIDING
    if is_a("DynamicLayer"):
        return _PLAIN
    return _OTHER


_DEFERRABLE: list[frozenset[type]] = []


def _deferrable_types() -> frozenset[type]:
    """The plain layer classes themselves, whose update `step_end` can account for from the outside."""
    if not _DEFERRABLE:
        import transformers.cache_utils as cu

        names = ("DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer", "StaticSlidingWindowLayer")
        _DEFERRABLE.append(frozenset(c for c in (getattr(cu, n, None) for n in names) if isinstance(c, type)))
    return _DEFERRABLE[0]


def _kv_as_logged(states: dict[tuple[int, int], Any], cid: int, layer_idx: int, layer: Any) -> bool:
    """Whether a layer's K and V are the tensor objects its slots last logged."""
    state = states.get((cid, layer_idx))
    if state is None:
        return False
    k_slot, v_slot = state.slots.get(("k", "data")), state.slots.get(("v", "data"))
    return (
        k_slot is not None
        and v_slot is not None
        and k_slot.tref() is getattr(layer, "keys", _MISSING)
        and v_slot.tref() is getattr(layer, "values", _MISSING)
    )


def _written(fast: tuple[Any, Any], keys: torch.Tensor, values: torch.Tensor, moved: bool) -> bool:
    """Whether a static layer's K or V was written in place since its slots last saw it; `moved`: whether
    its token count moved, the answer for inference tensors, which have no version counter."""
    try:
        return keys._version != fast[0].version or values._version != fast[1].version
    except RuntimeError:
        return moved


def _expected_tokens(layer: Any, kind: int, before: int | None, new_tokens: int) -> int | None:
    """Tokens a dynamic layer holds after its own update of `new_tokens`: `before` plus them, a sliding
    layer keeping its last `sliding_window - 1` (transformers' DynamicSlidingWindowLayer); None when unknown
    (a layer first seen, or a kind whose count is not its shape)."""
    if before is None:
        return None
    if kind == _PLAIN:
        return before + new_tokens
    if kind == _SLIDING:
        window = getattr(layer, "sliding_window", None)
        if not isinstance(window, int) or getattr(layer, "record_past", False):
            return None
        return min(before + new_tokens, window - 1)
    return None


def _aux_layer_tokens(layer: Any, base: int, before: int | None, new_tokens: int) -> int:
    """Tokens a layer holding auxiliary state holds after its update of `new_tokens`, counted as its plain
    kind `base` counts them: a static layer's from the tracker's count, as reading its own tensor syncs."""
    if base in (_STATIC, _STATIC_SLIDING) and before is not None:
        window = getattr(layer, "sliding_window", None) or layer.max_cache_len
        return layer_tokens(layer, min(before + new_tokens, int(window)))
    return layer_tokens(layer)
