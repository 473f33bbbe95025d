"""Test helpers that rebuild figures from a raw KV event log, independently of kvtrace's analyzers.

A storage is identified by its slot (cache, layer, k/v, part) and its address: addresses are reused once a
storage is freed, and a `freed` event names the address of an *older* storage of the slot, not the one the
slot holds now.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvtrace.format import KvEvent

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1, "uint8": 1}
TEARDOWN_PHASE = "end"  # events the recorder logs after the block, when it lets go of the caches

StorageKey = tuple[int, int, str, str, int]  # cache, layer, kv, part, addr


def storage_key(event: KvEvent) -> StorageKey:
    return (event.cache, event.layer, event.kv, event.part, event.addr)


def kv_bytes(kv_heads: int, head_dim: int, tokens: int, rows: int, dtype_bytes: int) -> int:
    """Bytes of one K (or V) tensor of shape [rows, kv_heads, tokens, head_dim]."""
    return kv_heads * head_dim * tokens * rows * dtype_bytes


def assert_well_ordered(events: Sequence[KvEvent]) -> None:
    """seq strictly increasing, time never going back, steps never going back, every free known."""
    assert events, "no KV events"
    for before, after in itertools.pairwise(events):
        assert after.seq > before.seq, f"seq not increasing: {before.seq} then {after.seq}"
        assert after.t_ns >= before.t_ns, f"t_ns went back between seq {before.seq} and {after.seq}"
        assert after.step >= before.step, f"step went back between seq {before.seq} and {after.seq}"
    live: set[StorageKey] = set()
    for event in events:
        if event.event == "freed":
            assert storage_key(event) in live, f"freed storage never created (or freed twice): {event}"
            live.discard(storage_key(event))
        elif event.addr:
            live.add(storage_key(event))


def assert_addresses_freed_before_reuse(events: Sequence[KvEvent]) -> None:
    """The allocator's own rule, in log order: a new storage (created, grown, replaced) never appears at an
    address that another storage holds until its `freed` (the analyzers replay the log by address). Not
    for engine pools, whose per-layer views all name the pool's one storage."""
    live: dict[int, StorageKey] = {}
    for event in sorted(events, key=lambda e: e.seq):
        if event.event == "freed":
            assert live.pop(event.addr, None) == storage_key(event), f"freed but not live: {event}"
        elif event.addr:
            holder = live.get(event.addr)
            if event.event in ("created", "grown", "replaced"):
                assert holder is None, (
                    f"seq {event.seq}: new storage at {event.addr}, still live from {holder}"
                )
            live.setdefault(event.addr, storage_key(event))


@dataclass
class LiveReplay:
    """Live KV storage bytes per layer after each step, and the final state after the recorder let go."""

    per_step: dict[int, dict[int, int]] = field(default_factory=dict)
    final: dict[int, int] = field(default_factory=dict)


def replay_live_bytes(events: Iterable[KvEvent], last_step: int = 0) -> LiveReplay:
    """Sum, per layer, the storage bytes of storages that appeared and have not been freed yet.

    Steps without events (up to `last_step`, or the last step seen) carry the state of the step before."""
    live: dict[StorageKey, int] = {}
    replay = LiveReplay()

    def by_layer() -> dict[int, int]:
        totals: dict[int, int] = {}
        for (_, layer, _, _, _), nbytes in live.items():
            totals[layer] = totals.get(layer, 0) + nbytes
        return totals

    for event in sorted(events, key=lambda e: e.seq):
        if event.event == "freed":
            live.pop(storage_key(event))
        elif event.addr:
            live[storage_key(event)] = event.storage_bytes
        if event.phase != TEARDOWN_PHASE:
            # Overwritten until the step's last event: what remains is the state at the end of the step.
            replay.per_step[event.step] = by_layer()
    replay.final = by_layer()
    state: dict[int, int] = {}
    for step in range(1, max([last_step, *replay.per_step]) + 1):
        state = replay.per_step.setdefault(step, state)
    return replay


@dataclass
class StorageLife:
    """One KV storage from its first event to its free, in kvtrace's clock (Unix ns)."""

    key: StorageKey
    storage_bytes: int
    first_ns: int
    last_use_ns: int
    freed_ns: int | None = None
    freed_phase: str = ""

    @property
    def addr(self) -> int:
        return self.key[4]


def storage_lives(events: Iterable[KvEvent]) -> list[StorageLife]:
    open_lives: dict[StorageKey, StorageLife] = {}
    done: list[StorageLife] = []
    for event in sorted(events, key=lambda e: e.seq):
        if not event.addr:
            continue
        key = storage_key(event)
        if event.event == "freed":
            life = open_lives.pop(key)
            life.freed_ns = event.t_ns
            life.freed_phase = event.phase
            done.append(life)
        elif key in open_lives:
            open_lives[key].last_use_ns = event.t_ns
        else:
            open_lives[key] = StorageLife(key, event.storage_bytes, event.t_ns, event.t_ns)
    return done + list(open_lives.values())


def dynamic_kv_peak(
    kv_heads: int, head_dim: int, layers: int, rows: int, prompt: int, new_tokens: int
) -> int:
    """A dynamic cache's live KV bytes (float32) at their highest, from the arithmetic alone: prefill writes
    `prompt` tokens per layer's K and V; each decode step replaces K then V of every layer by a copy one
    token longer (the new storage first, the old one freed right after)."""
    per_token = kv_bytes(kv_heads, head_dim, 1, rows, 4)  # one K or V
    live = peak = 0
    for step in range(1, new_tokens + 1):
        tokens = prompt + step - 1
        for _ in range(layers * 2):
            live += per_token * tokens
            peak = max(peak, live)
            if step > 1:
                live -= per_token * (tokens - 1)
    return peak
