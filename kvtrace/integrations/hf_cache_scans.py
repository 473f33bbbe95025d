"""What a forward changed in a cache's layers, compared after the fact: at a deferred step's end
(`step_end`, every layer once), and in scans for what code besides the cache's own methods rebound
(`scan_cache`, `scan_all`: eviction presses), and kvpress's head-wise masks (`scan_masks`).

Why apart from the wrappers (`kvtrace.integrations.hf_caches`): these run when a forward has returned, not
inside a cache method; the general path of a step's end (`kvtrace.integrations.hf_decode_plan` is its
planned one). `HfCacheHooks` inherits `CacheScans`, so they run as its own methods.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrace.integrations.hf_cache_ids import CacheIds, _nothing
from kvtrace.integrations.hf_layers import (
    _AUX,
    _FP8,
    _MISSING,
    _PLAIN,
    _SLIDING,
    _STATIC,
    _STATIC_SLIDING,
    _aux_layer_tokens,
    _expected_tokens,
    _kind_of,
    _kv_as_logged,
    _signature,
    _written,
    layer_parts,
    layer_tokens,
)
from kvtrace.kv_tracker import KvTracker


def _slow_path_only(tracker: KvTracker, cid: int, layer_idx: int) -> None:
    """Keep a layer holding auxiliary state off the (K, V) fast path, which the tracker gives any layer whose
    logged slots are just K and V (its auxiliary state still empty): the identity tests of K and V alone
    would then miss the state the model writes after the layer's update."""
    state = tracker._layers.get((cid, layer_idx))
    if state is not None:
        state.fast = None


