"""KV storages the process held before the profiler started: a reference model's preallocated buffers, a
cache built before `record()`. No allocation of the trace is theirs, yet they are memory from its first
event: they join the level before it, as KV, until the KV log's `freed` line for them.

Some are let go inside the block (Meta's Llama 3 converted with `model.to(torch.bfloat16)` copies its
float32 `cache_k` / `cache_v` in its first forward). A GPU's trace reports such a free (the caching
allocator reports every block it takes back); a CPU's does not (Kineto warns "profiler results will not
include the deallocation event" for a block allocated before it started), so the free is added, as for the
weights (`readers.weight_changes`): just after the allocation of the storage's replacement (the log's
`replaced` or `grown` line that names it), where the cache lets the old tensor go, or before the first
allocation that reuses its address, else at the log's time. The KV log's join (`analyzers.attribution`)
makes that free KV's, so the KV at each moment holds the storage until it goes.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

import numpy as np

from analyzers.attribution import (
    JOIN_TOLERANCE_US,
    block_holds,
    frees_storage,
    sizes_are_blocks,
    smallest_block,
    trace_lead_us,
)
from analyzers.model import DeviceEvents, normal_device
from analyzers.readers.weight_changes import insert_events

Storage = tuple[int, int, int, int, int, str, int]  # analyzers.kv_log: addr, bytes, first_ns, freed_ns, ...


def _fits(dev: DeviceEvents, allocated: int, storage_bytes: int) -> bool:
    """Whether an allocation of `allocated` bytes can be a storage's (on a GPU, a block that holds it)."""
    return allocated == storage_bytes or (sizes_are_blocks(dev) and block_holds(allocated, storage_bytes))


def kv_held_before_trace(
    dev: DeviceEvents,
    storages: list[Storage],
    events: list[Any],
    found: Set[tuple[int, int]] = frozenset(),
    lead_us: float | None = None,
) -> list[Storage]:
    """The KV storages on `dev` that the log saw no later than its first event (or `found`, by (address,
    first time): first logged where a cache filled before `record()` was first seen, or handed to
    `kvtrace.track()`, which may be well after the trace began, held since before), not freed by then, and
    whose allocation the trace does not hold: no event at their address, or (one the log saw freed) first
    their own free (a GPU's trace), or first the allocation of their address's next occupant, which the KV
    log's join cannot take for theirs. A storage the log never saw freed whose address the trace uses is
    left out: the trace would free, or reuse, memory the level holds. `lead_us`: `trace_lead_us(dev,
    storages)` where the caller has it already (it scans the device's events), else computed here."""
    if not len(dev):
        return []
    device_of = {e.addr: e.device for e in events if e.addr and e.device}
    # The log's sightings and frees on the trace's clock, as the KV log's join reads them: a trace a little
    # ahead (within a step of the tolerance) would otherwise put a storage the log saw soon after its
    # allocation before the trace's first event, and its allocation past the tolerance after the sighting;
    # and a storage the log saw go just after the trace began (the last step's, replaced by the next) gone
    # before it, its bytes missing from the level.
    lead = trace_lead_us(dev, storages) if lead_us is None else lead_us
    first_us = float(dev.ts_us[0])
    candidates = [
        s
        for s in storages
        if (s[2] / 1000.0 + lead <= first_us or (s[0], s[2]) in found)
        and (s[3] < 0 or s[3] / 1000.0 + lead > first_us)  # still held at the first event
        and normal_device(device_of.get(s[0], dev.device)) == dev.device
    ]
    at = dev.events_at({s[0] for s in candidates})
    ts, delta = dev.ts_us, dev.delta_bytes
    held = []
    for storage in candidates:
        addr, nbytes, first_ns, freed_ns = storage[:4]
        indices = at.get(addr, [])
        if not indices:
            held.append(storage)
            continue
        if freed_ns < 0:
            continue
        first = indices[0]
        if delta[first] < 0:
            # Its own free: a GPU reports those. A CPU's reporter does too where an earlier profiling session
            # of the process left a size for the address (ProfiledCPUMemoryReporter keeps the size of each
            # block it saw allocated until it sees it freed), maybe another block's: it is this storage's,
            # which sits at the address until the log's `freed` line, and `add_kv_frees` gives it its size.
            if frees_storage(dev, int(-delta[first]), nbytes) or not sizes_are_blocks(dev):
                held.append(storage)
            continue
        limit = first_ns / 1000.0 + lead + JOIN_TOLERANCE_US
        if not any(delta[i] > 0 and ts[i] <= limit and _fits(dev, int(delta[i]), nbytes) for i in indices):
            held.append(storage)
    return held


