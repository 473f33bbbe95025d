"""Turns observations of KV tensors into KV events, by comparing each storage with what was seen before.

Why a state diff and not a log of method calls: caches change in many ways (torch.cat growth, in-place
index_copy_, slicing to a view, eviction libraries rebinding `layer.keys` from a forward hook). Whoever
observes a layer (a patched cache method, the end-of-step scan, a custom-cache scan) hands its current
tensors here, with the cause it knows; the tracker decides what changed and logs one event per storage.

Frees are exact: each storage a slot holds is watched through a weak reference to the storage itself (not
the tensor: a view may outlive it), and `freed` is logged when the allocator has released it: at the
update that replaced it when the update itself released it (torch.cat growth), else at the first later
observation or step end that finds it gone, before that observation's new storages (the analyzers replay
the log by address, and malloc hands a released address to the next tensor at once).

Cost (issue 11): a layer update runs once per layer and step, so on a GPU it must cost microseconds.
Events are written straight into JSON lines with one `%` format (same keys as `KvEvent`, read back by
`kvtrace.run_reader.read_run`), per-slot facts (dtype, device, storage, shape) are kept and reused while the
tensor object is the same, storages are watched through raw weak references, and nothing here reads a
tensor's values: no `.item()`, no `int(tensor)`, no `.cpu()`, so no device sync. A cache's update of a
layer already seen is compared at once and only captured (a tuple of facts); the tuples become lines when
the recorder's writer thread takes them (every 0.1 s), in one loop (`KvTracker.drain`), with the time,
step and phase of the capture.

Threads: the model's thread calls everything; the writer thread calls `take_lines` only. The capture
queue is appended by the model's thread without a lock (a list append is atomic) and drained by whole
prefixes (`queue[:n]`, then `del queue[:n]`), so no update is lost to a swap; everything that numbers or
appends lines holds `lock`.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch

from kvtrace.format import KvEvent
from kvtrace.kv_lines import (
    EVENT_LINE,
    FREED_LINE,
    KEY_JSON,
    MASKED_LINE,
    NO_STORAGE_LINE,
    SHAPE_JSON,
    iter_tensors,
    key_json,
    quoted,
    shape_facts,
    slot_lines,
)
from kvtrace.kv_slots import (
    K_DATA,
    V_DATA,
    LayerState,
    Slot,
    capture,
    dead_ref,
    expired,
    free_weak_ref,
    refresh_fast,
    released_slots,
    set_dtype,
    shape_of,
    storage_of,
    weak_ref_of,
    with_rows,
)

# What a cause becomes when the storage changed (first) or stayed (second).
_CAUSE_EVENTS: dict[str, tuple[str, str]] = {
    "update": ("grown", "written"),
    "crop": ("cropped", "cropped"),
    "reset": ("reset", "reset"),
    "reorder": ("reordered", "reordered"),
    "offload": ("offloaded", "offloaded"),
    "prefetch": ("prefetched", "prefetched"),
    "scan": ("evicted", "written"),
    "track": ("grown", "written"),  # a custom cache rebound to a larger tensor (else "replaced", below)
}

# Events that carry their observation's `reason` without evicting: an eviction's `grad_enabled`, a beam
# search's first reorder's `beams:N`, a crop's or reset's `caller` (made outside the model's generate()
# calls).
_REASONED = ("evicted", "reordered", "cropped", "reset")
# A cache first seen holding KV (`HfCacheHooks.found`): its storages' `created` events carry `reason` "found",
# held since before kvtrace saw them (filled before record(), or copied by code kvtrace does not follow).
_EVICTING = ("evicted", "cropped")  # events whose tensor lost tokens (`on_evict`)
_NO_FREES: list[tuple[str, int, int]] = []  # drain's deferred frees of an update without `both_first`: none
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _held(facts: tuple[Any, ...] | None, other: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """A compiled graph's update facts whose released storage is to be watched (logged freed by the next
    poll, after the step's other new storages) rather than logged freed with the update; unchanged where a
    new storage of the layer sits at its address, which proves it was released before that one was made."""
    if facts is None or not facts[11] or facts[1] == facts[8] or (other is not None and other[1] == facts[8]):
        return facts
    return (*facts[:11], False, facts[12])


def _locked(method: Callable[Concatenate[KvTracker, _P], _R]) -> Callable[Concatenate[KvTracker, _P], _R]:
    """Run a method that numbers or appends lines under the tracker's lock (the writer thread drains)."""

    @functools.wraps(method)
    def locked(self: KvTracker, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class KvTracker:
    """Owns the last-seen state of every KV slot and appends events, as JSON lines, to `lines`.

    The recorder's writer thread takes `lines` into `kv_events.jsonl` every 0.1 s; `on_evict(layer, kv)`
    runs for each K and V tensor of an `evicted`, `cropped` or `masked` event (the recorder opens an NVTX
    range there; a sliding window's evictions get theirs from the `Cache.update` wrapper, NVTX only).
    """

    def __init__(
        self, clock: Callable[[], int], on_evict: Callable[[int, str], None] | None = None
    ) -> None:
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

    def take_lines(self) -> list[str]:
        """The lines logged so far, the captured updates included; safe from the writer thread."""
        with self.lock:
            if self._queue:
                self._drain_locked(released=True)
            lines, self.lines = self.lines, []
        return lines

    def tokens(self, cache_id: int, layer: int) -> int:
        state = self._layers.get((cache_id, layer))
        return state.tokens if state is not None else 0

    def tokens_or_none(self, cache_id: int, layer: int) -> int | None:
        """The tokens last logged for a layer; None for a layer never seen."""
        state = self._layers.get((cache_id, layer))
        return None if state is None else state.tokens

    @_locked
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
            (cache_id, layer, self._clock(), self.step, self._phase_json, tokens, evicted, reason, k_facts,
             v_facts, both_first)
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
                slots, cache_id, layer, K_DATA, keys, tokens, evicted, reason_json, t_ns, "update", '"hf"',
                written=written,
            )
            self._see(
                slots, cache_id, layer, V_DATA, values, tokens, 0, '""', t_ns, "update", '"hf"',
                written=written,
            )
            refresh_fast(state)
            if self._pending:
                self.poll_frees(t_ns)

    def drain(self) -> None:
        """Log the captured updates, in the order they happened, with the time, step and phase of each."""
        if not self._queue:
            return
        with self.lock:
            self._drain_locked()

    def _drain_locked(self, released: bool = False) -> None:
        """Turn the captured updates into lines, in order. A storage released before the update that
        replaced it (the layer was rebound outside the update, see `capture`) may have handed its address
        to a new storage captured before that update (this layer's own, or an earlier layer's in the same
        step: light mode captures every layer at the forward's end). The log is replayed by address, so such
        a release's `freed` goes before that new storage's event, at its time.

        `released` (the writer thread's drain, every 0.1 s, which may fall between that new storage's
        capture and the update that captures the release): the slots are searched too for storages released
        but not yet captured (`released_slots`), before the queue's prefix is taken, so that a release
        captured meanwhile is in the batch. A new storage at one's address logs its `freed` first, and the
        slot's later capture (or poll) logs none. O(layers) per such drain, nothing on the model's thread."""
        unlogged = released_slots(self._layers) if released else None
        queue = self._queue
        count = len(queue)  # a prefix: the model's thread may append meanwhile, after it
        batch = queue[:count]
        del queue[:count]
        append = self.lines.append
        templates = self._templates
        seq = self._seq
        # The facts that release a storage, per its address, the next to log last (the batch walked back)
        releases: dict[int, list[tuple[Any, ...]]] = {}
        early = self._freed_early
        for entry in reversed(batch):
            for f in (entry[9], entry[8]):
                if f is not None and f[11] and not (early and f[10] in early):
                    at = releases.get(f[8])
                    if at is None:
                        releases[f[8]] = [f]
                    else:
                        at.append(f)
        # Those made in this batch: a new storage at their address before they were made is not after them
        made_here = self._unlogged_in(batch, unlogged, releases) if unlogged else set()
        for cid, layer, t_ns, step, phase_json, tokens, evicted, reason, k_facts, v_facts, pair in batch:
            # with `pair` (both_first): the frees wait for both new storages; no list made otherwise
            later = [] if pair else _NO_FREES
            for key, f in ((K_DATA, k_facts), (V_DATA, v_facts)):
                if f is None:
                    continue
                (kind, addr, nbytes, view_offset, shape, dtype, device, itemsize, prev_addr, prev_size,
                 old_wref, old_gone, wref) = f
                lines = templates.get((cid, layer, key, dtype, device)) or self._slot_lines(
                    cid, layer, key, dtype, device
                )
                at = releases.get(addr)
                if at and at[-1][10] != wref:
                    # The next release at this address is not of the storage made here (the normal case: a
                    # later step replaces it) but of one released before this update made it: logged first.
                    gone = at.pop()
                    free_weak_ref(gone[10])
                    seq += 1
                    append(self._released_line(batch, gone) % (seq, t_ns, step, phase_json, addr, gone[9]))
                if unlogged and old_wref and addr in unlogged:
                    held = unlogged[addr]
                    if held[3] == wref:  # its own event: a new storage here after it follows its release
                        made_here.discard(wref)
                    elif held[3] not in made_here:
                        # Released (by other code) before this storage was made at its address, and its slot's
                        # update, which captures that, is still to come: its `freed` now, once.
                        del unlogged[addr]
                        early.add(held[3])
                        seq += 1
                        append(
                            self._slot_lines(held[0], held[1], held[2], held[5], held[6])[1]
                            % (seq, t_ns, step, phase_json, addr, held[4])
                        )
                shape_json, count = SHAPE_JSON.get(shape) or shape_facts(shape)
                first = key is K_DATA
                seq += 1
                append(
                    lines[0]
                    % (
                        seq, t_ns, step, phase_json, kind, addr, nbytes, view_offset, shape_json,
                        count * itemsize, tokens, evicted if first else 0, prev_addr,
                        quoted(reason) if first and evicted else '""',
                    )
                )
                if old_gone and early and old_wref in early:
                    early.discard(old_wref)  # logged by an earlier drain, before a new storage at its address
                    free_weak_ref(old_wref)
                elif old_gone:
                    at = releases[prev_addr]
                    if at and at[-1] is f:  # else logged already, before a new storage at its address
                        # released by the update itself (torch.cat growth): freed at its time
                        at.pop()
                        free_weak_ref(old_wref)
                        if pair and not (first and v_facts is not None and v_facts[1] == prev_addr):
                            later.append((lines[1], prev_addr, prev_size))
                        else:  # not deferred past a V storage made at its address
                            seq += 1
                            append(lines[1] % (seq, t_ns, step, phase_json, prev_addr, prev_size))
            for template, prev_addr, prev_size in later:
                seq += 1
                append(template % (seq, t_ns, step, phase_json, prev_addr, prev_size))
        self._seq = seq

    @staticmethod
    def _unlogged_in(
        batch: list[tuple[Any, ...]], unlogged: dict[int, tuple[Any, ...]], releases: dict[int, Any]
    ) -> set[int]:
        """Drop from `unlogged` the storages whose release `batch` captures (logged by its own rules); return
        the weak references of those left that `batch` made as new storages (their own event comes first)."""
        for addr, held in list(unlogged.items()):
            if any(f[10] == held[3] for f in releases.get(addr, ())):
                del unlogged[addr]
        wanted = {held[3] for held in unlogged.values()}
        facts = [f for entry in batch for f in (entry[8], entry[9]) if f is not None]
        return {f[12] for f in facts if f[10] and f[12] in wanted}

    def _released_line(self, batch: list[tuple[Any, ...]], gone: tuple[Any, ...]) -> str:
        """The `freed` line template of the slot whose captured facts `gone` are, found in `batch` (rare: a
        release logged before its own update, see `_drain_locked`)."""
        for entry in batch:
            if entry[8] is gone or entry[9] is gone:
                key = K_DATA if entry[8] is gone else V_DATA
                return self._slot_lines(entry[0], entry[1], key, gone[5], gone[6])[1]
        raise AssertionError("a release not in its batch")

    def _slot_lines(
        self, cid: int, layer: int, key: tuple[str, str], dtype: str, device: str
    ) -> tuple[str, str]:
        """A drained slot's event and freed line templates (`slot_lines`), made at its first line."""
        lines = self._templates.get((cid, layer, key, dtype, device))
        if lines is None:
            lines = self._templates[(cid, layer, key, dtype, device)] = slot_lines(
                layer, *KEY_JSON[key], dtype, device, cid, '"hf"'
            )
        return lines

    def _see(
        self,
        slots: dict[tuple[str, str], Slot],
        cache_id: int,
        layer: int,
        key: tuple[str, str],
        tensor: torch.Tensor,
        tokens: int,
        evicted: int,
        reason_json: str,
        t_ns: int,
        cause: str,
        source_json: str,
        prev_tokens: int = -1,
        written: bool = False,
        rows: int = 0,
        say_rows: bool = False,
    ) -> bool:
        """Compare one tensor with its slot, log what changed; False when it has no storage (skipped).
        `rows`: the batch rows in use, when known to be fewer than the tensor's, or with `say_rows`
        (`with_rows`)."""
        slot = slots.get(key)
        try:
            version = tensor._version
        except RuntimeError:  # an inference tensor: in-place writes are invisible, its replacement is not
            version = -1
        if slot is not None and slot.tref() is tensor:
            if version == slot.version and (version != -1 or cause != "update") and not written:
                return True  # the very same tensor, not written since
            if tensor.data_ptr() == slot.ptr:
                # Written in place (static caches): every fact but the version is what we logged last.
                slot.version = version
                kind = _CAUSE_EVENTS.get(cause, ("replaced", "written"))[1]
                if cause == "scan" and tokens < prev_tokens:
                    kind = "evicted"
                self._seq += 1
                kv_json, part_json = KEY_JSON.get(key) or key_json(key)
                line = EVENT_LINE % (
                    self._seq, t_ns, self.step, self._phase_json, kind, layer, kv_json, part_json,
                    slot.addr, slot.storage_bytes, slot.view_offset, shape_of(slot),
                    slot.logical_bytes, slot.dtype, slot.device, tokens, evicted, slot.addr, cache_id,
                    source_json, reason_json if evicted or kind in _REASONED else '""',
                )
                self.lines.append(with_rows(line, rows, slot.shape, say_rows) if rows else line)
                if kind in _EVICTING and self._on_evict is not None:
                    self._on_evict(layer, key[0])
                return True
        found = storage_of(tensor)
        if found is None:
            return False
        storage, addr, nbytes = found
        kv_json, part_json = KEY_JSON.get(key) or key_json(key)
        same_storage = released = False
        if slot is not None and slot.addr == addr:
            if expired(slot.wref):
                # No view of the slot's storage but a new one made where it was, after it was released (a
                # cache dropped and made again): its free comes first, as the replay by address needs.
                released = True
                free_weak_ref(slot.wref)
                if slot.wref in self._freed_early:  # logged by the writer's drain (`_drain_locked`)
                    self._freed_early.discard(slot.wref)
                else:
                    self._seq += 1
                    self.lines.append(
                        FREED_LINE
                        % (
                            self._seq, t_ns, self.step, self._phase_json, layer, kv_json, part_json, addr,
                            slot.storage_bytes, cache_id,
                        )
                    )
            else:
                same_storage = True
        if slot is None:
            kind = "created"
            prev_addr = 0
            new = Slot()
            new.wref = weak_ref_of(storage)
        elif same_storage:
            kind = _CAUSE_EVENTS.get(cause, ("replaced", "written"))[1]
            if cause == "scan" and tokens < prev_tokens:
                kind = "evicted"  # a view of the old storage: tokens gone, memory kept
            prev_addr = addr
            new = slot
        else:
            assert slot is not None
            if (cause in ("update", "track") and nbytes <= slot.storage_bytes) or (
                cause == "scan" and tokens >= prev_tokens
            ):
                kind = "replaced"
            else:
                kind = _CAUSE_EVENTS.get(cause, ("replaced", "written"))[0]
            prev_addr = slot.addr
            new = Slot()
            new.wref = weak_ref_of(storage)
        try:
            new.tref = weakref.ref(tensor)
        except TypeError:
            new.tref = dead_ref
        new.ptr = ptr = tensor.data_ptr()
        if ptr < addr:  # an empty view (DeepSeek-V4's drained compressor buffer) has data_ptr 0
            ptr = addr + int(tensor.storage_offset()) * tensor.element_size()
        new.version = version
        new.addr = addr
        new.storage_bytes = nbytes
        new.view_offset = ptr - addr
        shape = tensor.shape
        new.shape = shape
        new.shape_json, count = SHAPE_JSON.get(shape) or shape_facts(shape)
        dtype = tensor.dtype
        if slot is not None and cause == "update" and dtype is slot.dtype_obj:
            # An update keeps a slot's device (moves are offload/prefetch, seen apart), not always its dtype:
            # torch.cat promotes a cache the caller made bfloat16 back to the float32 of the new states.
            if new is not slot:
                new.dtype_obj = dtype
                new.dtype = slot.dtype
                new.device = slot.device
                new.itemsize = slot.itemsize
        else:
            set_dtype(new, dtype, tensor.device)
        new.logical_bytes = count * new.itemsize
        slots[key] = new
        self._seq += 1
        line = EVENT_LINE % (
            self._seq, t_ns, self.step, self._phase_json, kind, layer, kv_json, part_json, addr,
            nbytes, new.view_offset, new.shape_json, new.logical_bytes, new.dtype, new.device, tokens,
            evicted, prev_addr, cache_id, source_json,
            reason_json if evicted or kind in _REASONED or cause == "found" else '""',
        )
        self.lines.append(with_rows(line, rows, shape, say_rows) if rows else line)
        if kind in _EVICTING and self._on_evict is not None:
            self._on_evict(layer, key[0])
        if slot is not None and not same_storage and not released:
            # After the new storage's event, so the log shows both alive (the real transient peak: the new
            # tensor was made while this one held the slot), and before any later slot's event, which may
            # reuse the freed address.
            self._pending.append(
                (slot.wref, layer, kv_json, part_json, slot.addr, slot.storage_bytes, cache_id)
            )
            self._pending_addrs.add(slot.addr)
            self.poll_frees(t_ns)
        return True

    # -- every other observation (scans, crop, reset, custom caches) -------------------------------------
    @_locked
    def observe(
        self,
        cache_id: int,
        layer: int,
        parts: dict[tuple[str, str], Any],
        cause: str,
        tokens: int,
        source: str = "hf",
        reason: str = "",
        evicted: int | None = None,
        evicted_reason: str = "",
        whole_layer: bool = True,
        rows: int = 0,
        written: bool = False,
        frees_last: bool = False,
        say_rows: bool = False,
        hold: Mapping[tuple[str, str], Hashable] | None = None,
    ) -> bool:
        """Compare the current tensors of one layer with the last seen ones; log what changed, and return
        whether anything of the layer did (frees of other storages found meanwhile aside).

        `parts` maps (kv, part) to the attribute's value (a tensor, a tuple of tensors, a quantized object,
        or None). `tokens` is how many tokens the layer holds now, per batch row. `evicted` overrides the
        evicted-token count (window evictions counted by the caller, with `evicted_reason`). Without
        `whole_layer`, `parts` are only some of the layer's slots (one `track()`): the others are left as
        they are, not taken for vanished. `rows`: the batch rows the tokens are held in, when the caller
        knows them (0: every row of the tensors); an event logs them where they are fewer than its tensor's
        (a preallocated buffer, partly used), or with `say_rows` always (said by a forward that does not say
        its tokens: the analyzers then know the rows were said). `written`: the caller knows the tensors
        were written, even if their version says not (an inference tensor's in-place write, which no
        version counter shows). `frees_last`: the tensors were rebound by other code, seen only afterwards,
        which made all the new ones before releasing an old one; its old storages are logged freed after all
        its new ones (an eviction press makes the kept K and V, then rebinds both; a module cache's layer
        keeps its old K and V in locals until it returns, `ModuleCaches.scan`), unless a new storage took
        an old one's address, which proves that one was released first. `hold`: slots whose old storage
        outlived later layers' new storages (module caches kept on a list until the step ends), each mapped
        to a token: its free waits for `release_held(token)`.

        Storages watched since an earlier observation and released by now are logged freed first, before
        this observation's new storages: they were released since that observation, and a hand-written
        loop releases the tensors it held (a local rebound to the next layer's) before it makes the new
        ones, maybe at the very same address, which the log's replay must see free first. Only the slot's
        own old storage is logged freed after its new one, which was made from it or while it was held.
        """
        self.drain()
        state = self._state(cache_id, layer)
        prev_tokens = state.tokens
        state.tokens = tokens
        if evicted is None:
            evicted = max(0, prev_tokens - tokens) if cause in ("scan", "crop") else 0
            evicted_reason = ""
        t_ns = self._clock()
        if self._pending:
            self._poll_locked(t_ns)
        logged = self._seq  # frees of other storages found by that poll aside
        source_json = quoted(source)
        slots = state.slots
        # Released storages of this layer by address: a new tensor at one's address logs its free first
        dead_at: dict[int, tuple[str, str]] = {}
        if any(expired(slot.wref) for slot in slots.values()):
            parts = self._givers_first(slots, parts)
            dead_at = {slot.addr: key for key, slot in slots.items() if expired(slot.wref)}
        seen: set[tuple[str, str]] = set()
        reason_json = quoted(evicted_reason) if evicted_reason else quoted(reason)
        self._frees_held = frees_last
        try:
            for (kv, part), value in parts.items():
                for name, tensor in iter_tensors(value, part):
                    key = (kv, name)
                    first = kv == "k" and part == "data"
                    if frees_last and self._pending:
                        found = storage_of(tensor)
                        if found is not None and any(item[4] == found[1] for item in self._pending):
                            self._poll_locked(t_ns)  # made where a held one was: that one was released first
                    if dead_at:
                        self._giver_freed(slots, dead_at, cache_id, layer, key, tensor, t_ns)
                    token = hold.get(key) if hold else None
                    old = slots.get(key) if token is not None else None
                    if old is not None:
                        self._frees_held = True  # its free, if released by now, waits past later layers
                    if self._see(
                        slots,
                        cache_id,
                        layer,
                        key,
                        tensor,
                        tokens,
                        evicted if first else 0,
                        reason_json,
                        t_ns,
                        cause,
                        source_json,
                        prev_tokens,
                        written=written,
                        rows=rows,
                        say_rows=say_rows,
                    ):
                        seen.add(key)
                    if old is not None:
                        self._frees_held = frees_last
                        self._hold(old.wref, token)
        finally:
            self._frees_held = False
        # Slots of this layer that vanished (reset, a quantized residual flushed to an empty tensor).
        for key in [k for k in slots if k not in seen] if whole_layer else ():
            old = slots.pop(key)
            self._retire(cache_id, layer, key, old)
            if cause in ("reset", "scan", "crop"):
                self._seq += 1
                first = key == K_DATA
                self.lines.append(
                    NO_STORAGE_LINE
                    % (
                        self._seq, t_ns, self.step, self._phase_json,
                        "reset" if cause == "reset" else "evicted", layer, quoted(key[0]), quoted(key[1]),
                        tokens,
                        evicted if first else 0, old.addr, cache_id, source_json,
                        reason_json if cause == "reset" else '""',
                    )
                )
                if cause != "reset" and self._on_evict is not None:
                    self._on_evict(layer, key[0])
        refresh_fast(state)
        changed = self._seq != logged
        self.poll_frees(t_ns)
        return changed

    def _giver_freed(
        self,
        slots: dict[tuple[str, str], Slot],
        dead_at: dict[int, tuple[str, str]],
        cache_id: int,
        layer: int,
        key: tuple[str, str],
        tensor: torch.Tensor,
        t_ns: int,
    ) -> None:
        """Log freed, now, the released storage of another slot of this layer at `tensor`'s address, before
        `tensor`'s event: the replay by address must meet that free first. `_givers_first` orders the parts
        so that this rarely has to happen, but parts can give to each other both ways (DeepSeek-V4's
        `buffer_kv` taking `buffer_gate`'s address while `overlap_kv` takes `buffer_kv`'s). The slot's own
        later release (its next storage's event, or its retirement) then logs no second free."""
        found = storage_of(tensor)
        giver = dead_at.pop(found[1], None) if found is not None else None
        slot = slots.get(giver) if giver is not None and giver != key else None
        if slot is None or found is None or slot.addr != found[1] or not expired(slot.wref):
            return  # its own slot's address (`_see` logs that free), or a giver already logged
        if slot.wref in self._freed_early:
            return  # logged by the writer's drain already
        self._freed_early.add(slot.wref)
        kv_json, part_json = KEY_JSON.get(giver) or key_json(giver)  # type: ignore[arg-type]
        self._seq += 1
        self.lines.append(
            FREED_LINE
            % (
                self._seq, t_ns, self.step, self._phase_json, layer, kv_json, part_json, slot.addr,
                slot.storage_bytes, cache_id,
            )
        )

    def _hold(self, wref: int, token: Hashable) -> None:
        """Move the storage `wref` from `_pending` to those held for `token` (`release_held`)."""
        for index, item in enumerate(self._pending):
            if item[0] == wref:
                self._held.setdefault(token, []).append(self._pending.pop(index))
                self._pending_addrs = {item[4] for item in self._pending}
                return

    @_locked
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

    @staticmethod
    def _givers_first(
        slots: dict[tuple[str, str], Slot], parts: dict[tuple[str, str], Any]
    ) -> dict[tuple[str, str], Any]:
        """`parts` with the slots whose released storage's address another slot's new tensor took moved
        first (V rebound before K: the new K sits where old V was). Their new storage and free are then
        logged before the taker's event, never a free after a creation at its address (the log is replayed
        by address), and in the order the layer made them, so the replay meets its true peak."""
        taken: dict[int, tuple[str, str]] = {}  # address -> the slot whose new tensor is there
        owners: dict[tuple[str, str], tuple[str, str]] = {}  # slot -> the part it is in
        for (kv, part), value in parts.items():
            for name, tensor in iter_tensors(value, part):
                owners[(kv, name)] = (kv, part)
                found = storage_of(tensor)
                if found is not None:
                    taken[found[1]] = (kv, name)
        givers: set[tuple[str, str]] = set()
        for key, slot in slots.items():
            at = taken.get(slot.addr)
            if at is None or at == key or not expired(slot.wref):
                continue
            if at[0] != key[0]:
                givers.update(k for k in parts if k[0] == key[0])
            elif key in owners and owners[key] != owners.get(at):
                # One auxiliary part's new tensor where another's old one was (DeepSeek-V4's compressed
                # entries where its drained buffer was): the giver's part first
                givers.add(owners[key])
        if not givers:
            return parts
        return {**{k: v for k, v in parts.items() if k in givers}, **parts}

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

    def watch_pool(self, storage: Any, layer: int, kv: str, cache: int) -> None:
        """Log `freed` for an engine pool's storage once the allocator releases it (continuous batching frees
        its pool when generate_batch returns). The caller holds `lock`."""
        kv_json, part_json = KEY_JSON.get((kv, "data")) or key_json((kv, "data"))
        wref, addr, nbytes = weak_ref_of(storage), storage.data_ptr(), int(storage.nbytes())
        self._pending.append((wref, layer, kv_json, part_json, addr, nbytes, cache))
        self._pending_addrs.add(addr)

    @_locked
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
                    self._seq, t_ns, self.step, self._phase_json, layer, kv_json, tokens, cache_id, reason,
                    masked_entries,
                )
            )
        if self._on_evict is not None:
            self._on_evict(layer, "k")
            self._on_evict(layer, "v")

    @_locked
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

    @_locked
    def release_dead_at(
        self, cache_id: int, addrs: Mapping[int, int], rank: Callable[[int], int]
    ) -> None:
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

    @_locked
    def retire_cache(self, cache_id: int) -> None:
        """A cache object is gone: its slots' storages are watched until released (`poll_frees`)."""
        self.drain()
        for key in [key for key in self._layers if key[0] == cache_id]:
            state = self._layers.pop(key)
            for slot_key, slot in state.slots.items():
                self._retire(cache_id, key[1], slot_key, slot)

    @_locked
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
                        self._seq, t_ns, self.step, self._phase_json, item[1], item[2], item[3], item[4],
                        item[5], item[6],
                    )
                )
            else:
                still.append(item)
        self._pending = still
        self._pending_addrs = {item[4] for item in still}

    @_locked
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

    def live_slots(self) -> dict[tuple[int, int, str, str], int]:
        """Storage bytes now held per slot (for the manifest's end-of-run summary)."""
        return {
            (cache_id, layer, kv, part): slot.storage_bytes
            for (cache_id, layer), state in self._layers.items()
            for (kv, part), slot in state.slots.items()
        }

    def pending_frees(self) -> int:
        return len(self._pending)
