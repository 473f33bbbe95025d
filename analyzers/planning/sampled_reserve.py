"""The reserve of `kvtrace plan --from-run` for a CUDA run without allocator events whose memory samples
measured the allocator's peak. Pure, torch-free.

Why: a run recorded with `profiler=False` has no allocator events, so its activations are unseen and the
plan kept its default 10% reserve for them, on top of its arithmetic (the prefill's activations included).
On a real H200 OOM (sample_traces/h200/oom_b266, a 24.96 GiB cap) that guess was 2.50 GiB where the run
itself needed 50 MiB beyond the arithmetic at its prefill and 585 MiB at its last decode step: a context
`kvtrace diagnose` named as fitting planned NO at 25.39 GiB, though the run had passed that prefill and
held more tokens than that context under the cap. Each step's CUDA sample carries
`cuda_peak_allocated_bytes` (`torch.cuda.max_memory_allocated`, which kvtrace never resets: the process's
peak so far), so where it rose over the sample before, it is the peak of that step: measured, as the
profiler's events are. What it exceeds the plan's own arithmetic of that step by, at the run's own batch,
prompt and tokens, is what the arithmetic leaves out (a decode step's logits, workspaces); the most over the
steps replaces the guess, so the run planned as recorded peaks where its samples say it did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from analyzers.planning.plan_kv import kv_sizes, prefill_at
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.planning.plan_types import PlanRequest
    from analyzers.planning.run_defaults import RunDefaults
    from kvtrace.format import Run

__all__ = [
    "SampledPeak",
    "SampledReserve",
    "at_run",
    "sampled_peaks",
    "sampled_reserve",
    "sampled_reserve_note",
]


@dataclass(frozen=True)
class SampledPeak:
    """A step of the planned generate() call whose sample measured its own peak (the running peak rose)."""

    step: int
    phase: str  # "prefill" or "decode"
    tokens: int  # a row's tokens in the cache at the step's end
    peak_bytes: int  # the allocator's peak during the step


@dataclass(frozen=True)
class SampledReserve:
    """The reserve the samples measure: `reserve_bytes`, the most a step's measured peak exceeds the plan's
    arithmetic of that step by (never below 0), at `worst`; `arithmetic` the plan's bytes of each step of
    `peaks`, in order."""

    reserve_bytes: int
    peaks: tuple[SampledPeak, ...]
    arithmetic: tuple[int, ...]
    worst: int  # the index in `peaks` of the step whose peak exceeds its arithmetic most


def sampled_peaks(run: Run, prompt: int) -> tuple[SampledPeak, ...]:
    """The steps of the run's last generate() call of a `prompt`-token prompt whose CUDA sample (of the run's
    device) shows the allocator's peak risen over the sample before it: that step's own peak. A step whose
    forward raised (its sample's `raised`) reached part of it and is left out; so is a prefill that set no
    new peak, and every step when the first CUDA sample is the prefill's (nothing tells what came before).
    Empty on the CPU, and for samples without `cuda_peak_allocated_bytes` (runs recorded before kvtrace
    wrote it)."""
    device: Any = run.manifest.get("device") or {}
    if not isinstance(device, dict) or device.get("type") != "cuda":
        return ()
    index = device.get("index")
    samples = [
        sample
        for sample in run.memory_samples
        if type(sample.get("cuda_peak_allocated_bytes")) is int
        and type(sample.get("step")) is int
        and (index is None or sample.get("cuda_device", index) == index)
    ]
    starts = [
        i
        for i, sample in enumerate(samples)
        if sample.get("phase") == "prefill" and sample.get("prompt_end") == prompt
    ]
    if not starts or starts[-1] == 0:
        return ()
    start = starts[-1]
    prefill_step = samples[start]["step"]
    before = samples[start - 1]["cuda_peak_allocated_bytes"]
    peaks: list[SampledPeak] = []
    for sample in samples[start:]:
        phase, step, peak = sample.get("phase"), sample["step"], sample["cuda_peak_allocated_bytes"]
        if sample is not samples[start] and phase == "prefill":
            break  # the next call's
        rose = peak > before and not sample.get("raised")
        if phase in ("prefill", "decode") and step >= prefill_step and rose:
            peaks.append(SampledPeak(step, phase, prompt + step - prefill_step, peak))
        before = max(before, peak)
    return tuple(peaks)


def _arithmetic(req: PlanRequest, peak: SampledPeak) -> int:
    """The plan's bytes of a step at the run's shape, no reserve: at the prefill, the weights, the prompt's
    KV and the activations the planner estimates (`prefill_at`; the KV alone where it does not); at a
    decode step, the weights and the KV peak of a cache holding the step's tokens (its growth copy)."""
    if peak.phase == "prefill":
        prefill = prefill_at(req, req.batch, req.context)
        held = (
            prefill[0] + prefill[1].peak_bytes
            if prefill is not None
            else kv_sizes(req, req.batch, req.context).prefill_bytes
        )
        return req.weights_bytes + held
    return req.weights_bytes + kv_sizes(req, req.batch, peak.tokens + 1).step_peak_bytes


def at_run(req: PlanRequest, run: RunDefaults) -> PlanRequest | None:
    """`req` at the run's own settings, those its samples measured (its model, weights, cache, KV dtype,
    batch, prompt and context; another cache, batch or dtype typed is the plan's, not the measurement's);
    None where the run does not say its batch, prompt or context."""
    if run.batch is None or run.prompt is None or run.context is None:
        return None
    weights_dtype = run.weights_dtype or "bf16"
    default_kv = weights_dtype if weights_dtype in ("bf16", "fp16", "fp32") else "bf16"
    return replace(
        req,
        geometry=run.geometry,
        weights_dtype=weights_dtype,
        kv_dtype=run.kv_dtype or ("int4" if run.cache == "quantized" else default_kv),
        batch=run.batch,
        context=run.context,
        prompt=run.prompt,
        beams=run.beams,
        cache=run.cache,
        window=run.window if run.cache in ("sliding", "static_sliding") else None,
        encoder_tokens=run.encoder_tokens,
        measured_weights_bytes=run.weights_bytes,
        quant_group_size=run.quant_group_size or req.quant_group_size,
        residual_length=run.residual_length or req.residual_length,
        quant_backend=run.quant_backend if run.cache == "quantized" else None,
    )


def sampled_reserve(at_run: PlanRequest, peaks: tuple[SampledPeak, ...]) -> SampledReserve | None:
    """The reserve `peaks` measure against the plan `at_run` (the run's own model, cache, batch, prompt and
    context; its reserve is not counted); None without a peak."""
    if not peaks:
        return None
    bare = replace(at_run, reserve_bytes=0, reserve_fraction=None, recorded=None)
    arithmetic = tuple(_arithmetic(bare, peak) for peak in peaks)
    excess = [peak.peak_bytes - planned for peak, planned in zip(peaks, arithmetic, strict=True)]
    worst = max(range(len(peaks)), key=lambda i: excess[i])
    return SampledReserve(max(excess[worst], 0), peaks, arithmetic, worst)


def sampled_reserve_note(cause: str, measured: SampledReserve, reserve_typed: bool) -> str:
    """The plan's note: what the samples measured, what the arithmetic gives at those steps, the reserve
    kept; `cause` why the run has no allocator events (`peak_moment`'s sentence, without its end)."""

    told = [i for i, peak in enumerate(measured.peaks) if peak.phase == "prefill"]
    if measured.worst not in told:
        told.append(measured.worst)

    def step_text(i: int) -> str:
        peak = measured.peaks[i]
        where = (
            "at its prefill"
            if peak.phase == "prefill"
            else f"at its step {peak.step} ({peak.tokens:,} tokens a row)"
        )
        planned = (
            "the plan's arithmetic at the run's own batch and tokens gives" if i == told[0] else "it gives"
        )
        measured_bytes = f"{human_bytes(peak.peak_bytes)} ({peak.peak_bytes:,} B)"
        return f"{measured_bytes} {where}, where {planned} {human_bytes(measured.arithmetic[i])}"

    decodes = sum(peak.phase == "decode" for peak in measured.peaks)
    counted = (
        f" (of the {decodes} decode steps whose peak its samples measured, the most beyond it)"
        if decodes > 1 and measured.peaks[measured.worst].phase == "decode"
        else ""
    )
    kept = (
        f"the {human_bytes(measured.reserve_bytes)} ({measured.reserve_bytes:,} B) beyond it"
        if measured.reserve_bytes
        else "nothing beyond it"
    )
    on_top = "; the --reserve typed goes on top" if reserve_typed else ""
    return (
        f"{cause}, but its memory samples measured the CUDA allocator's peak (max_memory_allocated, never "
        f"reset by kvtrace): {'; '.join(step_text(i) for i in told)}{counted}: {kept} "
        f"{'are' if measured.reserve_bytes else 'is'} kept as the reserve, standing for what the arithmetic "
        "leaves out (a decode step's logits, workspaces) in place of the 10% guess, so the run planned as "
        f"recorded peaks as measured{on_top}"
    )
