"""Which stacks held the live bytes at a diagnosis's moment. Pure, torch-free.

From the attributed events (an allocation is live until an event reuses its address), and for a snapshot
diagnosed at its dump, from the pickle's own blocks, whose stacks the snapshot reader does not keep. Stacks
are shown without the frames torch's memory_viz leaves out (analyzers.stack_frames). What no event places
is listed too, as its own line: what was allocated before the trace began, and the bytes no address holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analyzers.model import DeviceEvents, MemorySource
from analyzers.planning.diagnosis import StackShare
from analyzers.stack_frames import heading, kept_frames
from analyzers.summary import DeviceSummary

__all__ = [
    "freed_from_before",
    "live_allocations",
    "live_by_stack",
    "live_sizes",
    "moment_stacks",
    "snapshot_block_stacks",
    "unaddressed_share",
]

TOP_STACKS = 10  # the stacks a diagnosis lists, most live bytes first

_NO_STACK = "(no stack recorded: record with with_stack=True)"
# A run whose memory events are the KV log's (profiler=False, profile_memory=False, ...): with_stack=True
# puts stacks on the profiler's allocations, so without them it adds none
_KV_LOG_STORAGES = (
    "(KV cache storages from the KV log: no allocator trace, whose stacks with_stack=True records)"
)
_NO_ADDRESS = "(no stack recorded: the file gives no address or stack per allocation)"


def _from_kv_log(source: MemorySource) -> bool:
    """A run whose memory events are its KV log's (profiler=False, no trace, profile_memory=False, ...)."""
    events_from = source.meta.get("events_from")
    return isinstance(events_from, str) and events_from.startswith("kv_log")


def _held_before_label(source: MemorySource) -> str:
    """The row of what a device held before its first event: before the trace began, or, for a run with no
    allocator trace, the weights its weights log lists (and the KV a cache held before the block)."""
    if _from_kv_log(source):
        return "(the model's weights and KV held before the block, from the run's logs: no allocator trace)"
    return "(weights and others, allocated before the trace began)"


def live_by_stack(source: MemorySource, dev_index: int, upto: int) -> list[StackShare]:
    """Group the allocations live after event `upto` by their stack text.

    An allocation is live when no later event up to `upto` reuses its address (its free). Vectorised:
    sort events by (address, index) so each event's successor at the same address is the next row.
    """
    dev = source.devices[dev_index]
    if upto < 0:
        return []
    n = upto + 1
    live = live_allocations(dev, upto)
    grouped: dict[str, list[int]] = {}
    frame_ids = dev.frame_id if dev.frame_id is not None else np.full(len(dev), -1, dtype=np.int32)
    no_stack = _KV_LOG_STORAGES if _from_kv_log(source) else _NO_STACK
    kept: dict[int, str] = {}  # frame_id -> its stack without the frames memory_viz leaves out
    for frame_id, nbytes in zip(
        frame_ids[:n][live].tolist(), dev.delta_bytes[:n][live].tolist(), strict=True
    ):
        text = kept.get(frame_id)
        if text is None:
            known = 0 <= frame_id < len(source.frames)
            text = kept[frame_id] = "\n".join(kept_frames(source.frames[frame_id])) if known else no_stack
        entry = grouped.setdefault(text, [0, 0])
        entry[0] += int(nbytes)
        entry[1] += 1
    return [_share(text, total, count) for text, (total, count) in grouped.items()]


def live_allocations(dev: DeviceEvents, upto: int) -> np.ndarray:
    """Which of the events up to `upto` are allocations still live after it (see `live_by_stack`)."""
    n = upto + 1
    addr = dev.addr[:n]
    order = np.lexsort((np.arange(n), addr))
    same_next = np.zeros(n, dtype=bool)
    same_next[order[:-1]] = addr[order[:-1]] == addr[order[1:]]
    return (dev.delta_bytes[:n] > 0) & ~same_next & (addr >= 0)


def live_sizes(dev: DeviceEvents, upto: int, category: int) -> list[int]:
    """The sizes of the allocations of `category` (analyzers.model's codes) live after event `upto`: empty
    where the events carry no addresses or categories (which allocations are live is then unknown)."""
    if upto < 0 or dev.category is None or not len(dev):
        return []
    live = live_allocations(dev, upto) & (dev.category[: upto + 1] == category)
    return [int(nbytes) for nbytes in dev.delta_bytes[: upto + 1][live].tolist()]


def unaddressed_share(
    dev: DeviceEvents, live_bytes: int | None, listed: list[StackShare]
) -> StackShare | None:
    """The live bytes no row of `listed` holds, where the events carry no addresses (torch's memory
    timeline, Kineto's old `[memory]` form): which allocations are live is unknown, only their sum, so one
    row holds it and the rows add up to what is live."""
    if live_bytes is None or not len(dev) or bool((dev.addr >= 0).any()):
        return None
    rest = live_bytes - sum(share.bytes for share in listed)
    return _share(_NO_ADDRESS, rest, 0) if rest > 0 else None


