"""Gives every allocation a category: KV cache (with layer and K/V), weights, or other.

Four methods, and each event says which one decided it (`DeviceEvents.method`):
- **profiler_category**: the file itself says what some events are (`DeviceEvents.stated_category`:
  torch.profiler's memory timeline knows its parameters). The methods below may refine it.
- **kv_log**: kvtrace's own log names every KV storage (address, size, lifetime). An allocation is KV when
  the latest allocation of that address and size at or before the storage's first sighting is it. Addresses
  are reused, so the join respects lifetimes; its free is the next free of that address. On a GPU the size
  is the allocator's block that holds the storage (`block_holds`), and the whole block counts as KV. The
  time of each storage's free on its own device goes to `source.meta[KV_FREES]`, where the KV line
  (`analyzers.kv_line`) drops.
- **weights_table**: a run's weights table says which storages its model took or let go during the run
  (`model.to(torch.bfloat16)` inside the block): their allocations and frees, found by address and time.
- **stack_rule**: for traces and snapshots from anyone, the allocation's stack frames are matched against
  `RULES` (first match wins). Add your own with `attribute(..., rules=RULES + [...])`. Where a KV log is
  joined, its KV rules stand aside: the log names every KV storage, and what else a cache's `update()`
  allocates (an fp8 cache's dequantized copies, a sliding window's `roll`) is its transient work, other
  as in a run recorded without stacks, so that stacks never change the figures by category.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Any

import numpy as np

from analyzers.addr_events import AddrEvents
from analyzers.model import (
    KV,
    METHOD_KV_LOG,
    METHOD_NONE,
    METHOD_PROFILER,
    METHOD_STACK_RULE,
    METHOD_WEIGHTS_TABLE,
    OTHER,
    WEIGHTS,
    DeviceEvents,
    MemorySource,
    normal_device,
)
from analyzers.readers.sources import STAGE_STEP, ProgressFn
from analyzers.stack_rules import RULES as RULES
from analyzers.stack_rules import Rule as Rule
from analyzers.stack_rules import frame_rule_matches

# How far (µs) an allocation may follow the KV log's first sighting of its storage: the two clocks agree
# to ~0.15 ms (FIELD_NOTES), and the log observes a storage only after the op that made it.
JOIN_TOLERANCE_US = 2000.0
# How far before the tightest fit to the log's sightings a trace's allocations are put when its clock is
# found off. At the tightest fit, a storage sighted even sooner after its allocation than the one that
# fixed it would take a same-sized block freed just before at its address (the prefill's projection or
# RoPE output, then the cache's storage). Half a millisecond earlier, an allocation would be taken for a
# storage only if it came that soon after the sighting at the same address and size: the next occupant of
# a KV storage's address comes a step or more later.
SIGHTING_MARGIN_US = 500.0
# How far (µs) either way the join looks for the trace's lead over the KV log's clock (`_lead_of`): as far
# as `readers.trace_clock` leaves a trace's clock unmoved, a shift of up to the tolerance past the margin
LEAD_REACH_US = JOIN_TOLERANCE_US + SIGHTING_MARGIN_US
# `source.meta` key: the trace's lead (µs) over the KV log's clock that kvtrace's step ranges measured, after
# `readers.trace_clock` moved the trace by it (its fraction of a µs) or left it (within SIGHTING_MARGIN_US).
# Where set, the join reads each sighting at most that much later (`_lead_of`)
RANGES_LEAD = "trace_ranges_lead_us"
# `source.meta` key: float64 per KV log storage (`KvLogAnalysis.storages`), the µs of the trace's free of it
# on its own device (NaN: none in the trace)
KV_FREES = "kv_free_us"

# A GPU's caching allocator reports to the profiler the block it hands out (`reportMemoryUsageToProfiler(
# block->ptr, block->size, ...)` in c10/cuda/CUDACachingAllocator.cpp's `malloc`; XPU's allocator is the
# same design), while the KV log has the storage's `nbytes()`, the bytes asked for. `malloc` rounds a
# request up to a multiple of MIN_BLOCK_BYTES (`round_size`, `kMinBlockSize`); a block found free is split
# down to that only when more than UNSPLIT_BYTES would be left over in the large pool (`should_split`:
# `remaining > kSmallSize`; the small pool always splits), so a large request may get up to 1 MiB more.
# With `max_split_size_mb` set (it must exceed kLargeBuffer, 20 MiB), a request past it may take an
# unsplit cached block of less than OVERSIZE_SLACK_BYTES more (`get_free_block`).
MIN_BLOCK_BYTES = 512
UNSPLIT_BYTES = 1 << 20
OVERSIZE_SLACK_BYTES = 20 << 20


def smallest_block(storage_bytes: int) -> int:
    """The smallest block a GPU caching allocator hands out for a storage of `storage_bytes` (`round_size`):
    the one it has in the trace unless a larger one was handed out whole (see MIN_BLOCK_BYTES)."""
    return max(MIN_BLOCK_BYTES, -(-storage_bytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES)


def block_holds(block_bytes: int, storage_bytes: int) -> bool:
    """Whether a GPU caching allocator's block of `block_bytes` can be the one it handed out for a storage
    of `storage_bytes` (see MIN_BLOCK_BYTES). `roundup_power2_divisions` can round a storage of more than
    a few MiB further than this: such a storage's block stays unmatched (other)."""
    rounded = smallest_block(storage_bytes)
    slack = OVERSIZE_SLACK_BYTES - MIN_BLOCK_BYTES if rounded > OVERSIZE_SLACK_BYTES else UNSPLIT_BYTES
    return storage_bytes <= block_bytes <= rounded + slack


