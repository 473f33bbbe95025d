"""Without kvtrace's step ranges, a trace whose clock runs up to 5 ms behind or ahead of the KV log's keeps
every KV storage's own allocation: the join takes a lead behind as ahead, and a trace it cannot place is
moved by the storages.

The events are a real run's at the KV storages' addresses (test_evictions' one-by-one hook on one thread: a
3-layer prefill of 2 rows of 17 tokens, float32; each layer's K and V 4,352 B, freed by the hook after the
attention, their copies 2,048 B, seen at the next layer's update), µs from layer 0's sighting, rounded to
0.1 µs. Layer 0's V was freed 530 µs after its sighting and a same-sized temporary took its address 1,375
µs after it; layer 1's K, freed 287 µs after, had a same-sized successor 960 µs after. Read as it was, a
trace 1-2.2 ms behind gave those sightings the successors (the KV peak 21,248 B, not 18,944), 2.2-2.4 ms
behind it took the storages freed within 0.4 ms of their sighting for released before it; 2.4-2.9 ms
ahead, the storages seen at once fell out of the join's fit, half the others fit as read (the trace was
not moved), and the lead the join found was the others'.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from analyzers.attribution import attribute
from analyzers.model import KV, DeviceEvents, MemorySource
from analyzers.readers.trace_clock import align_trace_clock

SIGHTING_US = 1_796_612_858_581_000  # layer 0's sighting, µs since the epoch
ADDRESS = 0x5583_A0F0_0000  # the first storage address; the others 64 KiB apart
# (address index, bytes, sighting µs)
STORAGES = [
    (4, 4352, 0.0), (7, 4352, 0.0), (5, 2048, 1462.2), (3, 2048, 1462.2),
    (9, 4352, 1721.8), (4, 4352, 1721.8), (8, 2048, 2887.5), (2, 2048, 2887.5),
    (0, 4352, 3113.5), (10, 4352, 3113.5), (6, 2048, 4497.5), (1, 2048, 4497.5),
]  # fmt: skip
# Each storage's own allocation (µs), in STORAGES' order
OWN_US = [-171.5, -156.0, 508.8, 525.5, 1685.8, 1702.8, 2000.0, 2018.5, 3075.2, 3094.0, 3378.2, 3398.5]
# (µs, address index, signed bytes): every allocation and free at those addresses
EVENTS = [
    (-311.2, 9, 4352), (-275.2, 4, 4352), (-266.2, 9, -4352), (-266.0, 4, -4352), (-171.5, 4, 4352),
    (-156.0, 7, 4352), (322.0, 5, 2380), (363.2, 5, -2380), (508.8, 5, 2048), (517.2, 4, -4352),
    (525.5, 3, 2048), (530.0, 7, -4352), (1368.2, 1, 2176), (1374.8, 7, 4352), (1384.2, 1, -2176),
    (1389.5, 7, -4352), (1685.8, 9, 4352), (1702.8, 4, 4352), (1845.0, 8, 2380), (1878.2, 8, -2380),
    (2000.0, 8, 2048), (2008.5, 9, -4352), (2018.5, 2, 2048), (2022.8, 4, -4352), (2647.2, 4, 4352),
    (2681.8, 9, 4352), (2798.0, 10, 4352), (2814.5, 6, 2176), (2830.5, 6, -2176), (2842.2, 10, -4352),
    (2846.8, 4, -4352), (3075.2, 0, 4352), (3094.0, 10, 4352), (3149.0, 9, -4352), (3225.8, 1, 2380),
    (3258.0, 1, -2380), (3378.2, 6, 2048), (3387.2, 0, -4352), (3398.5, 1, 2048), (3403.0, 10, -4352),
]  # fmt: skip


def _source(lead_us: int) -> tuple[MemorySource, list[tuple[int, int, int, int, int, str, int]]]:
    """The run's trace, its clock `lead_us` ahead of the log's (behind where negative), and the log's
    storages."""
    times = np.array([SIGHTING_US + t + lead_us for t, _, _ in EVENTS], np.float64)
    addrs = np.array([ADDRESS + (a << 16) for _, a, _ in EVENTS], np.int64)
    device = DeviceEvents("cpu", times, addrs, np.array([b for _, _, b in EVENTS], np.int64))
    storages = [
        (ADDRESS + (a << 16), nbytes, round((SIGHTING_US + seen) * 1000), -1, index // 4, "kv"[index % 2], 1)
        for index, (a, nbytes, seen) in enumerate(STORAGES)
    ]
    kv = SimpleNamespace(storages=storages, storage_devices=["cpu"] * len(storages))
    return MemorySource(kind="run", path="run", devices=[device], meta={"kv": kv}), storages


@pytest.mark.parametrize("lead_us", range(-5000, 5001, 100))
def test_every_storage_keeps_its_own_allocation_under_a_trace_clock_off_by_up_to_5_ms(lead_us: int) -> None:
    # GIVEN the run's trace, its clock lead_us off the KV log's, and no step ranges to set it
    source, storages = _source(lead_us)
    run_ns = (round(SIGHTING_US - 1000) * 1000, round(SIGHTING_US + 5000) * 1000)

    # WHEN the storages set its clock (or leave it) and are joined to it
    align_trace_clock(source, storages, 1, run_ns, {}, None)
    attribute(source)

    # THEN the allocations the join made KV are the storages' own, each once (wherever the trace was put)
    (device,) = source.devices
    assert device.category is not None
    moved = source.meta.get("trace_clock_shift_us", 0)
    kv_made = sorted(
        (int(a), round(float(t) - SIGHTING_US - lead_us - moved, 1))
        for a, t, d, c in zip(device.addr, device.ts_us, device.delta_bytes, device.category, strict=True)
        if d > 0 and c == KV
    )
    own = sorted((ADDRESS + (STORAGES[i][0] << 16), t) for i, t in enumerate(OWN_US))
    assert kv_made == own
