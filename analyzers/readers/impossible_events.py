"""`[memory]` events whose figures the trace's own other events rule out: damage, skipped with a note.

A value can be well-formed and still impossible. Two such cases change a trace's figures silently:

* A free of more than the allocator ever held. The allocator's `Total Allocated` before a free counts the
  block being freed, so a free of N bytes follows an event whose total was at least N; a block allocated
  before the profiler started is counted too (it is held at every earlier event). So a free larger than
  every earlier total of its device is impossible when its own total is whole (>= 0): its Bytes were
  damaged. (With totals that agree with the Bytes, such a free leaves a total below 0: that is damage of
  the totals, see `chrome_trace.NEGATIVE_TOTAL_NOTE`, and the Bytes stand.) Taken as is, the free reads
  as memory allocated before the trace and lifts the level before the trace by its size (-1e12 Bytes: a
  931 GiB peak). The device's first event has no earlier total and is not judged; nor is a device with
  several processes, each counting its own total (an event's process is not kept).
* A time far outside the span of the device's other events (1e30 µs). Sorted, such an allocation lands
  after its own free and looks held forever. "Far" is beyond the middle half of the device's events by
  more than `SPREAD_FACTOR` times that half's width and at least `FAR_US`: no profiler session is that
  long, and a device with fewer than four events is not judged.

Both the column readers (`chrome_trace`) and the streaming report (`stream_summary`, which hands a trace
with such an event to the column readers) use these rules, so every path drops the same events.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FAR_TS_REASON",
    "FAR_US",
    "OVERSIZED_FREE_REASON",
    "SPREAD_FACTOR",
    "far_timestamps",
    "oversized_frees",
]

FAR_US = 1e12  # ~11.6 days of µs, the least distance judged far: a span no real trace's memory events have
SPREAD_FACTOR = 1000  # times the width of the middle half of a device's events
# Reasons in the reader's `skipped_events`, as `analyzers.trace_coverage` words them ("[memory] " first)
OVERSIZED_FREE_REASON = "[memory] freeing more than any earlier 'Total Allocated'"
FAR_TS_REASON = "[memory] with a ts far outside the trace's other events"


def oversized_frees(
    delta: np.ndarray, allocated: np.ndarray, most_before: int = -1
) -> tuple[np.ndarray, int]:
    """(mask of the frees larger than every earlier `Total Allocated`, the largest total so far).

    `delta` and `allocated` are one device's events in time order (a total below 0 is unknown: -1 stands
    for a missing one); `most_before` is the largest total of the events before them, -1 for none, so
    chunks can be judged one after another."""
    if len(delta) == 0:
        return np.zeros(0, dtype=bool), most_before
    most = np.maximum.accumulate(np.maximum(allocated.astype(np.int64), most_before))
    before = np.concatenate(([most_before], most[:-1]))
    return (delta < 0) & (allocated >= 0) & (before >= 0) & (-delta > before), int(most[-1])


def far_timestamps(ts: np.ndarray) -> np.ndarray | None:
    """Mask of the events of one device (raw `ts`, any order) far outside the span of the others (see the
    module docstring); None when there is none, the common case, found from the extremes alone."""
    count = len(ts)
    if count < 4 or float(ts.max()) - float(ts.min()) <= FAR_US:
        return None
    lower, upper = count // 4, (3 * count) // 4
    quartiles = np.partition(ts, (lower, upper))
    low, high = float(quartiles[lower]), float(quartiles[upper])
    reach = max(FAR_US, SPREAD_FACTOR * (high - low))
    far = (ts < low - reach) | (ts > high + reach)
    return far if bool(far.any()) else None
