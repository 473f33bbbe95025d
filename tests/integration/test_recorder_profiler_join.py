"""The KV log joins the profiler's allocator events: every KV storage is one allocation of the trace.

The Chrome trace is read here with plain `json`, independently of kvtrace's trace reader. Its `[memory]`
instant events carry `Addr` and `Bytes` (+ alloc, - free); `ts` (µs) + `baseTimeNanoseconds` / 1000 is
Unix-epoch µs, the clock of `KvEvent.t_ns` / 1000, as near as Kineto sets its base: on a loaded host it
sets it a few ms late, so a storage is looked for on the trace's clock (`trace_clock_lead_us`). Addresses
are reused within microseconds (often by a same-sized temporary), so a storage is matched on address, size
*and* lifetime.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kvlog_math import StorageLife, kv_bytes, storage_lives
from transformers import DynamicCache

import kvtrace
from analyzers.attribution import JOIN_TOLERANCE_US, sighting_fit_us
from analyzers.model import DeviceEvents
from analyzers.planning.diagnose import diagnose
from analyzers.report import build_report
from kvtrace.cli import main as kvtrace_main
from kvtrace.llama import build_model, cache_keyword, make_cache
from kvtrace.run_reader import read_run

NEW_TOKENS = 4
# How far a storage's allocation may follow its sighting on the trace's clock (`trace_clock_lead_us`): there
# the storage the log saw soonest after its allocation is seen at it, and the others later; the profiler's
# clock and time.time_ns() agree within ~0.15 ms on these machines, but for Kineto's base.
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


def trace_clock_lead_us(allocations: dict[int, list[Allocation]], lives: list[StorageLife]) -> float:
    """How far (µs) the trace's clock, as read, runs ahead of the KV log's: Kineto sets its
    `baseTimeNanoseconds` now and then a few ms late on a loaded host, which puts every allocation past its
    storage's sighting. Found as the analyzers' join finds it (`attribution.sighting_fit_us`: the least lead
    of the widest run under which the most storages have an allocation of their address and size live at
    their sighting), over any lead: the storage seen soonest after its allocation is seen at it. 0 where no
    storage has an allocation in the trace."""
    made = [a for runs in allocations.values() for a in runs]
    changes = sorted(  # at one instant a free first, as the allocator goes
        [(a.alloc_us, a.addr, a.nbytes) for a in made]
        + [(a.free_us, a.addr, -a.nbytes) for a in made if a.free_us is not None]
    )
    trace = DeviceEvents(
        device="cpu",
        ts_us=np.array([c[0] for c in changes], dtype=np.float64),
        addr=np.array([c[1] for c in changes], dtype=np.int64),
        delta_bytes=np.array([c[2] for c in changes], dtype=np.int64),
    )
    storages = [(life.addr, life.storage_bytes, life.first_ns, -1, life.key[1], life.key[2], life.key[0])
                for life in lives]  # fmt: skip
    return sighting_fit_us(trace, storages, within_us=math.inf) or 0.0


def match(life: StorageLife, allocations: dict[int, list[Allocation]], lead_us: float) -> Allocation | None:
    """The allocation at the storage's address, of its size, live from its first to its last KV event (read
    on the trace's clock: `lead_us` later, `trace_clock_lead_us`): of several (the next layer's storage of
    the same size may take the address within the clock tolerance, on a fast machine), the one made nearest
    the storage's first sighting."""
    first_us, last_us = life.first_ns / 1000 + lead_us, life.last_use_ns / 1000 + lead_us
    candidates = [
        a
        for a in allocations.get(life.addr, [])
        if a.nbytes == life.storage_bytes
        and a.alloc_us <= first_us + CLOCK_TOLERANCE_US
        and (a.free_us is None or a.free_us >= last_us - CLOCK_TOLERANCE_US)
    ]
    return min(candidates, key=lambda a: abs(a.alloc_us - first_us)) if candidates else None


