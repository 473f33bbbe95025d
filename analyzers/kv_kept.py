"""K/V storages a cache replaced that something outside it still holds: a list of past keys and values, a
kept output.

A DynamicCache's torch.cat makes new K and V each step and drops the old; the recorder logs `freed` when the
allocator releases a storage. One that left every slot of the log (its slot moved to another storage) and is
never freed is held by something the log does not see: a loop of one's own that keeps `(layer.keys,
layer.values)` of every step "for debugging" holds every step's copies, and the KV log counts them, exactly,
as KV. Grad-enabled forwards keep them too (the autograd graph): `analyzers.planning.grad_steps` says that.
Pure, torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from analyzers.units import human_bytes
from kvtrace.format import KvEvent

__all__ = ["KeptStorages", "kept_bytes_per_token_note", "kept_note", "kept_storages"]

# Events that say nothing of which storage a slot holds: a free, or no storage at all (a mask, a reset)
_NO_SLOT_CHANGE = ("freed", "masked")


@dataclass(frozen=True)
class KeptStorages:
    """Storages live at a moment that no slot of the log holds any more."""

    count: int
    bytes: int
    by_cache: dict[int, int]  # cache -> those bytes of its storages


def kept_storages(events: Iterable[KvEvent], until_ns: int | None = None) -> KeptStorages:
    """Replays the log (up to `until_ns`, the moment's clock, where given): a storage is live from its first
    event to its `freed`, and held while a slot (cache, layer, K or V, part) is on it; those live and held
    by none at the end are kept from outside. A storage shared by several slots' views (one tensor of every
    layer) is held while any of them is on it."""
    slot_addr: dict[tuple[int, int, str, str], int] = {}
    holders: dict[int, set[tuple[int, int, str, str]]] = {}
    live: dict[int, tuple[int, int]] = {}  # addr -> (storage bytes, cache)
    for ev in events:
        if until_ns is not None and ev.t_ns > until_ns:
            break
        if ev.event == "freed":
            live.pop(ev.addr, None)
            holders.pop(ev.addr, None)
            continue
        if ev.event in _NO_SLOT_CHANGE or not ev.addr or not ev.storage_bytes:
            continue
        slot = (ev.cache, ev.layer, ev.kv, ev.part)
        before = slot_addr.get(slot)
        if before is not None and before != ev.addr:
            holders.get(before, set()).discard(slot)
        slot_addr[slot] = ev.addr
        holders.setdefault(ev.addr, set()).add(slot)
        live.setdefault(ev.addr, (ev.storage_bytes, ev.cache))
    kept = [(nbytes, cache) for addr, (nbytes, cache) in live.items() if not holders.get(addr)]
    by_cache: dict[int, int] = {}
    for nbytes, cache in kept:
        by_cache[cache] = by_cache.get(cache, 0) + nbytes
    return KeptStorages(len(kept), sum(nbytes for nbytes, _ in kept), by_cache)


def kept_note(kept: KeptStorages, final_bytes: int) -> str | None:
    """The report's note on the storages kept at the run's end; None where there are none."""
    if not kept.count:
        return None
    held = human_bytes(kept.bytes)
    return (
        f"{kept.count:,} K/V storage{'s' if kept.count != 1 else ''} the cache replaced "
        f"{'were' if kept.count != 1 else 'was'} never freed ({held} of the final KV's "
        f"{human_bytes(final_bytes)}): something outside the cache still holds them (a list of past keys "
        f"or values, a kept output); dropping them frees {held}"
    )


def kept_bytes_per_token_note(kept_bytes: int, measured: float, token_rows: int) -> str:
    """Why the measured bytes per token exceeds the arithmetic: the main cache's kept storages are counted
    in its bytes, over its tokens held."""
    without = measured - kept_bytes / token_rows
    return (
        f"the measured figure counts {human_bytes(kept_bytes)} of replaced K/V storages that something "
        f"outside the cache still holds: without them it is {without:,.1f}"
    )
