"""What the CUDA caching allocator held and lacked at a diagnosis's moment (analyzers.planning.diagnose):
allocated, reserved and free memory, the largest free block, CUDA graphs' private pools, the request (or the
segment PyTorch's message names instead), a per-process limit, whether fragmentation caused the OOM, and the
shortfall a remedy must cover. Pure, torch-free.

These figures come from the OOM (a snapshot's `oom` entry, PyTorch's message) and the allocator's segments,
not from the KV: they are kept apart from the KV at the moment so that each reads on its own, and the notes
they give (a figure rounded in PyTorch's message, a limit the input does not give) are said where the
figure is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from analyzers.model import MemorySource, OomInfo, request_at_most
from analyzers.planning.diagnose_fragments import private_pools_note
from analyzers.planning.diagnosis import reservable
from analyzers.summary import DeviceSummary
from analyzers.timeline import DeviceTimeline
from analyzers.trace_coverage import peak_before_trace_note
from analyzers.units import human_bytes

__all__ = ["AllocatorFacts", "allocator_facts"]


@dataclass(frozen=True)
class AllocatorFacts:
    """The allocator's figures at the moment, as `Diagnosis` names them (None: the input does not give
    it), with `needed_bytes` (the request, else the segment the message names) and the reader's notes on
    them, in the order the report prints them."""

    allocated_bytes: int | None
    reserved_bytes: int | None
    free_bytes: int | None
    capacity_bytes: int | None
    largest_free_block_bytes: int | None
    reserved_unallocated_bytes: int | None
    private_pool_bytes: int | None
    held_from_message: bool
    requested_bytes: int | None
    segment_bytes: int | None
    needed_bytes: int | None
    limit_bytes: int | None
    free_within_limit_bytes: int | None
    fragmented: bool | None
    fragmentation_possible: bool | None
    shortfall_bytes: int | None
    notes: tuple[str, ...]


def allocator_facts(
    source: MemorySource,
    oom: OomInfo | None,
    summary: DeviceSummary | None,
    timeline: DeviceTimeline | None,
    index: int,
    device: str | None,
    at_start: bool,
    at_dump: bool,
    budget_bytes: int | None,
    peak_leaves_out: object,
) -> AllocatorFacts:
    """The allocator's figures at the moment: the event at `index` of `timeline` (the level before the
    trace's first event when `at_start`), `at_dump` when it is the snapshot's dump, whose segments then
    describe it; the shortfall against `budget_bytes` when there is no OOM (unknown when the peak leaves
    something out)."""
    notes: list[str] = []
    allocated = oom.allocated_bytes if oom is not None else None
    reserved = oom.reserved_bytes if oom is not None else None
    if at_start:
        assert summary is not None
        allocated, reserved = summary.peak_allocated_bytes, summary.reserved_at_peak
        notes.append(peak_before_trace_note(summary, source.kind))
    if allocated is None and timeline is not None:
        peak = summary.peak_allocated_bytes if summary else None
        allocated = int(timeline.allocated[index]) if index >= 0 else peak
    if reserved is None and timeline is not None and timeline.reserved is not None and index >= 0:
        reserved = int(timeline.reserved[index])
    segments = [s for s in source.segments if s.device == device]
    if reserved is None and segments and at_dump:
        reserved = sum(s.total_size for s in segments)
    capacity = summary.capacity_bytes if summary else None
    free = oom.device_free_bytes if oom is not None else None
    if free is None and capacity is not None and reserved is not None and source.kind != "run":
        free = capacity - reserved
    # A private pool's segments (CUDA graphs') serve only its own allocations: their free blocks are held,
    # as PyTorch's OOM message counts them, never free memory the request could use
    shared = [s for s in segments if not s.private_pool]
    largest_free = (
        max((s.largest_free_block for s in shared), default=0 if segments else None) if at_dump else None
    )
    held_from_message = oom is not None and oom.held_from_message and not at_start
    in_pools = sum(s.private_pool_free for s in segments) if at_dump and not held_from_message else 0
    if in_pools and allocated is not None:
        allocated += in_pools  # then reserved less allocated leaves them out, as c10's message does
    stream = oom.stream if oom is not None else None
    if largest_free is not None and stream is not None and any(s.stream is not None for s in segments):
        # The caching allocator serves a request from the segments of its own stream only.
        own = max((s.largest_free_block for s in shared if s.stream == stream), default=0)
        if own < largest_free:
            notes.append(
                f"the largest free block, {human_bytes(largest_free)}, is in another stream's segment: the "
                f"allocator serves stream {stream}'s requests from its own segments, whose largest is "
                f"{human_bytes(own)}"
            )
        largest_free = own
    if segments and not at_dump:
        notes.append("segments describe the dump, not this moment: no largest-free-block figure")
    reserved_unallocated = reserved - allocated if reserved is not None and allocated is not None else None
    private_pools = oom.private_pool_bytes if oom is not None and held_from_message else in_pools or None
    if held_from_message:
        assert reserved_unallocated is not None
        notes.append(
            f"no OOM snapshot (recorded with snapshots=True, it gives them exactly): allocated and "
            f"reserved memory at the failure are PyTorch's message's, {human_bytes(allocated)} allocated by "
            f"PyTorch and {human_bytes(reserved_unallocated)} reserved but unallocated, reserved their sum; "
            "each is to two decimals (within half a unit of its last digit: 5.12 MiB for GiB), so what "
            "follows from them (the free memory within a per-process limit, the shortfall) is approximate "
            "by as much, and there is no largest free block"
        )
    if private_pools and allocated is not None:
        notes.append(private_pools_note(private_pools, allocated, from_snapshot=not held_from_message))
    requested = oom.requested_bytes if oom is not None else None
    segment = oom.segment_bytes if oom is not None else None
    # What the failed allocation needed from the device: the request, or where CUDA's message names only the
    # segment it tried to reserve for it (the request unknown, at most that), the segment.
    needed = requested if requested is not None else segment
    if requested is None and segment is not None:
        at_most = human_bytes(request_at_most(segment))
        notes.append(
            f"PyTorch's message names the {human_bytes(segment)} segment the CUDA caching allocator tried to "
            f"reserve for the request, not the request: that was at most {at_most} (a snapshot, recorded "
            "with snapshots=True, gives it exactly); the shortfall is the segment's"
        )
    limit = oom.limit_bytes if oom is not None else None
    free_within_limit = None
    if limit is not None and reserved is not None:
        # Under a per-process cap the allocator may reserve only up to it, however much the device has free
        free_within_limit = max(limit - reserved, 0)
        notes.append(
            f"a per-process limit applied (torch.cuda.set_per_process_memory_fraction): PyTorch's message "
            f"says {human_bytes(limit)} allowed, so the allocator could reserve only "
            f"{human_bytes(free_within_limit)} more (allowed less reserved), not the device's free memory; "
            "the allowed figure is the message's, to two decimals (within half a unit of its last digit), so "
            "the free memory within it and the shortfall are approximate by as much"
        )
    room = reservable(free, free_within_limit)
    fragmented = possibly = None
    # Room enough for a new segment, yet the request failed: a cap the input does not give (a bare snapshot
    # does not record it), or the rounding of the one it gives, left less; whether fragmentation caused it
    # cannot be told then (None), nor denied.
    if requested is not None and largest_free is not None and reserved_unallocated is not None:
        unexplained = room is not None and room >= requested
        total_free = reserved_unallocated + (room or 0)
        fragmented = None if unexplained else total_free >= requested > max(largest_free, room or 0)
        possibly = fragmented
    elif oom is not None and largest_free is None and reserved_unallocated is not None and needed is not None:
        # No largest free block (no snapshot): enough free bytes in total, the reserved-but-unallocated
        # ones and what could still be reserved, leave fragmentation possible, not sure (PyTorch's own
        # message points there: "If reserved but unallocated memory is large try ... expandable_segments");
        # too few rule it out. A request known only by its segment (at most that) is compared at the segment
        # for "possible", where it cannot be ruled out.
        total_free = reserved_unallocated + (room or 0)
        if room is not None and room >= needed:
            possibly = None  # room for a new segment, yet it failed: cannot tell, as above
        elif total_free >= needed:
            possibly = True
        elif requested is not None:
            fragmented = possibly = False

    shortfall = None
    if needed is not None and room is not None and limit is not None and needed <= room:
        # The message's rounded cap leaves room for it, yet the allocation failed: the rounding hides the
        # shortfall, which is then at most the request (no less free than none within the cap)
        what = "the request" if requested is not None else f"the {human_bytes(needed)} segment"
        notes.append(
            f"the allowed figure, rounded in PyTorch's message, leaves room for {what}: the shortfall is "
            f"taken as {what} itself (at most that much was missing)"
        )
        shortfall = needed
    elif needed is not None and room is not None:
        shortfall = needed - room
        if shortfall <= 0:
            # The allocation failed although the device reports enough free memory: a cap such as
            # set_per_process_memory_fraction or another limit applies. At most the request was missing.
            what = "the request" if requested is not None else f"the {human_bytes(needed)} segment"
            notes.append(
                f"the device reported enough free memory for {what}, so a per-process limit applied: "
                f"the shortfall is taken as {what} itself (an upper bound: what the limit, which this input "
                "does not give, left free would lessen it)"
            )
            shortfall = needed
    elif needed is not None and oom is not None:
        shortfall = needed  # an OOM without a free figure: at least the request was missing
    elif budget_bytes is not None and allocated is not None and not peak_leaves_out:
        shortfall = allocated - budget_bytes  # unknown when the peak is a lower bound: no remedy "fits"
    return AllocatorFacts(
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        free_bytes=free,
        capacity_bytes=capacity,
        largest_free_block_bytes=largest_free,
        reserved_unallocated_bytes=reserved_unallocated,
        private_pool_bytes=private_pools,
        held_from_message=held_from_message,
        requested_bytes=requested,
        segment_bytes=segment,
        needed_bytes=needed,
        limit_bytes=limit,
        free_within_limit_bytes=free_within_limit,
        fragmented=fragmented,
        fragmentation_possible=possibly,
        shortfall_bytes=shortfall,
        notes=tuple(notes),
    )