@pytest.mark.parametrize("kind", ["dynamic", "sliding"])
def test_every_kv_storage_is_a_profiled_allocation(tiny_model, prompt_batch, tmp_path, kind):
    # GIVEN a run recorded with the profiler's memory events on
    cache, extra = make_cache(
        kind, tiny_model, prompt_batch.rows, prompt_batch.prompt_len + NEW_TOKENS, window=8
    )
    if cache is not None:
        extra[cache_keyword()] = cache  # kept past the block: its last storages never freed
    out_dir = tmp_path / "run"
    _record_with_memory_events(tiny_model, prompt_batch, out_dir, extra)
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

    # THEN each storage was allocated, at its size, before its first event (on the trace's clock) ...
    lead_us = trace_clock_lead_us(allocations, lives)
    unmatched = [life for life in lives if match(life, allocations, lead_us) is None]
    assert not unmatched, f"{len(unmatched)}/{len(lives)} KV storages without an allocation: {unmatched[:3]}"
    for life in lives:
        allocation = match(life, allocations, lead_us)
        assert allocation is not None
        if allocation.free_us is None:
            # ... and where the trace has no free, the storage outlived the profiler (the recorder logs
            # such frees, if any, while it lets go of the caches, in phase "end").
            assert life.freed_ns is None or life.freed_phase == "end", life
        else:
            # ... and freed after its last event, no later than the recorder saw it go.
            assert allocation.free_us >= life.last_use_ns / 1000 + lead_us - CLOCK_TOLERANCE_US, life
            if life.freed_ns is not None:
                assert allocation.free_us <= life.freed_ns / 1000 + lead_us + CLOCK_TOLERANCE_US, life
    if cache is not None:
        still_allocated = [life for life in lives if match(life, allocations, lead_us).free_us is None]
        assert len(still_allocated) == 2 * 2  # the cache the caller holds: K and V of two layers
    del cache


# How another tool may leave a trace's clock base: gone, not a number, zero, no int64 (Kineto's type), or
# moved by seconds (a merge).
MISSING = object()
BASE_EDITS = {
    "missing": lambda base: MISSING,
    "a string": lambda base: "soon",
    "zero": lambda base: 0,
    "beyond int64": lambda base: 10**30,
    "3 s late": lambda base: base + 3_000_000_000,
    "3 s early": lambda base: base - 3_000_000_000,
    # tens of ms: as Kineto's own base was once off on a loaded host (a demo run 0.023 s away)
    "25 ms late": lambda base: base + 25_000_000,
}


@pytest.fixture(scope="module")
def run_with_kept_cache(tiny_model, prompt_batch, tmp_path_factory) -> Path:
    """A real run with the profiler's memory events on, whose dynamic cache outlives the block: its last K
    and V storages are still allocated when the trace ends."""
    out_dir = tmp_path_factory.mktemp("base") / "run"
    cache = DynamicCache(config=tiny_model.config)
    _record_with_memory_events(tiny_model, prompt_batch, out_dir, {cache_keyword(): cache})
    del cache
    return out_dir


def _trace_of(run_dir: Path) -> tuple[Path, dict]:
    (path,) = sorted((run_dir / "profiler").glob("*.pt.trace.json*"))
    return path, load_trace(path)


def _kv_allocations(run_dir: Path) -> tuple[dict[int, list[Allocation]], list[StorageLife], float]:
    """The run's trace's allocations (as read), its KV storages, and how far the trace's clock runs ahead of
    the log's (`trace_clock_lead_us`), by which each storage finds its own allocation. The lags the helpers
    below take from them stay as read: what they add to the base puts the trace where they mean against
    the log's clock, whatever lead the recorded base had."""
    allocations = cpu_allocations(_trace_of(run_dir)[1])
    lives = storage_lives(read_run(run_dir).kv_events)
    return allocations, lives, trace_clock_lead_us(allocations, lives)


def _write_trace(path: Path, trace: dict) -> None:
    text = json.dumps(trace).encode()
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)


