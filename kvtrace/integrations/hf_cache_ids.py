"""Which cache is which: the small stable number each `transformers` cache object gets, the caches dropped
since, and what a cache first seen already holding KV held (`found`).

Why apart from the wrappers (`kvtrace.integrations.hf_caches`): these are about cache objects, not their
updates; every wrapper and every step's end asks them first. `HfCacheHooks` inherits `CacheIds` through
`CacheScans`, so they run as its own methods.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kvtrace.format import next_cache_id
from kvtrace.integrations.hf_layers import _AUX, _PLAIN, _STATIC

if TYPE_CHECKING:
    from kvtrace.kv_tracker import KvTracker


def _nothing() -> None:
    return None


class CacheIds:
    """Cache objects and their ids (a mixin of `HfCacheHooks`, whose state it shares; set in its
    `__init__`)."""

    tracker: KvTracker
    _known: dict[int, tuple[Callable[[], Any], int]]
    _next_id: int
    _last: tuple[Callable[[], Any], int] | None
    dropped: bool
    on_new_cache: Callable[[int], None] | None
    _cache_cls: Any
    _signatures: dict[tuple[int, int], tuple[Any, ...]]
    encoder_decoder: dict[int, tuple[int, int]]
    cross_layers: frozenset[int]
    cross_parts: dict[int, int]

    if TYPE_CHECKING:

        def scan_cache(
            self, cache: Any, cause: str, only: set[int] | None = None, reason: str = ""
        ) -> None: ...

        def _kind(self, layer: Any) -> int: ...

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