def freed_from_before(dev: DeviceEvents, upto: int) -> int:
    """Bytes that events up to `upto` freed of blocks allocated before the trace began: frees that are the
    first event at their address (sorted by (address, index) as in `live_by_stack`).

    Events without addresses (torch's memory timeline, Kineto's old `[memory]` form) do not say whose block
    a free is: what the trace allocated itself is never below zero, so the running total's fall below where
    it began is what it freed of those blocks, at the least. Only settled levels count (the last event of an
    instant, and `upto`'s): a version bump's release and re-creation at one instant is no free."""
    if upto < 0:
        return 0
    n = upto + 1
    if not bool((dev.addr >= 0).any()):
        running = np.cumsum(dev.delta_bytes[:n].astype(np.int64))
        times = dev.ts_us[:n]
        settled = np.append(times[1:] != times[:-1], True)
        return max(0, -int(running[settled].min()))
    addr = dev.addr[:n]
    order = np.lexsort((np.arange(n), addr))
    first = np.ones(n, dtype=bool)
    first[order[1:]] = addr[order[1:]] != addr[order[:-1]]
    delta = dev.delta_bytes[:n]
    return -int(delta[(delta < 0) & first & (addr >= 0)].sum())


def _share(stack: str, nbytes: int, allocations: int) -> StackShare:
    return StackShare(stack, nbytes, allocations, "\n".join(heading(stack.splitlines())))


def snapshot_block_stacks(path: str) -> list[StackShare]:
    """Stacks of the blocks live at a snapshot's dump, read from the pickle itself.

    The snapshot reader folds blocks allocated before the trace began into `baseline_bytes` without their
    stacks; on a snapshot with an empty trace (torch 2.0 dumps) those blocks are everything.
    """
    from analyzers.readers.safe_pickle import load_pickle

    data = load_pickle(path)
    grouped: dict[str, list[int]] = {}
    # The snapshot reader checked sizes and states; stacks it does not keep, so each level is checked here
    # (a damaged history entry or frame loses its stack, not the diagnosis).
    for segment in _list(data.get("segments") if isinstance(data, dict) else None):
        for block in _list(segment.get("blocks") if isinstance(segment, dict) else None):
            if not isinstance(block, dict) or block.get("state") not in _LIVE_STATES:
                continue
            frames = block.get("frames")
            history = _list(block.get("history"))
            if not frames and history and isinstance(history[-1], dict):
                frames = history[-1].get("frames")
            text = "\n".join(
                f"{f.get('filename')}:{f.get('line')}:{f.get('name')}"
                for f in _list(frames)
                if isinstance(f, dict)
            )
            size = block.get("requested_size") or block.get("size", 0)
            entry = grouped.setdefault("\n".join(kept_frames(text)) or "(no stack recorded)", [0, 0])
            entry[0] += size if type(size) is int and size > 0 else 0
            entry[1] += 1
    return [_share(text, total, count) for text, (total, count) in grouped.items()]


_LIVE_STATES = ("active_allocated", "active_pending_free", "active_awaiting_free")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def moment_stacks(
    source: MemorySource,
    dev_index: int | None,
    index: int,
    at_start: bool,
    at_dump: bool,
    summary: DeviceSummary | None,
    allocated: int | None,
) -> tuple[StackShare, ...]:
    """The TOP_STACKS stacks that held the most live bytes at the moment (event `index` of device
    `dev_index`; the level before the trace's first event when `at_start`, the snapshot's dump when
    `at_dump`), with what the events cannot place: what was allocated before the trace and is still live,
    and the allocated bytes no address accounts for."""
    stacks = live_by_stack(source, dev_index, index) if dev_index is not None and not at_start else []
    baseline = source.devices[dev_index].baseline_bytes if dev_index is not None else 0
    if source.kind == "snapshot" and at_dump:
        stacks = snapshot_block_stacks(source.path)  # every block live at the dump, with its stack
    elif source.kind == "snapshot" and at_start and summary is not None and summary.alloc_events == 0:
        # Nothing allocated since the start: what was live then is the dump's blocks plus what the trace freed
        stacks = snapshot_block_stacks(source.path)
        freed = (allocated or 0) - summary.final_allocated_bytes
        if freed > 0:
            stacks.append(StackShare("(freed by the trace before the dump)", freed, 0))
    elif baseline:
        # What was allocated before the trace and is still live: the trace may have freed some of it first
        before = baseline - (
            freed_from_before(source.devices[dev_index], index) if dev_index is not None else 0
        )
        if before > 0:
            stacks.append(StackShare(_held_before_label(source), before, 0))
    unaddressed = (
        unaddressed_share(source.devices[dev_index], allocated, stacks) if dev_index is not None else None
    )
    if unaddressed is not None:
        stacks.append(unaddressed)
    return tuple(sorted(stacks, key=lambda s: -s.bytes)[:TOP_STACKS])