def _edit_base(run_dir: Path, edit) -> None:
    """Rewrite the run's trace with its top-level baseTimeNanoseconds edited, as another tool might."""
    path, trace = _trace_of(run_dir)
    value = edit(trace["baseTimeNanoseconds"])
    if value is MISSING:
        del trace["baseTimeNanoseconds"]
    else:
        trace["baseTimeNanoseconds"] = value
    _write_trace(path, trace)


def _counters_ts(run_dir: Path) -> np.ndarray:
    with gzip.open(run_dir / "kv_counters.trace.json.gz", "rt", encoding="utf-8") as fh:
        return np.array([e["ts"] for e in json.load(fh)["traceEvents"] if e["ph"] == "C"])


@pytest.mark.parametrize("edit", list(BASE_EDITS))
def test_a_trace_without_its_clock_base_keeps_its_kv_figures(
    run_with_kept_cache, prompt_batch, tmp_path, edit
):
    # GIVEN the run as recorded, and a copy whose trace's clock base another tool removed or changed
    reference = tmp_path / "reference"
    edited = tmp_path / "edited"
    shutil.copytree(run_with_kept_cache, reference)
    shutil.copytree(run_with_kept_cache, edited)
    _edit_base(edited, BASE_EDITS[edit])

    # WHEN both are reported (with the KV counters written beside the trace)
    _, want = build_report(reference)
    source, got = build_report(edited)
    assert kvtrace_main(["report", str(reference), "-q"]) == 0
    assert kvtrace_main(["report", str(edited), "-q"]) == 0

    # THEN the KV log still finds every KV storage's allocation: the dynamic cache made one K and one V
    # storage per layer and forward, of prompt_len, prompt_len + 1, ... prompt_len + NEW_TOKENS - 1 tokens
    # (conftest's TINY: 2 layers, 2 KV heads of 64 / 4 = 16 dims, float32)
    rows, prompt_len, layers, kv_heads, head_dim = prompt_batch.rows, prompt_batch.prompt_len, 2, 2, 16
    tokens = [prompt_len + i for i in range(NEW_TOKENS)]
    made = sum(layers * 2 * kv_bytes(kv_heads, head_dim, t, rows, 4) for t in tokens)
    held_at_end = layers * 2 * kv_bytes(kv_heads, head_dim, tokens[-1], rows, 4)
    for report in (want, got):
        (device,) = report.devices
        assert device.bytes_by_method["kv_log"] == made
        assert int(report.timelines[0].by_category["kv"][-1]) == held_at_end
    # ... and every KV figure is the one the trace's own base gives
    assert got.devices[0].categories_at_peak == want.devices[0].categories_at_peak
    assert got.devices[0].categories_at_peak["kv"] > 0
    np.testing.assert_array_equal(got.timelines[0].by_category["kv"], want.timelines[0].by_category["kv"])
    # ... the events sit where the base puts them, within the join's tolerance
    assert abs(got.devices[0].peak_time - want.devices[0].peak_time) <= JOIN_TOLERANCE_US
    # ... the report and the diagnosis say, in one note, that the trace's clock was set by kvtrace's own step
    # ranges in it (each opened as the recorder read the run's clock for its step's start)
    assert want.notes == []
    (note,) = got.notes
    assert note.startswith("the profiler trace's baseTimeNanoseconds ")
    assert note.endswith("by kvtrace's step ranges in it (4 steps, each range opened as its step began)")
    assert ("set off on a loaded host, or a trace edited" in note) is (edit == "25 ms late")
    assert note in diagnose(source, got).notes
    # ... and the KV counters line up with the trace's own events, as the reference's do
    np.testing.assert_allclose(_counters_ts(edited), _counters_ts(reference), rtol=0, atol=JOIN_TOLERANCE_US)


