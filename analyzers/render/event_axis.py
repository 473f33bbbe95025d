"""Where the HTML timeline puts a device's memory events on x: seconds from the first event, or each event's
place in order where no clock tells them apart.

A snapshot of torch 2.0 records no times (its entries go by their index in the trace), and a trace whose
events all fall at one instant (a ring buffer of one entry) has nothing to spread them over: drawn at one
x, a stacked area has no width and the chart is two dots on an empty axis. On an axis of events in order,
the level before the trace spans the event before the first one, and a chart of one instant also holds
its last level over one event after it, so that the level before, the step of each event and the level
after all show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from analyzers.timeline import DeviceTimeline

__all__ = ["LEVEL_LINE", "EventAxis", "event_axis", "held_points", "held_span"]

# How a memory level is drawn between two events: held until the next one (plotly's "hv" step), as torch's
# memory_viz draws it. Memory is piecewise constant; a straight line between 6 MiB at one event and 512 MiB
# at the next draws growth that never happened.
LEVEL_LINE = "hv"

_BEFORE = "-1: the level before the trace"


@dataclass(frozen=True)
class EventAxis:
    t0: float  # the first event's `ts_us`: x = 0
    in_order: bool  # x counts events, not seconds
    by_position: bool  # x is the event's position in its device's events (their times are all one)
    instant_events: int  # the most events of a device where every device's share one instant, else 0
    title: str
    x_title: str
    held_only: bool = False  # no device has events: a device's memory held is one level, x = 0 to 1

    def place(self, ts_us: float) -> float:
        """A marker's x (a step, an OOM, a budget crossing): its time, or, where the events are drawn in
        order at one time, before them (-1), at them (0) or after them."""
        if self.by_position:
            if ts_us == self.t0:
                return 0.0
            return -1.0 if ts_us < self.t0 else float(self.instant_events)
        return (ts_us - self.t0) / (1.0 if self.in_order else 1e6)

    def points(
        self, timeline: DeviceTimeline, keep: np.ndarray
    ) -> tuple[np.ndarray, Callable[[np.ndarray, int], np.ndarray]]:
        """x of the kept events, with the level before the first event in front, and a function that lines a
        series' values (and its level before the trace) up with that x."""
        if self.held_only:  # no events: the level before the trace, from 0 to 1
            return held_points((0.0, 1.0))
        if self.by_position:
            x = keep.astype(np.float64)
        else:
            x = (timeline.ts_us[keep] - self.t0) / (1.0 if self.in_order else 1e6)
        starts = timeline.start_allocated != int(timeline.allocated[0])
        # The level before the trace: at the first event's time on a clock (how long it held is unknown),
        # over the event before the first on an axis of events.
        lead = (2 if self.in_order else 1) if starts else 0
        hold = 1 if self.in_order and self.instant_events else 0
        x = np.concatenate([[x[0] - 1, x[0]][2 - lead :], x, x[len(x) - hold :] + 1])

        def values(series: np.ndarray, start: int) -> np.ndarray:
            picked = series[keep]
            return np.concatenate(
                [np.full(lead, start, dtype=picked.dtype), picked, picked[len(picked) - hold :]]
            )

        return x, values


def held_points(span: tuple[float, float]) -> tuple[np.ndarray, Callable[[np.ndarray, int], np.ndarray]]:
    """x and values of a device without events: its level before the trace, one flat line across `span`
    (the x the devices with events cover), since that level is all that is known of it."""
    return np.array(span, dtype=np.float64), lambda series, start: np.full(2, start, dtype=np.int64)


def held_span(xs: Iterable[float]) -> tuple[float, float]:
    """The `span` of `held_points`: from the first to the last of `xs` (the x the devices with events are
    drawn at), or 0 to 1 where they cover no width (an axis that measures nothing)."""
    xs = list(xs)
    return (min(xs), max(xs)) if xs and min(xs) < max(xs) else (0.0, 1.0)


def event_axis(
    timelines: list[DeviceTimeline],
    t0: float,
    untimed: bool,
    seconds_shared: bool,
    held_at: str = "at its start",
) -> EventAxis:
    """`untimed`: the events' `ts_us` are their index in the trace (a snapshot without times);
    `seconds_shared`: other charts share this x in seconds (the KV log's, the CPU samples'), so events at
    one time cannot be laid out in order; `held_at`: when the memory held without events was seen (a
    snapshot's, "at the dump")."""
    with_events = [tl for tl in timelines if len(tl.ts_us)]
    if not with_events and not seconds_shared and any(tl.start_allocated for tl in timelines):
        # A trace that kept no allocator events (torch 2.0's ring buffer of one "snapshot" entry): the
        # memory held is one level, drawn across an axis that measures nothing
        title = f"Memory by category: the trace holds no allocations, only the state {held_at}"
        return EventAxis(t0, True, False, 0, title, f"no allocator events (the level held {held_at})", True)
    instant = bool(with_events) and all(tl.ts_us[0] == tl.ts_us[-1] for tl in with_events)
    by_position = instant and not untimed and not seconds_shared
    in_order = untimed or by_position
    events = max((len(tl.ts_us) for tl in with_events), default=0) if instant else 0
    starts = any(tl.start_allocated != int(tl.allocated[0]) for tl in with_events)
    title = "Memory by category over time"
    if instant and events == 1:
        title = "Memory by category: the trace holds a single event"
    elif instant:
        title = f"Memory by category: the trace's {events:,} events fall at one instant"
    if instant and in_order:
        title += ", drawn with the level before it and after it" if events == 1 else ", drawn in order"
    elif instant:
        title += " (no span of time to draw)"
    notes = []
    if untimed:
        notes.append("this snapshot records no times")
    elif by_position:
        notes.append("all at one time")
    if in_order and starts:
        notes.append(_BEFORE)
    x_title = f"allocator event, in order ({'; '.join(notes)})" if in_order else "seconds from first event"
    return EventAxis(t0, in_order, by_position, events, title, x_title)
