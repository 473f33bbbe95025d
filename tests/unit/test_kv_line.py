"""The KV line on small hand-made logs: a `freed` line moves to the allocator's free where the trace has
one, only earlier, never before a line logged ahead of it; its levels and the final point stay the log's."""

from __future__ import annotations

import numpy as np

from analyzers.kv_line import kv_line
from analyzers.kv_log import analyze_kv_log
from kvtrace.format import KvEvent


def ev(seq: int, t_ns: int, event: str, addr: int, nbytes: int, **kw: object) -> KvEvent:
    fields = {"step": 1, "phase": "prefill", "part": "data", "tokens": 1, "shape": [1, 1, 1, 1]}
    fields.update(kw)
    return KvEvent(
        seq=seq, t_ns=t_ns, event=event, layer=0, kv="k", addr=addr, storage_bytes=nbytes, **fields
    )  # type: ignore[arg-type]


# One layer's K grown 100 -> 200 (the old storage's free logged at the growth), then a cache made at 5 µs,
# then the block's end, which notices the grown storage gone at 9 µs
EVENTS = [
    ev(1, 1000, "created", 0xA, 100),
    ev(2, 2000, "grown", 0xB, 200, prev_addr=0xA, tokens=2),
    ev(3, 2000, "freed", 0xA, 100),
    ev(4, 5000, "created", 0xC, 50, step=2, phase="decode", cache=1),
    ev(5, 9000, "freed", 0xB, 200, step=2, phase="end"),
]


def test_without_frees_the_line_is_the_logs() -> None:
    kv = analyze_kv_log(EVENTS)
    for frees in (None, np.full(len(kv.storages), np.nan)):
        t_ns, live = kv_line(kv, frees)
        assert t_ns.tolist() == [1000, 2000, 2000, 5000, 9000]
        assert live.tolist() == [100, 300, 200, 250, 50]


def test_a_free_moves_to_the_allocators_between_the_lines_around_it() -> None:
    kv = analyze_kv_log(EVENTS)
    # storages: 0xA, 0xB, 0xC; 0xA freed by the allocator before the log saw 0xB (clocks ~0.15 ms apart),
    # 0xB at 3 µs, long before the block's end noticed it
    t_ns, live = kv_line(kv, np.array([1.5, 3.0, np.nan]))
    # 0xA: not before 0xB's line; 0xB: not before 0xC's
    assert t_ns.tolist() == [1000, 2000, 2000, 5000, 5000]
    assert live.tolist() == [100, 300, 200, 250, 50]
    # a free the trace has after the log's line (its clock ahead): the log's, which cannot be early
    t_ns, _ = kv_line(kv, np.array([2.5, 9.5, np.nan]))
    assert t_ns.tolist() == [1000, 2000, 2000, 5000, 9000]
    dropped_only = [*EVENTS[:3], ev(4, 5000, "freed", 0xB, 200, step=2, phase="end")]
    kv = analyze_kv_log(dropped_only)
    t_ns, _ = kv_line(kv, np.array([1.5, 3.0]))
    assert t_ns.tolist() == [1000, 2000, 2000, 3000]


def test_the_final_point_is_the_last_steps_end() -> None:
    kv = analyze_kv_log(EVENTS)
    assert kv.final_point == 3  # the line before the block's end lines
    assert kv.series_bytes[kv.final_point] == kv.final_bytes == 250
