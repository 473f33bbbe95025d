"""The KV log joins the profiler's allocator events: every KV storage is one allocation of the trace.

The Chrome trace is read here with plain `json`, independently of kvtrace's trace reader. Its `[memory]`
instant events carry `Addr` and `Bytes` (+ alloc, - free); `ts` (µs) + `baseTimeNanoseconds` / 1000 is
Unix-epoch µs, the clock of `KvEvent.t_ns` / 1000. Addresses are reused within microseconds (often by a
same-sized temporary), so a storage is matched on address, size *and* lifetime.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kvlog_math import StorageLife, storage_lives

import kvtrace
from kvtrace.format import read_run
from kvtrace.llama import make_cache

NEW_TOKENS = 4
# The profiler's clock and time.time_ns() agree within ~0.15 ms on these machines.
CLOCK_TOLERANCE_US = 500.0


@dataclass(frozen=True)
class Allocation:
    addr: int
    nbytes: int
    alloc_us: float
    free_us: float | None  # None: still allocated when the profiler stopped


def load_trace(path: Path) -> dict:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def cpu_allocations(trace: dict) -> dict[int, list[Allocation]]:
    """Pair every allocation with the next free of the same address: one lifetime per pair."""
    base_us = trace["baseTimeNanoseconds"] / 1000
    by_addr: dict[int, list[tuple[float, int]]] = {}
    for event in trace["traceEvents"]:
        if event.get("name") != "[memory]":
            continue
        args = event["args"]
        if args.get("Device Type", 0) != 0:
            continue
        by_addr.setdefault(int(args["Addr"]), []).append((event["ts"] + base_us, int(args["Bytes"])))
    lives: dict[int, list[Allocation]] = {}
    for addr, changes in by_addr.items():
        changes.sort()
        open_alloc: tuple[float, int] | None = None
        for t_us, nbytes in changes:
            if nbytes > 0:
                assert open_alloc is None, f"address {addr} allocated twice without a free"
                open_alloc = (t_us, nbytes)
            elif open_alloc is not None:  # a free of a block allocated before profiling started is skipped
                assert -nbytes == open_alloc[1], (
                    f"address {addr}: free of {-nbytes} bytes, allocated {open_alloc}"
                )
                lives.setdefault(addr, []).append(Allocation(addr, open_alloc[1], open_alloc[0], t_us))
                open_alloc = None
        if open_alloc is not None:
            lives.setdefault(addr, []).append(Allocation(addr, open_alloc[1], open_alloc[0], None))
    return lives


def match(life: StorageLife, allocations: dict[int, list[Allocation]]) -> Allocation | None:
    """The allocation at the storage's address, of its size, live from its first to its last KV event."""
    first_us, last_us = life.first_ns / 1000, life.last_use_ns / 1000
    candidates = [
        a
        for a in allocations.get(life.addr, [])
        if a.nbytes == life.storage_bytes
        and a.alloc_us <= first_us + CLOCK_TOLERANCE_US
        and (a.free_us is None or a.free_us >= last_us - CLOCK_TOLERANCE_US)
    ]
    return max(candidates, key=lambda a: a.alloc_us) if candidates else None


@pytest.mark.parametrize("kind", ["dynamic", "sliding"])
def test_every_kv_storage_is_a_profiled_allocation(tiny_model, prompt_batch, tmp_path, kind):
    # GIVEN a run recorded with the profiler's memory events on
    cache, extra = make_cache(
        kind, tiny_model, prompt_batch.rows, prompt_batch.prompt_len + NEW_TOKENS, window=8
    )
    if cache is not None:
        extra["cache"] = cache  # kept alive past the block: its last storages are never freed in the trace
    out_dir = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(out_dir, model=tiny_model, profiler=True, profile_memory=True):
        tiny_model.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            **extra,
        )
    run = read_run(out_dir)
    assert run.manifest["ended"]["status"] == "ok"
    traces = sorted((out_dir / "profiler").glob("*.pt.trace.json*"))
    assert len(traces) == 1, traces
    trace = load_trace(traces[0])
    assert trace.get("profile_memory") == 1

    # WHEN the KV storages are joined to the trace's allocations
    allocations = cpu_allocations(trace)
    lives = storage_lives(run.kv_events)
    # Two layers x K and V, a new storage every step.
    assert len(lives) >= 2 * 2 * NEW_TOKENS

    # THEN each storage was allocated, at its size, before its first event ...
    unmatched = [life for life in lives if match(life, allocations) is None]
    assert not unmatched, f"{len(unmatched)}/{len(lives)} KV storages without an allocation: {unmatched[:3]}"
    for life in lives:
        allocation = match(life, allocations)
        assert allocation is not None
        if allocation.free_us is None:
            # ... and where the trace has no free, the storage outlived the profiler (the recorder logs
            # such frees, if any, while it lets go of the caches, in phase "end").
            assert life.freed_ns is None or life.freed_phase == "end", life
        else:
            # ... and freed after its last event, no later than the recorder saw it go.
            assert allocation.free_us >= life.last_use_ns / 1000 - CLOCK_TOLERANCE_US, life
            if life.freed_ns is not None:
                assert allocation.free_us <= life.freed_ns / 1000 + CLOCK_TOLERANCE_US, life
    if cache is not None:
        still_allocated = [life for life in lives if match(life, allocations).free_us is None]
        assert len(still_allocated) == 2 * 2  # the cache the caller holds: K and V of two layers
    del cache