def _ahead_copy(run_dir: Path, tmp_path: Path, lead_us: float) -> Path:
    """A copy of `run_dir` whose trace's clock runs `lead_us` ahead of the KV log's."""
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited)
    _edit_base(edited, lambda base: base + round(lead_us * 1000))
    return edited


def _lead_onto_an_earlier_occupant(run_dir: Path) -> float:
    """A clock lead (µs) of the trace over the KV log that puts a KV storage's allocation after its
    sighting and an earlier, same-sized occupant of its address (a prefill projection's output, freed
    just before the cache's storage was made there) at the sighting; 0 when the run has none within the
    join's tolerance. Read from the trace with plain json and the log's own events."""
    allocations, lives, lead_us = _kv_allocations(run_dir)
    leads = []
    for life in lives:
        own = match(life, allocations, lead_us)
        seen_us = life.first_ns / 1000
        earlier = [
            a.alloc_us
            for a in allocations.get(life.addr, [])
            if own is not None
            and a.nbytes == life.storage_bytes
            and a.free_us is not None
            and a.free_us <= own.alloc_us
            and seen_us - a.alloc_us < JOIN_TOLERANCE_US / 2
        ]
        if earlier:
            leads.append(seen_us - max(earlier))
    return max(leads, default=0.0)


# How far short of the tolerance's edge a shift stops: µs since the epoch as float64 step by 0.25 µs, so a
# storage whose allocation lands exactly at the tolerance after its sighting fell in or out by rounding (the
# trace's clock was then moved, 1 run in 6)
EDGE_US = 1.0