def frees_storage(dev: DeviceEvents, freed_bytes: int, storage_bytes: int) -> bool:
    """Whether a free of `freed_bytes` (positive; 0 or less: no free) can be that of a storage of
    `storage_bytes`: its size, or on a GPU the block that held it. A free of another size at a storage's
    address is another block's (one allocated before the profiler started, whose allocation it never saw)."""
    if freed_bytes <= 0:
        return False
    return freed_bytes == storage_bytes or (sizes_are_blocks(dev) and block_holds(freed_bytes, storage_bytes))


def sizes_are_blocks(dev: DeviceEvents) -> bool:
    """Whether `dev`'s allocation sizes are a GPU caching allocator's blocks, not the bytes asked for: a
    profiler trace's on a GPU. A CPU allocator reports the request, and so do a snapshot's trace entries."""
    return dev.size_basis == "allocator" and dev.device != "cpu" and not dev.device.startswith("cpu:")


def _frame_categories(frames: list[str], rules: list[Rule]) -> tuple[np.ndarray, np.ndarray]:
    """`frame_rule_matches` as arrays."""
    categories, kinds = frame_rule_matches(frames, rules)
    return np.array(categories, dtype=np.int8), np.array(kinds, dtype=np.int8)


def _pair_frees(dev: DeviceEvents, alloc_index: np.ndarray, frees: AddrEvents | None = None) -> np.ndarray:
    """For each allocation index, the index of the next free of the same address (-1 if none). `frees`:
    the frees at (at least) the allocations' addresses, where the caller has them (the KV log's join)."""
    result = np.full(alloc_index.shape[0], -1, dtype=np.int64)
    if alloc_index.size == 0:
        return result
    alloc_addrs = dev.addr[alloc_index]
    if frees is None:
        at_allocs = np.isin(dev.addr, np.unique(alloc_addrs))
        frees = AddrEvents(dev, np.flatnonzero((dev.delta_bytes < 0) & at_allocs), values=False)
    free_index = frees.indices
    # Each address's frees are in index order: a bisect of its range, not an array made of it per allocation
    # (an address a long run reuses thousands of times made that quadratic)
    for j, (a, i) in enumerate(zip(alloc_addrs.tolist(), alloc_index.tolist(), strict=True)):
        span = frees.span(a)
        if span is not None:
            pos = bisect.bisect_right(free_index, i, span[0], span[1])
            if pos < span[1]:
                result[j] = free_index[pos]
    return result


