"""Follows Hugging Face `transformers` caches (layer-based caches, 4.56+ and 5.x) without changing them.

`transformers` has no cache observer API, but every layer write goes through `Cache.update(…, layer_idx)`
and every structural change through a handful of `Cache` methods. `HfCacheHooks.install` wraps those
methods on the `Cache` base class (subclasses that do not override them inherit the wrapper) and
`uninstall` puts the originals back. Changes made behind the cache's back (eviction libraries rebinding
`layer.keys` in an attention hook) are caught when the next layer's update arrives, which first looks at
the layer updated before it, and by `scan_all`, which the recorder runs at the end of every forward (the
last layer, and whatever changed elsewhere) and at a generate() call's first forward (what the caller
changed between calls: a `.to()` of a cache it passes again). A cache first seen already holding KV (filled
before record()) has what it holds logged before anything changes it (`found`): its first update then
replaces storages the log holds, as any later one does. What a layer holds, how many tokens and of which
kind it is, is read by `kvtrace.integrations.hf_layers`; which cache is which, by
`kvtrace.integrations.hf_cache_ids`; the comparisons after a forward (`step_end`, the scans), by
`kvtrace.integrations.hf_cache_scans`. Here: the wrappers, and what an update logs as it happens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from kvtrace.format import CALLER_REASON, NO_BEAMS_REASON
from kvtrace.integrations.hf_cache_scans import CacheScans, _slow_path_only
from kvtrace.integrations.hf_layers import (
    _AUX,
    _FP8,
    _MISSING,
    _PLAIN,
    _RESIDUAL,
    _SLIDING,
    _STATIC,
    _STATIC_SLIDING,
    _aux_layer_tokens,
    _deferrable_types,
    _kind_of,
    _signature,
    layer_parts,
    layer_tokens,
)
from kvtrace.kv_tracker import KvTracker

_WRAPPED = {
    "crop": "crop",
    "reset": "reset",
    "reorder_cache": "reorder",
    "batch_select_indices": "reorder",
    "batch_repeat_interleave": "reorder",
}
# Reorders that are not `reorder_cache`: their `reordered` events' `reason` is the method's name, which says
# which it was (a row repeat or selection, contrastive search's or a caller's)
_NAMED_REORDERS = ("batch_select_indices", "batch_repeat_interleave")


def rows_per_prompt(sources: list[int]) -> int:
    """The smallest block of rows a reorder keeps within (row r's new content comes from a row of r's own
    block), given each row's source row. transformers' beam search reorders within each prompt's beams, and
    at its first step every beam copies the prompt's first one (the others start at -1e9): that block is
    exactly `num_beams`. 1 when no row takes another's content."""
    rows = len(sources)
    for size in range(1, rows + 1):
        if rows % size == 0 and all(source // size == row // size for row, source in enumerate(sources)):
            return size
    return rows


# What `Cache.update`'s wrapper reads of its arguments, and the names they may be passed by
_UPDATE_NAMES = frozenset(("key_states", "value_states", "layer_idx"))


def _update_arguments(
    cache: Any, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any
) -> tuple[Any, Any, int]:
    """The cache, new keys and layer index of a `Cache.update` call, however they were passed."""
    return cache, key_states, layer_idx


# True while torch.compile traces: the graph then gets the cache's plain update, without kvtrace's
# bookkeeping (which would break the graph and guard on every layer index); the step's end sees the result.
compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
# True only while dynamo traces (torch.export's non-strict mode runs the Python eagerly): a plain function
# returning False otherwise, a third of `compiling`'s cost, and folded to True in a trace, so a store behind
# it is never replayed after a compiled graph (dynamo applies a traced attribute store after the graph)
dynamo_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_dynamo_compiling", compiling
)


