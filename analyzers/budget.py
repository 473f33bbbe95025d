"""Where a run would have run out on a smaller device: the first allocation that crosses a memory budget.

A budget (`kvtrace.record(..., gpu_memory="8GiB")`, `kvtrace demo --gpu-memory`) costs nothing while
recording. Afterwards the device's allocated-bytes timeline (weights included) is replayed: the first
event that takes it above the budget is the allocation that would have failed, the way a real OOM is the
first request the allocator cannot serve. Its step comes from kvtrace's step ranges (an engine's name its
own step numbers), the KV log's steps, or else the trace's own (torch.profiler's `ProfilerStep#N`, counted
and named as `diagnose` does), its layer from the KV log: the layer the allocation belongs to when it is KV,
else the layer whose KV update came last before it (the layer the forward was in).

This counts allocated bytes in the source's unit (`counts` says which: requested sizes, or the allocator's
blocks), not the allocator's rounded reserved segments, so a real device of that size would run out at
this point or a little earlier (fragmentation, CUDA context, other processes). Memory held
since before the trace began that its events miss (a vLLM engine's weights, from engine.json) is passed in as
`unseen_bytes`, a level under the whole timeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from analyzers.model import CATEGORY_NAMES, MemorySource
from analyzers.timeline import DeviceTimeline

__all__ = [
    "BudgetCrossing",
    "budget_crossing",
    "budget_of",
    "manifest_budget",
    "marker_step_at",
    "step_at",
    "step_starts",
]

# An engine's step range (vLLM, transformers' continuous batching): it names its own step number, as the
# engine_steps.jsonl rows do; an engine step mixes prefill and decode requests, so it names no phase
ENGINE_STEP = "kvtrace/engine step "
COUNTS = "allocated bytes (requested sizes, weights included), not reserved segments"
# Kineto's `[memory]` events (a run's, a Chrome trace's) give the sizes the allocator reported: on CUDA its
# rounded blocks, so a little more than the program asked for (DeviceEvents.size_basis)
ALLOCATOR_COUNTS = "allocated bytes (the allocator's block sizes, weights included), not reserved segments"
# Without a profiler trace (profiler=False) the only events are the KV log's: activations, logits and every
# other allocation are unseen, so a run can cross the budget although these figures fit it.
KV_ONLY_COUNTS = "KV cache and weights only: other allocations (activations, logits) were not recorded"


@dataclass(frozen=True)
class BudgetCrossing:
    """`crossed` False: the run's peak fits (`headroom_bytes` left). When crossed, the request that would
    have failed: its bytes, category, step, layer and time (Unix-epoch µs)."""

    bytes: int
    crossed: bool
    device: str | None
    peak_bytes: int
    headroom_bytes: int
    counts: str = COUNTS
    step: int | None = None
    phase: str | None = None
    layer: int | None = None
    layer_from: str | None = None
    t: float | None = None
    request_bytes: int | None = None
    request_category: str | None = None
    allocated_before_bytes: int | None = None
    allocated_after_bytes: int | None = None
    before_first_step: bool = False  # no step had begun: the setup or an engine's start crossed it
    partial: bool = False  # only the KV cache and weights were seen (see KV_ONLY_COUNTS)
    unseen_bytes: int = 0  # held since before the trace, missing from its events, counted throughout
    # no event to replay: a snapshot whose trace holds no alloc or free, one moment (what was live at its
    # dump), which crosses the budget or not as a whole; which allocation crossed it is not seen
    at_dump: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def budget_of(source: MemorySource) -> int | None:
    """The budget a run was recorded with (manifest options.gpu_memory), if any."""
    return manifest_budget(source.meta.get("manifest") or {})


def manifest_budget(manifest: dict[str, Any]) -> int | None:
    """`budget_of` from the manifest alone, for a reader that has no memory source (`plan --from-run`)."""
    value = (manifest.get("options") or {}).get("gpu_memory")
    return int(value) if isinstance(value, int | float) and value > 0 else None


def _device_index(source: MemorySource, timelines: list[DeviceTimeline]) -> int | None:
    """The run's device (the manifest's type) where known, else the device that peaks highest."""
    if not timelines:
        return None
    kind = ((source.meta.get("manifest") or {}).get("device") or {}).get("type")
    if kind:
        for i, dev in enumerate(source.devices):
            if dev.device.startswith(str(kind)) and len(dev):
                return i
    peaks = [float(tl.allocated.max()) if len(tl.allocated) else -1.0 for tl in timelines]
    return int(np.argmax(peaks))


def _step_starts(source: MemorySource) -> list[tuple[float, str]]:
    """(start µs, label) of the run's step ranges, in time order."""
    return sorted(
        (m.ts_us, m.label)
        for m in source.markers
        if m.kind == "step"
        and (m.label == "kvtrace/prefill" or m.label.startswith(("kvtrace/decode", ENGINE_STEP, "step ")))
    )


def _has_steps(source: MemorySource) -> bool:
    kv = source.meta.get("kv")
    return bool(_step_starts(source)) or (kv is not None and bool(kv.step_start_ns))


def _named_step(label: str, count: int) -> tuple[int, str | None]:
    """The step number and phase a step range names, `count`: the ranges begun up to it, this one included."""
    if label.startswith("step "):  # a run's own steps ("step N phase"): step 0 is the setup before any
        number, _, phase = label[5:].partition(" ")
        if number.isdigit():
            return int(number), phase or None
    if label.startswith(ENGINE_STEP) and label[len(ENGINE_STEP) :].isdigit():
        return int(label[len(ENGINE_STEP) :]), None
    return count, ("prefill" if "prefill" in label else "decode")


