"""Storages that several cache slots are views of: who holds which bytes of them.

One preallocated tensor kv[layers, 2, batch, heads, seq, head_dim] whose per-layer K and V views are tracked
is one storage, logged under the slot that showed it first. Counted once in the totals, it is split by view
in the per-layer figures: each slot holds its view's bytes (`logical_bytes`) where the views cover the
storage, a share in proportion to them where they cover part of it (views cut to the tokens written), so
that the layers add up to the storage (as `engine_report._split_pool_by_layer` splits a vLLM pool by its
layers' views). Views that overlap (more view bytes than the storage) are not split: the first slot keeps it
all, as before this module. The tensor's room (its max_seq, which views cut to the tokens written log as
`capacity_tokens`) is the cache's capacity (`tracked_capacity`), over which a token is priced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from analyzers.units import human_bytes

TRACKED_PARTS = ("tracked", "tracked_bshd")  # the KV log parts of `kvtrace.track` tensors

# (cache, layer, kv): one slot of one cache
Slot = tuple[int, int, str]
# live storage: addr -> (bytes, layer, kv, cache) of the slot that showed it first
Entry = tuple[int, int, str, int]


class SharedStorages:
    """The views seen at each live storage, and the shares of the storages split between several slots."""

    def __init__(self) -> None:
        self.views: dict[int, dict[tuple[Slot, str], int]] = {}  # addr -> {(slot, part): view bytes}
        self.shares: dict[int, dict[Slot, int]] = {}  # addr -> {slot: bytes}, for split storages only

    def see(self, addr: int, entry: Entry, slot: Slot, part: str, view_bytes: int) -> dict[Slot, int]:
        """A view of `slot` at the live storage `addr` (`entry`: its first slot's); returns what each slot's
        share changed by (empty: nothing)."""
        views = self.views.get(addr)
        if views is None:  # a storage's first view: one slot holds it whole, as before (a growing cache's
            # every storage, seen once: `_split` and `_delta` were a quarter of a long log's replay)
            self.views[addr] = {(slot, part): view_bytes}
            return {}
        if views.get((slot, part)) == view_bytes:
            return {}
        views[(slot, part)] = view_bytes
        before = self.shares.get(addr) or _whole(entry)
        after = _split(views, entry)
        if len(after) > 1:
            self.shares[addr] = after
        else:
            self.shares.pop(addr, None)
        return _delta(before, after)

    def release(self, addr: int, entry: Entry) -> dict[Slot, int]:
        """The storage was freed: the shares its slots held."""
        self.views.pop(addr, None)
        return self.shares.pop(addr, None) or _whole(entry)


def held_by_slot(state: dict[int, Entry], shares: dict[int, dict[Slot, int]]) -> Iterator[Entry]:
    """The storages of `state` as (bytes, layer, kv, cache) per slot: a split one's share by share."""
    for addr, entry in state.items():
        split = shares.get(addr)
        if split is None:
            yield entry
            continue
        for (cache, layer, kv), nbytes in split.items():
            yield nbytes, layer, kv, cache


def layer_shares(shares: dict[Slot, int]) -> dict[tuple[int, int], int]:
    """A split storage's shares by (cache, layer), K and V together."""
    by_layer: dict[tuple[int, int], int] = {}
    for (cache, layer, _), nbytes in shares.items():
        by_layer[(cache, layer)] = by_layer.get((cache, layer), 0) + nbytes
    return by_layer


def split_by_view(
    by_slot: dict[tuple[int, int], int],
    storages: list[tuple[int, int, int, int, int, str, int]],
    storage_shares: dict[int, dict[tuple[int, int], int]],
    at_us: float,
) -> dict[tuple[int, int], int]:
    """KV bytes by (cache, layer) at a moment (`at_us`, a storage's `t_ns` / 1000), each split storage live
    then moved from its first slot, where the allocator's events placed it whole, to its views' slots."""
    split = dict(by_slot)
    for index, shares in storage_shares.items():
        _, nbytes, first_ns, last_ns, layer, _, cache = storages[index]
        owner = (cache, layer)
        live = first_ns / 1000.0 <= at_us and (last_ns < 0 or last_ns / 1000.0 > at_us)
        if not live or split.get(owner, 0) < nbytes:
            continue
        split[owner] -= nbytes
        for slot, share in shares.items():
            split[slot] = split.get(slot, 0) + share
    return {slot: nbytes for slot, nbytes in split.items() if nbytes > 0}


@dataclass
class _TrackedViews:
    """What a cache's tracked tensors' events say of the room behind them."""

    whole_bytes: int  # a storage that several slots' last views together make up (0: none)
    in_place: bool  # a slot written in place at its length (not a view tracked again longer)
    room: int  # the most positions a row a slot's last view has room for beyond its length (0: none said)
    rows: int  # the most rows the tensor a slot's last view is cut from has beyond its own (0: none said)


def _tracked_views(events: Iterable[Any]) -> _TrackedViews:
    """`events`: a cache's KV data events; those of tracked tensors decide, each slot's last one."""
    views: dict[int, dict[Slot, int]] = {}
    storage: dict[int, int] = {}
    written: set[Slot] = set()
    cut: set[Slot] = set()
    room: dict[Slot, int] = {}
    rows: dict[Slot, int] = {}
    for ev in events:
        if ev.part not in TRACKED_PARTS:
            continue
        slot = (ev.cache, ev.layer, ev.kv)
        slots = views.setdefault(ev.addr, {})
        if ev.event == "written":
            written.add(slot)
            if slots.get(slot, ev.logical_bytes) != ev.logical_bytes:
                cut.add(slot)
        slots[slot] = ev.logical_bytes
        storage[ev.addr] = ev.storage_bytes
        room[slot] = ev.capacity_tokens
        rows[slot] = ev.capacity_rows
    whole = [addr for addr, slots in views.items() if len(slots) > 1 and sum(slots.values()) == storage[addr]]
    whole_bytes = storage[whole[0]] if whole else 0
    return _TrackedViews(
        whole_bytes, bool(written - cut), max(room.values(), default=0), max(rows.values(), default=0)
    )


def tracked_rows(events: Iterable[Any], rows: int) -> int:
    """Batch rows a cache of tracked tensors has room for: the rows of the tensor its views are cut from
    (`capacity_rows`: views cut to the rows in use of one [layers, 2, max_batch, ...] tensor say its
    max_batch), else the rows its views span (a view of every row, fed fewer: `rows`, those in use, are
    fewer), each slot's last view; at least `rows`."""
    last: dict[Slot, int] = {}
    for ev in events:
        if ev.part in TRACKED_PARTS:
            last[(ev.cache, ev.layer, ev.kv)] = max(ev.capacity_rows, ev.shape[0] if ev.shape else 0)
    return max(rows, *last.values())


def tracked_capacity(events: Iterable[Any], tokens: int) -> int:
    """Positions a row that a cache of tracked tensors has room for, where they are preallocated: the room
    its views logged beyond their length (`capacity_tokens`: views cut to the tokens written of one
    [layers, 2, batch, ..., max_seq, ...] tensor say its max_seq), else their length `tokens` where that is
    the room (views that together make up a whole storage, or tensors written in place at their length, as
    `tracked_length_note` says); 0 for tracked tensors that grow with what they hold (torch.cat)."""
    found = _tracked_views(events)
    if found.room:
        return found.room
    # views cut to the rows in use of a tensor with more: preallocated, their length its whole seq dim
    return tokens if tokens and (found.whole_bytes or found.in_place or found.rows) else 0


def tracked_length_note(events: Iterable[Any], tokens: int | None) -> str | None:
    """A tracked tensor's tokens are its length along its seq dim (`kvtrace.track`): the tokens it holds for
    a tensor that grows with them (torch.cat), the room preallocated for one that does not: views that
    together make up a whole storage (one kv[layers, 2, ...] tensor), or a tensor written in place at its
    length. A view tracked again longer over the same storage (kv[l, 0, :, :, :pos], as the README advises)
    is also logged `written`, but its length is the tokens written: such a slot is no room preallocated, nor
    is a view whose event says its room is longer (`capacity_tokens`). `events`: the main cache's KV data
    events; their last view per slot decides."""
    found = _tracked_views(events)
    if not tokens or found.room or not (found.whole_bytes or found.in_place):
        return None
    why = (
        f"views that together make up one {human_bytes(found.whole_bytes)} tensor"
        if found.whole_bytes
        else "written in place"
    )
    return (
        f"tokens per row ({tokens}) are the tracked tensors' length along their seq dim, {why}: the room "
        "preallocated, not the tokens written (bytes per token divide by it); for the tokens held, track "
        "views cut to them (kv[layer, 0, :, :, :pos]) again after each forward"
    )


def _whole(entry: Entry) -> dict[Slot, int]:
    nbytes, layer, kv, cache = entry
    return {(cache, layer, kv): nbytes}


def _split(views: dict[tuple[Slot, str], int], entry: Entry) -> dict[Slot, int]:
    by_slot: dict[Slot, int] = {}
    for (slot, _), nbytes in views.items():
        by_slot[slot] = by_slot.get(slot, 0) + nbytes
    storage, layer, kv, cache = entry
    covered = sum(by_slot.values())
    if len(by_slot) < 2 or covered > storage:
        return _whole(entry)
    # Views cut to the tokens written (kv[l, 0, :, :, :pos]) cover part of the storage: each slot's room is
    # in proportion to its view, the rounding's bytes the first slot's
    shares = {slot: storage * nbytes // covered for slot, nbytes in by_slot.items()}
    first = (cache, layer, kv)
    shares[first] = shares.get(first, 0) + storage - sum(shares.values())
    return shares


def _delta(before: dict[Slot, int], after: dict[Slot, int]) -> dict[Slot, int]:
    changes = {slot: after.get(slot, 0) - before.get(slot, 0) for slot in before.keys() | after.keys()}
    return {slot: change for slot, change in changes.items() if change}