def attribute(
    source: MemorySource, rules: list[Rule] | None = None, progress: ProgressFn | None = None
) -> MemorySource:
    """Fill category/layer/kv_kind/method on every device's events, in place; returns the source.
    `progress(done, total)`: the KV log's storages joined so far on a device, every 65,536 and at the end."""
    rules = RULES if rules is None else rules
    frame_cat, frame_kind = _frame_categories(source.frames, rules)
    kv = source.meta.get("kv")
    kv_storages = kv.storages if kv is not None else []
    storage_devices: list[str] = kv.storage_devices if kv is not None else []
    frees_us = np.full(len(kv_storages), np.nan)
    weight_changes = source.meta.get("weight_changes")  # a run's model converted inside the block
    for dev in source.devices:
        n = len(dev)
        dev.category = np.full(n, OTHER, dtype=np.int8)
        dev.layer = np.full(n, -1, dtype=np.int16)
        dev.kv_kind = np.zeros(n, dtype=np.int8)
        dev.method = np.full(n, METHOD_NONE, dtype=np.int8)
        dev.kv_cache = None  # set by the KV log's join
        if dev.stated_category is not None and len(dev.stated_category) == n:
            stated = dev.stated_category >= 0
            dev.category[stated] = dev.stated_category[stated]
            dev.method[stated] = METHOD_PROFILER
        allocs = np.nonzero(dev.delta_bytes > 0)[0]
        if dev.frame_id is not None and len(source.frames):
            has_frame = allocs[dev.frame_id[allocs] >= 0]
            cats = frame_cat[dev.frame_id[has_frame]]
            # With a KV log, only the log says what is KV (see the module's docstring).
            matched = has_frame[(cats >= 0) & (cats != KV)] if kv_storages else has_frame[cats >= 0]
            dev.category[matched] = frame_cat[dev.frame_id[matched]]
            dev.kv_kind[matched] = frame_kind[dev.frame_id[matched]]
            dev.method[matched] = METHOD_STACK_RULE
            frees = _pair_frees(dev, matched)
            ok = frees >= 0
            dev.category[frees[ok]] = dev.category[matched[ok]]
            dev.kv_kind[frees[ok]] = dev.kv_kind[matched[ok]]
            dev.method[frees[ok]] = METHOD_STACK_RULE
        if weight_changes:
            _join_weight_changes(dev, weight_changes)
        if kv_storages:
            held = (source.meta.get("kv_held_before_trace") or {}).get(dev.device)
            ranges_lead = source.meta.get(RANGES_LEAD)
            for storage, freed_us in _join_kv_log(dev, kv_storages, held, ranges_lead, progress).items():
                named = storage_devices[storage] if storage < len(storage_devices) else ""
                if not named or normal_device(named) == dev.device:
                    frees_us[storage] = freed_us
        if dev.baseline_blocks:
            # Blocks live before the trace began (snapshots): their stacks split the baseline too.
            split: dict[int, int] = {}
            for _address, size, fid in dev.baseline_blocks:
                category = int(frame_cat[fid]) if 0 <= fid < len(frame_cat) and frame_cat[fid] >= 0 else OTHER
                split[category] = split.get(category, 0) + size
            dev.baseline_categories = split
    if kv_storages:
        source.meta[KV_FREES] = frees_us
    return source


# A KV storage as analyzers.kv_log gives it: addr, bytes, first_ns, freed_ns, layer, kv, cache
_Storage = tuple[int, int, int, int, int, str, int]


def _join_weight_changes(dev: DeviceEvents, changes: list[Any]) -> None:
    """The weights' events of a model converted inside the block (`readers.weight_changes.WeightChange`):
    of each storage it took, the latest allocation at its address by the time the recorder saw it, and that
    allocation's free; of each storage listed at the start and let go, the first event at its address (its
    free: it was live from before the first event)."""
    mine = [c for c in changes if c.device == dev.device]
    if not mine:
        return
    assert dev.category is not None and dev.method is not None  # filled by attribute() before the joins
    watched = np.fromiter({c.addr for c in mine}, dtype=np.int64)
    at: dict[int, list[int]] = {}
    for index in np.flatnonzero(np.isin(dev.addr, watched)).tolist():
        at.setdefault(int(dev.addr[index]), []).append(index)
    ts, delta = dev.ts_us, dev.delta_bytes
    allocations: list[int] = []
    frees: list[int] = []
    for change in mine:
        events = at.get(change.addr, [])
        limit = change.t_us + JOIN_TOLERANCE_US
        if change.event == "added":
            taken = [i for i in events if ts[i] <= limit and delta[i] > 0]
            if taken:
                allocations.append(taken[-1])
        elif (
            change.from_start
            and events
            and ts[events[0]] <= limit
            and frees_storage(dev, int(-delta[events[0]]), change.nbytes)
        ):
            frees.append(events[0])
    taken_at = np.asarray(allocations, dtype=np.int64)
    paired = _pair_frees(dev, taken_at)
    targets = np.concatenate([taken_at, paired[paired >= 0], np.asarray(frees, dtype=np.int64)])
    dev.category[targets] = WEIGHTS
    dev.method[targets] = METHOD_WEIGHTS_TABLE