def step_starts(source: MemorySource) -> list[tuple[float, int, str | None]]:
    """(start µs, step, phase) of the run's steps in time order, where each began as `step_at` counts it:
    the step ranges (the profiler's, else a run's own from its samples' `started_ns`, the forward's start),
    else the KV log's first line of each step. Every per-step window and stamp (a prefill's activations,
    the exported counters) takes these, so that a step's own allocations fall in it."""
    starts = _step_starts(source)
    if starts:
        return [(ts, *_named_step(label, i + 1)) for i, (ts, label) in enumerate(starts)]
    kv = source.meta.get("kv")
    if kv is None:
        return []
    return sorted((t_ns / 1000.0, step, kv.step_phase.get(step)) for step, t_ns in kv.step_start_ns.items())


def step_at(source: MemorySource, t_us: float) -> tuple[int | None, str | None]:
    """Step number (1 = prefill) and phase of the step running at `t_us`, the one way every figure of a
    run names a moment's step. The step ranges come first: they open when a forward begins, where the KV
    log's first line of a step may come only at its end (a module's cache, `cache_k`, is scanned after the
    forward), which would place the forward's own allocations in the step before. A run recorded without
    the profiler has its ranges from its samples' `started_ns` (analyzers.readers.run_dir)."""
    starts = _step_starts(source)
    started = [label for ts, label in starts if ts <= t_us]
    if started:
        return _named_step(started[-1], len(started))
    kv = source.meta.get("kv")
    if kv is not None and kv.step_start_ns:
        steps = [s for s, t in kv.step_start_ns.items() if t / 1000.0 <= t_us]
        if steps:
            return max(steps), kv.step_phase.get(max(steps))
    return marker_step_at(source, t_us)


def marker_step_at(source: MemorySource, t_us: float) -> tuple[int | None, str | None]:
    """(count, label) of the trace's step ranges begun by `t_us`, any labels (torch.profiler's
    `ProfilerStep#N`): a trace without kvtrace's steps or KV log, as `diagnose` places its moment."""
    steps = [m for m in source.markers if m.kind == "step" and m.ts_us <= t_us]
    return (len(steps), steps[-1].label) if steps else (None, None)


def _layer_at(source: MemorySource, dev_index: int, index: int, t_us: float) -> tuple[int | None, str | None]:
    dev = source.devices[dev_index]
    if dev.layer is not None and 0 <= index < len(dev) and int(dev.layer[index]) >= 0:
        return int(dev.layer[index]), "the KV allocation's own layer"
    run = source.meta.get("run")
    if run is None:
        return None, None
    last = None
    for event in run.kv_events:
        if event.t_ns / 1000.0 > t_us:
            break
        # only a forward's updates say which layer it was in: not a cache made at setup, nor an engine's
        # pool (vLLM logs its layers' views once, at its start, and no update after)
        if event.event != "freed" and event.phase not in ("", "end"):
            last = event.layer
    if last is None:
        return None, None
    return last, "the layer whose KV update came last before the request"


def budget_crossing(
    source: MemorySource, timelines: list[DeviceTimeline], budget_bytes: int, unseen_bytes: int = 0
) -> BudgetCrossing:
    """The first allocation that takes the run's device above `budget_bytes` (see the module docstring);
    `unseen_bytes` held throughout besides the timeline's (none counted without a timeline)."""
    dev_index = _device_index(source, timelines)
    if dev_index is None:
        return BudgetCrossing(budget_bytes, False, None, 0, budget_bytes)
    dev, timeline = source.devices[dev_index], timelines[dev_index]
    # No event: one moment, what was live before any (a snapshot whose trace holds no alloc or free: its
    # dump; a run without allocator events or KV: its weights), which crosses the budget or not as a whole
    events = len(timeline.allocated)
    allocated = timeline.allocated + unseen_bytes
    peak = int(allocated.max()) if events else timeline.start_allocated + unseen_bytes
    fits = BudgetCrossing(
        budget_bytes,
        False,
        dev.device if events or peak else None,
        peak,
        budget_bytes - peak,
        unseen_bytes=unseen_bytes,
        at_dump=not events and bool(peak) and source.kind == "snapshot",
    )
    if source.kv_log_only:
        fits = replace(fits, counts=KV_ONLY_COUNTS, partial=True)
    elif dev.size_basis == "allocator":
        fits = replace(fits, counts=ALLOCATOR_COUNTS)
    if not events:
        if peak <= budget_bytes:
            return fits
        return replace(fits, crossed=True, allocated_after_bytes=peak, before_first_step=not fits.at_dump)
    before_first = int(allocated[0]) - int(dev.delta_bytes[0])
    if before_first > budget_bytes:
        t0 = float(timeline.ts_us[0])
        return replace(fits, crossed=True, t=t0, allocated_after_bytes=before_first, before_first_step=True)
    over = np.flatnonzero(allocated > budget_bytes)
    if not len(over):
        return fits
    index = int(over[0])
    t_us = float(timeline.ts_us[index])
    step, phase = step_at(source, t_us)
    if step is None and _has_steps(source):  # before every step began: step 0, record()'s setup
        step = 0
    layer, layer_from = _layer_at(source, dev_index, index, t_us)
    category = CATEGORY_NAMES[int(dev.category[index])] if dev.category is not None else None
    request = int(dev.delta_bytes[index])
    return replace(
        fits,
        crossed=True,
        # during record()'s setup (preallocated caches) or an engine's start (its pool): no step had begun
        before_first_step=step == 0,
        step=step,
        phase=phase,
        layer=layer,
        layer_from=layer_from,
        t=t_us,
        request_bytes=request,
        request_category=category,
        allocated_before_bytes=int(allocated[index]) - request,
        allocated_after_bytes=int(allocated[index]),
    )
