"""`readers.trace_clock` moves a trace whose clock base a loaded host set a few ms late, though earlier
occupants of some KV storages' addresses fit those storages as read.

The lags are a real run's (a prefill cut short at its third layer: 4 storages, the first 2 layers' K and V,
each of 4,096 bytes), read with its trace's base set 3 ms late: each storage's own allocation 2.9 ms after
its sighting, past the join's tolerance, and for two of them a same-sized projection output, freed just
before the storage took its block, 1.5 ms before the sighting, within it.
"""

from __future__ import annotations

import numpy as np
import pytest

from analyzers.model import DeviceEvents
from analyzers.readers.trace_clock import SIGHTING_MARGIN_US, Storage, _moves, clock_shift

SIGHTING_US = 1_796_591_212_550_000  # each storage's first line in the KV log, µs since the epoch
NBYTES = 4096


def _run(lags_us: list[list[int]]) -> tuple[list[DeviceEvents], list[Storage]]:
    """One storage per entry, sighted 1 ms apart; each lag (sighting - allocation, µs) an allocation of its
    address and size, freed 100 µs later unless it is the storage's own (the last, nearest the sighting)."""
    events: list[tuple[float, int, int]] = []
    storages: list[Storage] = []
    for index, lags in enumerate(lags_us):
        addr, seen = 0x55D9EEE31240 + index * 0x10000, SIGHTING_US + index * 1000
        for lag in lags[:-1]:
            events += [(seen - lag, addr, NBYTES), (seen - lag + 100, addr, -NBYTES)]
        events.append((seen - lags[-1], addr, NBYTES))
        storages.append((addr, NBYTES, seen * 1000, 0, index // 2, "kv"[index % 2], 1))
    events.sort()
    times, addrs, deltas = zip(*events, strict=True)
    device = DeviceEvents(
        "cpu", np.array(times, np.float64), np.array(addrs, np.int64), np.array(deltas, np.int64)
    )
    return [device], storages


@pytest.mark.parametrize(
    ("lags_us", "shift_us"),
    [
        # base 3 ms late: own allocations 2,858-2,952 µs after the sightings, earlier occupants 1,498 and
        # 1,537 µs before two of them (one more 63 ms before a third)
        ([[1498, -2909], [1537, -2952], [63204, -2858], [-2870]], -2952),
        # another run's, base 2.1 ms late: own allocations just past the tolerance (2,040-2,068 µs after),
        # earlier occupants 1,483-1,915 µs before two storages, which the shift covers too (the tolerance is
        # wide), but as the storage's allocation only its own, the latest before its sighting, counts
        ([[270, 185, -2057], [-2068], [617, -2040], [-2060]], -2068),
    ],
    ids=["3 ms late", "2.1 ms late"],
)
def test_storages_fit_as_read_only_by_earlier_occupants_move_the_trace(
    lags_us: list[list[int]], shift_us: int
) -> None:
    # GIVEN a real run's lags (sighting - allocation) with its trace's base set late
    devices, storages = _run(lags_us)

    # WHEN the storages are matched to the trace's allocations
    found = clock_shift(devices, storages)

    # THEN all 4 agree on one shift, the latest that puts every own allocation at most the tolerance before
    # its sighting, less the margin; 2 fit as read, by their earlier occupants only, so the trace is moved
    assert found is not None
    assert (found.covered, found.covered_as_read, found.kept_as_read, found.with_allocation) == (4, 2, 0, 4)
    assert found.shift_us == shift_us - SIGHTING_MARGIN_US
    assert _moves(found)


def test_a_right_clock_with_earlier_occupants_everywhere_is_left_as_read() -> None:
    # GIVEN a trace on the run's clock: own allocations 30-90 µs before the sightings, and an earlier
    # occupant 4.5 ms before every one of them
    devices, storages = _run([[4500, 40], [4510, 90], [4490, 60], [4520, 30]])

    # WHEN matched
    found = clock_shift(devices, storages)

    # THEN every storage fits as read by its own allocation: however many the occupants fit under a shift
    # (all 4, 4.5 ms on: the tie's latest shift), the trace stays as read
    assert found is not None
    assert (found.covered, found.covered_as_read) == (4, 4)
    assert not _moves(found)
