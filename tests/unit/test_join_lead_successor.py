"""Without kvtrace's step ranges, a storage freed soon after its sighting keeps its own allocation when a
same-sized one takes its address within SIGHTING_MARGIN_US: the join reads no sighting past the leads under
which every storage's allocation is live.

The events are test_join_lead_behind's (a real one-by-one eviction run's, at its KV storages' addresses),
with one edit: layer 1's K (4,352 B) was freed 286.7 µs after its sighting and the next same-sized
allocation at its address came 959.9 µs after it; here it comes 400 µs after (as the next layer's
projection output does on a faster host: a re-recording of that run had it 350 µs after). The storages' fit
read every sighting up to SIGHTING_MARGIN_US late and took the newcomer for layer 1's K, leaving its own
allocation other: the KV line's peak read 21,248 B, not 18,944.
"""

from __future__ import annotations

import numpy as np
import pytest

from analyzers.attribution import attribute
from analyzers.model import KV
from analyzers.readers.trace_clock import align_trace_clock
from tests.unit import test_join_lead_behind as real
from tests.unit.test_join_lead_behind import ADDRESS, OWN_US, SIGHTING_US, STORAGES

LAYER1_K = 4  # STORAGES' index of layer 1's K: address index 9, seen at 1721.8 µs
SUCCESSOR = (2681.8, 9, 4352)  # the next allocation of its address and size
MOVED_US = STORAGES[LAYER1_K][2] + 400.0  # 400 µs after layer 1's K's sighting, 113.3 µs after its free


@pytest.fixture
def moved_successor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's events with the successor moved next to the sighting (events kept in time order)."""
    events = [(MOVED_US, 9, 4352) if e == SUCCESSOR else e for e in real.EVENTS]
    monkeypatch.setattr(real, "EVENTS", sorted(events))


@pytest.mark.parametrize("lead_us", range(-2000, 2501, 100))
def test_a_same_sized_allocation_within_the_margin_after_a_storage_s_free_is_not_taken_for_it(
    moved_successor: None, lead_us: int
) -> None:
    # GIVEN the trace, its clock lead_us off the KV log's, no step ranges, and layer 1's K's address taken
    # by a same-sized allocation 400 µs after its sighting
    source, storages = real._source(lead_us)
    run_ns = (round(SIGHTING_US - 1000) * 1000, round(SIGHTING_US + 5000) * 1000)

    # WHEN the storages set its clock (or leave it) and are joined to it
    align_trace_clock(source, storages, 1, run_ns, {}, None)
    attribute(source)

    # THEN the allocations made KV are the storages' own, the newcomer is other, and the KV level peaks at
    # the true 18,944 B: layers 0 and 1's copies (2 x 2 x 2,048 B) and layer 2's K and V (2 x 4,352 B) with
    # its K copy (2,048 B)
    (device,) = source.devices
    assert device.category is not None
    moved = source.meta.get("trace_clock_shift_us", 0)
    at = np.round(device.ts_us - SIGHTING_US - lead_us - moved, 1)
    kv_made = sorted(
        (int(a), float(t))
        for a, t, d, c in zip(device.addr, at, device.delta_bytes, device.category, strict=True)
        if d > 0 and c == KV
    )
    assert kv_made == sorted((ADDRESS + (STORAGES[i][0] << 16), t) for i, t in enumerate(OWN_US))
    kv_level = np.cumsum(np.where(device.category == KV, device.delta_bytes, 0))
    assert int(kv_level.max()) == 2 * 2 * 2048 + 2 * 4352 + 2048 == 18944
