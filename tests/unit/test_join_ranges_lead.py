"""Where kvtrace's step ranges placed a trace, the KV log's join reads each sighting no later than the lead
they measured, not SIGHTING_MARGIN_US past the storages' fit: a storage freed soon after its sighting keeps
its own allocation, not the next same-sized one at its address.

The storages' fit reads every sighting up to SIGHTING_MARGIN_US late, past the tightest fit. A storage whose
own allocation came more than the join's tolerance before its sighting (an eviction's copy, which the log
sees at the next layer's update) does not take part in that fit, and when the storage goes soon after it is
seen (a second press) and a same-sized allocation (the next layer's projection output) takes its address
within that margin, read that late its sighting falls after the newcomer: the join took it, and the
storage's own allocation was counted as other. A range opens just after its step's sample reads the run's
clock, so the lead it measures is at most those µs late. (Built for the case: no recorded run showed it.)
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from analyzers.attribution import KV_FREES, attribute
from analyzers.model import KV, DeviceEvents, Marker, MemorySource
from analyzers.readers.trace_clock import align_trace_clock

NBYTES = 4352  # a 17-token prefill's K or V: 2 rows, 2 KV heads of 16 dims, float32
STARTED_US = 1_796_591_212_550_000  # the prefill's sample's `started_ns`, µs since the epoch
LATE_US = 300  # the trace's base set this late: within the margin the ranges leave a trace unmoved at
RANGE_GAP_US = 20  # from the sample's read of the run's clock to its range's opening in the trace
SEEN_US = STARTED_US + 1000  # every storage's sighting in the KV log
# (address, µs from its sighting to its allocation, to its free; None: held to the end)
OWN = [
    (0x5607_A5A0_0000, -20, None),  # the prefill's K, seen at once
    (0x5607_A5A1_0000, -36, None),  # its V
    (0x5607_A5A2_0000, -2500, 150),  # a press's copy, seen at the next update, dropped by a second press
]
NEXT_OCCUPANT = (0x5607_A5A2_0000, 400, 500)  # a projection output of the copy's size at its address
END_US = SEEN_US + 10_000


def _source() -> tuple[MemorySource, list[tuple[int, int, int, int, int, str, int]]]:
    """The trace, LATE_US ahead of the run's clock, with the prefill's range; the log's storages."""
    events: list[tuple[float, int, int]] = []
    storages = []
    for layer, (addr, made, freed) in enumerate(OWN):
        events.append((SEEN_US + made + LATE_US, addr, NBYTES))
        if freed is not None:
            events.append((SEEN_US + freed + LATE_US, addr, -NBYTES))
        freed_ns = -1 if freed is None else (SEEN_US + freed + 50) * 1000  # the log sees the free after it
        storages.append((addr, NBYTES, SEEN_US * 1000, freed_ns, layer, "k", 1))
    addr, made, freed = NEXT_OCCUPANT
    events += [(SEEN_US + made + LATE_US, addr, NBYTES), (SEEN_US + freed + LATE_US, addr, -NBYTES)]
    events.sort()
    times, addrs, deltas = zip(*events, strict=True)
    device = DeviceEvents(
        "cpu", np.array(times, np.float64), np.array(addrs, np.int64), np.array(deltas, np.int64)
    )
    prefill = Marker("step", STARTED_US + RANGE_GAP_US + LATE_US, "kvtrace/prefill", end_us=END_US + LATE_US)
    kv = SimpleNamespace(storages=storages, storage_devices=["cpu"] * len(storages))
    source = MemorySource(kind="run", path="run", devices=[device], markers=[prefill], meta={"kv": kv})
    return source, storages


def test_a_storage_freed_soon_after_its_sighting_keeps_its_own_allocation_under_the_ranges_lead() -> None:
    # GIVEN a trace LATE_US ahead, whose prefill range opened RANGE_GAP_US after its sample's clock read
    source, storages = _source()
    (device,) = source.devices
    base_ns = 1_796_591_212_000_000_000

    # WHEN it is put on the run's clock by its range (left as read: within the margin) and joined
    align_trace_clock(
        source, storages, base_ns, (STARTED_US * 1000, END_US * 1000), {}, {1: (STARTED_US * 1000, "prefill")}
    )
    attribute(source)

    # THEN each storage's KV allocation is its own, the copy's too (made 2.5 ms before its sighting), and
    # the projection output that took its address 400 µs after the sighting is other
    assert "trace_clock_shift_us" not in source.meta
    assert device.category is not None
    kv_allocations = sorted(
        (int(a), float(t))
        for a, t, d, c in zip(device.addr, device.ts_us, device.delta_bytes, device.category, strict=True)
        if d > 0 and c == KV
    )
    assert kv_allocations == sorted((addr, float(SEEN_US + made + LATE_US)) for addr, made, _ in OWN)
    # ... and the copy's free is its own, read on the trace's clock
    assert source.meta[KV_FREES][2] == SEEN_US + 150 + LATE_US
