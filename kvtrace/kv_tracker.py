"""Turns observations of KV tensors into KV events, by comparing each storage with what was seen before.

Why a state diff and not a log of method calls: caches change in many ways (torch.cat growth, in-place
index_copy_, slicing to a view, eviction libraries rebinding `layer.keys` from a forward hook). Whoever
observes a layer (a patched cache method, the end-of-step scan, a custom-cache scan) hands its current
tensors here, with the cause it knows; the tracker decides what changed and logs one event per storage.

Frees are exact: a storage that left its slot is watched until the allocator releases it, and its `freed`
is logged where the log's replay by address needs it (`kvtrace.kv_frees`).

Cost (issue 11): a layer update runs once per layer and step, so on a GPU it must cost microseconds.
Events are written straight into JSON lines with one `%` format (same keys as `KvEvent`, read back by
`kvtrace.run_reader.read_run`), per-slot facts (dtype, device, storage, shape) are kept and reused while the
tensor object is the same, storages are watched through raw weak references, and nothing here reads a
tensor's values: no `.item()`, no `int(tensor)`, no `.cpu()`, so no device sync. A cache's update of a
layer already seen is compared at once and only captured (a tuple of facts); the tuples become lines when
the recorder's writer thread takes them (every 0.1 s), in one loop (`KvTracker.drain`), with the time,
step and phase of the capture.

`KvTracker` owns that state, the per-update fast path (`update`) and the events logged at once; its other
roles are mixins, each in its own module and sharing the state: `kvtrace.kv_drain` writes the log (the
captured updates into lines, the lock the writer thread takes), `kvtrace.kv_compare` compares one tensor
with its slot, `kvtrace.kv_observe` takes a layer that a scan, crop, reset or custom cache hands over, and
`kvtrace.kv_frees` watches storages until the allocator releases them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from kvtrace.format import KvEvent
from kvtrace.kv_compare import KvCompare
from kvtrace.kv_drain import KvDrain, locked
from kvtrace.kv_frees import KvFrees
from kvtrace.kv_lines import KEY_JSON, MASKED_LINE, iter_tensors, quoted
from kvtrace.kv_observe import KvObserve
from kvtrace.kv_slots import K_DATA, V_DATA, LayerState, capture, expired, refresh_fast, storage_of


def _held(facts: tuple[Any, ...] | None, other: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """A compiled graph's update facts whose released storage is to be watched (logged freed by the next
    poll, after the step's other new storages) rather than logged freed with the update; unchanged where a
    new storage of the layer sits at its address, which proves it was released before that one was made."""
    if facts is None or not facts[11] or facts[1] == facts[8] or (other is not None and other[1] == facts[8]):
        return facts
    return (*facts[:11], False, facts[12])


class KvTracker(KvObserve, KvCompare, KvFrees, KvDrain):
    """Owns the last-seen state of every KV slot and appends events, as JSON lines, to `lines`.

    The recorder's writer thread takes `lines` into `kv_events.jsonl` every 0.1 s; `on_evict(layer, kv)`
    runs for each K and V tensor of an `evicted`, `cropped` or `masked` event (the recorder opens an NVTX
    range there; a sliding window's evictions get theirs from the `Cache.update` wrapper, NVTX only).
    """

    def __init__(self, clock: Callable[[], int], on_evict: Callable[[int, str], None] | None = None) -> None:
        self._clock = clock
        self._on_evict = on_evict
        self._layers: dict[tuple[int, int], LayerState] = {}
        # Storages that left their slot but may still be alive (a view, an autograd graph, the caller):
        # (weak ref, layer, kv, quoted part, addr, bytes, cache).
        self._pending: list[tuple[int, int, str, str, int, int, int]] = []
        # Their addresses: a new storage at one of them means that storage was released first (`update`).
        self._pending_addrs: set[int] = set()
        # Raw weak references of storages whose `freed` the writer thread's drain logged before their slot's
        # next capture, at a new storage at their address (`_drain_locked`): not logged again after it.
        self._freed_early: set[int] = set()
        self._frees_held = False  # inside an `observe(frees_last=True)`: its frees wait for its new storages
        # Storages that left their slot, kept out of `_pending` until a later layer's new storages are logged
        # (`observe(hold=...)`, `release_held`), by the token they wait for
        self._held: dict[Hashable, list[tuple[int, int, str, str, int, int, int]]] = {}
        self.lines: list[str] = []
        self.lock = threading.RLock()  # around `_seq` and `lines`: the writer thread drains too
        # Captured layer updates waiting for `drain`: (cache, layer, t_ns, step, phase JSON, tokens,
        # evicted, reason, K facts, V facts); see `update` and `capture`.
        self._queue: list[tuple[Any, ...]] = []
        # (cache, layer, (kv, part), dtype, device) -> that slot's line templates (`slot_lines`)
        self._templates: dict[tuple[Any, ...], tuple[str, str]] = {}
        self._seq = 0
        self.step = 0
        self._phase = ""
        self._phase_json = quoted("")

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value != self._phase:  # set every step, changed only at prefill and the end
            self._phase = value
            self._phase_json = quoted(value)

    def tokens(self, cache_id: int, layer: int) -> int:
        state = self._layers.get((cache_id, layer))
        return state.tokens if state is not None else 0

    def tokens_or_none(self, cache_id: int, layer: int) -> int | None:
        """The tokens last logged for a layer; None for a layer never seen."""
        state = self._layers.get((cache_id, layer))
        return None if state is None else state.tokens

    def storage_alive(self, cache_id: int, layer: int) -> bool:
        """Whether a storage the layer's slots last showed is still alive, read from its weak reference (no
        tensor is read): a tracked view dropped at once leaves its slot on its tensor's storage until the
        next scan, and that tensor may live on after the view."""
        state = self._layers.get((cache_id, layer))
        return state is not None and any(not expired(slot.wref) for slot in list(state.slots.values()))

    @locked
    def written_since(self, cache_id: int, layer: int, parts: dict[tuple[str, str], Any]) -> bool:
        """Whether a tensor of `parts` shows a write since the layer was last logged: the very tensor of its
        slot, its version counter moved, or a tensor on a new storage in place of its slot's (the forward
        made it: a cache grown by torch.cat). False where nothing shows one (an inference tensor counts no
        version; a layer never seen, or a new view of its slot's storage, tells nothing of what it holds). For
        a forward that raised,
        which may have stopped before the layer's write: every version is read, so never per decode step
        (issue 11)."""
        state = self._layers.get((cache_id, layer))
        if state is None:
            return False
        for (kv, part), value in parts.items():
            for name, tensor in iter_tensors(value, part):
                slot = state.slots.get((kv, name))
                if slot is None:
                    continue
                if slot.tref() is not tensor:
                    found = storage_of(tensor)
                    if found is not None and (found[1] != slot.addr or expired(slot.wref)):
                        return True
                    continue
                try:
                    if tensor._version != slot.version:
                        return True
                except RuntimeError:  # an inference tensor
                    continue
        return False

    def _state(self, cache_id: int, layer: int) -> LayerState:
        state = self._layers.get((cache_id, layer))
        if state is None:
            state = self._layers[(cache_id, layer)] = LayerState()
        return state

    # -- the per-update fast path ----------------------------------------------------------------------
    def update(
        self,
        cache_id: int,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        tokens: int,
        evicted: int = 0,
        reason: str = "",
        both_first: bool = False,
        written: bool = False,
        state: LayerState | None = None,
    ) -> None:
        """A cache's own update wrote plain `keys`/`values` tensors of one layer, which now holds `tokens`
        tokens per row; `evicted` of them left a window in this update (reason `window`). `both_first`: the
        update made both new tensors before releasing either old one (a sliding layer), so the frees of the
        old storages are logged after both new ones, not each after its own. `written`: the update ran in a
        compiled graph, whose in-place writes may leave the version counters as they were, and which made
        every layer's new storages before releasing any old one (dynamo rebinds the layers' attributes after
        the graph): a storage it replaced is watched, not logged freed with this update, and the caller polls
        (`poll_frees`) after the step's last layer, so that all the step's frees follow all its new storages.

        A layer seen before, holding one K and one V tensor, is compared here and only captured: the slots
        are brought up to date and the facts each event needs go into a queue as tuples, with the time,
        step and phase of the update. `drain` turns the queue into lines in one loop when the writer thread
        takes the lines (every 0.1 s), or before any other event is logged, so the log keeps its order. So
        the model's thread neither formats nor writes a line for these updates (issue 11). A storage the
        update released is logged freed at the update's time; one still held elsewhere is watched, and
        found by a later poll. `state`: the layer's, where the caller has just looked it up.
        """
        if state is None:
            state = self._layers.get((cache_id, layer))
        fast = state.fast if state is not None else None
        if fast is None:
            self._update_now(cache_id, layer, keys, values, tokens, evicted, reason, written)
            return
        assert state is not None
        state.tokens = tokens
        k_facts = capture(fast[0], keys, written)
        v_facts = capture(fast[1], values, written)
        if k_facts is None and v_facts is None:
            return  # the very same tensors, not written since
        if written:
            k_facts, v_facts = _held(k_facts, v_facts), _held(v_facts, k_facts)
        reused = self._pending_addrs
        if reused and (
            (k_facts is not None and k_facts[1] in reused) or (v_facts is not None and v_facts[1] in reused)
        ):
            # A new storage where a watched one was: that one was released before this update made it, so
            # its `freed` goes before this update's events (the log is replayed by address).
            self.poll_frees()
        self._queue.append(
            (
                cache_id,
                layer,
                self._clock(),
                self.step,
                self._phase_json,
                tokens,
                evicted,
                reason,
                k_facts,
                v_facts,
                both_first,
            )
        )
        if k_facts is not None and k_facts[10] and not k_facts[11]:
            self._watch(cache_id, layer, K_DATA, k_facts)
        if v_facts is not None and v_facts[10] and not v_facts[11]:
            self._watch(cache_id, layer, V_DATA, v_facts)

    def _watch(self, cache_id: int, layer: int, key: tuple[str, str], facts: tuple[Any, ...]) -> None:
        """Watch a storage an update replaced but did not release (a view or the caller holds it)."""
        kv_json, part_json = KEY_JSON[key]
        self._pending.append((facts[10], layer, kv_json, part_json, facts[8], facts[9], cache_id))
        self._pending_addrs.add(facts[8])

    def _update_now(
        self,
        cache_id: int,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        tokens: int,
        evicted: int,
        reason: str,
        written: bool = False,
    ) -> None:
        """The first update of a layer (or one holding other parts): compared and logged at once."""
        with self.lock:
            self.drain()
            state = self._state(cache_id, layer)
            state.tokens = tokens
            t_ns = self._clock()
            if self._pending:  # released before this update's new storages were made (see `observe`)
                self._poll_locked(t_ns)
            slots = state.slots
            reason_json = quoted(reason) if evicted else '""'
            self._see(
                slots,
                cache_id,
                layer,
                K_DATA,
                keys,
                tokens,
                evicted,
                reason_json,
                t_ns,
                "update",
                '"hf"',
                written=written,
            )
            self._see(
                slots,
                cache_id,
                layer,
                V_DATA,
                values,
                tokens,
                0,
                '""',
                t_ns,
                "update",
                '"hf"',
                written=written,
            )
            refresh_fast(state)
            if self._pending:
                self.poll_frees(t_ns)

    def pool_view_created(
        self, t_ns: int, layer: int, kv: str, storage: dict[str, Any], tokens: int, cache: int, source: str
    ) -> None:
        """A `created` event for one layer's K or V view of an engine's paged pool (vLLM, transformers'
        continuous batching): `storage` gives `storage_addr`, `storage_bytes`, `view_offset`, `shape`,
        `bytes` (the view's), `dtype` and `device`. Every view names the one storage, so a replay counts
        the pool once. The caller holds `lock` and has drained the queue."""
        self._seq += 1
        event = KvEvent(
            seq=self._seq,
            t_ns=t_ns,
            step=self.step,
            phase=self.phase,
            event="created",
            layer=layer,
            kv=kv,
            part="data",
            addr=storage["storage_addr"],
            storage_bytes=storage["storage_bytes"],
            view_offset=storage["view_offset"],
            shape=storage["shape"],
            logical_bytes=storage["bytes"],
            dtype=storage["dtype"],
            device=storage["device"],
            tokens=tokens,
            cache=cache,
            source=source,
        )
        self.lines.append(json.dumps(event.to_json(), separators=(",", ":")))

    @locked
    def masked(self, cache_id: int, layer: int, masked_entries: int, tokens: int) -> None:
        """Tokens hidden from attention in place (kvpress AdaKV's `masked_key_indices`): nothing is freed.
        One event for K and one for V: a masked key's value is never read either, so both are what the
        mask claims to save; each carries the (row, head, token) entries it hides."""
        self.drain()
        t_ns = self._clock()
        reason = json.dumps(f"masking without removal: {masked_entries} (row, head, token) entries masked")
        for kv_json in ('"k"', '"v"'):
            self._seq += 1
            self.lines.append(
                MASKED_LINE
                % (
                    self._seq,
                    t_ns,
                    self.step,
                    self._phase_json,
                    layer,
                    kv_json,
                    tokens,
                    cache_id,
                    reason,
                    masked_entries,
                )
            )
        if self._on_evict is not None:
            self._on_evict(layer, "k")
            self._on_evict(layer, "v")

    def live_slots(self) -> dict[tuple[int, int, str, str], int]:
        """Storage bytes now held per slot (for the manifest's end-of-run summary)."""
        return {
            (cache_id, layer, kv, part): slot.storage_bytes
            for (cache_id, layer), state in self._layers.items()
            for (kv, part), slot in state.slots.items()
        }

    def pending_frees(self) -> int:
        return len(self._pending)
