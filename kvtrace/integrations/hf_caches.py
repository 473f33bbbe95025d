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
kind it is, is read by `kvtrace.integrations.hf_layers`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from kvtrace.format import CALLER_REASON, NO_BEAMS_REASON, next_cache_id
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
    _expected_tokens,
    _kind_of,
    _kv_as_logged,
    _signature,
    _written,
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


def _slow_path_only(tracker: KvTracker, cid: int, layer_idx: int) -> None:
    """Keep a layer holding auxiliary state off the (K, V) fast path, which the tracker gives any layer whose
    logged slots are just K and V (its auxiliary state still empty): the identity tests of K and V alone
    would then miss the state the model writes after the layer's update."""
    state = tracker._layers.get((cid, layer_idx))
    if state is not None:
        state.fast = None


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


def _nothing() -> None:
    return None


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


class HfCacheHooks:
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

    def cache_id(self, cache: Any) -> int:
        """A small stable number per cache object seen in this recording, none of another source's."""
        last = self._last
        if last is not None and last[0]() is cache:
            return last[1]
        entry = self._known.get(id(cache))
        if entry is None or entry[0]() is not cache:
            self.forget_dead()  # a new cache: the frees of one dropped before it come first in the log
            self._next_id = next_cache_id(self._next_id)
            try:
                ref: Callable[[], Any] = weakref.ref(cache, self._on_dropped)
            except TypeError:
                ref = _nothing
            entry = (ref, self._next_id)
            self._known[id(cache)] = entry
            if self.on_new_cache is not None:
                self.on_new_cache(self._next_id)
        self._last = entry
        return entry[1]

    def first_sight(self, cache: Any, cross_part: bool = False) -> int:
        """`cache_id`, and for a cache that gets its id here and already holds KV (`found`), what it holds,
        logged before anything changes it. Once per cache object: a known one costs `cache_id`'s lookup.
        `cross_part`: a cache of the recorded model, whose `cross_layers` get an id of their own first."""
        seen = self._next_id
        cid = self.cache_id(cache)
        if cross_part and self.cross_layers and cid not in self.cross_parts:
            self._next_id = next_cache_id(self._next_id)
            self.cross_parts[cid] = self._next_id
            if self.on_new_cache is not None:
                self.on_new_cache(self._next_id)
        if cid > seen:
            self.found(cache, cid)
        return cid

    def slot_cache(self, cid: int, layer_idx: int) -> int:
        """The id a layer of cache `cid` is logged under: its cross-attention part's for a cross-attention
        layer of the model's cache (`cross_parts`), else `cid`."""
        if self.cross_parts and layer_idx in self.cross_layers:
            return self.cross_parts.get(cid, cid)
        return cid

    def given(self, cache: Any) -> tuple[int, ...]:
        """`first_sight` of a cache a forward of the recorded model was given. An encoder-decoder cache
        (`EncoderDecoderCache`) holds no layers itself: the log holds its self-attention cache's updates (the
        decoder's tokens) and its cross-attention cache's (the encoder's, at its length), so both get their
        ids here too, and their roles go in `encoder_decoder` for the manifest. A cache whose
        `cross_layers` hold cross-attention KV (Mllama) gets an id for those layers (`cross_parts`)."""
        cross = getattr(cache, "cross_attention_cache", None)
        cid = self.first_sight(cache, cross_part=cross is None)
        if cross is None:
            part = self.cross_parts.get(cid)
            return (cid,) if part is None else (cid, part)
        own = getattr(cache, "self_attention_cache", None)
        if not isinstance(own, self._cache_cls) or not isinstance(cross, self._cache_cls):
            return (cid,)
        roles = (self.first_sight(own), self.first_sight(cross))
        self.encoder_decoder[cid] = roles
        return (cid, *roles)

    def found(self, cache: Any, cid: int) -> None:
        """Log what a cache kvtrace sees for the first time already holds (filled before record(), or copied
        by code kvtrace does not follow): `created` events for its layers' storages, `reason` "found", before
        its next update. That update then replaces storages the log holds, its new tensor made while the old
        one is held (`grown`, then the old one's `freed`), as for any cache seen before; without them its
        first update would seem to make the cache from nothing. The reason tells the analyzers they were held
        before their sighting (a profiler trace begun before it has no allocation of them). Layers the
        tracker has seen, and those that hold nothing yet, are left alone. A static layer's count is a
        tensor: read here, once per layer (a sync), so that its updates count from the tracker's own."""
        states = self.tracker._layers
        unseen = {
            layer_idx
            for layer_idx, layer in enumerate(getattr(cache, "layers", ()))
            if (self.slot_cache(cid, layer_idx), layer_idx) not in states
            and getattr(layer, "is_initialized", True)
            and isinstance(getattr(layer, "keys", None), torch.Tensor)
        }
        if unseen:
            self.scan_cache(cache, "found", only=unseen, reason="found")

    def ids_given(self) -> list[int]:
        """The ids cache objects got, in order: 1 up to the last one, without other sources' ids."""
        ids = [next_cache_id(0)] if self._next_id else []
        while ids and ids[-1] < self._next_id:
            ids.append(next_cache_id(ids[-1]))
        return ids

    def _on_dropped(self, _ref: Any) -> None:
        self.dropped = True

    def forget_dead(self) -> None:
        """Caches that were dropped (a finished `generate()`): their storages are watched until released and
        logged freed then, instead of counting as held until the recording ends."""
        self.dropped = False
        dead = [key for key, (ref, _) in self._known.items() if ref is not _nothing and ref() is None]
        for key in dead:
            _, cid = self._known.pop(key)
            part = self.cross_parts.get(cid)  # kept: the manifest lists it
            for gone in (cid,) if part is None else (cid, part):
                self.tracker.retire_cache(gone)
                for signature_key in [k for k in self._signatures if k[0] == gone]:
                    del self._signatures[signature_key]
        if dead:
            self._last = None
            self.tracker.poll_frees()

    def held_tokens(self, cache: Any) -> int | None:
        """Tokens layer 0 of `cache` holds, without a device sync; None when unknown here."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            return None
        if not layers or not getattr(layers[0], "is_initialized", True):
            return 0
        entry = self._known.get(id(cache))
        if entry is not None and entry[0]() is cache:
            return self.tracker.tokens_or_none(entry[1], 0)
        return None

    def positions_seen(self, cache: Any) -> int | None:
        """Positions layer 0 of `cache` has been written at (what transformers' `get_seq_length` returns),
        read without a device sync: a sliding layer's running count, a dynamic layer's length, a static
        layer's tokens as the tracker counted them; None when unknown here."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            return None
        if not layers or not getattr(layers[0], "is_initialized", True):
            return 0
        layer = layers[0]
        for name in ("cumulative_length_int", "cumulative_length"):
            count = getattr(layer, name, None)
            if isinstance(count, int) and not isinstance(count, bool):
                return count
        kind = self._kind(layer) % _AUX
        if kind == _PLAIN:
            keys = getattr(layer, "keys", None)
            return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() >= 2 else None
        return self.held_tokens(cache) if kind == _STATIC else None

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
            setattr(Cache, name, self._wrap_whole_cache(original, cause, beams=name == "reorder_cache"))
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
        self, original: Callable[..., Any], cause: str, beams: bool = False
    ) -> Callable[..., Any]:
        """`beams`: the method is `reorder_cache(beam_idx)`, whose first call on a cache says how many rows
        each prompt has (`rows_per_prompt`): its events carry it as `reason` `beams:N`. A crop or reset made
        outside the recorded model's generate() calls carries `CALLER_REASON`: the analyzers then never take
        it for a draft rejection (assisted decoding's crops run inside a call)."""
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
                reason = ""
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

    def uninstall(self) -> None:
        if self._cache_cls is not None:
            for name, original in self._originals.items():
                setattr(self._cache_cls, name, original)
        self._originals.clear()
        self.installed = False
