"""The notes a plan from a recorded run carries where its figure is a bound, not a measurement: a prefill
larger than the run's that the run does not tell, prompts whose padding it does not tell, a quantized cache's
prefill temporaries it never made. Pure, no torch."""

from __future__ import annotations

import math

from analyzers.planning.plan_kv import kv_sizes
from analyzers.planning.plan_types import PlanRequest
from analyzers.planning.prefill_activations import cpu_flash_thread_bytes
from analyzers.planning.presets import dtype_bytes_for
from analyzers.planning.recorded_run import run_request, same_cache_as_run
from analyzers.planning.recorded_terms import prefill_growth
from analyzers.planning.static_prefill import (
    prefill_attention_bytes,
    unknown_padding_note,
    unpadded_prompts_note,
)
from analyzers.units import human_bytes

__all__ = ["cpu_flash_note", "padding_note", "prefill_bound_note", "quantized_prefill_note"]


def prefill_bound_note(req: PlanRequest) -> str | None:
    """Why the plan's prefill may be priced high: its rows or prompt outgrow the run's, and the run does not
    tell what it held beside the KV at its prefill, so the bound for it, the run's peak less its weights and
    prefill KV, holds whatever KV the run held later too (its decode steps' and their growth copies)."""
    rec = req.recorded
    if rec is None or rec.prefill_activations_bytes is not None or not same_cache_as_run(req):
        return None
    run = run_request(req, rec)
    prompt = kv_sizes(req, req.batch, req.context).prompt
    rows = max(req.batch / rec.batch, 1.0)
    if rows * prefill_growth(run, rec, prompt) <= 1.0 and not prefill_attention_bytes(
        req, run, rec, req.batch, req.context, prompt
    ):
        return None
    return (
        "the run does not tell what it held beside its KV at its prefill (no whole prefill step in its KV "
        "log): this larger prefill counts the run's peak less its weights and prefill KV as activations, "
        "which holds the KV the run held later too (an upper bound, far above where its peak came late)"
    )


def padding_note(req: PlanRequest) -> str | None:
    """Why a plan of an sdpa run that does not tell whether its prompts were padded is priced as padded
    (`unknown_padding_note`), or what padded prompts add where its were not (`unpadded_prompts_note`)."""
    if req.recorded is None:
        return None
    return unknown_padding_note(req, run_request(req, req.recorded)) or unpadded_prompts_note(req)


def quantized_prefill_note(req: PlanRequest) -> str | None:
    """Why a quantized plan from a run on another cache may be priced low: the prefill's quantize
    temporaries are the backend's own (hqq's grow to a few times the layer's K), never in such a run."""
    if req.recorded is None or req.cache != "quantized" or same_cache_as_run(req):
        return None
    return (
        "the quantized cache's prefill quantizes each layer's prompt K and V through temporaries that depend "
        "on the backend (hqq, quanto, fp8), which this run did not make: they are not priced (where this "
        "run peaked at its prefill, or the plan's prompt is longer, its update's copies are kept on top of "
        "the run's activations instead, a bound); record a run with the quantized cache to be sure"
    )


def cpu_flash_note(req: PlanRequest) -> str | None:
    """What a CPU run's sdpa holds more at the plan's longer prompt than its measured prefill, grown with the
    prompt, prices: torch's CPU flash kernel keeps, for each of its threads while a layer attends, a query
    split's float32 scores over the keys with their max, sum and output (`cpu_flash_thread_bytes`), and its
    split steps up with the prompt (32 queries, 64 from 192 tokens, 256 from 768), so a thread's blocks
    outgrow the prompt there. No GPU kernel holds them: the plan, for a GPU, leaves them out, as a config's
    plan does (its prefill note). The tiny Mistral of the tests (a window of 128, 2 rows, one thread)
    planned from a 184-token prompt at 192 was 26,777 B under its CPU recording, 26,780 B of them the
    blocks' step. None where the run was not on a CPU under sdpa, its sdpa takes no mask at the plan's
    prompt (unpadded, no window reached: a layer's attention then holds less than its MLP), or the blocks
    grow no faster than the prompt."""
    rec = req.recorded
    if rec is None or rec.device != "cpu" or rec.attn_implementation != "sdpa" or not rec.prompt:
        return None
    prompt = kv_sizes(req, req.batch, req.context).prompt
    geom = req.geometry
    window = geom.sliding_window
    if rec.padded is False and (window is None or not geom.windowed_layers or prompt < window):
        return None  # no mask: the layer's sdpa holds too little beside them to be the prefill's peak
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    head_dim = geom.head_dim
    planned = cpu_flash_thread_bytes(prompt, head_dim, compute)
    grown = math.ceil(cpu_flash_thread_bytes(rec.prompt, head_dim, compute) * prompt / rec.prompt)
    more = planned - grown
    if more <= 0:
        return None
    return (
        f"the run was on a CPU, whose sdpa (torch's flash kernel) keeps blocks of scores for each of its "
        f"threads while a layer attends: {human_bytes(planned)} ({planned:,} B) a thread at the "
        f"{prompt:,}-token prompt, {human_bytes(more)} ({more:,} B) more than the run's at "
        f"{rec.prompt:,} tokens grown with the prompt (its query split steps up at 192 and 768 tokens): "
        "not counted, as no GPU kernel holds them"
    )
