"""Another model's cache on a thread the profiler did not record: its KV log storages join a CPU trace's
events (in the log's order, totals kept), never a GPU's, whose totals count every thread's blocks."""

from __future__ import annotations

import numpy as np
import pytest

from analyzers.model import DeviceEvents
from analyzers.readers.untraced_caches import add_untraced_kv, caches_on_other_threads, untraced_note
from kvtrace.format import KvEvent


def ev(seq: int, t_us: int, event: str, addr: int, nbytes: int, cache: int, device: str = "cpu") -> KvEvent:
    return KvEvent(
        seq=seq,
        t_ns=t_us * 1000,
        step=1,
        phase="decode",
        event=event,
        layer=0,
        kv="k",
        part="data",
        addr=addr,
        storage_bytes=nbytes,
        cache=cache,
        device=device,
    )


# The recording thread's trace: cache 1's storage (0xA, 100 B at 10 us), an activation (0xD, 1000 B from 30 to
# 60 us), and an earlier occupant of 0xC (128 B) freed at 40 us, before cache 2's thread took that address.
TRACE = [(10.0, 0xA, 100), (20.0, 0xC, 128), (30.0, 0xD, 1000), (40.0, 0xC, -128), (60.0, 0xD, -1000)]
# Cache 1's storage (the trace has it), and cache 2's, on another thread: 0xB (64 B) seen at 25 us, grown into
# 0xC (128 B) at 50 us, the old one freed in the same clock reading (the transient copy).
LOG = [
    ev(1, 10, "created", 0xA, 100, cache=1),
    ev(2, 25, "created", 0xB, 64, cache=2),
    ev(3, 50, "grown", 0xC, 128, cache=2),
    ev(4, 50, "freed", 0xB, 64, cache=2),
]


def _device(name: str) -> DeviceEvents:
    ts, addr, delta = (np.asarray(column) for column in zip(*TRACE, strict=True))
    return DeviceEvents(
        device=name,
        ts_us=ts.astype(np.float64),
        addr=addr.astype(np.int64),
        delta_bytes=delta.astype(np.int64),
        total_allocated=np.cumsum(delta).astype(np.int64) + 5000,  # 5000 B counted before the first event
    )


def _storages(events: list[KvEvent]) -> list[tuple[int, int, int, int, int, str, int]]:
    from analyzers.kv_log import analyze_kv_log

    return analyze_kv_log(events).storages


def test_a_cpu_trace_gets_the_other_threads_storages_in_the_logs_order() -> None:
    # GIVEN a CPU trace of the recording thread and the log of cache 2, used on another thread
    dev = _device("cpu")
    # WHEN cache 2's storages are added
    added = add_untraced_kv(dev, LOG, _storages(LOG), {2})
    # THEN both of its storages are, at the log's times: the new one before the old one's free
    assert added == {2: 2}
    assert dev.ts_us.tolist() == [10.0, 20.0, 25.0, 30.0, 40.0, 50.0, 50.0, 60.0]
    assert dev.addr.tolist() == [0xA, 0xC, 0xB, 0xD, 0xC, 0xC, 0xB, 0xD]
    assert dev.delta_bytes.tolist() == [100, 128, 64, 1000, -128, 128, -64, -1000]
    # AND the allocator's running total counts them from there on (the CPU reporter's counts only the
    # recorded thread's): 5000 before, +100 +128 +64 +1000 -128 +128 -64 -1000
    assert dev.total_allocated is not None
    assert dev.total_allocated.tolist() == [5100, 5228, 5292, 6292, 6164, 6292, 6228, 5228]


def test_a_storage_the_trace_holds_is_not_added_twice() -> None:
    # GIVEN cache 2's 0xB allocated by the recording thread too (its cache passed between threads): the trace
    # has a 64 B allocation at 0xB before the log saw it, freed after
    dev = _device("cpu")
    dev.ts_us = np.append(dev.ts_us, [24.0, 70.0])
    dev.addr = np.append(dev.addr, [0xB, 0xB])
    dev.delta_bytes = np.append(dev.delta_bytes, [64, -64])
    order = np.argsort(dev.ts_us, kind="stable")
    dev.ts_us, dev.addr, dev.delta_bytes = dev.ts_us[order], dev.addr[order], dev.delta_bytes[order]
    dev.total_allocated = None
    # WHEN cache 2's storages are added THEN only the one the trace lacks is: 0xC, whose address's earlier
    # occupant (the activation freed at 40 us) was not it
    assert add_untraced_kv(dev, LOG, _storages(LOG), {2}) == {2: 1}
    assert dev.delta_bytes.tolist().count(64) == 1 and dev.delta_bytes.tolist().count(128) == 2


def test_a_gpu_trace_is_left_as_it_is() -> None:
    # GIVEN a GPU trace, whose totals count every thread's blocks
    dev = _device("cuda:0")
    before = (dev.ts_us.copy(), dev.delta_bytes.copy())
    # WHEN cache 2's storages would be added THEN none is (they would count twice), and the note says where
    # its KV is counted
    assert add_untraced_kv(dev, LOG, _storages(LOG), {2}) == {}
    assert dev.ts_us.tolist() == before[0].tolist() and dev.delta_bytes.tolist() == before[1].tolist()
    note = untraced_note({2}, {})
    assert note.startswith("the profiler's trace has no allocation of cache 2 (another model's, first used")
    assert (
        "the memory figures' KV leaves its KV out (the KV section's figures, from the KV log, hold it)"
        in note
    )


def test_the_manifests_list_is_read_as_cache_ids() -> None:
    assert caches_on_other_threads({"other_caches_on_other_threads": [2, 3]}) == {2, 3}
    assert caches_on_other_threads({"other_caches_on_other_threads": [True, -1, "2", 4]}) == {4}
    assert caches_on_other_threads({"other_caches_on_other_threads": "2"}) == set()
    assert caches_on_other_threads({}) == set()


@pytest.mark.parametrize("listed", [{2}, {1, 2}], ids=["another cache proves the lead", "only listed caches"])
def test_a_trace_ahead_just_past_the_tolerance_still_holds_its_storage(listed: set[int]) -> None:
    # GIVEN the recording thread's trace with cache 2's 0xB allocated there too (freed at 700 us), on a clock
    # 2,100 us ahead of the log's (the tolerance, 2,000 us, and 100), and a log that saw cache 1's 0xA 290 us
    # after its allocation: 1,810 us before it, as read, which puts the trace at least that far ahead
    dev = _device("cpu")
    dev.ts_us = np.append(dev.ts_us, [24.0, 700.0])
    dev.addr = np.append(dev.addr, [0xB, 0xB])
    dev.delta_bytes = np.append(dev.delta_bytes, [64, -64])
    order = np.argsort(dev.ts_us, kind="stable")
    dev.ts_us, dev.addr, dev.delta_bytes = dev.ts_us[order] + 2100.0, dev.addr[order], dev.delta_bytes[order]
    dev.total_allocated = None
    log = [ev(1, 300, "created", 0xA, 100, cache=1), *LOG[1:]]
    # WHEN the listed caches' storages are added
    added = add_untraced_kv(dev, log, _storages(log), listed)
    # THEN 0xB, 2,099 us before its allocation as read, is the trace's (read 2,310 us later: the lead and
    # the join's 500 us margin), and only 0xC is added, whose address's earlier occupant was freed before
    assert added == {2: 1}
    assert dev.delta_bytes.tolist().count(64) == 1 and dev.delta_bytes.tolist().count(128) == 2
