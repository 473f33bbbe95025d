"""The peak a recorded transformers run reached, for `kvtrace plan --from-run`: the report's device peak,
what it held beside the weights and KV (activations, logits, temporaries), and where it fell, as
`kvtrace diagnose` places its moment. Pure, torch-free.

Why: a plan's KV and weights are exact arithmetic, but the rest of a step's memory is not in a config; a
run measured it. Without it the plan of the run itself said 95.17 MiB where the run peaked at 111.87 MiB
(`kvtrace demo --cache static`: its prefill attends over all of max_cache_len, 10.38 MiB a layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analyzers.budget import step_starts
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.summary import Report

__all__ = ["PeakMoment", "peak_moment", "prefill_beside", "recorded_note", "update_beside"]


@dataclass(frozen=True)
class PeakMoment:
    """The run's peak: bytes, what beside weights and KV, the phase and tokens a row of its step."""

    peak_bytes: int
    activations_bytes: int
    phase: str | None
    tokens: int
    batch: int | None
    cut_short: bool  # the run stopped (an OOM, an exception): its peak is what it reached
    # of activations_bytes, the batch-first ones, which fewer rows free in proportion (diagnose's figure)
    row_activation_bytes: int | None = None
    # the most held beside the weights and KV during the run's prefill (`prefill_beside`); None: not told
    prefill_activations_bytes: int | None = None
    # held beside the weights and KV at the KV log's peak, a cache update's transient (`update_beside`)
    update_activations_bytes: int | None = None


def peak_moment(path: str | Path) -> PeakMoment | str:
    """The run's peak moment, or why it has none to plan from (a sentence for the plan's notes)."""
    from analyzers.planning.diagnose import diagnose
    from analyzers.report import build_report

    source, report = build_report(path, timelines=True)
    main = report.main_device
    if source.kv_log_only or main is None:
        # Why, as the report's note says it: a run recorded with the profiler on may have lost its trace
        cause = source.kv_log_cause if source.kv_log_only else None
        why = f" ({cause})" if cause else ""
        unseen = "its activations are unseen, so the reserve stands for them"
        return f"the run has no allocator events{why}: {unseen}"
    leaves_out = source.meta.get("peak_leaves_out")
    if leaves_out:
        return f"the run's peak leaves out {leaves_out}: the reserve stands for its activations"
    diagnosis = diagnose(source, report)
    at_peak = main.categories_at_peak
    beside = main.peak_allocated_bytes - at_peak.get("weights", 0) - at_peak.get("kv", 0)
    return PeakMoment(
        peak_bytes=main.peak_allocated_bytes,
        activations_bytes=max(beside, 0),
        phase=diagnosis.step_phase,
        tokens=diagnosis.tokens_held or 0,
        batch=diagnosis.batch,
        cut_short=diagnosis.event == "oom" or diagnosis.step_cut,
        row_activation_bytes=diagnosis.row_activation_bytes,
        prefill_activations_bytes=prefill_beside(source, report),
        update_activations_bytes=update_beside(source, report),
    )


def update_beside(source: MemorySource, report: Report) -> int | None:
    """What the main device held beside its weights and KV at the KV log's peak, where that peak is a cache
    update's transient (above the final KV: a dynamic cache's growth copy): the activations alive during a
    decode step's cache update. Another cache's update copies (a QuantizedCache's dequantized and returned
    K and V) sit beside these, not beside the run's peak moment's, which are the logits a step ends with
    (the tour's demo at batch 8: 8.12 MiB at its update, 24.61 MiB at its peak). None where the run does not
    tell: no transient, no timeline."""
    kv_log = source.meta.get("kv")
    main = report.main_device
    if kv_log is None or main is None or not report.timelines or kv_log.peak_bytes <= kv_log.final_bytes:
        return None
    dev_index = next((i for i, d in enumerate(source.devices) if d.device == main.device), None)
    if dev_index is None or dev_index >= len(report.timelines):
        return None
    timeline = report.timelines[dev_index]
    at = int(np.searchsorted(timeline.ts_us, kv_log.peak_t_ns / 1000.0, side="right")) - 1
    return int(timeline.by_category["other"][at]) if at >= 0 else None


