"""Custom KV caches: tensors that a model keeps on its own modules, and tensors the user hands to `track()`.

Meta's reference Llama 3 (`llama-models`) and many hand-written decoders preallocate `cache_k`/`cache_v`
on each attention module and write into them in place. Such caches have no methods to wrap, so the
recorder scans them at the end of every forward: a new tensor bound to the attribute is a new storage,
a bumped version counter (`tensor._version`) is an in-place write.

A preallocated buffer's shape says its capacity, not what it holds. The tokens written per row come from
the forward itself, as transformers' StaticCache's come from its updates: Meta's forward takes `start_pos`
and writes `start_pos + seqlen` tokens into the input's rows (`ForwardSignature.progress`), so no tensor is
read. A forward that does not say leaves the tokens unknown, logged as 0 and named in the run's warnings.

A cache grown by torch.cat is a new storage at every step, and the moment its old one is released decides
the step's KV peak: `self.k_cache = torch.cat([self.k_cache, k], 2)` releases the old K as the new one is
bound, before V's copy is made, while `kc = self.k_cache` keeps it until the layer returns, after both
copies, and a list of past caches kept until the step ends keeps every layer's. The scan comes after the
forward, so each logged storage is watched through a weak reference whose callback CPython runs at its very
release (`cache_releases`), and the scan logs its free after the new storages that were made by then.

A module cache's layout says which dim holds the positions (`module_cache_layout`): Meta's `cache_k`/`cache_v`
are [batch, seq, kv_heads, head_dim], gpt-fast's `KVCache.k_cache`/`v_cache` [batch, kv_heads, seq, head_dim].
Read the wrong way, a buffer's capacity is its heads count (gpt-fast's 32 positions read as 2). What a slot
is (its names, pair, layer and layout) is decided in `kvtrace.integrations.module_cache_slots`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from kvtrace.format import MODULE_CACHE_IDS, TRACK_CACHE_ID
from kvtrace.integrations.cache_releases import Releases
from kvtrace.integrations.module_cache_slots import (
    DEFAULT_CACHE_ATTRS,
    MODULE_LAYOUTS,
    TRACK_LAYOUTS,
    _Extent,
    _Owner,
    _storage_addr,
    kv_heads_hints,
    layer_from_name,
    module_cache_layout,
    module_pattern,
    pair_cache_attrs,
    split_cache_attrs,
)
from kvtrace.kv_slots import dead_ref
from kvtrace.kv_tracker import KvTracker


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _place(
    key: tuple[int, int],
    givers: dict[tuple[int, int], list[tuple[int, int]]],
    order: dict[tuple[int, int], None],
    path: set[tuple[int, int]],
) -> None:
    """Append `key` to `order` after the givers it must follow, theirs first (a chain: layer 2's old V where
    layer 0's new V is, layer 0's old K where layer 1's new K is); a cycle is broken where it closes."""
    if key in order or key in path:
        return
    path.add(key)
    for giver in givers.get(key, ()):
        _place(giver, givers, order, path)
    order[key] = None


def _position_of(position: dict[tuple[int, int], int], cache_id: int, layer: int) -> int:
    """Where `cache_id`'s `layer` is logged in a scan (`position`); past every one where it is not."""
    return position.get((cache_id, layer), len(position))


class ModuleCaches:
    """Finds cache tensors held as module attributes or buffers and reports their changes to the tracker."""

    def __init__(self, tracker: KvTracker, cache_attrs: dict[str, Any] | None = None) -> None:
        self.tracker = tracker
        self.cache_attrs, self.said_layouts = split_cache_attrs(
            DEFAULT_CACHE_ATTRS if cache_attrs is None else cache_attrs
        )
        self.owners: list[_Owner] = []
        self._model: weakref.ref[torch.nn.Module] | None = None  # where `rediscover` looks
        self._module_layers: set[tuple[int, int]] = set()  # (cache, layer)s the last scan logged
        self._remade = False  # `rediscover` found other owners: the next scan frees dead slots in the way
        # layer -> kind -> (weak ref, layout, storage address when tracked)
        self._tracked: dict[int, dict[str, tuple[Callable[[], torch.Tensor | None], str, int]]] = {}
        # storage address -> (layer, kind) tracked there: a new tensor at the address of one dropped unseen
        # needs that one's free logged first
        self._tracked_at: dict[int, tuple[int, str]] = {}
        self._ever_tracked = False
        # (tokens per row, rows) the running forward leaves in the module caches, set by the recorder at
        # each forward; None when unknown (outside a forward, or a forward without `start_pos`)
        self.progress: tuple[int, int] | None = None
        # The running forward's input rows where it says them but not where it writes (no `start_pos`): 0
        # when unknown, or when `progress` says them
        self.rows = 0
        # rows of the model's last forward's input ([batch, seq] ids or states; 0: none such), kept past its
        # step's end, where `rows` is not: the rows tensors tracked after it returns hold its tokens in
        self.fed_rows = 0
        # What the old storages' releases told since the last scan: which frees come after which new storages
        self._releases = Releases()
        self._scanned: list[Any] = []  # the tensors `_module_parts` found, in `owners`' order
        # (cache, layer) -> what `_module_parts` saw of its tensors (`_Extent`), for the scan that called it
        self._extents: dict[tuple[int, int], _Extent] = {}
        # (cache, module path with its layer number as `*`, K attribute, V attribute) of every module cache
        # found, in the order found: which module each id is (the manifest's `module_caches`)
        self.named: dict[tuple[int, str, str | None, str | None], None] = {}

    def discover(self, model: torch.nn.Module) -> int:
        """Find cache tensors on `model`'s modules (in place of those found before); returns how many."""
        self._model = weakref.ref(model)
        owners = []
        order = 0
        caches_of_layer: dict[int, int] = {}  # layer -> its module caches (K/V pairs) found so far
        for name, module in model.named_modules():
            held = [
                (attr, kv)
                for attr, kv in self.cache_attrs.items()
                if isinstance(
                    module._buffers.get(attr) if attr in module._buffers else module.__dict__.get(attr),
                    torch.Tensor,
                )
            ]
            if not held:
                continue
            layer = layer_from_name(name, order)
            rank = caches_of_layer.get(layer, 0)
            pairs = pair_cache_attrs(held)
            caches_of_layer[layer] = rank + len(pairs)
            heads = kv_heads_hints(model, name)
            for index, pair in enumerate(pairs):
                cache = MODULE_CACHE_IDS[min(rank + index, len(MODULE_CACHE_IDS) - 1)]
                for attr, kv in pair:
                    owners.append(_Owner(weakref.ref(module), attr, kv, layer, cache, heads=heads))
                said = {kv: attr for attr, kv in pair}
                self.named[(cache, module_pattern(name), said.get("k"), said.get("v"))] = None
            order += 1
        for index, owner in enumerate(owners):
            owner.siblings = tuple(
                other
                for other in owners
                if other.layer == owner.layer and other.cache == owner.cache and other is not owner
            )
            owner.later_pairs = tuple(
                other
                for other in owners
                if other.module_ref() is owner.module_ref() and other.cache > owner.cache
            )
            owner.after = index + 1
            while owner.after < len(owners) and owners[owner.after].module_ref() is owner.module_ref():
                owner.after += 1
        for old in self.owners:
            old.watch = None  # its callback, which holds it, must not outlive it: the new owners watch
        self.owners = self._releases.owners = owners
        return len(owners)

    def rediscover(self) -> None:
        """Look for the caches again where they may have appeared since the last look: made inside the block
        (`setup_caches()` before a generation, a lazy `cache_k = None` its first forward allocates) or
        re-made (a new cache module in place of the old). Called at a generation's first step, at the block's
        end and where a scan finds an owning module gone, never per decode step otherwise."""
        model = self._model() if self._model is not None else None
        if model is None:
            return
        before = [(owner.module_ref(), owner.attr, owner.layer) for owner in self.owners]
        self.discover(model)
        self._remade |= before != [(owner.module_ref(), owner.attr, owner.layer) for owner in self.owners]

    def weight_exclusions(self) -> set[int]:
        """Storage addresses that are caches, not weights (a cache registered as a buffer). Looked for again
        first: a `.to()` may come after caches made inside the block, before a step found them."""
        self.rediscover()
        tensors = (owner.tensor() for owner in self.owners)
        return {_storage_addr(t) for t in tensors if isinstance(t, torch.Tensor)}

    def track(self, tensor: torch.Tensor, layer: int, kind: str, layout: str = "bhsd") -> None:
        """Follow `tensor` as the `kind` ("k"/"v") cache of `layer`, through a weak reference: a tracked
        tensor must live and die as it would unrecorded. Tracking a new tensor for the same layer and kind
        (a cache regrown by torch.cat) replaces the old one, whose storage is logged freed once released.
        `layout` ("bhsd" or "bshd", see TRACK_LAYOUTS) says which dim holds the tokens.

        Only `kind` is compared here: the layer's other kind may be between its regrowth and its own
        `track()` (its old tensor released, the new one not handed over yet), which is no vanished cache
        but a `grown` still to come. The end of the step compares the whole layer. Only a tensor of
        another layer or kind found dead at this one's address is let go first: its storage was released
        before this one was made there."""
        try:
            ref: Callable[[], torch.Tensor | None] = weakref.ref(tensor)
        except TypeError:  # a tensor type without weak references: held, as a last resort
            ref = functools.partial(_same, tensor)
        addr = _storage_addr(tensor)
        owner = self._tracked_at.get(addr)
        if owner is not None and owner != (layer, kind):
            self._release_dead(owner, addr)
        refs = self._tracked.setdefault(layer, {})
        previous = refs.get(kind)
        if previous is not None and self._tracked_at.get(previous[2]) == (layer, kind):
            del self._tracked_at[previous[2]]
        refs[kind] = (ref, layout, addr)
        if addr:
            self._tracked_at[addr] = (layer, kind)
        self._ever_tracked = True
        self._observe_tracked(layer, "track", only=kind)

    def held_tokens(self) -> int | None:
        """Tokens the tracked tensors hold now (the fullest layer), as last logged: no tensor is read. None
        before anything was tracked, and where the tracked tensors are gone but not their storage: views cut
        afresh after each forward (`kv[l, 0, :, :, :pos]`, the README's way) die as soon as they are tracked,
        while the tensor they were cut from lives on, holding what they showed; whether this forward writes
        after those tokens (a decode step) or starts over on that tensor (a new prompt) only its own
        arguments tell (`forward_inputs.is_prefill`). 0 once every tracked storage is released (a loop
        starting over)."""
        if not self._ever_tracked:
            return None
        held = 0
        viewed = False  # a tracked tensor gone, its storage alive
        for layer, refs in self._tracked.items():
            if any(ref() is not None for ref, *_ in refs.values()):
                held = max(held, self.tracker.tokens(TRACK_CACHE_ID, layer))
            elif refs and self.tracker.storage_alive(TRACK_CACHE_ID, layer):
                viewed = True
        return None if viewed and not held else held

    def _release_dead(self, owner: tuple[int, str], addr: int) -> None:
        """The tracked tensor `owner` (layer, kind) was at `addr`: if it died, its slot lets go of its storage
        now (the end of the step forgets the dead reference, as for any tracked tensor dropped)."""
        layer, kind = owner
        entry = self._tracked.get(layer, {}).get(kind)
        if entry is not None and entry[0]() is None:
            self.tracker.release_slot_at(TRACK_CACHE_ID, layer, (kind, TRACK_LAYOUTS[entry[1]]), addr)

    def _observe_tracked(self, layer: int, cause: str, only: str | None = None) -> None:
        """Compare a layer's tracked tensors (with `only`, that kind's alone) with their last state."""
        refs = self._tracked[layer]
        parts: dict[tuple[str, str], Any] = {}
        tokens = 0
        for kind, (ref, layout, addr) in list(refs.items()):
            if only is not None and kind != only:
                continue
            tensor = ref()
            if tensor is None:  # gone: its slot vanishes below, and its storage is logged freed when released
                del refs[kind]
                if self._tracked_at.get(addr) == (layer, kind):
                    del self._tracked_at[addr]
                continue
            parts[(kind, TRACK_LAYOUTS[layout])] = tensor
            if not tokens:
                seq_dim = 1 if layout == "bshd" and tensor.dim() >= 3 else -2
                tokens = int(tensor.shape[seq_dim]) if tensor.dim() >= 2 else int(tensor.numel())
        # The rows the model's last forward was fed: tensors tracked whole (kv[l, 0, :, :pos]) of a batch
        # preallocated for more rows hold its tokens in those alone (logged where fewer than the tensor's)
        self.tracker.observe(
            TRACK_CACHE_ID,
            layer,
            parts,
            cause,
            tokens,
            source="track",
            whole_layer=only is None,
            rows=self.fed_rows,
        )
        if not refs:
            del self._tracked[layer]

    def scan(self, cause: str = "track", raised: bool = False) -> bool:
        """Compare every custom cache tensor with its last state; the first scan logs them as created.
        Module caches hold the tokens of `progress` (0: unknown). `raised`: the forward raised, maybe
        before some layers wrote (an OOM in its embedding or its layer 1): a layer holds the new tokens only
        where a version counter or a new storage shows its write, else it keeps those it held. A layer whose
        old storage was released while another slot held its new tensor beside its old one (`_released`)
        has its frees logged after all its new storages. Returns whether a module cache's event was logged
        while its tokens were unknown."""
        by_layer = self._module_parts()
        if by_layer is None:  # a module holding a cache is gone: the model re-made its caches
            self.rediscover()
            by_layer = self._module_parts() or {}
        for key in self._module_layers - by_layer.keys():  # no longer the model's: its slots let go
            by_layer[key] = {}
        self._module_layers = {key for key, parts in by_layer.items() if parts}
        tokens, rows = self.progress or (0, self.rows)
        extents, self._extents = self._extents, {}
        # Rows said without tokens are logged even where they are all the tensor's: the analyzers then
        # know them said, and do not take a buffer's capacity for the batch
        say_rows = self.progress is None and rows > 0
        tracker = self.tracker
        if self._releases.gone:
            by_layer = self._run_order(by_layer)
        if self._remade:
            self._remade = False
            self._free_taken(by_layer)
        late, holds = self._released_since(by_layer)
        changed = False
        for (cache_id, layer), parts in by_layer.items():
            # A forward that says it wrote new positions did write them, even where no version counter
            # shows it: Meta's forward runs in inference mode, whose `.to(dtype)` copy is an inference tensor
            written = self.progress is not None and tracker.tokens_or_none(cache_id, layer) != tokens
            held = tokens
            extent = extents.get((cache_id, layer)) if self.progress is not None else None
            if extent is not None:
                held, written = self._held_tokens(extent, cache_id, layer, written, raised)
            if raised and written and not tracker.written_since(cache_id, layer, parts):
                # Not shown written: claimed, its tokens would be the forward's, as if it had finished
                held, written = tracker.tokens(cache_id, layer), False
            changed |= tracker.observe(
                cache_id,
                layer,
                parts,
                cause,
                held,
                source="module",
                rows=rows,
                written=written,
                frees_last=(cache_id, layer) in late,
                say_rows=say_rows,
                hold=holds.get((cache_id, layer)) if holds else None,
            )
            if holds:
                tracker.release_held((cache_id, layer))  # the frees held until this layer's new storages
        if holds:
            tracker.release_held()  # those held until a layer no longer the model's
        self._watch_logged(self._scanned)
        self._scanned = []
        unknown = changed and self.progress is None
        for layer in list(self._tracked):
            self._observe_tracked(layer, cause)
        return unknown

    def _released_since(
        self, by_layer: dict[tuple[int, int], Any]
    ) -> tuple[set[tuple[int, int]], dict[tuple[int, int], dict[tuple[str, str], tuple[int, int]]]]:
        """What the releases since the last scan told (`Releases`), for this scan: the (cache, layer)s whose
        frees come after all their new storages, and per (cache, layer) the slots whose free waits for a
        later layer's new storages, each with that layer's (cache, layer), the hold's token."""
        releases = self._releases
        late = set(releases.late)
        holds: dict[tuple[int, int], dict[tuple[str, str], tuple[int, int]]] = {}
        if releases.holds:
            position = {key: index for index, key in enumerate(by_layer)}
            for owner, until in releases.holds.values():
                own = (owner.cache, owner.layer)
                if position.get(until, -1) > position.get(own, len(position)):
                    slot = (owner.kv, MODULE_LAYOUTS[owner.layout or "bshd"])
                    holds.setdefault(own, {})[slot] = until
        releases.clear()  # emptied, not replaced: the watches' callbacks hold it
        return late, holds

    def _run_order(
        self, by_layer: dict[tuple[int, int], dict[tuple[str, str], Any]]
    ) -> dict[tuple[int, int], dict[tuple[str, str], Any]]:
        """`by_layer` in the order the caches ran where the releases tell it (`Releases.reordered`: one
        released by its own store after a later-registered one's was rebound; `for layer in
        self.layers[::-1]`, a module's second cache run first): the order of their first releases. And
        with each (cache, layer) whose released storage's address another's new tensor took before that
        one (a beam reorder between steps releases every layer's storage before the forward): the log is
        replayed by address, so such a free must come before that tensor's event. One pass over the
        slots, an address per new tensor, and only in a scan after releases."""
        releases = self._releases
        gone = releases.gone
        at = {owner.addr: owner for owner in gone if owner.addr}
        # taker -> the (cache, layer)s whose released storage's address its new tensors took, with the slot
        takes: dict[tuple[int, int], list[tuple[_Owner, int]]] = {}
        for owner, tensor in zip(self.owners, self._scanned, strict=False):
            if isinstance(tensor, torch.Tensor) and tensor is not owner.seen():
                addr = _storage_addr(tensor)
                giver = at.get(addr)
                taker = (owner.cache, owner.layer)
                if giver is not None and (giver.cache, giver.layer) != taker:
                    takes.setdefault(taker, []).append((giver, addr))
        if not takes and not releases.reordered:
            return by_layer
        givers = {taker: [(g.cache, g.layer) for g, _ in taken] for taker, taken in takes.items()}
        ran = ((owner.cache, owner.layer) for owner in gone) if releases.reordered else by_layer
        order: dict[tuple[int, int], None] = {}
        for key in dict.fromkeys(ran):
            _place(key, givers, order, set())
        position = {key: index for index, key in enumerate(order)}
        for taker, taken in takes.items():
            for giver, addr in taken:
                if position.get((giver.cache, giver.layer), -1) > position.get(taker, len(position)):
                    # A cycle (every layer's storage released before the forward, a beam reorder): no
                    # order logs every free first, so this one is logged now, its slot let go
                    slot = (giver.kv, MODULE_LAYOUTS[giver.layout or "bshd"])
                    self.tracker.release_slot_at(giver.cache, giver.layer, slot, addr)
        if all(a == b for a, b in zip(order, by_layer, strict=False)):
            return by_layer
        return {**{key: by_layer[key] for key in order if key in by_layer}, **by_layer}

    def _free_taken(self, by_layer: dict[tuple[int, int], dict[tuple[str, str], Any]]) -> None:
        """After `rediscover` found the caches re-made: a new cache at the address of an old one released
        unseen, its own layer's or one logged before (the old modules all dropped first), has that one's
        free logged first. An old one whose layer is logged earlier (`setup_caches()` making each layer's
        new cache before dropping its old: layer 1's new K where layer 0's old K was) stays in its slot: its
        layer's new storage names it (`replaced`) and its free follows, before the taker's event. So are
        the others, at no address taken: the analyzers place such a free where the new storage was made, as
        a re-made module lets the old one go."""
        position = {key: index for index, key in enumerate(by_layer)}
        taken: dict[int, int] = {}  # address of a new tensor -> the position of its (cache, layer)
        for key, parts in by_layer.items():
            for tensor in parts.values():
                if isinstance(tensor, torch.Tensor):
                    taken.setdefault(_storage_addr(tensor), position[key])
        for cache_id in sorted({cache_id for cache_id, _ in by_layer}):
            rank = functools.partial(_position_of, position, cache_id)
            self.tracker.release_dead_at(cache_id, taken, rank)

    def _watch_logged(self, tensors: list[Any]) -> None:
        """Watch the storage of each module cache tensor just logged (`tensors`, in `owners`' order) that is
        new since the last scan (`_released`): one identity test per slot where nothing changed, a weak
        reference per new tensor."""
        for owner, tensor in zip(self.owners, tensors, strict=False):
            if not isinstance(tensor, torch.Tensor) or tensor is owner.seen():
                continue
            try:
                owner.seen = weakref.ref(tensor)
                storage = tensor.untyped_storage()
                if owner.watch is None or owner.watch() is not storage:
                    owner.watch = weakref.ref(storage, functools.partial(self._releases.released, owner))
                    owner.addr = int(storage.data_ptr())
            except (TypeError, RuntimeError, NotImplementedError):  # no weak reference, or no storage (meta)
                owner.seen, owner.watch = dead_ref, None

    def _held_tokens(
        self, extent: _Extent, cache_id: int, layer: int, written: bool, raised: bool
    ) -> tuple[int, bool]:
        """(tokens held, written) of a module cache whose forward said `progress`: the forward's tokens
        are every cache's it writes, not a cache it does not (a cross-attention cache made once from the
        encoder's positions) nor one with less room (a ring buffer, a window kept by slicing). A cache whose
        every tensor is the one last scanned, its version unmoved, was not written: it keeps its tokens. One
        made in this forward and not written in place since (version 0) holds all its positions. Else it
        holds the forward's tokens, at most its positions."""
        tokens = self.progress[0] if self.progress is not None else 0
        if extent.unchanged:
            return self.tracker.tokens(cache_id, layer), False
        if extent.positions is None:
            return tokens, written
        if extent.made and not raised:
            return extent.positions, written
        return min(tokens, extent.positions), written

    def _module_parts(self) -> dict[tuple[int, int], dict[tuple[str, str], Any]] | None:
        """The module caches' tensors now, by (cache, layer), each cache-holding module of a layer its own
        cache (and in `owners`' order in `_scanned`, for the watches); None when an owning module is gone."""
        by_layer: dict[tuple[int, int], dict[tuple[str, str], Any]] = {}
        scanned = self._scanned = []
        self._extents = {}
        for owner in self.owners:
            module = owner.module_ref()
            if module is None:
                return None
            tensor = getattr(module, owner.attr, None)
            scanned.append(tensor)
            if not owner.layout and isinstance(tensor, torch.Tensor):
                said = self.said_layouts.get(owner.attr)
                layout = module_cache_layout(owner, module, tuple(tensor.shape), said)
                owner.layout, owner.guessed = layout or "bshd", layout is None
            part = MODULE_LAYOUTS[owner.layout or "bshd"]
            key = (owner.cache, owner.layer)
            by_layer.setdefault(key, {})[(owner.kv, part)] = tensor
            if isinstance(tensor, torch.Tensor):
                extent = self._extents.get(key)
                if extent is None:
                    extent = self._extents[key] = _Extent()
                extent.see(owner, tensor)
        return by_layer