def _join_kv_log(
    dev: DeviceEvents,
    storages: list[_Storage],
    held: list[_Storage] | None = None,
    ranges_lead_us: float | None = None,
    progress: ProgressFn | None = None,
) -> dict[int, float]:
    """Mark as KV the allocation of each storage of the KV log that the trace holds, and its free; and the
    free of each storage `held` before the trace (`readers.kv_before_trace`): the first event at its address,
    the trace's or one the reader added, which takes it out of the level before the first event. Returns
    {index in `storages`: the time (µs) of its free} for those whose free the trace holds. `ranges_lead_us`:
    the lead kvtrace's step ranges measured (RANGES_LEAD), taken as the join's."""
    kv_addrs = {s[0] for s in storages}
    alloc_mask = dev.delta_bytes > 0
    at_kv = np.isin(dev.addr, np.fromiter(kv_addrs, dtype=np.int64))
    allocations = AddrEvents(dev, np.flatnonzero(alloc_mask & at_kv))
    frees_at = AddrEvents(dev, np.flatnonzero((dev.delta_bytes < 0) & at_kv), values=False)
    matched_allocs: list[int] = []
    matched_storages: list[int] = []
    layers: list[int] = []
    kinds: list[int] = []
    caches: list[int] = []
    ts = dev.ts_us
    blocks = sizes_are_blocks(dev)
    lead = _lead_of(dev, storages, allocations, blocks, frees_at, ranges_lead_us)
    for storage, (addr, nbytes, first_ns, _last_ns, layer, kv, cache) in enumerate(storages):
        if progress is not None and not storage % STAGE_STEP:
            progress(storage, len(storages))
        span = allocations.span(addr)
        if span is None:
            continue
        # The storage's allocation is the one of its size (on a GPU, a block that can hold it) still live
        # when the log saw it: the latest by the sighting whose free (if any) is not before it, else the
        # first within the clocks' tolerance after it. A later one at the same address, inside the
        # tolerance, is the next step's. The sighting is read on the trace's clock: `lead` later.
        seen = first_ns / 1000.0 + lead
        join = _Join(seen, nbytes, blocks, frees_at, addr, ts)
        lo, hi, in_time_order = span
        if in_time_order:
            best = join.sorted_best(allocations, lo, hi)
        else:
            best = join.scanned_best(allocations, lo, hi)
        if best >= 0:
            matched_allocs.append(best)
            matched_storages.append(storage)
            layers.append(layer)
            kinds.append(1 if kv == "k" else 2)
            caches.append(cache)
    if progress is not None:
        progress(len(storages), len(storages))
    del allocations  # a long log's: memory the rest reuses
    held_frees = _held_frees(dev, held)
    if not matched_allocs and not held_frees:
        return {}
    # attribute() fills these arrays before joining the KV log.
    assert dev.category is not None and dev.method is not None
    assert dev.layer is not None and dev.kv_kind is not None
    index = np.asarray(matched_allocs, dtype=np.int64)
    del matched_allocs
    frees = _pair_frees(dev, index, frees_at)
    del frees_at
    for target in (index, frees[frees >= 0]):
        dev.category[target] = KV
        dev.method[target] = METHOD_KV_LOG
    dev.layer[index] = np.asarray(layers, dtype=np.int16)
    dev.kv_kind[index] = np.asarray(kinds, dtype=np.int8)
    dev.kv_cache = np.full(len(dev), -1, dtype=np.int64)
    dev.kv_cache[index] = np.asarray(caches, dtype=np.int64)
    ok = frees >= 0
    dev.layer[frees[ok]] = dev.layer[index[ok]]
    dev.kv_kind[frees[ok]] = dev.kv_kind[index[ok]]
    dev.kv_cache[frees[ok]] = dev.kv_cache[index[ok]]
    freed_at = {
        storage: float(ts[free])
        for storage, free in zip(matched_storages, frees.tolist(), strict=True)
        if free >= 0
    }
    index_of = {(s[0], s[2]): i for i, s in enumerate(storages)} if held_frees else {}
    for free, (addr, _nbytes, first_ns, _freed, layer, kv, cache) in held_frees:
        dev.category[free] = KV
        dev.method[free] = METHOD_KV_LOG
        dev.layer[free] = layer
        dev.kv_kind[free] = 1 if kv == "k" else 2
        dev.kv_cache[free] = cache
        held_index = index_of.get((addr, first_ns))
        if held_index is not None:
            freed_at[held_index] = float(ts[free])
    return freed_at


