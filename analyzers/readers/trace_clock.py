"""Puts a run's profiler trace on the run's clock when the trace's own clock base cannot.

Kineto writes each `ts` relative to the trace's top-level `baseTimeNanoseconds` (docs/format.md, "Clock"),
and the KV log's `t_ns` is Unix time. The KV log's join (analyzers.attribution) takes, of the trace's
allocations at a storage's address and of its size, the one live when the log saw the storage: it compares
times. A trace whose base is missing, not a positive integer, or changed by another tool (a merge) leaves
its events days or seconds away from the log, every storage misses its allocation, and the KV cache is
counted as other.

The addresses give the clock back. A storage's allocation is one of the trace's allocations of its address
and size (on a GPU, of a block that can hold it: the caching allocator reports its blocks), and the log
sees the storage after it: tens of µs after when the cache's update logs it, so at most `WINDOW_US`; up to
a whole forward after when a scan at the forward's end finds it (a module cache: Meta's `cache_k` made by
the first forward's `.to(xq)` is seen after the output projection, 50-120 ms later on a small model), so at
most its reach (`sighting_reach_us`: since the log's last line before that forward). Under the right shift
most storages have an allocation within their reach before their sighting; under a wrong one few do, as an
address and size recur only a step or more apart. `clock_shift` finds the shifts that cover the most
storages and takes the latest of them (a µs later, some storage's allocation would follow its sighting),
less `SIGHTING_MARGIN_US`. A trace on which most storages are already seen in time (a right base, or an older
Kineto that writes Unix-epoch `ts` and no base) is left as read. Scanned storages alone place a trace only
within a forward: where in it each was made, the log cannot say.

A run recorded by kvtrace says more: each step's sample holds when its forward began on the run's clock
(`started_ns`), and the recorder opens the step's range ("kvtrace/prefill", "kvtrace/decode N") in the trace
just after reading that clock. The ranges' starts less those times measure the trace's lead directly,
whatever the host's load (`step_range_lead_us`); the storages are the fallback for traces without them. On
a loaded host a storage's allocation may come tens of ms before the update that logs it (the process
descheduled inside a `cat`), past any reach the storages can be given: a base set 2.15 ms late then moved
no trace, and the join counted two of a prefill's KV storages as other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from analyzers.attribution import (
    JOIN_TOLERANCE_US,
    LEAD_REACH_US,
    RANGES_LEAD,
    SIGHTING_MARGIN_US,
    block_holds,
    sizes_are_blocks,
)
from analyzers.model import DeviceEvents, Marker, MemorySource

__all__ = ["ClockShift", "align_trace_clock", "clock_shift", "sighting_reach_us", "step_range_lead_us"]

# The join's own tolerance: a trace within it of the log's clock is not moved, and a sighting counts for a
# shift when its allocation is at most this long before it.
WINDOW_US = JOIN_TOLERANCE_US
# Storages looked at: the shift is one number for the whole trace, a sample of this size fixes it.
SAMPLE_STORAGES = 512
# An address and size allocated more often than this says little about when the storage was: left out.
MAX_CANDIDATES = 4096
# A lead the step ranges measure and put right without a note: Kineto's base has been seen set up to ~8 ms
# late on a loaded host, near enough for a reader of the trace's file alone; one farther off is said.
QUIET_LEAD_US = 10_000.0

Storage = tuple[int, int, int, int, int, str, int]  # analyzers.kv_log: addr, bytes, first_ns, freed_ns, ...


@dataclass(frozen=True)
class ClockShift:
    """What the KV log's storages say of the trace's clock."""

    shift_us: int  # add to the trace's times to put them on the run's clock
    covered: int  # sampled storages with an allocation at most their reach before their sighting, shifted
    covered_as_read: int  # the same count for the trace's times as read (and up to WINDOW_US after)
    with_allocation: int  # sampled storages with any allocation of their address and size in the trace
    # Of `covered`, those whose allocation under the shift (one live at the sighting) also fits them as
    # read: the others fit as read, if at all, only by another allocation of their address and size (an
    # earlier occupant the CPU's malloc or the caching allocator handed the same block), which says nothing
    # of the clock
    kept_as_read: int = 0


def _candidates(devices: list[DeviceEvents], storages: list[Storage]) -> dict[tuple[int, int], np.ndarray]:
    """The trace's allocations that can be the storages', by the storage's (address, bytes): of its address
    and size, or on a GPU of a block that can hold it (`block_holds`), as the join takes. One row each: its
    time and its free's (the next free of its address; inf where the trace has none)."""
    wanted = np.fromiter({s[0] for s in storages}, dtype=np.int64)
    at: dict[int, list[list[Any]]] = {}  # address -> [size, time, freed, sizes are blocks]
    for dev in devices:
        if not len(dev):
            continue
        blocks = sizes_are_blocks(dev)
        hits = np.nonzero((dev.delta_bytes != 0) & np.isin(dev.addr, wanted))[0]
        open_at: dict[int, list[Any]] = {}
        for addr, size, ts in zip(
            dev.addr[hits].tolist(), dev.delta_bytes[hits].tolist(), dev.ts_us[hits].tolist(), strict=True
        ):
            if size > 0:
                row = [size, float(ts), math.inf, blocks]
                at.setdefault(addr, []).append(row)
                open_at[addr] = row
            elif (row_open := open_at.pop(addr, None)) is not None:
                row_open[2] = float(ts)
    groups: dict[tuple[int, int], np.ndarray] = {}
    for addr, nbytes, *_rest in storages:
        if (addr, nbytes) in groups:
            continue
        rows = [
            (ts, freed)
            for size, ts, freed, blocks in at.get(addr, ())
            if size == nbytes or (blocks and block_holds(size, nbytes))
        ]
        if rows and len(rows) <= MAX_CANDIDATES:
            groups[(addr, nbytes)] = np.asarray(rows, dtype=np.float64)
    return groups


