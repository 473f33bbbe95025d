"""One tensor against its slot's last-seen state (`KvTracker._see`): what changed, logged as one event.

Why apart: every update that the captured fast path does not take (a layer's first update, one holding
other parts) and every tensor an observation hands over end here, where a cause becomes an event (`grown`,
`written`, `evicted`, ...) and the storage a slot held is logged freed first, if released before a new one
was made at its address, or else watched until the allocator releases it (`kvtrace.kv_frees`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvtrace.kv_lines import EVENT_LINE, FREED_LINE, KEY_JSON, SHAPE_JSON, key_json, shape_facts
from kvtrace.kv_slots import (
    TRACKED_SEQ_DIMS,
    Slot,
    dead_ref,
    expired,
    free_weak_ref,
    set_dtype,
    shape_of,
    storage_of,
    weak_ref_of,
    with_room,
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


class KvCompare:
    """Comparing one tensor with its slot (a mixin of `KvTracker`, whose state it shares)."""

    lines: list[str]
    step: int
    _phase_json: str
    _seq: int
    _on_evict: Callable[[int, str], None] | None
    _pending: list[tuple[int, int, str, str, int, int, int]]
    _pending_addrs: set[int]
    _freed_early: set[int]

    if TYPE_CHECKING:

        def poll_frees(self, t_ns: int = 0) -> None: ...

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
            if (
                version == slot.version
                and (version != -1 or cause != "update")
                and not written
                and not (cause == "crop" and tokens < prev_tokens)  # a StaticCache's crop: a count moved back
            ):
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
                    self._seq,
                    t_ns,
                    self.step,
                    self._phase_json,
                    kind,
                    layer,
                    kv_json,
                    part_json,
                    slot.addr,
                    slot.storage_bytes,
                    slot.view_offset,
                    shape_of(slot),
                    slot.logical_bytes,
                    slot.dtype,
                    slot.device,
                    tokens,
                    evicted,
                    slot.addr,
                    cache_id,
                    source_json,
                    reason_json if evicted or kind in _REASONED else '""',
                )
                if key[1] in TRACKED_SEQ_DIMS:
                    line = with_room(line, tensor, key[1])
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
                            self._seq,
                            t_ns,
                            self.step,
                            self._phase_json,
                            layer,
                            kv_json,
                            part_json,
                            addr,
                            slot.storage_bytes,
                            cache_id,
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
            self._seq,
            t_ns,
            self.step,
            self._phase_json,
            kind,
            layer,
            kv_json,
            part_json,
            addr,
            nbytes,
            new.view_offset,
            new.shape_json,
            new.logical_bytes,
            new.dtype,
            new.device,
            tokens,
            evicted,
            prev_addr,
            cache_id,
            source_json,
            reason_json if evicted or kind in _REASONED or cause == "found" else '""',
        )
        if key[1] in TRACKED_SEQ_DIMS:  # a view cut from a preallocated tensor: the room behind it
            line = with_room(line, tensor, key[1])
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