def _lead_just_past_the_tolerance(run_dir: Path) -> float:
    """A clock lead (µs) just past the join's tolerance that half the KV storages still fit as read (their
    allocation at most the tolerance after their sighting), so the trace's clock is not moved
    (`readers.trace_clock`), while a storage the log saw sooner after its allocation, one with an earlier
    same-sized occupant of its address, falls past it; 0 when the run has no such storage. Read from the
    trace with plain json and the log's own events."""
    allocations, lives, lead_us = _kv_allocations(run_dir)
    lags, crowded = [], []  # each storage's sighting - its allocation; those of storages with an earlier one
    for life in lives:
        own = match(life, allocations, lead_us)
        if own is None:
            continue
        lag = life.first_ns / 1000 - own.alloc_us
        lags.append(lag)
        if any(a.nbytes == life.storage_bytes and a.free_us is not None and a.free_us <= own.alloc_us
               for a in allocations.get(life.addr, [])):  # fmt: skip
            crowded.append(lag)
    if not lags:
        return 0.0
    half = sorted(lags, reverse=True)[(len(lags) + 1) // 2 - 1]  # at least half the lags are >= it
    return JOIN_TOLERANCE_US + half - EDGE_US if any(lag < half - EDGE_US for lag in crowded) else 0.0


@pytest.mark.parametrize("lead", ["onto an earlier occupant", "1.5 ms", "just past the tolerance"])
def test_a_trace_clock_ahead_of_the_logs_within_the_tolerance_keeps_its_kv_figures(
    run_with_kept_cache, prompt_batch, tmp_path, lead
):
    # GIVEN a copy of the run whose trace's clock runs ahead of the KV log's by less than the join's
    # tolerance (the clocks agree to ~0.15 ms, a prefill storage is seen 0.02-0.2 ms after it is made), so
    # that a storage's allocation comes after its sighting: one lead that puts an earlier, same-sized
    # occupant of the storage's address at the sighting, one of 1.5 ms, and one just past the tolerance
    # that half the storages still fit as read (the trace is not moved)
    if lead == "1.5 ms":
        lead_us = 1500.0
    elif lead == "just past the tolerance":
        lead_us = _lead_just_past_the_tolerance(run_with_kept_cache)
    else:
        lead_us = _lead_onto_an_earlier_occupant(run_with_kept_cache)
    if not lead_us:
        pytest.skip("no KV storage of this run took an address a same-sized allocation had just left")
    edited = _ahead_copy(run_with_kept_cache, tmp_path, lead_us)

    # WHEN both are reported
    _, want = build_report(run_with_kept_cache)
    _, got = build_report(edited)

    # THEN every storage keeps its own allocation: the same KV bytes (conftest's TINY: 2 layers, 2 KV heads
    # of 16 dims, float32, one storage per layer, K/V and forward) at every event, and no note
    rows, prompt_len, layers, kv_heads, head_dim = prompt_batch.rows, prompt_batch.prompt_len, 2, 2, 16
    made = sum(layers * 2 * kv_bytes(kv_heads, head_dim, prompt_len + i, rows, 4) for i in range(NEW_TOKENS))
    assert got.devices[0].bytes_by_method["kv_log"] == want.devices[0].bytes_by_method["kv_log"] == made
    np.testing.assert_array_equal(got.timelines[0].by_category["kv"], want.timelines[0].by_category["kv"])
    assert got.devices[0].categories_at_peak == want.devices[0].categories_at_peak
    assert got.notes == want.notes == []


def _cut_before(run_dir: Path, alloc_us: float, frees_of_earlier: bool = True) -> None:
    """Drop the trace's memory events before `alloc_us` (Unix-epoch µs), as a trace whose memory profiling
    began there: the storages made before it are held before the trace. Without `frees_of_earlier`, also
    the frees of blocks allocated before it, as a CPU's trace has none (Kineto reports no free of a block
    allocated before it started)."""
    path, trace = _trace_of(run_dir)
    start = alloc_us - trace["baseTimeNanoseconds"] / 1000 - 1.0
    kept, allocated = [], set()
    for event in trace["traceEvents"]:
        if event.get("name") == "[memory]":
            if event["ts"] < start:
                continue
            addr = event["args"]["Addr"]
            if event["args"]["Bytes"] > 0:
                allocated.add(addr)
            elif addr not in allocated and not frees_of_earlier:
                continue
            else:
                allocated.discard(addr)
        kept.append(event)
    trace["traceEvents"] = kept
    _write_trace(path, trace)


def _owned_lags(run_dir: Path) -> list[tuple[float, float, int]]:
    """(sighting - allocation, allocation, bytes) of each KV storage the trace holds (µs, the allocation
    as the trace reads)."""
    allocations, lives, lead_us = _kv_allocations(run_dir)
    return [(life.first_ns / 1000 - own.alloc_us, own.alloc_us, life.storage_bytes)
            for life in lives if (own := match(life, allocations, lead_us)) is not None]  # fmt: skip


def _just_past_the_tolerance_from(owned: list[tuple[float, float, int]], cut_at: float) -> float:
    """The lag (µs) that at least half the storages the trace keeps from `cut_at` on are seen after their
    allocation: a trace that far past the join's tolerance ahead (less EDGE_US) is not moved."""
    lags = sorted((lag for lag, alloc_us, _ in owned if alloc_us >= cut_at), reverse=True)
    return lags[(len(lags) + 1) // 2 - 1]


def _report_cut_and_ahead(
    run_dir: Path, tmp_path: Path, cut_at: float, half: float, frees_of_earlier: bool = True
) -> tuple[Any, Any]:
    """Reports of a copy of the run whose trace's memory events begin at `cut_at` (`_cut_before`) and of a
    copy of that whose trace's clock runs JOIN_TOLERANCE_US + `half` - EDGE_US ahead of the log's."""
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    _cut_before(reference, cut_at, frees_of_earlier)
    edited = _ahead_copy(reference, tmp_path, JOIN_TOLERANCE_US + half - EDGE_US)
    return build_report(reference)[1], build_report(edited)[1]


def test_a_storage_seen_before_a_trace_just_past_the_tolerance_ahead_keeps_its_allocation(
    run_with_kept_cache, prompt_batch, tmp_path
):
    # GIVEN a copy of the run whose trace's memory events begin at the allocation of the prefill's storage
    # the log saw soonest after its own (so, on the log's clock, it was seen before the trace's first event;
    # no KV storage is freed until the first decode step, so none goes within the clocks' error of the
    # trace's start, where the shifted copy could only place its free as near as it knows its clock) ...
    rows, prompt_len, layers, kv_heads, head_dim = prompt_batch.rows, prompt_batch.prompt_len, 2, 2, 16
    owned = _owned_lags(run_with_kept_cache)
    prefill_bytes = kv_bytes(kv_heads, head_dim, prompt_len, rows, 4)
    soonest_lag, cut_at, _ = min(o for o in owned if o[2] == prefill_bytes)
    half = _just_past_the_tolerance_from(owned, cut_at)  # at least half the storages kept lag this
    if not soonest_lag < half - EDGE_US:  # (EDGE_US short of the edge, as `_lead_just_past_the_tolerance`)
        pytest.skip("the storages kept were all seen as soon after their allocation")
    # ... and a copy of that whose trace's clock runs ahead of the log's just past the join's tolerance for
    # it, while half the storages still fit as read (the trace is not moved)

    # WHEN both are reported
    want, got = _report_cut_and_ahead(run_with_kept_cache, tmp_path, cut_at, half)

    # THEN that storage keeps its own allocation, not a hold from before the trace: the same KV at every
    # event, the last of it the cache's last storages (conftest's TINY: 2 layers, 2 KV heads of 16 dims,
    # float32), and no note
    held_at_end = layers * 2 * kv_bytes(kv_heads, head_dim, prompt_len + NEW_TOKENS - 1, rows, 4)
    assert int(want.timelines[0].by_category["kv"][-1]) == held_at_end
    assert got.devices[0].bytes_by_method["kv_log"] == want.devices[0].bytes_by_method["kv_log"] > 0
    np.testing.assert_array_equal(got.timelines[0].by_category["kv"], want.timelines[0].by_category["kv"])
    assert got.devices[0].categories_at_peak == want.devices[0].categories_at_peak
    assert got.notes == want.notes == []


@pytest.mark.parametrize("frees", ["in the trace", "not in the trace"])
def test_kv_the_log_saw_freed_just_after_a_trace_just_past_the_tolerance_ahead_began_is_held_before_it(
    run_with_kept_cache, prompt_batch, tmp_path, frees
):
    # GIVEN a copy of the run whose trace's memory events begin at the allocation of the last step's first
    # storage, so that the previous step's storages, held before the trace, are replaced just after it (the
    # log's `freed` lines for them come within the lag of a sighting, or a layer's forward, of its start),
    # their frees in the trace (a GPU's) or not (a CPU's: added after their replacements' allocations) ...
    rows, prompt_len, layers, kv_heads, head_dim = prompt_batch.rows, prompt_batch.prompt_len, 2, 2, 16
    owned = _owned_lags(run_with_kept_cache)
    cut_at = sorted(alloc_us for _, alloc_us, _ in owned)[-layers * 2]
    half = _just_past_the_tolerance_from(owned, cut_at)
    if frees == "not in the trace" and not any(
        lag < half - EDGE_US for lag, alloc_us, _ in owned if alloc_us >= cut_at
    ):
        pytest.skip("the last step's storages were all seen as soon after their allocation")
    # ... and a copy of that whose trace's clock runs ahead of the log's just past the join's tolerance,
    # while half the storages kept still fit as read (the trace is not moved; a replacement seen sooner
    # after its allocation falls past the tolerance, as read)

    # WHEN both are reported
    want, got = _report_cut_and_ahead(run_with_kept_cache, tmp_path, cut_at, half, frees == "in the trace")

    # THEN the previous step's storages are held before both traces and go after their replacements' (the
    # log's times read on the trace's clock), the last step's first storage the first event's: the KV at it
    # (TINY: 2 layers, 2 KV heads of 16 dims, float32), the same at every event, and no note
    held_before = layers * 2 * kv_bytes(kv_heads, head_dim, prompt_len + NEW_TOKENS - 2, rows, 4)
    last = kv_bytes(kv_heads, head_dim, prompt_len + NEW_TOKENS - 1, rows, 4)
    assert int(want.timelines[0].by_category["kv"][0]) == held_before + last
    assert int(want.timelines[0].by_category["kv"][-1]) == layers * 2 * last
    np.testing.assert_array_equal(got.timelines[0].by_category["kv"], want.timelines[0].by_category["kv"])
    assert got.devices[0].categories_at_peak == want.devices[0].categories_at_peak
    assert got.notes == want.notes == []


# Another model beside the recorded one (conftest's TINY, other weights): 3 rows of a 9-token prompt, then 3
# tokens generated
OTHER_ROWS, OTHER_PROMPT, OTHER_NEW = 3, 9, 3


def _record_a_cache_begun_on_another_thread(model: Any, other: Any, batch: Any, out_dir: Path) -> None:
    """The recorded model generates NEW_TOKENS; another model's cache, prefilled on a second thread first
    (the manifest lists it in `other_caches_on_other_threads`: its prefill's storages are in no event of
    the trace), then generates on the recording thread (its later storages are in the trace). Both caches
    outlive the block."""
    ids = torch.randint(3, 1000, (OTHER_ROWS, OTHER_PROMPT), generator=torch.Generator().manual_seed(2))
    cache, kept = DynamicCache(config=other.config), DynamicCache(config=model.config)

    def prefill() -> None:
        with torch.no_grad():
            other(ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_keyword(): cache})

    with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=True, profile_memory=True):
        thread = threading.Thread(target=prefill)
        thread.start()
        thread.join()
        model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            **{cache_keyword(): kept},
        )
        more = torch.cat([ids, torch.full((OTHER_ROWS, 1), 5)], 1)  # the prefill's 9 tokens are cached
        other.generate(
            more,
            attention_mask=torch.ones_like(more),
            max_new_tokens=OTHER_NEW,
            min_new_tokens=OTHER_NEW,
            do_sample=False,
            pad_token_id=0,
            **{cache_keyword(): cache},
        )
    assert cache.get_seq_length() == OTHER_PROMPT + OTHER_NEW
    assert kept.get_seq_length() == batch.prompt_len + NEW_TOKENS - 1


