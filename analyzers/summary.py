"""The report's figures, computed once from an attributed `MemorySource`; renderers only format them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from analyzers.model import KV, METHOD_NAMES, OTHER, WEIGHTS, MemorySource
from analyzers.readers.snapshot_pools import peak_slack, pools_at
from analyzers.readers.unescaped_names import unescaped_names_note
from analyzers.run_end_notes import ended_notes
from analyzers.torch_categories import torch_categories_allocated, torch_categories_at
from analyzers.trace_coverage import all_memory_events_damaged, coverage_notes, skipped_events_note

if TYPE_CHECKING:
    from analyzers.caches import CacheSummary
    from analyzers.group import GroupReport
    from analyzers.kv_log_figures import KvLogAnalysis
    from analyzers.timeline import DeviceTimeline


@dataclass
class DeviceSummary:
    device: str
    alloc_events: int
    free_events: int
    peak_allocated_bytes: int
    peak_time: float | None  # Unix-epoch µs (a trace's own µs); None: no events, or no clock (see clock_time)
    final_allocated_bytes: int
    capacity_bytes: int | None
    categories_at_peak: dict[str, int]
    reserved_at_peak: int | None
    fragmentation_at_peak_bytes: int | None
    bytes_by_method: dict[str, int]
    # The unit of the byte figures: DeviceEvents.size_basis ("requested" or "allocator"), or "tensors" where
    # the source has no allocator events (MemorySource.kv_log_only): the KV log's and the weights' own bytes
    size_basis: str = "allocator"
    final_allocated_rounded_bytes: int | None = None  # allocator blocks at a snapshot's dump
    # The peak is the level before the trace's first event (a trace that begins by freeing blocks it never
    # allocated): the run peaked then or earlier, unseen, and `reserved_at_peak` is what the allocator had
    # cached by then, so `fragmentation_at_peak_bytes` is None (analyzers.trace_coverage)
    peak_before_trace: bool = False
    # Of the reserved bytes at the peak, those unallocated in a snapshot's private pools (CUDA graphs'), which
    # only their pools' allocations can use: left out of `fragmentation_at_peak_bytes`. None: no such pool
    private_pool_free_at_peak: int | None = None
    # A memory timeline's bytes by torch.profiler's own category (PARAMETER, ACTIVATION, ...; uncategorised:
    # its None), largest first: those live at the peak, and those allocated over the run that attribution took
    # from torch's category (`bytes_by_method["profiler_category"]`). None for other sources.
    torch_categories_at_peak: dict[str, int] | None = None
    torch_categories_allocated: dict[str, int] | None = None
    # A snapshot's: the span its trace covers, what "allocated" sums over (a ring buffer of max_entries, the
    # history maybe turned on mid-run: not the run). Its entries, and first to last entry's µs (None: the
    # trace has no times). None for every other source, and a snapshot device with no trace.
    trace_entries: int | None = None
    trace_span_us: int | None = None


@dataclass
class LayerSummary:
    layer: int
    k_bytes: int
    v_bytes: int
    evicted_tokens: int
    tokens: int = 0
    evicted_by_reason: dict[str, int] = field(default_factory=dict)  # window / press / crop
    cache: int | None = 0  # the cache object (the KV log's `cache`): a layer index can be in several;
    # None in a run group whose ranks' main caches have different ids (analyzers.group)
    k_tokens: int = 0
    v_tokens: int = 0
    """Tokens per row its K and V each hold: `tokens` both, but where a run stopped between the layer's K
    and V updates (an OOM in V's torch.cat), K holding one more. 0: unknown."""


@dataclass
class KvSummary:
    peak_bytes: int
    final_bytes: int
    allocated_bytes_total: int
    evicted_tokens: int
    per_layer: list[LayerSummary]
    measured_from: str  # "kv_log" | "engine" | "stack_rule" | "none" (also a refused vLLM start's: no pool)
    bytes_per_token_measured: float | None = None
    bytes_per_token_expected: int | None = None
    tokens_held: int | None = None
    batch: int | None = None
    token_rows: int | None = None
    """Tokens held summed over the rows, the divisor of the measured bytes per token (but for preallocated
    buffers, see `capacity_rows`): `tokens_held` x `batch` for one run; a data-parallel group's ranks may
    hold different tokens, so theirs is the ranks' sum."""
    capacity_rows: int | None = None
    capacity_tokens: int | None = None
    """A main cache of preallocated module buffers (Meta's cache_k/cache_v, KV log part `buffer`): the rows
    and positions they have room for, max_batch_size and max_seq_len, whatever `batch` and `tokens_held`
    the forwards wrote. Its bytes follow these, so the measured bytes per token divides by their product
    (its slots); None for caches that grow with what they hold. A transformers StaticCache likewise: its
    rows and max_cache_len, or tensors given to `kvtrace.track()` that are preallocated (views of one
    [layers, 2, batch, ...] tensor: their rows and its max_seq), `capacity_of` says which. The run's last
    buffers: a cache re-made inside the block had others before (`diagnose` prices a moment in those live
    then, `kv_capacity.buffers_live_at`)."""
    capacity_of: str | None = None  # "buffers" (module buffers) | "static_cache" | "tracked" (kvtrace.track)
    evictions: dict[str, Any] | None = None
    evictions_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_per_token_note: str | None = None
    """Why the measured bytes per token exceeds the arithmetic where a sliding window is the cause
    (`window_storage_note`: its layers keep window-1 tokens in storages of window positions), or replaced
    K/V storages something outside the cache holds (`analyzers.kv_kept`)."""
    """Evicted tokens by kind: `window` (the cache's own sliding window), `press` (an eviction library such
    as kvpress, or other code rebinding keys/values), `crop` (Cache.crop)."""
    caches: list[CacheSummary] = field(default_factory=list)
    main_cache: int | None = None
    rank_heads: dict[str, int] | None = None
    """One rank of a run group (`rank`, `world_size`): the KV heads its main cache's tensors hold
    (`kv_heads_held`) of the model's (`model_kv_heads`), which its arithmetic counts; a tensor-parallel
    rank holds a share. None for a single process and for a group's report (its figures are all ranks')."""


@dataclass
class Report:
    source_kind: str
    path: str
    devices: list[DeviceSummary]
    kv: KvSummary
    geometry: dict[str, Any] | None
    steps: int
    markers: int
    oom: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    timelines: list[DeviceTimeline] = field(default_factory=list, repr=False)
    budget: dict[str, Any] | None = None  # analyzers.budget.BudgetCrossing.to_json() of a run's gpu_memory
    engine: Any = None  # analyzers.engine.EngineFigures of a serving-engine (vLLM) run
    # No allocator events (MemorySource.kv_log_only): the device figures count only the KV cache and the
    # weights, and a note says why
    partial: bool = False
    # A run group's report (`build_report` on a group): its figures are the group's, ranks together
    group: GroupReport | None = field(default=None, repr=False, compare=False)
    # Why no device's figures tell the weights apart (`_weights_untold`), None where one does: renderers show
    # "-" and this, not a "0 B" that reads as measured
    weights_untold: str | None = None

    @property
    def main_device(self) -> DeviceSummary | None:
        """The device with the highest peak (the one that runs out first)."""
        return max(self.devices, key=lambda d: d.peak_allocated_bytes, default=None)

    def device_measured(self, device: DeviceSummary) -> bool:
        """False where a device's byte figures are 0 for want of any event, not a measured 0: a vLLM start
        refused for lack of KV memory made no pool and ran no step, so unless a profiler saw events (vLLM
        loading its weights) its devices measured nothing. Renderers say such figures are unknown."""
        return not self._refused_start or bool(device.alloc_events or device.free_events)

    @property
    def kv_measured(self) -> bool:
        """False where the KV figures are 0 for want of any KV entry (a refused vLLM start: no pool made)."""
        return not self._refused_start or bool(self.kv.per_layer)

    @property
    def _refused_start(self) -> bool:
        return self.engine is not None and self.engine.status == "refused_start"

    def _repr_html_(self) -> str:
        """Jupyter shows a report as its tables and a small timeline (analyzers.render.notebook); a run
        group's, its ranks side by side first."""
        from analyzers.render.notebook import report_to_notebook_html

        return report_to_notebook_html(self)


def clock_time(source: MemorySource, device: str, ts_us: float | None) -> float | None:
    """A device's `ts_us` value as a time, or None where its timestamps are no clock: a snapshot whose trace
    has no `time_us` orders its events by their index in the trace (readers.snapshot)."""
    return ts_us if source.meta.get("timestamps", {}).get(device, "time_us") == "time_us" else None


def _device_summary(
    source: MemorySource, index: int, baseline_category: int
) -> tuple[DeviceSummary, DeviceTimeline]:
    from analyzers.timeline import device_timeline  # the columns path: a small snapshot's report has none

    dev = source.devices[index]
    timeline = device_timeline(dev, baseline_category)
    n = len(dev)
    before_trace = False
    if n == 0:
        peak_i = -1
        peak = final = dev.baseline_bytes
        if dev.baseline_categories is not None:
            at_peak = {
                "kv": dev.baseline_categories.get(KV, 0),
                "weights": dev.baseline_categories.get(WEIGHTS, 0),
            }
        else:
            at_peak = {"kv": 0, "weights": dev.baseline_bytes if baseline_category == WEIGHTS else 0}
        at_peak["other"] = peak - at_peak["kv"] - at_peak["weights"]
    else:
        peak_i = int(np.argmax(timeline.allocated))
        peak = int(timeline.allocated[peak_i])
        final = int(timeline.allocated[-1])
        at_peak = {name: int(series[peak_i]) for name, series in timeline.by_category.items()}
        before_trace = timeline.start_allocated > peak
        if before_trace:  # the level before the first event (blocks the trace frees)
            peak = timeline.start_allocated
            at_peak = dict(timeline.start_by_category)
            peak_i = 0  # its time is the first event's: nothing is known between the start and it
    reserved_at_peak = (
        int(timeline.reserved[peak_i]) if timeline.reserved is not None and peak_i >= 0 else None
    )
    if n == 0 and source.kind == "snapshot":
        # No trace events: the peak is the state at the dump, whose segments are what was reserved then
        # (as `diagnose` reads them).
        reserved_at_peak = sum(s.total_size for s in source.segments if s.device == dev.device) or None
    in_pools = pools_at(dev.private_pool_free, dev.private_pool_free_at_dump, peak_i)
    fragmentation, in_pools = peak_slack(reserved_at_peak, peak, before_trace, in_pools)
    by_method: dict[str, int] = {}
    if dev.method is not None and n:
        allocs = dev.delta_bytes > 0
        for code, name in enumerate(METHOD_NAMES):
            total = int(dev.delta_bytes[allocs & (dev.method == code)].sum())
            if total:
                by_method[name] = total
    summary = DeviceSummary(
        device=dev.device,
        alloc_events=dev.alloc_events,
        free_events=dev.free_events,
        peak_allocated_bytes=peak,
        peak_time=clock_time(source, dev.device, float(dev.ts_us[peak_i])) if peak_i >= 0 else None,
        final_allocated_bytes=final,
        capacity_bytes=dev.capacity_bytes,
        categories_at_peak=at_peak,
        reserved_at_peak=reserved_at_peak,
        fragmentation_at_peak_bytes=fragmentation,
        bytes_by_method=by_method,
        size_basis="tensors" if source.kv_log_only else dev.size_basis,
        final_allocated_rounded_bytes=dev.final_rounded_bytes,
        peak_before_trace=before_trace,
        private_pool_free_at_peak=in_pools,
        # before the trace (or without events) the peak is the baseline: no event counted
        torch_categories_at_peak=torch_categories_at(dev, -1 if before_trace else peak_i),
        torch_categories_allocated=torch_categories_allocated(dev),
    )
    return summary, timeline


def _kv_from_log(source: MemorySource) -> KvSummary | None:
    kv = source.meta.get("kv")
    if kv is None:
        return None
    per_layer = [
        LayerSummary(
            f.layer,
            f.k_bytes,
            f.v_bytes,
            f.evicted_tokens,
            f.tokens,
            dict(f.evicted_by_reason),
            f.cache,
            k_tokens=f.k_tokens,
            v_tokens=f.v_tokens,
        )
        for f in kv.per_layer
    ]
    return KvSummary(
        peak_bytes=kv.peak_bytes,
        final_bytes=kv.final_bytes,
        allocated_bytes_total=kv.allocated_bytes_total,
        evicted_tokens=kv.evicted_tokens,
        per_layer=per_layer,
        measured_from="kv_log",
        evictions_by_reason=dict(kv.evicted_by_reason),
    )


def _kv_from_events(source: MemorySource, timelines: list[DeviceTimeline]) -> KvSummary:
    """Without a KV log: what the stack rules attributed to KV."""
    peak = final = total = 0
    per_layer: dict[int, LayerSummary] = {}
    for dev, timeline in zip(source.devices, timelines, strict=True):
        if dev.category is None or len(dev) == 0:
            continue
        kv_series = timeline.by_category["kv"]
        peak = max(peak, int(kv_series.max()))
        final += int(kv_series[-1])
        kv_allocs = (dev.category == KV) & (dev.delta_bytes > 0)
        total += int(dev.delta_bytes[kv_allocs].sum())
    measured = "stack_rule" if total else "none"
    return KvSummary(peak, final, total, 0, [per_layer[k] for k in sorted(per_layer)], measured)


def input_notes(source: MemorySource) -> list[str]:
    """What the reader set aside or chose: skipped events with their reasons, which file of a folder."""
    notes = list(source.meta.get("input_notes", ()))
    skipped: dict[str, int] = source.meta.get("skipped_events") or {}
    # A trace none of whose [memory] events could be read: `coverage_notes` says what was skipped, and why
    only_memory = all(reason.startswith("[memory]") for reason in skipped)
    if skipped and not (only_memory and all_memory_events_damaged(source) is not None):
        notes.append(skipped_events_note(skipped, source.meta.get("trace_events")))
    if source.meta.get("unescaped_names"):
        what = "" if source.kind == "chrome_trace" else "the profiler trace: "
        notes.append(unescaped_names_note(source.meta["unescaped_names"], what))
    return notes


def _engine_geometry(source: MemorySource) -> dict[str, Any] | None:
    """A vLLM run's model, from engine.json (its manifest has none); None for runs without an engine. The
    read files are kept for engine_of_source, which reads them next."""
    from analyzers.engine import model_geometry
    from analyzers.readers.engine_files import read_engine

    run = source.meta.get("engine") or read_engine(source.path)
    if run is None:
        return None
    source.meta["engine"] = run
    return model_geometry(run.info.model)


def _budget_crossing(
    source: MemorySource, devices: list[DeviceSummary], timelines: list[DeviceTimeline]
) -> dict[str, Any] | None:
    """Where the run crossed the budget it was recorded with (analyzers.budget), None without a budget."""
    from analyzers.budget import budget_crossing, budget_of

    budget_bytes = budget_of(source)
    if budget_bytes is None:
        return None
    unseen = 0
    if source.kind == "run":
        from analyzers.engine_report import bytes_before_trace  # a vLLM engine's weights and pool

        unseen = bytes_before_trace(source, devices)
    return budget_crossing(source, timelines, budget_bytes, unseen).to_json()


def _weights_untold(source: MemorySource, devices: list[DeviceSummary], engine: Any) -> str | None:
    """`Report.weights_untold`: None where a device's figures hold weights (a weights table, a stack rule's);
    else where they are: a serving engine's loaded before its trace, a run's left out (its notes say why:
    no weights table, a missing one), a bare input's or a GPU allocator's totals counted in other."""
    if any(
        d.categories_at_peak.get("weights", 0) or d.bytes_by_method.get("weights_table", 0) for d in devices
    ):
        return None
    if engine is not None:
        return "loaded before the trace: left out of these figures, see the note"
    if source.kind == "run" and not source.meta.get("weights_counted"):
        return "not in these figures: see the notes"
    return "not attributed: counted in other"


def _forward_passes(source: MemorySource, kv_log: KvLogAnalysis | None) -> int:
    """The steps: forward passes of the model. A run's KV log has a line in each forward that updated a
    cache (step 0 is before the first: a module cache's discovery, a cache made before; a cut last step
    is no whole one). Where none did (`use_cache=False`, a cache kvtrace does not follow), the forwards
    that ended whole each left a step-end sample. Other inputs count their step ranges."""
    if kv_log is None:
        return sum(1 for m in source.markers if m.kind == "step")
    cut = kv_log.cut
    steps = sum(1 for step in kv_log.step_start_ns if step > 0 and not (cut and step == cut.step))
    run = source.meta.get("run")
    if steps or run is None:
        return steps
    ended = {
        sample.get("step")
        for sample in run.memory_samples
        if sample.get("phase") in ("prefill", "decode") and sample.get("raised") is not True
    }
    return sum(1 for step in ended if isinstance(step, int) and step > 0)


def _kept_storages_note(source: MemorySource, kv: KvSummary) -> str | None:
    """The note on K/V storages the caches replaced that stay live at a finished run's end, held from
    outside (`analyzers.kv_kept`), and the measured bytes per token's note on those of the main cache. Not
    for a run whose forwards ran with grad enabled (the graph keeps them: `grad_note` says so), nor one
    still being recorded or that died (its last frees may be unwritten)."""
    from analyzers.kv_kept import kept_bytes_per_token_note, kept_note, kept_storages
    from analyzers.planning.grad_steps import grad_steps

    run = source.meta.get("run")
    ended = (source.meta.get("manifest") or {}).get("ended") or {}
    if run is None or not run.kv_events or ended.get("status") == "running" or grad_steps(source):
        return None
    kept = kept_storages(run.kv_events)
    main = kept.by_cache.get(kv.main_cache, 0) if kv.main_cache is not None else 0
    measured, rows = kv.bytes_per_token_measured, kv.token_rows
    if main and measured and rows and kv.capacity_of is None:
        said = kept_bytes_per_token_note(main, measured, rows)
        kv.bytes_per_token_note = "; ".join(n for n in (kv.bytes_per_token_note, said) if n)
    return kept_note(kept, kv.final_bytes)


def summarize(
    source: MemorySource,
    precomputed: tuple[list[DeviceSummary], list[DeviceTimeline]] | None = None,
    kv: KvSummary | None = None,
) -> Report:
    """Figures of an attributed source (see analyzers.attribution.attribute). `precomputed`: device figures
    folded while reading, for sources whose events were not kept (analyzers.stream_summary); `kv`, the
    stack rules' KV figures of such a source, where it has no KV log (analyzers.snapshot_summary)."""
    baseline_category = WEIGHTS if source.kind == "run" else OTHER
    devices: list[DeviceSummary] = []
    timelines: list[DeviceTimeline] = []
    if precomputed is not None:
        devices, timelines = precomputed
    for i in range(len(source.devices) if precomputed is None else 0):
        summary, timeline = _device_summary(source, i, baseline_category)
        devices.append(summary)
        timelines.append(timeline)
    if source.kind == "snapshot":
        for device in devices:
            span = source.meta.get("trace_span", {}).get(device.device)
            if span is not None:
                device.trace_entries, device.trace_span_us = span["entries"], span["span_us"]
    kv = _kv_from_log(source) or kv or _kv_from_events(source, timelines)
    manifest = source.meta.get("manifest") or {}
    geometry = manifest.get("model")
    if geometry is None and source.kind == "run":
        geometry = _engine_geometry(source)
    run = source.meta.get("run")
    kv_log = source.meta.get("kv")
    log_notes: list[str] = []
    if run is not None:  # a run's KV log: imported for runs only (a snapshot's report has none, issue 11)
        from analyzers.run_kv import add_log_figures

        log_notes = add_log_figures(kv, run, kv_log, manifest, geometry)
    steps = _forward_passes(source, kv_log)
    oom = None
    if source.ooms:
        first = source.ooms[0]
        oom = {
            "device": first.device,
            "time": clock_time(source, first.device, first.ts_us),
            "requested_bytes": first.requested_bytes,
            "segment_bytes": first.segment_bytes,
            "device_free_bytes": first.device_free_bytes,
            "limit_bytes": first.limit_bytes,
            "message": first.message,
        }
    notes = ended_notes(source)
    notes.extend(str(w) for w in (manifest or {}).get("warnings") or ())
    notes.extend(input_notes(source))
    notes.extend(
        coverage_notes(
            source.kind, devices, source.meta.get("skipped_events"), source.meta.get("history_cut")
        )
    )
    notes.extend(log_notes)
    if run is not None:  # a run's own loop with grad on, a generate() call's kept outputs (analyzers only)
        from analyzers.planning.grad_steps import grad_note
        from analyzers.planning.kept_outputs import peak_kept_note

        notes.extend(n for n in (peak_kept_note(source, timelines), grad_note(source, kv)) if n is not None)
        kept = _kept_storages_note(source, kv)
        if kept is not None:
            notes.append(kept)
    # A budget is a recording option (`gpu_memory`): only a run's manifest can hold one
    budget = _budget_crossing(source, devices, timelines) if manifest else None
    engine = None
    if source.kind == "run":
        from analyzers.engine_report import engine_of_source  # a vLLM run's pool, read from its files

        engine = engine_of_source(source, kv, devices, notes)  # vLLM: kv.peak_bytes becomes the pool's
        if engine is not None:
            # The KV log of a paged pool has a few events (its creation); the engine logs every step, and
            # its step numbers are kvtrace's (docs/format.md).
            steps = max(steps, engine.steps)
    return Report(
        engine=engine,
        weights_untold=_weights_untold(source, devices, engine),
        budget=budget,
        source_kind=source.kind,
        path=source.path,
        devices=devices,
        kv=kv,
        geometry=geometry,
        steps=steps,
        markers=len(source.markers),
        oom=oom,
        notes=notes,
        timelines=timelines,
        partial=source.kv_log_only,
    )
