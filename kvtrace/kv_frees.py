"""Frees: a storage that left its slot is watched until the allocator releases it, then logged `freed`.

Why watched and not logged when it leaves: a view, an autograd graph or the caller may keep it alive, so
each is watched through a raw weak reference to the storage itself (not the tensor: a view may outlive it).
A free is logged at the update that released it where the update itself did (torch.cat growth, see
`kvtrace.kv_drain`), else at the first later observation or step end that finds it gone, before that
observation's new storages: the analyzers replay the log by address, and malloc hands a released address
to the next tensor at once. Slots whose tensor was dropped unseen, or whose cache is gone, leave their
slots here (`release_slot_at`, `release_dead_at`, `retire_cache`, `release_all`); frees an observation
holds back wait for `release_held`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

from kvtrace.kv_drain import locked
from kvtrace.kv_lines import FREED_LINE, KEY_JSON, key_json
from kvtrace.kv_slots import LayerState, Slot, expired, free_weak_ref, refresh_fast, weak_ref_of


class KvFrees:
    """Watching storages until they are freed (a mixin of `KvTracker`, whose state it shares)."""

    lock: threading.RLock
    lines: list[str]
    step: int
    _phase_json: str
    _seq: int
    _clock: Callable[[], int]
    _layers: dict[tuple[int, int], LayerState]
    _pending: list[tuple[int, int, str, str, int, int, int]]
    _pending_addrs: set[int]
    _freed_early: set[int]
    _frees_held: bool
    _held: dict[Hashable, list[tuple[int, int, str, str, int, int, int]]]

    if TYPE_CHECKING:

        def drain(self) -> None: ...

    def _hold(self, wref: int, token: Hashable) -> None:
        """Move the storage `wref` from `_pending` to those held for `token` (`release_held`)."""
        for index, item in enumerate(self._pending):
            if item[0] == wref:
                self._held.setdefault(token, []).append(self._pending.pop(index))
                self._pending_addrs = {item[4] for item in self._pending}
                return

    @locked
    def release_held(self, token: Hashable | None = None) -> None:
        """The storages held for `token` (all, with None) are watched again, their frees logged now if
        released: the new storages they outlived are logged."""
        if not self._held:
            return
        held = [self._held.pop(token, [])] if token is not None else list(self._held.values())
        if token is None:
            self._held.clear()
        for items in held:
            self._pending.extend(items)
            self._pending_addrs.update(item[4] for item in items)
        if self._pending:
            self._poll_locked(self._clock())

    def watch_pool(self, storage: Any, layer: int, kv: str, cache: int) -> None:
        """Log `freed` for an engine pool's storage once the allocator releases it (continuous batching frees
        its pool when generate_batch returns). The caller holds `lock`."""
        kv_json, part_json = KEY_JSON.get((kv, "data")) or key_json((kv, "data"))
        wref, addr, nbytes = weak_ref_of(storage), storage.data_ptr(), int(storage.nbytes())
        self._pending.append((wref, layer, kv_json, part_json, addr, nbytes, cache))
        self._pending_addrs.add(addr)

    @locked
    def release_slot_at(self, cache_id: int, layer: int, key: tuple[str, str], addr: int) -> None:
        """A new storage shows up at `addr`, which a slot still holds whose tensor was dropped unseen (a
        hand-written cache thrown away between two generations): that storage was released before, so it
        leaves its slot and is logged freed now, before the new storage's event. Nothing when the slot has
        moved on or its storage is still alive."""
        state = self._layers.get((cache_id, layer))
        slot = state.slots.get(key) if state is not None else None
        if state is None or slot is None or slot.addr != addr or not expired(slot.wref):
            return
        self.drain()
        del state.slots[key]
        self._retire(cache_id, layer, key, slot)
        refresh_fast(state)
        self._poll_locked(self._clock())

    @locked
    def release_dead_at(self, cache_id: int, addrs: Mapping[int, int], rank: Callable[[int], int]) -> None:
        """The slots of `cache_id` at one of `addrs` whose storage was released unseen leave their slots,
        logged freed now: new storages sit there, maybe another layer's (a cache module the model re-made
        after dropping the old one), whose events must come after these frees. `addrs` maps each address to
        the rank in the caller's log order of the layer whose new storage is there, `rank` a layer of
        `cache_id` to its own: a slot whose layer is logged first stays, its next event naming it as the
        storage it replaced and its free logged right after, still before the new storage at its address
        (`setup_caches()` making layer 1's new K where layer 0's old K was, layer 0's new K made first)."""
        self.drain()
        released = False
        for (owner, layer), state in self._layers.items():
            if owner != cache_id:
                continue
            own = rank(layer)
            dead = [
                key
                for key, slot in state.slots.items()
                if addrs.get(slot.addr, own + 1) <= own and expired(slot.wref)
            ]
            for key in dead:
                self._retire(cache_id, layer, key, state.slots.pop(key))
            if dead:
                refresh_fast(state)
                released = True
        if released:
            self._poll_locked(self._clock())

    def _retire(self, cache_id: int, layer: int, key: tuple[str, str], old: Slot) -> None:
        """Watch a storage that left its slot until the allocator releases it."""
        kv_json, part_json = KEY_JSON.get(key) or key_json(key)
        self._pending.append((old.wref, layer, kv_json, part_json, old.addr, old.storage_bytes, cache_id))
        self._pending_addrs.add(old.addr)

    @locked
    def retire_cache(self, cache_id: int) -> None:
        """A cache object is gone: its slots' storages are watched until released (`poll_frees`)."""
        self.drain()
        for key in [key for key in self._layers if key[0] == cache_id]:
            state = self._layers.pop(key)
            for slot_key, slot in state.slots.items():
                self._retire(cache_id, key[1], slot_key, slot)

    @locked
    def release_all(self) -> None:
        """At the end of a recording: stop holding slots, so storages freed later are still reported by a
        final `poll_frees` (after the caller dropped its cache)."""
        self.drain()
        for (cache_id, layer), state in self._layers.items():
            for key, slot in state.slots.items():
                self._retire(cache_id, layer, key, slot)
            state.slots.clear()
            state.fast = None

    def poll_frees(self, t_ns: int = 0) -> None:
        """Log `freed` for every watched storage the allocator has released since the last poll (at `t_ns`,
        the time of the observation that found it, or now)."""
        if not self._pending or self._frees_held:
            return
        with self.lock:
            self._poll_locked(t_ns)

    def _poll_locked(self, t_ns: int) -> None:
        self.drain()  # the queued events come first: a free found now is logged after them
        pending = self._pending
        early = self._freed_early
        still: list[tuple[int, int, str, str, int, int, int]] = []
        for item in pending:
            wref = item[0]
            if expired(wref):
                free_weak_ref(wref)
                if wref in early:  # logged by the writer's drain, before a new storage at its address
                    early.discard(wref)
                    continue
                if not t_ns:
                    t_ns = self._clock()
                self._seq += 1
                self.lines.append(
                    FREED_LINE
                    % (
                        self._seq,
                        t_ns,
                        self.step,
                        self._phase_json,
                        item[1],
                        item[2],
                        item[3],
                        item[4],
                        item[5],
                        item[6],
                    )
                )
            else:
                still.append(item)
        self._pending = still
        self._pending_addrs = {item[4] for item in still}

    @locked
    def close(self) -> None:
        """Let go of the weak references still held (storages the caller keeps alive after the run)."""
        self.drain()
        for item in self._pending + [item for items in self._held.values() for item in items]:
            free_weak_ref(item[0])
        self._pending = []
        self._held.clear()
        self._pending_addrs = set()
        self._freed_early.clear()
        for state in self._layers.values():
            for slot in state.slots.values():
                free_weak_ref(slot.wref)
            state.slots.clear()
            state.fast = None