class HfCacheHooks(CacheScans):
    """Wraps `transformers.cache_utils.Cache` methods; `range_push`/`range_pop` let the recorder open NVTX
    and profiler ranges around each layer update (None when neither is listening: no cost at all)."""

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
        # id(cache) -> (weak reference, cache id): a new object at a reused address gets a new number.
        self._known: dict[int, tuple[Callable[[], Any], int]] = {}
        self._next_id = 0  # the last id given: they count up, stepping over other sources' (format.py)
        # A cache seen here was collected since the last `forget_dead` (set by its weak reference's callback,
        # on whichever thread let go of it): a step's start retires it before its forward logs anything.
        self.dropped = False
        self._last: tuple[Callable[[], Any], int] | None = None
        self.installed = False
        # Without a model, a layer-0 update begins a step: called with the tokens layer 0 held before it, and
        # the cache when it is first seen holding KV (its `found` events belong to the step it begins)
        self.on_first_layer: Callable[[int, Any], None] | None = None
        self.on_new_cache: Callable[[int], None] | None = None  # called with a cache's id when it gets one
        self._seen_masks: dict[int, Any] = {}
        self._kinds: dict[type, int] = {}
        self._update_names: list[str] = []
        self._evict_range_names: list[tuple[str, str]] = []
        # (cache, layer) -> identity of a quantized layer's tensors when last observed: the end-of-step
        # scan skips unchanged layers without the full comparison. Plain layers compare the tracker's slots.
        self._signatures: dict[tuple[int, int], tuple[Any, ...]] = {}
        self.updates_seen = 0  # layer-0 updates that ran through the wrapper (not inside a compiled graph)
        self.update_error: str | None = None  # "<exception type> at layer <n>": the first update that raised
        # (cache id, layer) of the last update through the wrapper: the next update checks that this layer
        # still holds what its update left (`_rebound`). Ids only: a layer kept here would keep its storages.
        self._previous: tuple[int, int] | None = None
        # The cache whose layer updates the running forward leaves to `step_end` (see `defer`), and whether
        # deferring stopped for good (a forward changed a layer in a way its updates do not explain).
        self.deferred: Any = None
        # An update of the deferred cache reached the wrapper since it was deferred: the forward's updates ran
        # eagerly. Still False at its end: they ran in a compiled graph, whose updates never reach the wrapper
        # at run time, and whose frees all follow its new storages (`step_end`'s `written`).
        self.deferred_reached = False
        self.defer_off = False
        self.unexplained: str | None = None  # what made a deferred step turn deferring off, for the manifest
        self._deferrable: dict[tuple[int, int], bool] = {}  # (cache id, layer count) -> all layers plain
        self._beams_read: set[int] = set()  # caches whose first beam-search reorder_cache told their beams
        # Whether the recorded model's generate() call in progress on this thread beam-searches, set by the
        # recorder where it sees those calls (`GenerateCalls.beam_search`). None (record() without a
        # model): a reorder_cache is read as beam search's, the only one transformers' generate() makes.
        self.beam_search: Callable[[], bool] | None = None
        # Whether a generate() call of the recorded model is in progress on this thread
        # (`GenerateCalls.in_call`): a crop or reset outside one is the caller's (`CALLER_REASON`). None
        # (record() without a model): the calls are not seen, and the reason stays "".
        self.in_call: Callable[[], bool] | None = None
        # An encoder-decoder cache's id -> (its self-attention cache's id, its cross-attention cache's id)
        self.encoder_decoder: dict[int, tuple[int, int]] = {}
        # The layers of the model's cache that hold cross-attention KV (Mllama's `cross_attention_layers`:
        # the image's vision tokens, written at prefill, never grown), set by the recorder from the config;
        # and each model cache's id -> the id those layers are logged under, so that the log keeps them
        # apart from its tokens' own KV as it keeps an encoder-decoder cache's cross-attention cache.
        self.cross_layers: frozenset[int] = frozenset()
        self.cross_parts: dict[int, int] = {}

    @staticmethod
    def available() -> bool:
        try:
            import transformers.cache_utils  # noqa: F401
        except ImportError:
            return False
        return True

    def install(self) -> None:
        from transformers.cache_utils import Cache

        self._cache_cls = Cache
        hooks = self
        tracker_layers = self.tracker._layers
        original_update = Cache.__dict__["update"]
        self._originals["update"] = original_update

        @functools.wraps(original_update)
        def update(*args: Any, **kwargs: Any) -> Any:
            # The arguments go on to the cache's update as the call made them: binding them to names here and
            # building them again cost a deferred step's update ~0.3 µs (issue 11)
            if args and args[0] is hooks.deferred:  # taken at the step's end
                if not hooks.deferred_reached and not dynamo_compiling():
                    hooks.deferred_reached = True  # once per step: the step's updates run eagerly
                return original_update(*args, **kwargs)
            if compiling():  # inside a compiled graph: the step's end sees the result
                return original_update(*args, **kwargs)
            if len(args) >= 4 and _UPDATE_NAMES.isdisjoint(kwargs):
                cache, key_states, layer_idx = args[0], args[1], args[3]
            else:  # passed by name (or too few: the binding raises the TypeError the update would)
                cache, key_states, layer_idx = _update_arguments(*args, **kwargs)
            if hooks.dropped:
                # A cache dropped since (a finished generate()) is retired before this update's new storages,
                # which may take its addresses: no step start of the recorded model may come to do it (another
                # model's generate() on a cache already known). One attribute read per update.
                hooks.forget_dead()
            last = hooks._last  # the cache of the previous update, almost always this one
            cid = last[1] if last is not None and last[0]() is cache else hooks.cache_id(cache)
            previous = hooks._previous
            if previous is not None and previous[0] == cid:
                # Did other code rebind the layer updated before this one (an eviction press's attention
                # hook)? Logged now, before this update, whose new storage may take the address the old one
                # freed: the log then orders them as the allocator did. One identity test per update.
                prev_state = tracker_layers.get(
                    (hooks.slot_cache(cid, previous[1]), previous[1]) if hooks.cross_parts else previous
                )
                fast = prev_state.fast if prev_state is not None else None
                layers = cache.layers
                if fast is not None and previous[1] < len(layers):
                    prev_layer = layers[previous[1]]
                    k_slot, v_slot = fast
                    if k_slot.tref() is not getattr(prev_layer, "keys", _MISSING) or (
                        v_slot.tref() is not getattr(prev_layer, "values", _MISSING)
                    ):
                        hooks._rebound(cache, previous[1])
                elif prev_state is not None and previous[1] < len(layers):
                    # No fast slots: a quantized layer, or one holding auxiliary state, which the model
                    # writes after the layer's update (DSA's indexer keys, DeepSeek-V4's compressed
                    # entries): logged now, as that layer's update. One class lookup, never for a plain layer.
                    prev_layer = layers[previous[1]]
                    if hooks._kinds.get(type(prev_layer), 0) >= _AUX:
                        hooks._aux_written(cache, hooks.slot_cache(cid, previous[1]), previous[1])
            slot = hooks.slot_cache(cid, layer_idx) if hooks.cross_parts else cid
            state = tracker_layers.get((slot, layer_idx))
            before = state.tokens if state is not None else None
            if before is None:  # first sight of this layer: empty unless the cache was used before record()
                layers = cache.layers
                if layer_idx >= len(layers) or not getattr(layers[layer_idx], "is_initialized", False):
                    before = 0
            if layer_idx == 0:
                hooks.updates_seen += 1  # a step's updates reached the wrapper (not inside a compiled graph)
                if hooks.on_first_layer is not None:
                    if before is None:  # a cache first seen holding KV: its step is this update's
                        hooks.on_first_layer(layer_tokens(cache.layers[0]), cache)
                    else:
                        hooks.on_first_layer(before, None)
            if before is None:
                # A layer holding KV that kvtrace never saw (a cache filled before record()): what the cache
                # holds is logged first, so this update replaces storages the log holds, as the allocator did
                hooks.found(cache, cid)
                before = hooks.tracker.tokens_or_none(slot, layer_idx)
            push = hooks._push
            if push is None:
                try:
                    result = original_update(*args, **kwargs)
                except Exception as error:
                    hooks._raised(error, layer_idx)
                    raise
                hooks._updated(cache, slot, layer_idx, key_states, before)
                hooks._previous = (cid, layer_idx)
                return result
            names = hooks._update_names
            while len(names) <= layer_idx:
                names.append(f"kvtrace/kv_update L{len(names)}")
            push(names[layer_idx])
            try:
                try:
                    result = original_update(*args, **kwargs)
                except Exception as error:
                    hooks._raised(error, layer_idx)
                    raise
                if hooks._updated(cache, slot, layer_idx, key_states, before):
                    # The window let tokens go: an evict range per K and V, inside the update's range (as
                    # kv_update, one per update: NVTX only, not in the profiler's trace).
                    k_name, v_name = hooks._evict_names(layer_idx)
                    push(k_name)
                    hooks._pop()  # type: ignore[misc]
                    push(v_name)
                    hooks._pop()  # type: ignore[misc]
                hooks._previous = (cid, layer_idx)
                return result
            finally:
                hooks._pop()  # type: ignore[misc]

        setattr(Cache, "update", update)  # noqa: B010 - deliberate patch; mypy rejects method assignment
        for name, cause in _WRAPPED.items():
            original = Cache.__dict__.get(name)
            if original is None:
                continue
            self._originals[name] = original
            named = name if name in _NAMED_REORDERS else ""
            wrapped = self._wrap_whole_cache(original, cause, beams=name == "reorder_cache", named=named)
            setattr(Cache, name, wrapped)
        for name, cause in (("offload", "offload"), ("prefetch", "prefetch")):
            original = Cache.__dict__.get(name)
            if original is None:
                continue
            self._originals[name] = original
            setattr(Cache, name, self._wrap_one_layer(original, cause))
        self.installed = True

    def _raised(self, error: Exception, layer_idx: int) -> None:
        """A cache's own update raised: the first such error is kept for the manifest's warnings, which
        otherwise could only say that no update was seen (the update raised before its layer was logged)."""
        if self.update_error is None:
            self.update_error = f"{type(error).__name__} at layer {layer_idx}"

    def _evict_names(self, layer_idx: int) -> tuple[str, str]:
        names = self._evict_range_names
        while len(names) <= layer_idx:
            names.append((f"kvtrace/evict L{len(names)} k", f"kvtrace/evict L{len(names)} v"))
        return names[layer_idx]

    def _updated(self, cache: Any, cid: int, layer_idx: int, key_states: Any, before: int | None) -> int:
        """After a layer update: what the layer holds now, and the tokens that left its window (returned,
        per row)."""
        layer = cache.layers[layer_idx]
        layer_type = type(layer)
        kind = self._kinds.get(layer_type)
        if kind is None:
            kind = self._kinds[layer_type] = _kind_of(layer)
        keys: Any = getattr(layer, "keys", None)
        values: Any = getattr(layer, "values", None)
        plain = type(keys) is torch.Tensor and type(values) is torch.Tensor
        if plain and kind in (_PLAIN, _SLIDING):
            shape = keys.shape
            tokens = shape[-2] if len(shape) >= 2 else 0
        elif plain and kind == _STATIC_SLIDING:
            tokens = min(layer.cumulative_length_int, layer.max_cache_len)
        elif plain and kind == _STATIC and before is not None:
            tokens = min(before + key_states.shape[-2], layer.max_cache_len)
        elif kind < _AUX:
            tokens = layer_tokens(layer)
            plain = False
        else:
            tokens = _aux_layer_tokens(layer, kind - _AUX, before, key_states.shape[-2])
            plain = False
        evicted = 0
        if before is not None:
            # Tokens in, minus what the layer holds now: what its window (or capacity) let go.
            evicted = before + key_states.shape[-2] - tokens
            if evicted < 0:
                evicted = 0
        if plain:
            self.tracker.update(cid, layer_idx, keys, values, tokens, evicted, "window", kind == _SLIDING)
        else:
            parts = layer_parts(layer)
            if kind == _RESIDUAL:
                # A flush makes the quantized K and V while the old residual is held: compared first.
                parts = {key: parts[key] for key in sorted(parts, key=lambda key: key[1] == "data")}
            self.tracker.observe(
                cid,
                layer_idx,
                parts,
                "update",
                tokens,
                evicted=evicted,
                evicted_reason="window",
                frees_last=kind == _FP8,
            )
            if kind >= _AUX:
                _slow_path_only(self.tracker, cid, layer_idx)
            self._signatures[(cid, layer_idx)] = _signature(parts)
        return evicted

    def _aux_written(self, cache: Any, cid: int, layer_idx: int) -> None:
        """Log what the model wrote into a layer's auxiliary state since the layer's own update (the indexer's
        keys, compressed entries: written by the attention after `Cache.update`) as part of that update."""
        known = self.tracker.tokens_or_none(cid, layer_idx)
        if known is None:
            return
        self.tracker.observe(cid, layer_idx, layer_parts(cache.layers[layer_idx]), "update", known)
        _slow_path_only(self.tracker, cid, layer_idx)

    def _rebound(self, cache: Any, layer_idx: int) -> None:
        """Layer `layer_idx` of `cache` no longer holds the K/V tensors its last update left: other code
        rebound them after that update (kvpress compresses a layer in its attention module's forward hook,
        before the next layer writes). Compared and logged as the end-of-step scan would, at this moment."""
        reason = "grad_enabled" if torch.is_grad_enabled() else ""
        self.scan_cache(cache, "scan", only={layer_idx}, reason=reason)

    def _wrap_whole_cache(
        self, original: Callable[..., Any], cause: str, beams: bool = False, named: str = ""
    ) -> Callable[..., Any]:
        """`beams`: the method is `reorder_cache(beam_idx)`, whose first call on a cache says how many rows
        each prompt has (`rows_per_prompt`): its events carry it as `reason` `beams:N`. A crop or reset made
        outside the recorded model's generate() calls carries `CALLER_REASON`: the analyzers then never take
        it for a draft rejection (assisted decoding's crops run inside a call). `named`: the `reason` of
        every event the method logs (`_NAMED_REORDERS`: its name)."""
        hooks = self
        by_caller = cause in ("crop", "reset")

        @functools.wraps(original)
        def wrapper(cache: Any, *args: Any, **kwargs: Any) -> Any:
            hooks.first_sight(cache)  # a cache first seen here: what it holds before the change
            result = original(cache, *args, **kwargs)
            if beams:
                reason = hooks._beams_reason(cache, kwargs.get("beam_idx", args[0] if args else None))
            elif by_caller and hooks.in_call is not None and not hooks.in_call():  # one check per crop
                reason = CALLER_REASON
            else:
                reason = named
            hooks.scan_cache(cache, cause, reason=reason)
            return result

        return wrapper

    def _beams_reason(self, cache: Any, beam_idx: Any) -> str:
        """`beams:N` at a cache's first beam-search reorder (N rows per prompt, N > 1), else "". Read once per
        cache: the indices are on the device, and reading them waits for it. A reorder outside beam search
        (a caller permuting its rows between generate() calls) is `no_beams`: its rows stay the batch's
        sequences, and a later beam search on the cache still tells its beams."""
        if self.beam_search is not None and not self.beam_search():
            return NO_BEAMS_REASON
        cid = self.cache_id(cache)
        if cid in self._beams_read or not isinstance(beam_idx, torch.Tensor) or beam_idx.dim() != 1:
            return ""
        self._beams_read.add(cid)
        beams = rows_per_prompt(beam_idx.tolist())
        return f"beams:{beams}" if beams > 1 else ""

    def _wrap_one_layer(self, original: Callable[..., Any], cause: str) -> Callable[..., Any]:
        hooks = self

        @functools.wraps(original)
        def wrapper(cache: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            hooks.first_sight(cache)
            result = original(cache, layer_idx, *args, **kwargs)
            # Prefetch moves the next offloaded layer at or after `layer_idx` (wrapping to 0): look at those
            # two rather than rescanning every layer on every update.
            candidates = {layer_idx, 0} if cause == "prefetch" else {layer_idx}
            hooks.scan_cache(cache, cause, only=candidates)
            return result

        return wrapper

    def defer(self, cache: Any) -> bool:
        """Leave `cache`'s layer updates in the coming forward to `step_end`, which compares every layer once
        when the forward returns: the update wrapper then only calls the cache's own update (issue 11: the
        per-update bookkeeping, ~2x the comparison itself between model steps, goes). Only for caches whose
        layers are all of the four plain kinds, exactly (subclasses may hold more state), and that do not
        offload; the recorder also requires that nothing else can change the cache inside the forward."""
        if self.defer_off or getattr(cache, "offloading", False):
            return False
        layers = getattr(cache, "layers", None)
        if not layers:  # a cache that makes its layers at their first update: those go through the wrapper
            return False
        cid = self.cache_id(cache)
        key = (cid, len(layers))
        plain = self._deferrable.get(key)
        if plain is None:
            plain = self._deferrable[key] = all(type(layer) in _deferrable_types() for layer in layers)
        if plain:
            self.deferred = cache
            self.deferred_reached = False
        return plain

    def uninstall(self) -> None:
        if self._cache_cls is not None:
            for name, original in self._originals.items():
                setattr(self._cache_cls, name, original)
        self._originals.clear()
        self.installed = False
