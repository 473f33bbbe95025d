"""The KV log's join finds a trace's clock lead of less than its tolerance though every KV storage's address
held a same-sized occupant just before it, and takes each storage's own allocation, not the occupant.

The allocations are a real run's (test_evictions' one-by-one hook: a 3-layer prefill of 2 rows of 17
tokens, float32, so each layer's K and V a storage of 4,352 bytes), µs from each storage's sighting in the
KV log, rounded to the µs. Each storage's own allocation comes 16-139 µs before its sighting; before it,
one or two same-sized temporaries (the projection's and RoPE's outputs) held the address and were freed
22-418 µs before the sighting, so a trace read some µs late sees two allocations of the storage's size
within the join's tolerance: the lead was proven only by a storage with one, and here none has one.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from analyzers.attribution import SIGHTING_MARGIN_US, attribute, sighting_fit_us, trace_lead_us
from analyzers.model import KV, DeviceEvents, MemorySource

NBYTES = 4352
SIGHTING_US = 1_796_591_212_550_000  # the first storages' sighting, µs since the epoch
# (layer, kv, sighting after the first's µs, [(allocated, freed) µs from the sighting], the own one last)
STORAGES = [
    (0, "k", 0, [(-496, -217), (-139, 20567)]),
    (0, "v", 0, [(-255, -222), (-132, 20577)]),
    (1, "k", 56941, [(-477, -438), (-412, -366), (-26, 14175)]),
    (1, "v", 56941, [(-376, -366), (-16, 14183)]),
    (2, "k", 104807, [(-631, -412), (-54, 15603)]),
    (2, "v", 104807, [(-438, -416), (-27, 15615)]),
]
SOONEST_US = 16  # the own allocation nearest its sighting: layer 1's V


def _trace(late_us: int) -> tuple[MemorySource, list[tuple[int, int, int, int, int, str, int]]]:
    """The run's allocations at the KV storages' addresses, read `late_us` late, and the log's storages."""
    events: list[tuple[int, int, int]] = []
    storages = []
    for index, (layer, kv, after_us, held) in enumerate(STORAGES):
        addr, seen = 0x5607_A5A0_0000 + index * 0x10000, SIGHTING_US + after_us
        for allocated, freed in held:
            events += [(seen + allocated + late_us, addr, NBYTES), (seen + freed + late_us, addr, -NBYTES)]
        storages.append((addr, NBYTES, seen * 1000, -1, layer, kv, 1))
    events.sort()
    times, addrs, deltas = zip(*events, strict=True)
    device = DeviceEvents("cpu", np.array(times, np.float64), np.array(addrs, np.int64), np.array(deltas))
    kv = SimpleNamespace(storages=storages, storage_devices=["cpu"] * len(storages))
    return MemorySource(kind="run", path="run", devices=[device], meta={"kv": kv}), storages


def _kv_and_own(device: DeviceEvents, late_us: int) -> tuple[list[float], list[float]]:
    """The times of the events the join made KV, and those of the storages' own allocations and frees."""
    assert device.category is not None
    kv_events = sorted(float(t) for t in device.ts_us[device.category == KV])
    own = sorted(float(SIGHTING_US + after + t + late_us) for _, _, after, held in STORAGES for t in held[-1])
    return kv_events, own


@pytest.mark.parametrize("late_us", [100, 1000, 1900])
def test_a_lead_within_the_tolerance_is_found_past_earlier_occupants(late_us: int) -> None:
    # GIVEN the run's trace with its base set late_us late
    source, storages = _trace(late_us)
    (device,) = source.devices

    # WHEN the storages are joined to it
    attribute(source)

    # THEN the lead is the tightest fit, the own allocation nearest its sighting at it, and the margin more
    assert sighting_fit_us(device, storages) == late_us - SOONEST_US
    assert trace_lead_us(device, storages) == late_us - SOONEST_US + SIGHTING_MARGIN_US
    # ... and each storage's KV allocation and free are its own, read late_us late
    kv_events, own = _kv_and_own(device, late_us)
    assert kv_events == own


def test_a_right_clock_is_left_as_read() -> None:
    # GIVEN the run's trace as recorded (its clock and the log's agree)
    source, storages = _trace(0)
    (device,) = source.devices

    # WHEN joined
    attribute(source)

    # THEN no lead: every own allocation is before its sighting, so the sightings are read as they are, and
    # each storage has its own
    assert sighting_fit_us(device, storages) == -SOONEST_US
    assert trace_lead_us(device, storages) == 0.0
    kv_events, own = _kv_and_own(device, 0)
    assert kv_events == own
