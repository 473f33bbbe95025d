"""Follows Hugging Face `transformers` caches (layer-based caches, 4.56+ and 5.x) without changing them.

`transformers` has no cache observer API, but every layer write goes through `Cache.update(…, layer_idx)`
and every structural change through a handful of `Cache` methods. `HfCacheHooks.install` wraps those
methods on the `Cache` base class (subclasses that do not override them inherit the wrapper) and
`uninstall` puts the originals back. Changes made behind the cache's back (eviction libraries rebinding
`layer.keys`) are caught by `scan_all`, which the recorder runs at the end of every forward.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from kvtrace.kv_tracker import KvTracker

_WRAPPED = {
    "crop": "crop",
    "reset": "reset",
    "reorder_cache": "reorder",
    "batch_select_indices": "reorder",
    "batch_repeat_interleave": "reorder",
}


def layer_parts(layer: Any) -> dict[tuple[str, str], Any]:
    """The attributes of a cache layer that hold KV memory, by (kv, part)."""
    parts: dict[tuple[str, str], Any] = {
        ("k", "data"): getattr(layer, "keys", None),
        ("v", "data"): getattr(layer, "values", None),
    }
    if hasattr(layer, "_quantized_keys"):
        parts[("k", "q")] = layer._quantized_keys
        parts[("v", "q")] = layer._quantized_values
    return parts


def layer_tokens(layer: Any) -> int:
    """Tokens a layer holds per batch row, without a device sync where possible."""
    cumulative = getattr(layer, "cumulative_length", None)
    if hasattr(layer, "_quantized_keys") and isinstance(cumulative, int):
        return cumulative
    keys = getattr(layer, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() >= 2:
        if getattr(layer, "max_cache_len", None) is not None and isinstance(cumulative, torch.Tensor):
            # Static layers: the storage is full length; what is held is the cumulative count, capped.
            # A static sliding layer stops updating the tensor count once full; its int count is exact.
            count = getattr(layer, "cumulative_length_int", None)
            count = count if isinstance(count, int) else int(cumulative)
            window = getattr(layer, "sliding_window", None) or layer.max_cache_len
            return min(count, int(window))
        return int(keys.shape[-2])
    return 0


def _signature(parts: dict[tuple[str, str], Any]) -> tuple[Any, ...]:
    """Cheap identity of a layer's KV attributes: which objects, where their data is, their shapes and their
    in-place write counters (an id alone can be reused by a new tensor once the old one is freed)."""
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


class HfCacheHooks:
    """Wraps `transformers.cache_utils.Cache` methods; `on_update_*` callbacks let the recorder open NVTX and
    profiler ranges around each layer update."""

    def __init__(
        self,
        tracker: KvTracker,
        range_push: Callable[[str], None] | None = None,
        range_pop: Callable[[], None] | None = None,
    ) -> None:
        self.tracker = tracker
        self._push = range_push
        self._pop = range_pop
        self._originals: dict[str, Any] = {}
        self._cache_cls: Any = None
        self._caches: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._cache_ids: dict[int, int] = {}
        self.installed = False
        self.on_first_layer: Callable[[int], None] | None = None
        self._seen_masks: dict[int, Any] = {}
        # (cache, layer) -> identity and version of its tensors when last observed: the end-of-step scan
        # skips unchanged layers without the full comparison (most layers, most steps).
        self._signatures: dict[tuple[int, int], tuple[Any, ...]] = {}

    @staticmethod
    def available() -> bool:
        try:
            import transformers.cache_utils  # noqa: F401
        except ImportError:
            return False
        return True

    def cache_id(self, cache: Any) -> int:
        """A small stable number per cache object seen in this recording."""
        key = id(cache)
        known = self._caches.get(key)
        if known is not cache:
            self._cache_ids[key] = len(self._cache_ids) + 1
            with contextlib.suppress(TypeError):
                self._caches[key] = cache
        return self._cache_ids[key]

    def install(self) -> None:
        from transformers.cache_utils import Cache

        self._cache_cls = Cache
        hooks = self
        tracker = self.tracker
        original_update = Cache.__dict__["update"]
        self._originals["update"] = original_update

        @functools.wraps(original_update)
        def update(cache: Any, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any):
            if layer_idx == 0 and hooks.on_first_layer is not None:
                layers = cache.layers
                hooks.on_first_layer(layer_tokens(layers[0]) if layers else 0)
            if hooks._push is not None:
                hooks._push(f"kvtrace/kv_update L{layer_idx}")
            try:
                result = original_update(cache, key_states, value_states, layer_idx, *args, **kwargs)
                layer = cache.layers[layer_idx]
                cid = hooks.cache_id(cache)
                parts = layer_parts(layer)
                tracker.observe(cid, layer_idx, parts, "update", layer_tokens(layer))
                hooks._signatures[(cid, layer_idx)] = _signature(parts)
                return result
            finally:
                if hooks._pop is not None:
                    hooks._pop()

        setattr(Cache, "update", update)  # noqa: B010 - deliberate patch; mypy rejects method assignment
        for name, cause in _WRAPPED.items():
            original = Cache.__dict__.get(name)
            if original is None:
                continue
            self._originals[name] = original
            setattr(Cache, name, self._wrap_whole_cache(original, cause))
        for name, cause in (("offload", "offload"), ("prefetch", "prefetch")):
            original = Cache.__dict__.get(name)
            if original is None:
                continue
            self._originals[name] = original
            setattr(Cache, name, self._wrap_one_layer(original, cause))
        self.installed = True

    def _wrap_whole_cache(self, original: Callable[..., Any], cause: str) -> Callable[..., Any]:
        hooks = self

        @functools.wraps(original)
        def wrapper(cache: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(cache, *args, **kwargs)
            hooks.scan_cache(cache, cause)
            return result

        return wrapper

    def _wrap_one_layer(self, original: Callable[..., Any], cause: str) -> Callable[..., Any]:
        hooks = self

        @functools.wraps(original)
        def wrapper(cache: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            result = original(cache, layer_idx, *args, **kwargs)
            # Prefetch moves the next offloaded layer at or after `layer_idx` (wrapping to 0): look at those
            # two rather than rescanning every layer on every update.
            candidates = {layer_idx, 0} if cause == "prefetch" else {layer_idx}
            hooks.scan_cache(cache, cause, only=candidates)
            return result

        return wrapper

    def scan_cache(self, cache: Any, cause: str, only: set[int] | None = None, reason: str = "") -> None:
        cid = self.cache_id(cache)
        signatures = self._signatures
        for layer_idx, layer in enumerate(getattr(cache, "layers", ())):
            if only is not None and layer_idx not in only:
                continue
            if not hasattr(layer, "keys") and cause != "reset":
                continue
            parts = layer_parts(layer)
            signature = _signature(parts)
            if cause == "scan" and signatures.get((cid, layer_idx)) == signature:
                continue  # the same tensor objects, not written since the update saw them
            self.tracker.observe(cid, layer_idx, parts, cause, layer_tokens(layer), reason=reason)
            signatures[(cid, layer_idx)] = signature

    def scan_all(self) -> None:
        """Catch what changed outside the cache's methods (rebinding by eviction presses)."""
        # With grad on, an autograd graph may keep a replaced storage alive: said on the eviction event.
        reason = "grad_enabled" if torch.is_grad_enabled() else ""
        for cache in list(self._caches.values()):
            self.scan_cache(cache, "scan", reason=reason)

    def scan_masks(self, attention_modules: list[Any]) -> None:
        """kvpress's head-wise presses (AdaKV) leave the cache whole and set `masked_key_indices` on the
        attention module: tokens are hidden, no memory is released. Log each new mask once."""
        for module in attention_modules:
            mask = getattr(module, "masked_key_indices", None)
            if mask is None or self._seen_masks.get(id(module)) is mask:
                continue
            self._seen_masks[id(module)] = mask  # kept here, not on the user's module
            entries = int(mask[-1].numel()) if isinstance(mask, tuple) and mask else 0
            layer_idx = int(getattr(module, "layer_idx", -1))
            cid = next(iter(self._cache_ids.values()), 0)
            self.tracker.masked(cid, layer_idx, entries, self.tracker.tokens(cid, layer_idx))

    def uninstall(self) -> None:
        if self._cache_cls is not None:
            for name, original in self._originals.items():
                setattr(self._cache_cls, name, original)
        self._originals.clear()
        self.installed = False
