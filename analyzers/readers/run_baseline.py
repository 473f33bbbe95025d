"""What a device held before its trace's first event: the weights and KV loaded before the profiler
started, and what else the trace frees without having seen it allocated.

Why apart from `analyzers.readers.run_dir`: a device's level before its first event is told differently
by each allocator (the CPU's counts from the profiler's start, a GPU's caching allocator from the
process's), and decides every figure after it.
"""

from __future__ import annotations

import numpy as np

from analyzers.attribution import frees_storage
from analyzers.model import KV, WEIGHTS, DeviceEvents


def held_before_trace(
    dev: DeviceEvents, weights: int, kv_held: int, listed: dict[int, int] | None = None
) -> None:
    """Put the weights (and KV) held before the profiler started into the level before the first event.

    A device's allocator total (`Total Allocated`) counts from where its allocator does: the CPU's, from the
    profiler's start (what was held before is not in it: added here), a GPU's caching allocator from the
    process's start (the weights are in it already: only which of its bytes they are is said here; adding
    them would count them twice)."""
    implied = _allocated_before_first(dev)
    if implied is not None and not dev.device.startswith("cpu"):
        counted_weights = min(weights, implied)
        counted_kv = min(kv_held, implied - counted_weights)
        if counted_weights or counted_kv:
            dev.baseline_categories = {KV: counted_kv, WEIGHTS: counted_weights}
        return
    if listed and len(dev):
        # A trace may show the frees of weights allocated before it began (a GPU's; the CPU's reporter too,
        # for an address whose size an earlier profiling session left it), and the KV held then, whose frees
        # a CPU trace lacks were added: the level before the first event must cover them, and it is their
        # own, not more besides. What else the trace frees without having seen it allocated is the level
        # beyond them.
        dev.baseline_bytes = _unseen_beyond(dev, listed)
    dev.baseline_bytes += weights + kv_held
    if listed is not None:
        # The weights and KV as listed; what else the trace freed unseen was held besides them (other)
        dev.baseline_categories = {KV: kv_held, WEIGHTS: weights}
    elif kv_held:
        # the weights as device_timeline would give them otherwise: the level beyond the trace's own total
        beyond_total = dev.baseline_bytes - kv_held - (implied or 0)
        dev.baseline_categories = {KV: kv_held, WEIGHTS: max(beyond_total, 0)}


def _allocated_before_first(dev: DeviceEvents) -> int | None:
    """What the device's allocator counted before the first event (its `Total Allocated` less the event),
    None where the trace gives no total for every event."""
    if dev.total_allocated is not None and len(dev.total_allocated) == len(dev) and len(dev):
        return max(int(dev.total_allocated[0]) - int(dev.delta_bytes[0]), 0)
    return None


def weights_from_table(dev: DeviceEvents, traced: bool) -> bool:
    """Whether the device's figures take the weights from weights.jsonl (as `held_before_trace` does): a
    CPU, or any device without a trace's allocator totals. A GPU's totals count them already."""
    return not traced or dev.device.startswith("cpu") or _allocated_before_first(dev) is None


def _unseen_beyond(dev: DeviceEvents, listed: dict[int, int]) -> int:
    """The bytes the trace frees without having seen them allocated, beyond the listed storages (address:
    bytes) whose free is the first event at their address: each such free's own bytes, a block held since
    before the trace (a notebook's earlier cell's output), all of which the level before the first event
    holds until its free; not the trace's deepest dip below its start, which a free after the trace's own
    allocations undercounts, leaving the final level below what is held. Where the trace gives no
    addresses, that dip."""
    delta = dev.delta_bytes.astype(np.int64)
    if not len(delta):
        return 0
    addrs = dev.addr.astype(np.int64) if dev.addr is not None and len(dev.addr) == len(delta) else None
    if addrs is None or not (addrs > 0).all():
        first_at = {addr: indices[0] for addr, indices in dev.events_at(listed).items()}
        own = [i for addr, i in first_at.items() if frees_storage(dev, int(-delta[i]), listed[addr])]
        if own:
            delta = delta.copy()
            delta[own] = 0
        return max(0, -int(np.cumsum(delta).min()))
    _, first = np.unique(addrs, return_index=True)  # each address's first event
    orphans = first[delta[first] < 0]
    own = [_own_free(dev, listed, int(addrs[i]), int(delta[i])) for i in orphans]
    return sum(-int(delta[i]) for i, mine in zip(orphans, own, strict=True) if not mine)


def _own_free(dev: DeviceEvents, listed: dict[int, int], addr: int, delta: int) -> bool:
    """Whether a trace's first event at `addr`, a free of -`delta` bytes, is a listed storage's own."""
    nbytes = listed.get(addr)
    return nbytes is not None and frees_storage(dev, -delta, nbytes)
