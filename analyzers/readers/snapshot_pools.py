"""The bytes a snapshot's private pools hold reserved but unallocated, at the dump and after each trace event.

A segment whose `segment_pool_id` is not (0, 0) belongs to a private pool (a CUDA graph's, a MemPool's:
`snapshot_entries.private_pool`): only that pool's allocations can use its free bytes, so they are no slack
an ordinary allocation could take, and the report leaves them out of the peak's reserved-but-unallocated
figure (as `diagnose` leaves them out of an OOM's). The trace entries do not say their pool: the dump's pool
segments do, by address range, so an alloc or free inside one, or a segment entry at its address, is the
pool's. Walked back from the dump, a level is the pools' segments reserved then less their bytes allocated
then (requested sizes, as the report's allocated figures). A pool segment released before the dump is not
in it: its bytes are not told apart. Pure Python, and only for a device that has pool segments.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from analyzers.readers.snapshot_entries import (
    LIVE_STATES,
    block_request_size,
    blocks_with_addresses,
    private_pool,
    segment_bytes,
)

__all__ = ["PoolLevels", "peak_slack", "pool_levels", "pools_at"]


@dataclass(frozen=True)
class PoolLevels:
    """A device's private pools' reserved-but-unallocated bytes: `at_dump`, and `after` each memory event
    (at the moments of the replay's `total_reserved`: a segment entry counts from the next event on)."""

    at_dump: int
    after: list[int]


def pool_levels(
    segments: list[dict[str, Any]],
    addresses: Sequence[int],
    deltas: Sequence[int],
    segment_changes: list[tuple[int, Any, int]],
) -> PoolLevels | None:
    """The levels of the device whose dump holds `segments`, whose replayed memory events are at
    `addresses` moving `deltas`, and whose segment entries are `segment_changes` (memory events before
    each, its address, its signed bytes); None where no segment is a private pool's."""
    pools = sorted(
        (int(s.get("address", 0)), segment_bytes(s), s)
        for s in segments
        if private_pool(s.get("segment_pool_id"))
    )
    if not pools:
        return None
    starts = [start for start, _, _ in pools]
    ends = [start + size for start, size, _ in pools]

    def in_pool(address: Any) -> bool:
        if type(address) is not int:
            return False
        at = bisect_right(starts, address) - 1
        return at >= 0 and address < ends[at]

    reserved_end = sum(size for _, size, _ in pools)
    live_end = sum(
        block_request_size(block)
        for _, _, segment in pools
        for _, block in blocks_with_addresses(segment)
        if block.get("state") in LIVE_STATES
    )
    at_dump = max(reserved_end - live_end, 0)
    count = len(deltas)
    # bytes the pools' events and segment entries moved from each event on, to walk back from the dump
    moved = [d if in_pool(a) else 0 for a, d in zip(addresses, deltas, strict=True)]
    live_from = list(accumulate(reversed(moved), initial=0))[::-1]  # [k]: events k.. of the pools
    grown_at = [0] * (count + 1)
    for position, address, size in segment_changes:
        if in_pool(address):
            grown_at[position] += size
    grown_from = list(accumulate(reversed(grown_at), initial=0))[::-1]
    # after event i: its allocations and the segment entries before it (position <= i) are in
    after = [max((reserved_end - grown_from[i + 1]) - (live_end - live_from[i + 1]), 0) for i in range(count)]
    return PoolLevels(at_dump, after)


def peak_slack(
    reserved: int | None, peak: int, before_trace: bool, pools: int | None
) -> tuple[int | None, int | None]:
    """The reserved-but-unallocated bytes at the peak outside private pools, and those in them (`pools`, at
    most all of the slack): none where the peak came before the trace (what was reserved then was cached
    earlier) or nothing was reserved."""
    if reserved is None or before_trace:
        return None, None
    held = None if pools is None else min(pools, max(reserved - peak, 0))
    return reserved - peak - (held or 0), held


def pools_at(levels: Any, at_dump: int | None, index: int) -> int | None:
    """A device's private pools' unallocated bytes after its event `index` (-1: no event, the dump)."""
    if at_dump is None:
        return None
    return at_dump if index < 0 else int(levels[index])