def prefill_beside(source: MemorySource, report: Report) -> int | None:
    """The most the main device held beside its weights and KV during the run's prefill steps (the KV log's
    steps of phase "prefill", from the step's start to the next step's, `step_starts`): what a plan prices a
    larger prefill with. The run's peak less its weights and prefill KV bounds it too, but where the peak
    came late that holds the run's decode KV and its growth copy as well (the tour's demo planned at batch
    12, context 40: 66.35 MiB of "activations" where the batch-12 recording held 36.34 MiB). None where
    the run does not tell: no step of its log a whole prefill (cut short in it), no timeline."""
    kv_log = source.meta.get("kv")
    main = report.main_device
    if kv_log is None or main is None or not report.timelines:
        return None
    dev_index = next((i for i, d in enumerate(source.devices) if d.device == main.device), None)
    if dev_index is None or dev_index >= len(report.timelines):
        return None
    timeline = report.timelines[dev_index]
    beside = timeline.by_category["other"]  # allocated less weights and KV, after each event
    # Where each step began as `diagnose` counts it: a module cache's first KV line (`cache_k`, scanned at
    # the forward's end) would put the prefill's own activations outside its window and the next decode
    # forward's inside it
    starts = step_starts(source)
    cut_step = kv_log.cut.step if kv_log.cut is not None else None
    found: int | None = None
    for i, (start_us, step, phase) in enumerate(starts):
        if (kv_log.step_phase.get(step) or phase) != "prefill" or step == cut_step:
            continue
        end_us = starts[i + 1][0] if i + 1 < len(starts) else np.inf
        inside = (timeline.ts_us >= start_us) & (timeline.ts_us < end_us)
        if inside.any():
            found = max(found or 0, int(beside[inside].max()))
    return found


def recorded_note(moment: PeakMoment, same_cache: bool, reserve_typed: bool, rows_told: bool) -> str:
    """How the plan's peak counts the run's activations, and what the reserve is then; `rows_told`: the plan
    frees the moment's batch-first activations for a smaller batch (`RecordedPeak.row_activation_bytes`)."""
    measured = (
        f"the peak counts the run's activations as recorded ({human_bytes(moment.activations_bytes)} beside "
        f"the weights and KV at its {human_bytes(moment.peak_bytes)} peak, "
        f"{moment.phase or 'its'} step)"
    )
    row_bytes = human_bytes(moment.row_activation_bytes or 0)
    smaller = (
        f"a smaller batch frees the {row_bytes} of them that are batch-first "
        "(the logits, attention's copies: allocations the rows times a model width long) in proportion, as "
        "`kvtrace diagnose` prices it, and keeps the rest (an upper bound); a smaller context keeps them (an "
        "upper bound, they shrink too)"
        if rows_told
        else "a smaller batch or context keeps them (an upper bound, they shrink too; the recording does not "
        "tell which follow the rows)"
    )
    how = (
        f": the run's own settings plan its own peak; {smaller}; a larger batch or context grows them in "
        "proportion, a longer prompt's prefill with the prompt "
        "(but where every layer slides, generate()'s ids and mask still grow with a longer context, a few "
        "bytes a token that a plan at the run's prompt does not count)"
        if same_cache
        else ": beside this cache's KV at the run's peak, or, the larger, its KV peak (inside a cache "
        "update) beside what the run held at its own KV peak, where the run tells it (else added to that KV "
        "peak), an estimate (another cache moves the peak: a static or sliding cache's prefill attends over "
        "its whole length); record it to be sure"
    )
    reserve = (
        "; the --reserve typed is kept out on top"
        if reserve_typed
        else "; they replace the reserve's guess, so none is kept (--reserve keeps memory out on top for "
        "the CUDA context and allocator fragmentation, which allocated bytes do not count)"
    )
    cut = (
        "; the run stopped before its end, so its peak is what it reached, a lower bound"
        if moment.cut_short
        else ""
    )
    return measured + how + reserve + cut