class _Join:
    """Which of an address's allocations is one KV storage's: the latest of its size by the sighting `seen`
    that was not released well before it, else the first of its size after it within the tolerance."""

    def __init__(
        self, seen: float, nbytes: int, blocks: bool, frees: AddrEvents, addr: int, ts: np.ndarray
    ) -> None:
        self.seen = seen
        self.nbytes = nbytes
        self.blocks = blocks
        # the address's frees, in index order: `released[lo:hi]`
        self.released = frees.indices
        span = frees.span(addr)
        self.lo, self.hi = (span[0], span[1]) if span is not None else (0, 0)
        self.ts = ts

    def _fits(self, size: int) -> bool:
        return size == self.nbytes or (self.blocks and block_holds(size, self.nbytes))

    def _gone_before(self, index: int) -> bool:
        """Allocated and released well before the sighting: an earlier occupant of the address."""
        freed = bisect.bisect_right(self.released, index, self.lo, self.hi)
        return freed < self.hi and self.ts[self.released[freed]] < self.seen - JOIN_TOLERANCE_US

    def scanned_best(self, allocations: AddrEvents, lo: int, hi: int) -> int:
        """In the candidates' order (`allocations`' `lo:hi`), stopping at the first past the tolerance (times
        out of order)."""
        limit = self.seen + JOIN_TOLERANCE_US
        best = -1
        candidates, times, sizes = allocations.indices, allocations.times, allocations.sizes
        for k in range(lo, hi):
            i, at, size = candidates[k], times[k], sizes[k]
            if at > limit:
                break
            if not self._fits(size):
                continue
            if at > self.seen and best >= 0:
                break
            if at <= self.seen and self._gone_before(i):
                continue
            best = i
        return best

    def sorted_best(self, allocations: AddrEvents, lo: int, hi: int) -> int:
        """As `scanned_best` where the times are in order: back from the sighting, then on within the
        tolerance, so that a storage costs the candidates near its sighting, not all its address had (a
        long run reuses an address thousands of times)."""
        candidates, times, sizes = allocations.indices, allocations.times, allocations.sizes
        by_sighting = bisect.bisect_right(times, self.seen, lo, hi)
        for k in range(by_sighting - 1, lo - 1, -1):
            if self._fits(sizes[k]) and not self._gone_before(candidates[k]):
                return candidates[k]
        limit = self.seen + JOIN_TOLERANCE_US
        for k in range(by_sighting, hi):
            if times[k] > limit:
                break
            if self._fits(sizes[k]):
                return candidates[k]
        return -1


def trace_lead_us(dev: DeviceEvents, storages: list[_Storage], ranges_lead_us: float | None = None) -> float:
    """How far (µs) the trace's clock runs ahead of the KV log's, as kvtrace's step ranges measured it
    (`ranges_lead_us`, `source.meta[RANGES_LEAD]`), else as the storages' allocations prove it (see
    `_lead_of`): the readers that place the log's sightings among the trace's events read them this much
    later, as the KV log's join does."""
    allocations, frees = _events_at(dev, storages)
    return _lead_of(dev, storages, allocations, sizes_are_blocks(dev), frees, ranges_lead_us)


def sighting_fit_us(
    dev: DeviceEvents, storages: list[_Storage], within_us: float = JOIN_TOLERANCE_US
) -> float | None:
    """The trace's lead (µs) over the KV log's clock that fits the storages tightest: a storage is made before
    the log sees it and freed after, so under the true lead each storage's own allocation is the one of its
    address live at its sighting (read that much later). Of the leads within `within_us` either way, those
    under which the most storages have an allocation of their size (on a GPU, a block that can hold it) live
    at their sighting, the widest unbroken run of them, and its least. None where no storage has one.

    An earlier occupant of a storage's address (a same-sized projection output, freed just before the cache's
    storage took its block) fits it under a lead some µs less. Where the other storages' own allocations came
    long before their sightings (a host that descheduled the process before the update logged them), those
    fit that lead too, and the occupants of the few storages seen at once line up (one forward's
    temporaries): as many storages fit, but only while all those short-lived occupants are live, where the
    true lead's run lasts from the tightest fit to the first storage's free."""
    allocations, frees = _events_at(dev, storages)
    run = _sighting_fit(dev, storages, allocations, sizes_are_blocks(dev), within_us, frees)
    return None if run is None else run[0]


