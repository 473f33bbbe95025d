"""What each KV eviction claimed to save, and what it really released.

An eviction library builds smaller K/V tensors and rebinds them into the cache; the user believes the
difference is free memory. It is only when the old storage is actually released: with grad enabled the
autograd graph keeps it, a slice back to a view keeps all of it, and masking (AdaKV) removes nothing.
Claimed bytes come from the log's logical sizes; released bytes from the old storage's `freed` event in
the same step (the recorder logs `freed` when the storage itself is released, as the allocator sees).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from analyzers.kv_events import event_rows
from kvtrace.format import KvEvent

REASONS = {
    "view": "the cache keeps a view of the old storage: tokens are gone from the view, the memory is not",
    "grad_enabled": "grad is enabled: the autograd graph keeps the old storage alive",
    "referenced": "the old storage is still referenced elsewhere (a caller, a hook or an output)",
    "masked": "masking without removal: tokens are hidden from attention but stay in memory",
}


@dataclass
class Eviction:
    """One eviction of one layer's K or V storage."""

    step: int
    layer: int
    kv: str
    evicted_tokens: int  # per batch row
    kept_tokens: int
    rows: int
    claimed_bytes: int  # logical bytes removed
    freed_bytes: int  # storage bytes released in the same step
    new_storage_bytes: int
    reason: str = ""  # a key of REASONS when nothing was freed
    cache: int = 0  # the cache object: a draft cache's layer 0 is not the model's

    @property
    def net_saved_bytes(self) -> int:
        return self.freed_bytes - self.new_storage_bytes


@dataclass
class EvictionSummary:
    evictions: list[Eviction] = field(default_factory=list)

    @property
    def claimed_bytes(self) -> int:
        return sum(e.claimed_bytes for e in self.evictions)

    @property
    def freed_bytes(self) -> int:
        return sum(e.freed_bytes for e in self.evictions)

    @property
    def new_storage_bytes(self) -> int:
        return sum(e.new_storage_bytes for e in self.evictions)

    @property
    def freed_nothing(self) -> list[Eviction]:
        return [e for e in self.evictions if e.freed_bytes == 0]

    def per_layer(self) -> dict[int, dict[str, int]]:
        """Per layer index, over every cache."""
        table: dict[int, dict[str, int]] = {}
        for (_, layer), row in self.per_cache_layer().items():
            into = table.setdefault(layer, {"evicted_tokens": 0, "claimed_bytes": 0, "freed_bytes": 0})
            for key, value in row.items():
                into[key] += value
        return dict(sorted(table.items()))

    def per_cache_layer(self) -> dict[tuple[int, int], dict[str, int]]:
        """Per (cache, layer)."""
        table: dict[tuple[int, int], dict[str, int]] = defaultdict(
            lambda: {"evicted_tokens": 0, "claimed_bytes": 0, "freed_bytes": 0}
        )
        for e in self.evictions:
            row = table[(e.cache, e.layer)]
            if e.kv == "k":
                row["evicted_tokens"] += e.evicted_tokens * e.rows
            row["claimed_bytes"] += e.claimed_bytes
            row["freed_bytes"] += e.freed_bytes
        return dict(sorted(table.items()))


def analyze_evictions(events: list[KvEvent]) -> EvictionSummary:
    # slot -> (logical bytes, tokens, addr, shape)
    logical: dict[tuple[int, int, str], tuple[int, int, int, list[int]]] = {}
    storage_bytes: dict[int, int] = {}
    # addr -> [(seq, step)] of its frees during the run (teardown frees, phase "end", are not savings)
    freed_at: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for ev in events:
        if ev.event == "freed" and ev.phase != "end":
            freed_at[ev.addr].append((ev.seq, ev.step))
    summary = EvictionSummary()
    for ev in events:
        if ev.event == "freed" or ev.part != "data":
            continue
        slot = (ev.cache, ev.layer, ev.kv)
        before = logical.get(slot)
        if ev.event in ("evicted", "masked") and before is not None:
            old_logical, old_tokens, old_addr, old_shape = before
            if ev.event == "masked":
                summary.evictions.append(_masked(ev, old_logical, old_tokens, old_shape))
                continue
            rows = event_rows(ev) or 1
            claimed = max(0, old_logical - ev.logical_bytes)
            freed = 0
            if ev.addr != old_addr:
                # The first free of the old address after this event (addresses are reused later).
                later = [(seq, step) for seq, step in freed_at.get(old_addr, []) if seq > ev.seq]
                if later and later[0][1] == ev.step:
                    freed = storage_bytes.get(old_addr, 0)
            reason = ""
            if freed == 0:
                if ev.addr == old_addr:
                    reason = "view"
                elif ev.reason == "grad_enabled":
                    reason = "grad_enabled"
                else:
                    reason = "referenced"
            summary.evictions.append(
                Eviction(
                    step=ev.step,
                    layer=ev.layer,
                    kv=ev.kv,
                    evicted_tokens=max(0, old_tokens - ev.tokens),
                    kept_tokens=ev.tokens,
                    rows=rows,
                    claimed_bytes=claimed,
                    freed_bytes=freed,
                    new_storage_bytes=ev.storage_bytes if ev.addr != old_addr else 0,
                    reason=reason,
                    cache=ev.cache,
                )
            )
        if ev.event == "masked":
            continue
        if ev.addr:
            storage_bytes[ev.addr] = ev.storage_bytes
        logical[slot] = (ev.logical_bytes, ev.tokens, ev.addr, ev.shape)
    return summary


def _masked(ev: KvEvent, held_logical: int, held_tokens: int, held_shape: list[int]) -> Eviction:
    """A mask (kvpress AdaKV) hides (row, head, token) entries of the tensor the layer holds: it claims
    what those entries take (head_dim x element size each, in K and in V alike) and releases nothing."""
    entries_held = 1
    for size in held_shape[:-1]:  # every dimension but head_dim, in either layout
        entries_held *= size
    per_entry = held_logical // entries_held if held_shape and entries_held else 0
    return Eviction(
        step=ev.step,
        layer=ev.layer,
        kv=ev.kv,
        evicted_tokens=0,  # hidden, not removed: the layer still holds them
        kept_tokens=held_tokens,
        rows=held_shape[0] if held_shape else 1,
        claimed_bytes=ev.masked_entries * per_entry,
        freed_bytes=0,
        new_storage_bytes=0,
        reason="masked",
        cache=ev.cache,
    )
