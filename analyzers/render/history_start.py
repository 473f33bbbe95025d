"""What a snapshot's page says of the memory held before its allocator history begins.

torch keeps a snapshot's history in a ring buffer of its last actions (`max_entries`), so on a long run
it begins mid-run (as it does when turned on after the run began): the blocks it frees, or still holds at
the dump, without having seen them allocated are the level before its first event. The chart draws that
level from its start, split by the blocks' stacks (often all "other"), so a category the trace's own
allocations attribute, KV, climbs from 0 in the first fraction of a second: the history starting, not
the run. The page says so, in a note and at the chart's first point."""

from __future__ import annotations

from analyzers.model import MemorySource
from analyzers.summary import Report
from analyzers.timeline import DeviceTimeline
from analyzers.units import human_bytes

__all__ = ["begins_mid_run", "history_start_label", "history_start_notes"]


def begins_mid_run(source: MemorySource, timeline: DeviceTimeline) -> bool:
    """Whether `timeline` is a snapshot device's whose history has events and begins after blocks it frees
    or holds were allocated (a level before its first event). A snapshot without events is one level,
    which its axis and note already say."""
    return source.kind == "snapshot" and len(timeline.ts_us) > 0 and timeline.start_allocated > 0


def history_start_label(timeline: DeviceTimeline) -> str:
    """The chart's mark at the history's first point."""
    return f"allocator history begins: {human_bytes(timeline.start_allocated)} held before it"


def history_start_notes(source: MemorySource, report: Report) -> list[str]:
    """A note for each such device, but where the report's own note says it (the peak is the level before
    the first event)."""
    said_before = {dev.device for dev in report.devices if dev.peak_before_trace}
    notes = []
    for timeline in report.timelines:
        if not begins_mid_run(source, timeline) or timeline.device in said_before:
            continue
        held = timeline.start_by_category
        parts = [f"{name} {human_bytes(held[name])}" for name in ("kv", "weights", "other") if held.get(name)]
        if parts == [f"other {human_bytes(timeline.start_allocated)}"]:
            split = "counted as other (their stacks name no KV or weights)"
        else:
            split = "split by their stacks: " + ", ".join(parts)
        climbs = " (KV)" if report.kv.measured_from != "none" else ""  # a series the chart draws
        notes.append(
            f"{timeline.device}: the snapshot's allocator history begins mid-run (torch keeps its last "
            "max_entries actions, or the history was turned on after the run began): "
            f"{human_bytes(timeline.start_allocated)} was allocated before its first event "
            "(blocks it frees, or still holds at the dump, without having seen them allocated). The chart "
            f"starts at that level, {split}: a category that climbs from 0 at the start{climbs} is the "
            "history beginning, not the run's memory growing"
        )
    return notes