def _events_at(dev: DeviceEvents, storages: list[_Storage]) -> tuple[AddrEvents, AddrEvents]:
    """The allocations at the storages' addresses, and the frees there (indices alone), by address."""
    at = np.isin(dev.addr, np.fromiter({s[0] for s in storages}, dtype=np.int64))
    allocations = AddrEvents(dev, np.flatnonzero((dev.delta_bytes > 0) & at))
    return allocations, AddrEvents(dev, np.flatnonzero((dev.delta_bytes < 0) & at), values=False)


def _lead_of(
    dev: DeviceEvents,
    storages: list[_Storage],
    allocations: AddrEvents,
    blocks: bool,
    frees: AddrEvents,
    ranges_lead_us: float | None = None,
) -> float:
    """How far (µs) the trace's clock runs ahead of the KV log's, as the storages prove it: the tightest fit
    within LEAD_REACH_US either way (`sighting_fit_us`), and SIGHTING_MARGIN_US more for storages the log
    saw sooner after theirs than the one that fixed it; no less than 0 where that fit is within the margin
    behind (a clock that agrees: the sightings read as they are). Where kvtrace's step ranges placed the
    trace, the lead they measured (`ranges_lead_us`), or less where the storages say so: a range's start
    less its step's sample is never less than the lead, but it is more by the µs between the two, which a
    loaded host may stretch to ms.

    A storage's own allocation comes before the log sees it, so a sighting read later than its true time
    still finds it, read earlier it finds an earlier occupant of its address (a same-sized projection output
    freed just before: the clocks agree to ~0.15 ms, a prefill storage is seen 0.02-0.2 ms after it is made),
    and read later than the storage's free, the next occupant. The margin reads every sighting at most that
    much late; a range's start less its step's sample, at least the lead, at most the µs between the two.
    When only a storage with no other allocation of its size within the tolerance could prove the lead, a
    prefill whose every storage had such an occupant (a CPU's malloc hands a freed block back at once) had
    none under a base set 0.1-2 ms late, and the join took the occupants. A trace whose clock ran behind was
    read as it was: 1-2.4 ms late, the next layer's same-sized projection output, 0.9 ms after a storage's
    sighting at its address, was taken for it (a one-by-one eviction's KV peak read 21,248 B, not 18,944).
    The reach is as far as `readers.trace_clock` leaves a trace unmoved: past 2 ms the storages seen at once
    fell out of the fit, and the lead found was another's.

    Where the fit's run holds every storage (all live under each of its leads), the margin never reads a
    sighting past it: under the true lead each storage's own allocation is live at its sighting, so such
    a run holds it (a run of fewer storages may be another lead's, the true one's past the reach),
    and past the run's end a storage freed soon after its sighting (an eviction hook's) is gone. A margin
    past it gave such a storage the same-sized allocation that took its address within 0.5 ms (the next
    layer's projection output: a one-by-one eviction's KV peak read 21,248 B, not 18,944)."""
    run = _sighting_fit(dev, storages, allocations, blocks, LEAD_REACH_US, frees)
    from_fit = None
    if run is not None:
        fit, run_end, every_storage = run
        from_fit = fit + SIGHTING_MARGIN_US if fit > 0 else min(0.0, fit + SIGHTING_MARGIN_US)
        if every_storage:
            from_fit = min(from_fit, run_end)
    if ranges_lead_us is None:
        return from_fit or 0.0
    return ranges_lead_us if from_fit is None else min(ranges_lead_us, from_fit)


