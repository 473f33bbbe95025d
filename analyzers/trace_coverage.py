"""What an input's events leave out of the run, said once for `report` and `diagnose`. Pure, torch-free.

* A trace that begins by freeing blocks it never allocated starts from a level higher than any it reaches
  after (`DeviceSummary.peak_before_trace`): that level is the peak, and the run reached it at or before
  the trace's first event, the trace showing nothing of that time. A torch 2.0 snapshot is the usual case:
  its history keeps one trace entry by default, the last free before the dump. What the allocator held
  reserved then is what it had cached earlier, at higher levels: not the slack of the run's peak.
* A Chrome trace without `[memory]` events (profiled without `profile_memory=True`) has no memory figures:
  its report's are 0 for want of any, not a measured 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analyzers.summary import DeviceSummary

__all__ = ["NO_ALLOCATOR_EVENTS_NOTE", "coverage_notes", "peak_before_trace_note"]

NO_ALLOCATOR_EVENTS_NOTE = (
    "the trace has no allocator events ([memory]): it was profiled without profile_memory=True, so its "
    "memory figures (peak, final, devices) are unknown, not 0; profile with "
    "torch.profiler(profile_memory=True), or record the run with kvtrace.record()"
)


def peak_before_trace_note(device: DeviceSummary, source_kind: str) -> str:
    """The note on a device whose peak is the level before its trace's first event."""
    note = (
        f"{device.device}: the peak is the level before the trace's first event (the trace holds "
        f"{device.alloc_events:,} allocs / {device.free_events:,} frees): the run peaked then or earlier, "
        "unseen, at least this high"
    )
    if device.reserved_at_peak is not None:
        note += ", and what was reserved then had been cached earlier: not the slack of a peak"
    if source_kind == "snapshot":
        note += (
            " (torch 2.0's _record_memory_history keeps 1 trace entry unless given trace_alloc_max_entries; "
            "later versions: max_entries)"
        )
    return note


def coverage_notes(source_kind: str, devices: list[DeviceSummary]) -> list[str]:
    """The report's notes on what its events do not cover: one per device that peaks before its trace, or
    that the trace holds no allocator events at all."""
    if source_kind == "chrome_trace" and not devices:
        return [NO_ALLOCATOR_EVENTS_NOTE]
    return [peak_before_trace_note(device, source_kind) for device in devices if device.peak_before_trace]