def clock_shift(
    devices: list[DeviceEvents], storages: list[Storage], reach_us: list[float] | None = None
) -> ClockShift | None:
    """The shift that puts the trace's allocations just before the KV log's sightings of the storages;
    None when no storage has an allocation of its address and size (on a GPU, its block) in the trace.
    `reach_us`, one per storage: how long before its sighting its allocation may be (`sighting_reach_us`);
    WINDOW_US for every storage when not given."""
    step = max(1, math.ceil(len(storages) / SAMPLE_STORAGES))
    sample = storages[::step]
    reaches = [WINDOW_US] * len(sample) if reach_us is None else reach_us[::step]
    groups = _candidates(devices, sample)
    lags: list[np.ndarray] = []  # sighting - allocation (µs) of each candidate, as read
    free_lags: list[np.ndarray] = []  # sighting - its free (-inf: never freed in the trace)
    owners: list[np.ndarray] = []
    spans: list[np.ndarray] = []  # the candidate's storage's reach
    for index, (addr, nbytes, first_ns, *_rest) in enumerate(sample):
        rows = groups.get((addr, nbytes))
        if rows is not None:
            lags.append(first_ns / 1000.0 - rows[:, 0])
            free_lags.append(first_ns / 1000.0 - rows[:, 1])
            owners.append(np.full(len(rows), index, dtype=np.int64))
            spans.append(np.full(len(rows), reaches[index]))
    if not lags:
        return None
    lag = np.concatenate(lags)
    free_lag = np.concatenate(free_lags)
    owner = np.concatenate(owners)
    reach = np.concatenate(spans)
    covered_as_read = len(np.unique(owner[(lag >= -WINDOW_US) & (lag <= reach)]))
    # A candidate covers the shifts s under which its allocation lands at most its reach before the
    # sighting: s in [lag - reach, lag]. Sweep those intervals' ends in order (an interval's start before
    # any end at the same place), counting the distinct storages covered; the count peaks at an end.
    position = np.concatenate([lag - reach, lag])
    ends = np.concatenate([np.zeros(len(lag), dtype=np.int8), np.ones(len(lag), dtype=np.int8)])
    order = np.lexsort((ends, position))
    whose = np.concatenate([owner, owner])[order].tolist()
    counts: dict[int, int] = {}
    best, best_at = 0, 0.0
    for at, is_end, storage in zip(position[order].tolist(), ends[order].tolist(), whose, strict=True):
        if not is_end:
            counts[storage] = counts.get(storage, 0) + 1
            continue
        if len(counts) >= best:  # ties: the latest shift, the tightest fit
            best, best_at = len(counts), at
        held = counts[storage] - 1
        if held:
            counts[storage] = held
        else:
            del counts[storage]
    # A storage's allocation under the shift is live at its sighting (freed after it, on the shifted
    # clock): an earlier occupant of its block, freed before the storage took it, may fit it as read, but
    # is not it
    kept = len(
        np.unique(
            owner[
                (lag - reach <= best_at) & (best_at <= lag) & (free_lag <= best_at)
                & (lag >= -WINDOW_US) & (lag <= reach)
            ]
        )
    )  # fmt: skip
    return ClockShift(math.floor(best_at - SIGHTING_MARGIN_US), best, covered_as_read, len(lags), kept)


