"""What an input's events leave out of the run, said once for `report` and `diagnose`. Pure, torch-free.

* A trace that begins by freeing blocks it never allocated starts from a level higher than any it reaches
  after (`DeviceSummary.peak_before_trace`): that level is the peak, and the run reached it at or before
  the trace's first event, the trace showing nothing of that time. A torch 2.0 snapshot is the usual case:
  its history keeps one trace entry by default, the last free before the dump. What the allocator held
  reserved then is what it had cached earlier, at higher levels: not the slack of the run's peak.
* A Chrome trace without `[memory]` events (profiled without `profile_memory=True`) has no memory figures:
  its report's are 0 for want of any, not a measured 0. One whose `[memory]` events are there but all
  damaged (a `Bytes` that is a string, no `args`, a `ts` that is NaN) has none either, for that reason:
  profiling again with `profile_memory=True` would not help, so its note says what was skipped and why.
* A snapshot whose trace holds no alloc or free (no `device_traces`, or history recorded too briefly) has
  only the state at its dump: that moment is its "peak", which a note says.
* A snapshot whose trace completes a free it never saw requested lost its oldest entries to torch's ring
  buffer (`max_entries`): its peak is its span's, the last seconds of a run that may have peaked before
  them. memory_viz draws the same span with no word of it; a note says so (the reader's `history_cut`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.summary import DeviceSummary

__all__ = [
    "NO_ALLOCATOR_EVENTS_NOTE",
    "all_memory_events_damaged",
    "coverage_notes",
    "damaged_memory_events",
    "dump_only_note",
    "history_cut_note",
    "peak_before_trace_note",
    "skipped_events_note",
    "trace_span_words",
]

NO_ALLOCATOR_EVENTS_NOTE = (
    "the trace has no allocator events ([memory]): it was profiled without profile_memory=True, so its "
    "memory figures (peak, final, devices) are unknown, not 0; profile with "
    "torch.profiler(profile_memory=True), or record the run with kvtrace.record()"
)


_MEMORY = "[memory] "  # how the Chrome trace reader's skip reasons for allocator events begin


def damaged_memory_events(skipped_events: dict[str, int] | None, whose: str = "the trace's") -> str | None:
    """What was skipped of the `[memory]` events (the reader's `skipped_events`), as "the trace's [memory]
    events are damaged: 3 of 3 skipped (3 with a non-integer Bytes)"; None when none was. For an input none
    of whose allocator events was kept: every one was skipped, so the count is of all of them."""
    damaged = {
        reason.removeprefix(_MEMORY): count
        for reason, count in (skipped_events or {}).items()
        if reason.startswith(_MEMORY) and count
    }
    if not damaged:
        return None
    total = sum(damaged.values())
    ranked = sorted(damaged.items(), key=lambda item: (-item[1], item[0]))
    reasons = ", ".join(f"{count:,} {reason}" for reason, count in ranked)
    return f"{whose} [memory] events are damaged: {total:,} of {total:,} skipped ({reasons})"


def skipped_events_note(skipped_events: dict[str, int], of: int | None, what: str = "") -> str:
    """The note on the events a reader skipped, with their reasons: "skipped 3 of 6 events: 2 [memory]
    with a non-integer Bytes, 1 [memory] with a non-numeric ts"; `what` heads it ("the profiler trace: ")."""
    total = sum(skipped_events.values())
    ranked = sorted(skipped_events.items(), key=lambda item: -item[1])
    reasons = ", ".join(f"{count} {reason}" for reason, count in ranked)
    return f"{what}skipped {total}{f' of {of}' if of else ''} events: {reasons}"


def all_memory_events_damaged(source: MemorySource) -> str | None:
    """`damaged_memory_events` of a Chrome trace whose `[memory]` events were all skipped (no device kept
    one); None for any other input. Such a trace has no memory figures: tools that need them refuse it."""
    if source.kind != "chrome_trace" or source.devices:
        return None
    return damaged_memory_events(source.meta.get("skipped_events"))


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


def coverage_notes(
    source_kind: str,
    devices: list[DeviceSummary],
    skipped_events: dict[str, int] | None = None,
    history_cut: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """The report's notes on what its events do not cover: one per device that peaks before its trace, or
    whose snapshot trace lost its start (`history_cut`, the reader's), or that the trace holds no allocator
    events at all, or none that could be read (`skipped_events`, the reader's: what it skipped as damaged,
    and why)."""
    if source_kind == "chrome_trace" and not devices:
        damaged = damaged_memory_events(skipped_events)
        if damaged is not None:
            return [f"{damaged}: its memory figures (peak, final, devices) are unknown, not 0"]
        return [NO_ALLOCATOR_EVENTS_NOTE]
    notes = [peak_before_trace_note(device, source_kind) for device in devices if device.peak_before_trace]
    if source_kind == "snapshot":
        untraced = [device for device in devices if not device.alloc_events + device.free_events]
        notes.extend(map(dump_only_note, untraced))
        for device in devices:  # a peak before the trace is said above, with the entries the trace holds
            cut = (history_cut or {}).get(device.device)
            if cut is not None and not device.peak_before_trace:
                notes.append(history_cut_note(device.device, cut))
    return notes


def history_cut_note(device: str, cut: dict[str, Any]) -> str:
    """The note on a snapshot device whose trace lost its oldest entries to the ring buffer: `cut` is the
    reader's (`entries` in the trace, `at`: the index of the free completed without its request,
    `span_us`: first to last entry, None without times)."""
    entries = cut["entries"]
    span = cut.get("span_us")
    kept = (
        f"the last {span / 1e6:,.3f} s before the dump"
        if span is not None
        else f"its last {entries:,} entries"
    )
    return (
        f"{device}: the snapshot's trace lost its oldest entries: its entry {cut['at'] + 1:,} of {entries:,} "
        "completes a free whose request is not in it, so torch's ring buffer (_record_memory_history's "
        "max_entries) had dropped what came before (or the history was turned on while that free waited on "
        f"a stream). The figures cover {kept}: the peak is the highest level then, and the run may have "
        "peaked earlier, unseen; record with a larger max_entries to see all of it"
    )


def trace_span_words(entries: int, span_us: float | None) -> str:
    """What a snapshot's figures sum over, said where a run's say "over the run": "the trace's 2,811
    entries, the last 0.016 s before the dump" (without times, its entries only). The trace is a ring buffer
    of max_entries, its history maybe turned on mid-run: its span, not the run's."""
    last = f", the last {span_us / 1e6:,.3f} s before the dump" if span_us is not None else ""
    return f"the trace's {entries:,} {'entry' if entries == 1 else 'entries'}{last}"


def dump_only_note(device: DeviceSummary) -> str:
    """The note on a snapshot device whose trace holds no alloc or free: its figures are the blocks held at
    the dump, one moment, which the report would otherwise give as a peak like any other."""
    return (
        f"{device.device}: the snapshot's trace holds no allocs or frees: the peak and final are what was "
        "allocated at the dump, one moment; the run's peak is not seen (torch.cuda.memory."
        "_record_memory_history(max_entries=...) before the run records a trace; trace_alloc_max_entries "
        "in torch 2.0)"
    )