def held_bytes(dev: DeviceEvents, held: list[Storage]) -> int:
    """The bytes `held` take on `dev`: on a GPU their blocks (`smallest_block`), as the allocator counts."""
    blocks = sizes_are_blocks(dev)
    return sum(smallest_block(s[1]) if blocks else s[1] for s in held)


def add_kv_frees(dev: DeviceEvents, held: list[Storage], events: list[Any], lead_us: float = 0.0) -> None:
    """Give `dev` the frees of the `held` storages that the KV log saw go and its trace does not show.
    `lead_us`: how far the trace's clock runs ahead of the log's (`attribution.trace_lead_us`); the log's
    times are read that much later, else a free the log saw just after the trace began lands before it."""
    freed = [s for s in held if s[3] >= 0]
    if not freed:
        return
    # A storage's replacement: the `replaced` (or `grown`) line naming it, logged before its `freed` line
    replaced_by: dict[tuple[int, int], Any] = {}
    pending: dict[int, Any] = {}
    for ev in events:
        if ev.event in ("replaced", "grown") and ev.prev_addr and ev.prev_addr != ev.addr:
            pending[ev.prev_addr] = ev
        elif ev.event == "freed" and ev.addr in pending:
            replaced_by[(ev.addr, ev.t_ns)] = pending.pop(ev.addr)
    replacements = [replaced_by.get((s[0], s[3])) for s in freed]
    at = dev.events_at({s[0] for s in freed} | {r.addr for r in replacements if r is not None})
    ts, delta = dev.ts_us, dev.delta_bytes
    blocks = sizes_are_blocks(dev)
    inserts: list[tuple[int, float, int, int]] = []
    for (addr, nbytes, _first_ns, freed_ns, *_rest), replacement in zip(freed, replacements, strict=True):
        indices = at.get(addr, [])
        if indices and delta[indices[0]] < 0:
            # the trace's own free; on a CPU, at the size an earlier profiling session left (see above)
            if not blocks:
                delta[indices[0]] = -nbytes
            continue
        freed_us = freed_ns / 1000.0 + lead_us
        # The log sees a free when it next looks, after it happened: before any reuse of the address
        position = int(np.searchsorted(ts, freed_us, side="right"))
        when = freed_us
        if indices and indices[0] < position:
            position, when = indices[0], float(ts[indices[0]])
        made = _allocation(dev, at, replacement, lead_us) if replacement is not None else None
        if made is not None and made < position:
            position, when = made + 1, float(ts[made])
        inserts.append((position, when, addr, -(smallest_block(nbytes) if blocks else nbytes)))
    if inserts:
        insert_events(dev, inserts)


def _allocation(dev: DeviceEvents, at: dict[int, list[int]], storage: Any, lead_us: float) -> int | None:
    """The allocation of a storage the log saw (a `replaced` or `grown` line): the latest of its size at
    its address by the sighting (on the trace's clock: `lead_us` later), within the join's tolerance."""
    limit = storage.t_ns / 1000.0 + lead_us + JOIN_TOLERANCE_US
    ts, delta = dev.ts_us, dev.delta_bytes
    taken = [
        i
        for i in at.get(storage.addr, [])
        if ts[i] <= limit and delta[i] > 0 and _fits(dev, int(delta[i]), storage.storage_bytes)
    ]
    return taken[-1] if taken else None