class CacheScans(CacheIds):
    """Comparing a cache's layers after a forward (a mixin of `HfCacheHooks`, whose state it shares)."""

    _kinds: dict[type, int]
    _seen_masks: dict[int, Any]
    deferred: Any
    defer_off: bool
    unexplained: str | None

    def step_end(
        self,
        cache: Any,
        new_tokens: int,
        written: bool,
        complete: bool = True,
        fresh: bool = False,
        first_layer: int = 0,
    ) -> None:
        """Log each layer of `cache` that changed in the forward just ended, as an update of `new_tokens`
        tokens per row: after a deferred forward (`defer`), or one whose updates ran inside a compiled graph
        (none reached the wrapper; `written`: its in-place writes may leave the version counters as they
        were, and it made every layer's new K and V before any old one went: dynamo rebinds `layer.keys`
        after the graph, so the old storages are logged freed after all the step's new ones, the peak the
        allocator saw). New tensors (a dynamic cache) are compared as usual; a static layer, written in place,
        counts its tokens from the tracker's own (reading its count is a device sync), except after a
        forward that raised (not `complete`), where only the layers it reached were written. `fresh`: the
        cache was empty when the forward began (a prefill). `first_layer`: the layers before it are logged
        (a planned step's, `kvtrace.integrations.hf_decode_plan`)."""
        if cache is self.deferred:
            self.deferred = None
        if self.dropped:
            # A cache dropped inside this forward: its frees come before the storages this forward made (its
            # new addresses may be the dropped cache's), as when each update is logged as it happens.
            self.forget_dead()
        cid = self.cache_id(cache)
        tracker = self.tracker
        states = tracker._layers
        kinds = self._kinds
        part = self.cross_parts.get(cid)
        for layer_idx, layer in enumerate(getattr(cache, "layers", ())):
            if layer_idx < first_layer:
                continue
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if type(keys) is not torch.Tensor or type(values) is not torch.Tensor:
                continue
            # A cross-attention layer holds the image's tokens, not `new_tokens`: what it holds is its count
            cross = part is not None and layer_idx in self.cross_layers
            slot = part if cross and part is not None else cid
            state = states.get((slot, layer_idx))
            before = state.tokens if state is not None else (0 if fresh else None)
            layer_type = type(layer)
            kind = kinds.get(layer_type)
            if kind is None:
                kind = kinds[layer_type] = _kind_of(layer)
            if kind in (_PLAIN, _SLIDING):
                shape = keys.shape
                tokens = shape[-2] if len(shape) >= 2 else 0
            elif kind in (_STATIC, _STATIC_SLIDING):
                if not complete or before is None:
                    # A sync: on the error path, or for a cache filled before the recording began
                    tokens = layer_tokens(layer)
                else:
                    window = getattr(layer, "sliding_window", None) or layer.max_cache_len
                    tokens = min(before + new_tokens, int(window))
            elif kind < _AUX:
                tokens = layer_tokens(layer)
            else:  # a layer holding auxiliary state: all its parts compared (it is never deferred)
                tokens = _aux_layer_tokens(layer, kind - _AUX, before, new_tokens)
                tracker.observe(slot, layer_idx, layer_parts(layer), "update", tokens, written=written)
                _slow_path_only(tracker, slot, layer_idx)
                continue
            fast = state.fast if state is not None and not written else None
            if fast is not None and fast[0].tref() is keys and fast[1].tref() is values:
                # The same tensor objects: a layer the forward did not reach? A dynamic layer's update makes
                # new ones; a static layer is written in place, which only a forward that raised can skip,
                # and which its version counters show (inference tensors have none: then its count).
                if kind in (_PLAIN, _SLIDING):
                    if tokens == before:
                        continue
                elif not complete and not _written(fast, keys, values, tokens != before):
                    continue
            if written or cross:
                expected = None
            elif kind == _PLAIN:  # `_expected_tokens`, inline for the common layer
                expected = None if before is None else before + new_tokens
            else:
                expected = _expected_tokens(layer, kind, before, new_tokens)
            if expected is not None and tokens != expected and (complete or tokens != before):
                # Changed by something besides the cache's update (an eviction in a forward hook): logged as
                # an update that lost tokens, and from now on each update is followed as it happens.
                self.defer_off = True
                self.unexplained = (
                    f"step {tracker.step}: layer {layer_idx} held {tokens} tokens per row where its updates "
                    f"give {expected}: something besides the cache's update changed it inside the forward, "
                    "and the log shows only the result of that step (later steps: every update)"
                )
                lost = expected - tokens if expected > tokens else 0
                tracker.update(slot, layer_idx, keys, values, tokens, lost, "", kind == _SLIDING, written)
                continue
            evicted = (before or 0) + new_tokens - tokens
            if evicted < 0 or cross:
                evicted = 0
            sliding = kind == _SLIDING
            tracker.update(slot, layer_idx, keys, values, tokens, evicted, "window", sliding, written, state)
        if written and tracker._pending:
            tracker.poll_frees()  # the storages `update` held back, freed after the step's last new one

    def _kind(self, layer: Any) -> int:
        """How a layer's class counts and replaces its tensors (`_kind_of`), decided once per class."""
        layer_type = type(layer)
        kind = self._kinds.get(layer_type)
        if kind is None:
            kind = self._kinds[layer_type] = _kind_of(layer)
        return kind

    def scan_cache(self, cache: Any, cause: str, only: set[int] | None = None, reason: str = "") -> None:
        cid = self.cache_id(cache)
        signatures = self._signatures
        tracker = self.tracker
        states = tracker._layers
        scan = cause == "scan"
        owner, part = cid, self.cross_parts.get(cid)
        for layer_idx, layer in enumerate(getattr(cache, "layers", ())):
            if only is not None and layer_idx not in only:
                continue
            cid = part if part is not None and layer_idx in self.cross_layers else owner
            if scan:
                # The same K and V tensor objects the update saw (in-place writes are the update's): every
                # layer of every step lands here, so the test is inline (issue 11).
                state = states.get((cid, layer_idx))
                fast = state.fast if state is not None else None
                if (
                    fast is not None
                    and fast[0].tref() is getattr(layer, "keys", _MISSING)
                    and fast[1].tref() is getattr(layer, "values", _MISSING)
                ):
                    continue
            if not hasattr(layer, "keys") and cause != "reset":
                continue
            signature: tuple[Any, ...] | None = None
            if scan and hasattr(layer, "_quantized_keys"):
                signature = _signature(layer_parts(layer))
                if signatures.get((cid, layer_idx)) == signature:
                    continue
            parts = layer_parts(layer)
            known = tracker.tokens_or_none(cid, layer_idx) if cause == "scan" else None
            if (
                scan
                and known is not None
                and self._kind(layer) >= _AUX
                and _kv_as_logged(states, cid, layer_idx, layer)
            ):
                # Only its auxiliary state changed: the model's attention writes it after the layer's update
                # (the last layer's is seen here, at the forward's end), so it is logged as that update.
                tracker.observe(cid, layer_idx, parts, "update", known, reason=reason)
                _slow_path_only(tracker, cid, layer_idx)
                continue
            # A scan finds tensors rebound by other code, after the fact: an eviction press makes the kept K
            # and V before it lets go of either old one, so their frees follow both (the transient peak), as
            # an fp8 layer's own reorder does (Fp8QuantizedLayer.reorder_cache holds both old tensors in
            # locals until it returns).
            frees_last = scan or (cause == "reorder" and self._kind(layer) == _FP8)
            tracker.observe(
                cid, layer_idx, parts, cause, layer_tokens(layer, known), reason=reason, frees_last=frees_last
            )
            if self._kind(layer) >= _AUX:
                _slow_path_only(tracker, cid, layer_idx)
            if signature is not None or hasattr(layer, "_quantized_keys"):
                signatures[(cid, layer_idx)] = _signature(parts)

    def scan_all(self, forget: bool = True, compared: Any = None, busy: tuple[Any, ...] = ()) -> None:
        """Catch what changed outside the cache's methods (rebinding by eviction presses); with `forget`,
        also retire the caches that were dropped (`forget_dead`). `compared`: a cache `step_end` has just
        compared layer by layer, skipped; `busy`: caches of forwards still running on other threads,
        skipped (a layer there may be half-way through its update, which logs it)."""
        known = self._known
        if compared is not None and len(known) == 1:
            # The common step's end: the one cache known is the one just compared, and it is alive
            only = next(iter(known.values()))[0]
            if only() is compared:
                return
        reason: str | None = None
        dead = False
        for ref, _ in list(self._known.values()):
            cache = ref()
            if cache is not None:
                if cache is not compared and not (busy and any(cache is other for other in busy)):
                    if reason is None:
                        # With grad on, an autograd graph may keep a replaced storage alive: said on the
                        # eviction event.
                        reason = "grad_enabled" if torch.is_grad_enabled() else ""
                    self.scan_cache(cache, "scan", reason=reason)
            elif ref is not _nothing:
                dead = forget
        if dead:
            self.forget_dead()

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
            cid = next(iter(self._known.values()), (None, 0))[1]
            self.tracker.masked(cid, layer_idx, entries, self.tracker.tokens(cid, layer_idx))
