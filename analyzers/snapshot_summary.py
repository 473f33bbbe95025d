"""A small snapshot's report with Python lists: numpy is never imported.

A real CUDA snapshot pickle is often well under a megabyte (a few thousand trace entries), and then
numpy's import alone (60 ms here) is twice the whole `pickle.load` process. The report needs few figures of
each device: counts, the running allocated bytes and where they peak, the bytes by category there (the
stack rules' KV and weights), the reserved bytes, the final level. So for a snapshot of up to
`PLAIN_MAX_ENTRIES` trace entries whose values are all plain ints (`plain_trace_ok`), the reader's replay is
kept as lists and those figures are worked out here, by the same rules as the columns path
(`analyzers.attribution.attribute`, `analyzers.timeline.device_timeline`, `analyzers.summary`); anything
larger or odd takes the columns path. The report has no timelines: it is for `--json` and text, not HTML.
Each trace is checked and replayed in one pass (`analyzers.readers.snapshot_one_pass`) where it can be.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from analyzers.model import (
    CATEGORY_NAMES,
    KV,
    METHOD_NAMES,
    METHOD_NONE,
    METHOD_STACK_RULE,
    OTHER,
    WEIGHTS,
    MemorySource,
)
from analyzers.readers.snapshot import (
    PLAIN_MAX_ENTRIES,
    PlainDevice,
    load_snapshot,
    plain_trace_ok,
    snapshot_source,
)
from analyzers.readers.snapshot_one_pass import NotPlain
from analyzers.readers.snapshot_pools import peak_slack, pools_at
from analyzers.readers.sources import ProgressFn
from analyzers.stack_rules import RULES, frame_rule_matches
from analyzers.summary import DeviceSummary, KvSummary, Report, clock_time, summarize
from kvtrace.collector import collector_paused

__all__ = ["plain_snapshot_report"]


def plain_snapshot_report(
    path: str, progress: ProgressFn | None = None, one_pass: bool = True
) -> tuple[MemorySource, Report]:
    """The snapshot's source and report: with lists when it is small and plain, else by the columns path.

    A source read with lists holds no `devices` (the report has their figures) and the report no
    timelines. `one_pass=False` reads a plain snapshot by the two-step path (`plain_trace_ok`, then the
    replay), as one the one pass gives up on is read: the same figures, more walks over its entries."""
    # The collector stays off until the loaded snapshot is dropped (`_read` returns): switched on while its
    # tens of thousands of containers were alive, its next collection walked them all (~1 ms at 300 kB).
    with collector_paused():
        source, replayed = _read(path, progress, one_pass)
        if replayed is None:
            return source, summarize(source)
        categories, kinds = frame_rule_matches(source.frames, RULES)
        del kinds  # K or V: per-layer figures need a KV log, which a snapshot has not
        devices = []
        kv = KvSummary(0, 0, 0, 0, [], "none")
        for dev in replayed:
            summary, kv_figures = _device_figures(source, dev, categories)
            devices.append(summary)
            if kv_figures is not None:
                kv.peak_bytes = max(kv.peak_bytes, kv_figures[0])
                kv.final_bytes += kv_figures[1]
                kv.allocated_bytes_total += kv_figures[2]
        kv.measured_from = "stack_rule" if kv.allocated_bytes_total else "none"
        return source, summarize(source, precomputed=(devices, []), kv=kv)


def _read(
    path: str, progress: ProgressFn | None, one_pass: bool
) -> tuple[MemorySource, list[PlainDevice] | None]:
    """The snapshot's source and each device's replay as lists; None for the replays where it was read by
    the columns path (then attributed). The loaded snapshot is dropped when this returns."""
    data = load_snapshot(path, progress)
    traces = data.get("device_traces") or []
    small = sum(map(len, traces)) <= PLAIN_MAX_ENTRIES
    if small and one_pass:
        replayed: list[PlainDevice] = []
        try:
            return snapshot_source(path, data, plain=replayed.append, one_pass=True), replayed
        except NotPlain:  # damaged or odd entries: read anew below, exactly as the two-step path reads them
            pass
    if not small or not all(map(plain_trace_ok, traces)):
        from analyzers.attribution import attribute

        return attribute(snapshot_source(path, data)), None
    replayed = []
    return snapshot_source(path, data, plain=replayed.append), replayed


def _event_categories(dev: PlainDevice, frame_category: list[int]) -> tuple[list[int], list[int]]:
    """Category of each event, as `attribute` decides them: an allocation whose stack a rule matches, and
    the next free of its address after it; and those allocations' indices, in order (their method is the
    stack rule, as is their frees'; every other event's is none)."""
    category = [OTHER] * len(dev.delta_bytes)
    ruled = {frame for frame, code in enumerate(frame_category) if code >= 0}  # stacks a rule matched
    if not ruled:  # the usual snapshot: no event to look at
        return category, []
    matched = [
        i
        for i, (delta, frame) in enumerate(zip(dev.delta_bytes, dev.frame_id, strict=True))
        if delta > 0 and frame in ruled
    ]
    wanted = {dev.addr[i] for i in matched}
    frees_at: dict[int, list[int]] = {}
    for i, (delta, address) in enumerate(zip(dev.delta_bytes, dev.addr, strict=True)):
        if delta < 0 and address in wanted:
            frees_at.setdefault(address, []).append(i)
    for i in matched:
        category[i] = frame_category[dev.frame_id[i]]
    for i in matched:  # in order: a free that two allocations reach takes the later one's, as numpy does
        frees = frees_at.get(dev.addr[i], [])
        at = bisect_right(frees, i)
        if at < len(frees):
            category[frees[at]] = category[i]
    return category, matched


def _device_figures(
    source: MemorySource, dev: PlainDevice, frame_category: list[int]
) -> tuple[DeviceSummary, tuple[int, int, int] | None]:
    """The device's summary (`analyzers.summary._device_summary` of a snapshot's device), and its KV
    figures (peak, final, allocated in all) where it has events.

    Each walk over the events is one in C where it can be (a count, a sum, the running level); a category
    no event has keeps its level from the start (most snapshots match no rule)."""
    baseline_categories: dict[int, int] = {}  # blocks live before the trace began: their stacks split it
    for _address, size, fid in dev.baseline_blocks:
        found = frame_category[fid] if 0 <= fid < len(frame_category) else -1
        code = found if found >= 0 else OTHER
        baseline_categories[code] = baseline_categories.get(code, 0) + size
    held = {CATEGORY_NAMES[code]: baseline_categories.get(code, 0) for code in (KV, WEIGHTS)}
    deltas = dev.delta_bytes
    peak = final = dev.baseline_bytes
    at_peak = {**held, "other": peak - held["kv"] - held["weights"]}
    # No trace events: the peak is the state at the dump, whose segments are what was reserved then.
    reserved = sum(s.total_size for s in source.segments if s.device == dev.device) or None
    peak_time: float | None = None
    before_trace = False
    by_method: dict[str, int] = {}
    kv_figures = None
    if deltas:
        category, matched = _event_categories(dev, frame_category)
        allocated = list(accumulate(deltas, initial=dev.baseline_bytes))[1:]
        present = {category[i] for i in matched}  # a free takes its allocation's category
        series = {  # the level of each category after each event; None: its level from the start
            CATEGORY_NAMES[code]: list(
                accumulate(
                    (d if c == code else 0 for d, c in zip(deltas, category, strict=True)), initial=base
                )
            )[1:]
            if code in present
            else None
            for code, base in ((KV, held["kv"]), (WEIGHTS, held["weights"]))
        }
        peak = max(allocated)
        peak_i = allocated.index(peak)  # the first highest, as np.argmax
        final = allocated[-1]
        at_peak = {name: held[name] if values is None else values[peak_i] for name, values in series.items()}
        at_peak["other"] = peak - at_peak["kv"] - at_peak["weights"]
        before_trace = dev.baseline_bytes > peak
        if before_trace:  # the level before the first event (blocks the trace frees)
            peak, peak_i = dev.baseline_bytes, 0
            at_peak = {name: held[name] if values is None else values[0] for name, values in series.items()}
            at_peak["other"] = allocated[0] - at_peak["kv"] - at_peak["weights"]
            at_peak[CATEGORY_NAMES[category[0]]] -= deltas[0]
        reserved = dev.total_reserved[peak_i] if any(dev.total_reserved) else None
        peak_time = clock_time(source, dev.device, float(dev.ts_us[peak_i]))
        # Allocations' bytes by method: a rule's matched ones (each > 0), and the rest as "none" (the
        # frees a rule reaches are < 0, counted in neither).
        by_rule = sum(deltas[i] for i in matched)
        totals = {METHOD_NONE: sum(filter((0).__lt__, deltas)) - by_rule, METHOD_STACK_RULE: by_rule}
        for code, name in enumerate(METHOD_NAMES):
            if totals.get(code):
                by_method[name] = totals[code]
        kv_allocated = sum(deltas[i] for i in matched if category[i] == KV)
        kv_series = series["kv"]
        kv_figures = (
            (held["kv"], held["kv"], kv_allocated)
            if kv_series is None
            else (max(kv_series), kv_series[-1], kv_allocated)
        )
    pools = pools_at(dev.private_pool_free, dev.private_pool_free_at_dump, peak_i if deltas else -1)
    fragmentation, in_pools = peak_slack(reserved, peak, before_trace, pools)
    summary = DeviceSummary(
        device=dev.device,
        alloc_events=sum(map((0).__lt__, deltas)),
        free_events=sum(map((0).__gt__, deltas)),
        peak_allocated_bytes=peak,
        peak_time=peak_time,
        final_allocated_bytes=final,
        capacity_bytes=None,
        categories_at_peak=at_peak,
        reserved_at_peak=reserved,
        fragmentation_at_peak_bytes=fragmentation,
        bytes_by_method=by_method,
        size_basis="requested",
        final_allocated_rounded_bytes=dev.final_rounded_bytes,
        peak_before_trace=before_trace,
        private_pool_free_at_peak=in_pools,
    )
    return summary, kv_figures