def _sighting_fit(
    dev: DeviceEvents,
    storages: list[_Storage],
    allocations: AddrEvents,
    blocks: bool,
    within_us: float,
    frees: AddrEvents,
) -> tuple[float, float, bool] | None:
    """`sighting_fit_us` on the `allocations` at the storages' addresses, and the `frees` there, with the
    end of its run: (the run's least lead, its greatest, whether every storage with a span is live in it)."""
    ts = dev.ts_us
    indices, times, sizes, released = allocations.indices, allocations.times, allocations.sizes, frees.indices
    # Each allocation live at its storage's sighting under some leads: a pair of spans, (lead, 0 from / 1
    # until, storage), kept as columns: `leads` two a pair, `owners` its storage (a tuple a span, and a float
    # object a lead, were a long light run's join peak)
    leads, owners = array("d"), array("q")
    for storage, (addr, nbytes, first_ns, *_rest) in enumerate(storages):
        span = allocations.span(addr)
        if span is None:
            continue
        first, end, _ = span
        seen = first_ns / 1000.0
        freed_span = frees.span(addr)
        free_lo, free_hi = (freed_span[0], freed_span[1]) if freed_span is not None else (0, 0)
        # the allocations live within the range of the sighting: the last made before it, those in it
        lo = max(first, bisect.bisect_right(times, seen - within_us, first, end) - 1)
        for j in range(lo, bisect.bisect_right(times, seen + within_us, first, end)):
            index = indices[j]
            size = sizes[j]
            if size != nbytes and not (blocks and block_holds(size, nbytes)):
                continue
            freed = bisect.bisect_right(released, index, free_lo, free_hi)
            until = min(float(ts[released[freed]]) - seen if freed < free_hi else within_us, within_us)
            since = max(times[j] - seen, -within_us)
            if until >= since:
                leads.extend((since, until))
                owners.append(storage)
    if not leads:
        return None
    # The spans in (lead, closes, storage) order, as their tuples sort: at one lead, a span that opens there
    # before one that closes, both live at it. Span k is its pair's (k // 2) from, or (odd k) its until.
    span_owners = np.repeat(np.frombuffer(owners, dtype=np.int64), 2)
    span_closes = np.tile(np.array([0, 1], dtype=np.int8), len(owners))
    order = np.lexsort((span_owners, span_closes, np.frombuffer(leads, dtype=np.float64)))
    del span_owners, span_closes
    sorted_leads = np.frombuffer(leads, dtype=np.float64)[order]
    # whether the next span is at the same lead: the count at a lead is the one after all its spans opened
    # and closed
    same_next = np.append(sorted_leads[1:] == sorted_leads[:-1], False)
    live: dict[int, int] = {}
    best = (0, -1.0, 0.0)  # storages live, how long, from which lead
    run_from, run_count = float(sorted_leads[0]), 0
    for start in range(0, len(order), _SPANS_A_TIME):  # Python objects for a part of the spans at a time
        part = order[start : start + _SPANS_A_TIME]
        for at_lead, closes, storage, same in zip(
            sorted_leads[start : start + _SPANS_A_TIME].tolist(),
            (part % 2).tolist(),
            np.frombuffer(owners, dtype=np.int64)[part // 2].tolist(),
            same_next[start : start + _SPANS_A_TIME].tolist(),
            strict=True,
        ):
            if closes:
                held = live[storage] - 1
                if held:
                    live[storage] = held
                else:
                    del live[storage]
            else:
                live[storage] = live.get(storage, 0) + 1
            if same:
                continue  # the count at a lead is the one after all its spans opened and closed
            if len(live) != run_count:
                if (run_count, at_lead - run_from) > best[:2]:
                    best = (run_count, at_lead - run_from, run_from)
                run_from, run_count = at_lead, len(live)
    if not best[0]:
        return None
    storage_of = np.frombuffer(owners, dtype=np.int64)  # in storage order: each storage's spans together
    with_spans = int(np.count_nonzero(storage_of[1:] != storage_of[:-1])) + 1
    return best[2], best[2] + best[1], best[0] == with_spans


_SPANS_A_TIME = 1 << 16


def _held_frees(dev: DeviceEvents, held: list[_Storage] | None) -> list[tuple[int, _Storage]]:
    """(index, storage) of the free of each storage held before the trace that the log saw go: the first
    event at its address."""
    freed = {s[0]: s for s in held or () if s[3] >= 0}
    if not freed or not len(dev):
        return []
    found: list[tuple[int, _Storage]] = []
    for index in np.flatnonzero(np.isin(dev.addr, np.fromiter(freed, dtype=np.int64))).tolist():
        storage = freed.pop(int(dev.addr[index]), None)
        if storage is not None and dev.delta_bytes[index] < 0:
            found.append((index, storage))
    return found