def test_a_cache_begun_on_another_thread_is_not_added_twice_under_a_trace_just_past_the_tolerance_ahead(
    tiny_model, tiny_size, prompt_batch, tmp_path
):
    # GIVEN a real run whose other model's cache began on another thread and went on on the recording one
    reference = tmp_path / "reference"
    _record_a_cache_begun_on_another_thread(
        tiny_model, build_model(tiny_size, seed=1), prompt_batch, reference
    )
    (listed,) = json.loads((reference / "manifest.json").read_text())["other_caches_on_other_threads"]
    # ... and a copy whose trace's clock runs ahead of the log's just past the join's tolerance for the
    # recorded model's storages, while half of them still fit as read (the trace is not moved), so that those
    # of the listed cache that the log saw sooner after their allocation fall past it, as read
    _, trace = _trace_of(reference)
    allocations, lives, lead_us = _kv_allocations(reference)
    lags: dict[bool, list[float]] = {True: [], False: []}  # listed? -> sighting - allocation of each storage
    untraced = 0
    for life in lives:
        own = match(life, allocations, lead_us)
        if own is None:
            assert life.key[0] == listed, "only the listed cache's storages may be missing from the trace"
            untraced += 1
        else:
            lags[life.key[0] == listed].append(life.first_ns / 1000 - own.alloc_us)
    recorded = sorted(lags[False], reverse=True)
    half = recorded[(len(recorded) + 1) // 2 - 1]  # at least half the recorded model's storages lag this
    # 1 µs short of it, as Unix-epoch µs in float64 differ by 0.25 µs steps: that storage stays in the
    # tolerance as read, whatever the rounding
    lead_us = JOIN_TOLERANCE_US + half - 1.0
    if not any(lag < half - 2.0 for lag in lags[True]):
        pytest.skip("the listed cache's storages were all seen later after their allocation than most")
    edited = _ahead_copy(reference, tmp_path, lead_us)

    # WHEN both are reported
    _, want = build_report(reference)
    source, got = build_report(edited)

    # THEN only the prefill's storages are added, one K and one V per layer (TINY: 2 layers, 2 KV heads of 16
    # dims, float32), each allocated and freed once: the device's events are the trace's and those
    layers, kv_heads, head_dim = 2, 2, 16
    assert untraced == layers * 2
    memory_events = sum(
        1
        for e in trace["traceEvents"]
        if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0
    )
    events = len(source.devices[0])
    assert events == memory_events + 2 * untraced
    for report in (want, got):
        (note,) = [n for n in report.notes if n.startswith("the profiler's trace has no allocation of cache")]
        assert f"its KV ({untraced} storages, from the KV log, at the log's times) is added" in note
    # AND the KV is each storage's once: those the dynamic caches made (a storage per layer, K/V and
    # forward), both caches' last ones held at the end, and the peak and its categories the reference's (the
    # added storages sit among the trace's events at the log's times, so their order there may differ)
    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    made = sum(layers * 2 * kv_bytes(kv_heads, head_dim, prompt_len + i, rows, 4) for i in range(NEW_TOKENS))
    made += sum(
        layers * 2 * kv_bytes(kv_heads, head_dim, OTHER_PROMPT + i, OTHER_ROWS, 4)
        for i in range(OTHER_NEW + 1)
    )
    held_at_end = (
        layers
        * 2
        * (
            kv_bytes(kv_heads, head_dim, prompt_len + NEW_TOKENS - 1, rows, 4)
            + kv_bytes(kv_heads, head_dim, OTHER_PROMPT + OTHER_NEW, OTHER_ROWS, 4)
        )
    )
    for report in (want, got):
        (device,) = report.devices
        assert device.bytes_by_method["kv_log"] == made
        assert int(report.timelines[0].by_category["kv"][-1]) == held_at_end
    assert got.devices[0].peak_allocated_bytes == want.devices[0].peak_allocated_bytes
    assert got.devices[0].categories_at_peak == want.devices[0].categories_at_peak
    assert got.notes == want.notes


def test_a_trace_that_cannot_be_put_on_the_runs_clock_says_so(run_with_kept_cache, tmp_path):
    # GIVEN a copy of the run whose trace lost its clock base, kvtrace's step ranges, and any allocation at a
    # KV storage's address (every address moved by 8 bytes), so nothing says where its events belong
    edited = tmp_path / "edited"
    shutil.copytree(run_with_kept_cache, edited)
    _edit_base(edited, BASE_EDITS["missing"])
    path, trace = _trace_of(edited)
    for event in trace["traceEvents"]:
        if event.get("name") == "[memory]":
            event["args"]["Addr"] += 8
    trace["traceEvents"] = [e for e in trace["traceEvents"] if not str(e.get("name")).startswith("kvtrace/")]
    _write_trace(path, trace)

    # WHEN it is reported and diagnosed
    source, report = build_report(edited)
    diagnosis = diagnose(source, report)

    # THEN the memory figures hold no KV, and both say why in one note
    assert report.devices[0].categories_at_peak["kv"] == 0
    (note,) = report.notes
    assert note.startswith(
        "the profiler trace's baseTimeNanoseconds is missing and too few of its allocations"
    )
    assert note in diagnosis.notes


def _record_with_memory_events(model: Any, batch: Any, out_dir: Path, extra: dict[str, Any]) -> None:
    """`generate()` of NEW_TOKENS under `kvtrace.record` with the profiler's memory events on."""
    with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=True, profile_memory=True):
        model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            **extra,
        )