def sighting_reach_us(
    storages: list[Storage], scanned_after_ns: dict[int, int], run_start_ns: int
) -> list[float]:
    """How long (µs) before the KV log's sighting each storage's allocation may be: WINDOW_US for one its
    update logged (made just before); for one a scan found (`KvLogAnalysis.scanned_after_ns`: a module
    cache, compared at the end of each forward), since the log's last line before the forward that found
    it (else the run's start), and WINDOW_US more for the clocks."""
    reach = [WINDOW_US] * len(storages)
    for index, after_ns in scanned_after_ns.items():
        since_ns = after_ns or run_start_ns
        reach[index] = max(0.0, (storages[index][2] - since_ns) / 1000.0) + WINDOW_US
    return reach


def _base_fault(base_ns: Any) -> str | None:
    """Why the trace's base is no clock base, or None when it is one."""
    if base_ns is None:
        return "is missing"
    if isinstance(base_ns, bool) or not isinstance(base_ns, int):
        return f"is {str(base_ns)[:40]!r}, not a whole number of nanoseconds"
    if not 0 < base_ns < 2**63:  # Kineto's is an int64 of Unix-epoch ns
        return f"is {str(base_ns)[:40]}"
    return None


def step_range_lead_us(markers: list[Marker], step_starts: dict[int, tuple[int, str]]) -> float | None:
    """How far (µs) the trace's clock runs ahead of the run's, as the recorder's step ranges say: each step's
    range opens just after the recorder read the run's clock for the step's start (`step_starts`: step ->
    (its sample's `started_ns`, phase)), so a range's start less that time is the lead plus a gap that is
    never negative (µs, or more where the host descheduled the process between the two): the least of them.
    None where the ranges and the steps do not pair one to one, in order and phase (a trace that holds no
    ranges or only some steps' forwards), or pair with gaps too unlike to be one clock's (more than the
    join's tolerance between the least and the median)."""
    ranges = sorted(
        (
            m
            for m in markers
            if m.kind == "step" and (m.label == "kvtrace/prefill" or m.label.startswith("kvtrace/decode "))
        ),
        key=lambda m: m.ts_us,
    )
    steps = [step_starts[step] for step in sorted(step_starts)]
    if not ranges or len(ranges) != len(steps):
        return None
    if any(
        (m.label == "kvtrace/prefill") != (phase == "prefill")
        for m, (_, phase) in zip(ranges, steps, strict=True)
    ):
        return None
    gaps = sorted(m.ts_us - began_ns / 1000.0 for m, (began_ns, _) in zip(ranges, steps, strict=True))
    if gaps[len(gaps) // 2] - gaps[0] > WINDOW_US:
        return None
    return gaps[0]


def align_trace_clock(
    source: MemorySource,
    storages: list[Storage],
    base_ns: Any,
    span_ns: tuple[int, int],
    scanned_after_ns: dict[int, int] | None = None,
    step_starts: dict[int, tuple[int, str]] | None = None,
) -> None:
    """Shift the trace's events and markers (already in `source`) onto the run's clock when the recorder's
    step ranges (`step_starts`: see `step_range_lead_us`), or without them the KV log's storages, say its
    base put them elsewhere; the report's notes say so (for the ranges, past QUIET_LEAD_US).
    When neither can say while the events lie outside the run (`span_ns`: the run's start and end), a note
    says the trace is off the run's clock. `scanned_after_ns`: the storages a scan found
    (`KvLogAnalysis.scanned_after_ns`)."""
    fault = _base_fault(base_ns)
    lead = step_range_lead_us(source.markers, step_starts) if step_starts else None
    if lead is not None:
        _align_by_ranges(source, lead, fault, len(step_starts or ()))
        return
    reach = sighting_reach_us(storages, scanned_after_ns or {}, span_ns[0])
    found = clock_shift(source.devices, storages, reach)
    if found is not None and _moves(found):
        _shift(source, found.shift_us)
        source.meta["trace_clock_shift_us"] = found.shift_us
        away = f"puts its events {abs(found.shift_us) / 1e6:,.3f} s away from the run's clock"
        edited = "a trace edited or merged by another tool?"
        if abs(found.shift_us) < 1e6:  # tens of ms: Kineto's base set off by that much, seen on a loaded host
            edited = f"its clock base set off on a loaded host, or {edited}"
        why = fault or f"{away} ({edited})"
        note = (
            f"the profiler trace's baseTimeNanoseconds {why}: its events were put on the run's clock by "
            "matching KV storages to their allocations by address and size "
            f"({found.covered} of the {found.with_allocation} looked at)"
        )
    elif not _within(source.devices, span_ns):
        why = fault or "puts its events outside the run's time"
        note = (
            f"the profiler trace's baseTimeNanoseconds {why} and too few of its allocations match the KV "
            "log's storages to set its clock: its events are off the run's clock, so the memory figures "
            "count the KV cache as other (the KV section's figures are the KV log's)"
        )
    else:
        return
    source.meta.setdefault("input_notes", []).append(note)
    source.meta["trace_clock_note"] = note


def _align_by_ranges(source: MemorySource, lead_us: float, fault: str | None, steps: int) -> None:
    """Put the trace on the run's clock by the lead its step ranges measured: left as read within
    SIGHTING_MARGIN_US (the join places storages that close), moved beyond it, with a note where the base
    is no clock base or is more than QUIET_LEAD_US off. The lead left (`RANGES_LEAD`: the µs the ranges
    measured, or their fraction) bounds the KV log's join's: a range opens just after its step's sample, so
    each sighting read that much later is read at most those µs late, where the storages' fit reads up to
    SIGHTING_MARGIN_US late (the next occupant of a storage's address may come sooner)."""
    if abs(lead_us) <= SIGHTING_MARGIN_US:
        source.meta[RANGES_LEAD] = lead_us
        return
    shift_us = math.floor(-lead_us)
    _shift(source, shift_us)
    source.meta["trace_clock_shift_us"] = shift_us
    source.meta[RANGES_LEAD] = lead_us + shift_us
    if abs(lead_us) <= QUIET_LEAD_US and fault is None:
        return
    away = f"puts its events {abs(shift_us) / 1e6:,.3f} s away from the run's clock"
    edited = "a trace edited or merged by another tool?"
    if abs(shift_us) < 1e6:
        edited = f"its clock base set off on a loaded host, or {edited}"
    why = fault or f"{away} ({edited})"
    note = (
        f"the profiler trace's baseTimeNanoseconds {why}: its events were put on the run's clock by "
        f"kvtrace's step ranges in it ({steps} steps, each range opened as its step began)"
    )
    source.meta.setdefault("input_notes", []).append(note)
    source.meta["trace_clock_note"] = note


def _moves(found: ClockShift) -> bool:
    """Whether the storages call for the shift: most of those with an allocation agree on it, the shift
    is more than the join tolerates, and fewer than half as many agree with the trace as read, or, where
    the shift fits more storages than the trace as read does, none by its own allocation. A base set a few
    ms late on a loaded host puts every storage's allocation past the join's tolerance, while earlier
    occupants of some of their blocks fit them as read: the 2 of 4 storages these fitted kept the trace
    from moving, and the KV cache was counted as other. Where some storages' own allocations fit as read
    (a lead just past the tolerance), the join places them (`analyzers.attribution`), as far as it looks
    for a lead (LEAD_REACH_US, either way; the shift, less the margin, puts the storage seen soonest after
    its allocation at its sighting): 2.1-2.9 ms ahead, the storages seen at once fell past it while half
    the others fit as read, the lead the join found was those others', and a one-by-one eviction's KV peak
    read 12,544-16,896 B, not 18,944."""
    agreed = found.covered >= 2 and 2 * found.covered >= found.with_allocation
    if not agreed or abs(found.shift_us) <= WINDOW_US:
        return False
    if 2 * found.covered_as_read < found.covered:
        return True
    beyond_join = abs(found.shift_us + SIGHTING_MARGIN_US) > LEAD_REACH_US
    return found.covered > found.covered_as_read and (found.kept_as_read == 0 or beyond_join)


def _within(devices: list[DeviceEvents], span_ns: tuple[int, int]) -> bool:
    """Whether the trace's memory events overlap the run's time (with the join's tolerance)."""
    first = min((float(dev.ts_us[0]) for dev in devices if len(dev)), default=None)
    last = max((float(dev.ts_us[-1]) for dev in devices if len(dev)), default=None)
    if first is None or last is None:
        return True
    return first <= span_ns[1] / 1000.0 + WINDOW_US and last >= span_ns[0] / 1000.0 - WINDOW_US


def _shift(source: MemorySource, shift_us: int) -> None:
    for dev in source.devices:
        if dev.ts_us.dtype.kind in "iu":
            dev.ts_us = dev.ts_us + np.int64(shift_us)
        else:
            dev.ts_us = dev.ts_us + float(shift_us)
    source.markers = [
        dataclasses.replace(
            marker,
            ts_us=marker.ts_us + shift_us,
            end_us=None if marker.end_us is None else marker.end_us + shift_us,
        )
        for marker in source.markers
    ]
