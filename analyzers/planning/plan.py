"""`kvtrace plan`: will this model, batch and context fit on this GPU? Pure arithmetic, no torch.

`plan(request)` turns a `PlanRequest` into a frozen `PlanResult`; `to_json` and `format_text` render a
result and compute nothing.

A plan fits when its worst moment, weights + KV + activations + reserve, <= GPU memory: the larger of the
KV peak (the last decode step's growth copy) and the prefill, the prompt's KV beside the activations
transformers' forward holds over the whole prompt, estimated from the geometry
(analyzers.planning.prefill_activations: at a Llama layer's MLP, 3 x rows x prompt x intermediate_size
elements and four hidden states; tens of GiB at a long prompt). The reserve stands for what the planner
cannot see (CUDA context, cuBLAS workspaces, a decode step's activations, the logits, allocator
fragmentation); its default of 10% of the GPU mirrors vLLM's (<0.32) `gpu_memory_utilization=0.9`. A plan
from a recorded run (`PlanRequest.recorded`) sees the activations: its peak is the run's measured one, moved
to the batch, context and cache planned (analyzers.planning.recorded_growth's `recorded_peak_at`), and the
measured activations replace the reserve's guess (`kvtrace plan --from-run` keeps none unless --reserve is
typed, on top).

This module decides whether a request fits and searches for what would: the largest batch, the longest
context, the remedies. The rest is split by role: the request and result types
(analyzers.planning.plan_types), the KV each cache kind holds (analyzers.planning.plan_kv), a recorded
run's peak moved to the plan (analyzers.planning.recorded_growth), and the rendering
(analyzers.planning.plan_render). `parse_size` (analyzers.planning.size_text) is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

# `blocks`, the types, the renderers and `parse_size` are re-exported: one import for the planner.
from analyzers.planning.encoder_pass import encoder_pass_note
from analyzers.planning.plan_kv import (
    blocks,
    cache_layout,
    cross_kv_per_token,
    kv_per_token,
    kv_sizes,
    peak_at,
    plan_peak,
    prefill_at,
    prompt_kv_by_layer,
)
from analyzers.planning.plan_render import format_text, to_json
from analyzers.planning.plan_types import (
    CACHE_KINDS,
    DEFAULT_RESERVE_FRACTION,
    PREALLOCATED_CACHES,
    PlanRequest,
    PlanResult,
    Remedy,
)
from analyzers.planning.prefill_note import prefill_note
from analyzers.planning.quantized_weights import quantized_weights_note
from analyzers.planning.recorded_notes import (
    cpu_flash_note,
    padding_note,
    prefill_bound_note,
    quantized_prefill_note,
)
from analyzers.planning.size_text import parse_size
from analyzers.units import a_or_an

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_RESERVE_FRACTION",
    "PlanRequest",
    "PlanResult",
    "Remedy",
    "blocks",
    "format_text",
    "parse_size",
    "plan",
    "to_json",
]


def _steady_context(req: PlanRequest) -> int | None:
    """The context from which the peak stops growing, None when it grows with every token: only when every
    layer keeps a window, and, for a dynamic cache or a prefill the plan estimates, only once the prompt is
    fixed (sliding layers hold the prompt, a prefill's activations follow it, and the worst prompt grows
    with the context)."""
    whole, _, window = cache_layout(req)
    if whole or window is None or req.geometry.compressed is not None:  # DeepSeek-V4's entries grow too
        return None
    if req.prompt is None and prefill_at(req, req.batch, req.context) is not None:
        return None  # the worst prompt's prefill grows with the context, whatever the window
    if req.cache not in PREALLOCATED_CACHES:  # dynamic, or sliding (a DynamicCache too)
        return None if req.prompt is None else max(req.prompt, window) + 2
    # min(written, window) tokens, written = context - 1; a prompt past the window is written whole first
    return window + 1 if req.prompt is None else max(window, req.prompt) + 1


def _largest(fits: Callable[[int], bool], cap: int | None = None) -> int:
    """Largest n >= 1 with fits(n), for a monotone predicate; 0 if even 1 fails. Doubling then bisection,
    so the answer is exact without assuming the cost is linear (residuals and windows make it piecewise)."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while (cap is None or high <= cap) and fits(high):
        low, high = high, high * 2
    if cap is not None:
        high = min(high, cap + 1)
    while high - low > 1:  # invariant: fits(low), not fits(high) (or high is past the cap)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _evaluate(req: PlanRequest) -> PlanResult:
    data, scales, _ = kv_per_token(req)
    sizes = kv_sizes(req, req.batch, req.context)
    weights = req.weights_bytes
    reserve = req.effective_reserve_bytes
    total = weights + sizes.kv_bytes + reserve
    moment = plan_peak(req, req.batch, req.context)
    peak = moment.peak_bytes
    # beside the weights, the reserve and the KV the peak's moment holds: a recorded run's, or the prefill's
    activations = peak - weights - reserve - moment.kv_bytes
    prefill = prefill_at(req, req.batch, req.context)
    gpu = req.gpu_memory_bytes

    def context_fits(context: int) -> bool:
        return peak_at(req, req.batch, context) <= gpu

    beams = req.beams  # beam search decodes whole prompts: a batch of beams rows at a time
    max_batch = beams * _largest(lambda prompts: peak_at(req, prompts * beams, req.context) <= gpu)
    shortest = 2 if req.prompt is None else req.prompt + 1  # the prompt (at least 1) and one new token
    steady = _steady_context(req)
    max_context: int | None
    if steady is not None and context_fits(steady):
        max_context = None  # every longer context costs what this one does
    else:
        cap = None if steady is None else steady - shortest + 1
        longer = _largest(lambda extra: context_fits(shortest - 1 + extra), cap=cap)
        max_context = shortest - 1 + longer if longer else 0
    budget = gpu - weights - reserve - activations
    return PlanResult(
        request=req,
        kv_bytes_per_token=data,
        kv_scale_bytes_per_token=math.ceil(scales),
        prompt_tokens=sizes.prompt,
        kv_tokens=sizes.kv_tokens,
        kv_bytes=sizes.kv_bytes,
        kv_prefill_bytes=sizes.prefill_bytes,
        kv_peak_bytes=sizes.peak_bytes,
        kv_scale_bytes=sizes.kv_scale_bytes,
        kv_residual_bytes=sizes.kv_residual_bytes,
        kv_preallocated_bytes=sizes.kv_bytes if req.cache in PREALLOCATED_CACHES else 0,
        weights_bytes=weights,
        reserve_bytes=reserve,
        total_bytes=total,
        dynamic_realloc_peak_bytes=sizes.step_peak_bytes - sizes.kv_bytes,
        peak_bytes=peak,
        headroom_bytes=gpu - peak,
        fits=peak <= gpu,
        max_batch=max_batch,
        max_context=max_context,
        kv_budget_bytes=budget,
        kv_blocks=blocks(budget, math.ceil(data + scales), req.block_size),
        activations_bytes=activations,
        kv_at_peak_bytes=moment.kv_bytes,
        activations_moment=moment.activations_moment,
        prefill_activations_bytes=None if prefill is None else prefill[1].peak_bytes,
        kv_cross_attention_bytes=sizes.cross_bytes,
        kv_parts=dict(sizes.parts) or None,
        kv_cross_attention_bytes_per_token=cross_kv_per_token(req),
        encoder_tokens=req.effective_encoder_tokens or None,
    )


def _remedies(result: PlanResult) -> tuple[Remedy, ...]:
    req = result.request
    gpu = req.gpu_memory_bytes
    if result.weights_bytes + result.reserve_bytes >= gpu:
        return (Remedy("weights", None, result.weights_bytes + result.reserve_bytes, False),)
    found: list[Remedy] = []
    if 1 <= result.max_batch < req.batch:
        found.append(Remedy("batch", result.max_batch, peak_at(req, result.max_batch, req.context), True))
    if result.max_context is not None and 1 <= result.max_context < req.context:
        found.append(Remedy("context", result.max_context, peak_at(req, req.batch, result.max_context), True))
    if req.geometry.compressed is not None:  # DeepSeek-V4's layers run in their own DynamicCache alone
        return tuple(found)
    if req.cache in ("dynamic", "static") and req.beams == 1:  # a quantized beam search is not planned
        # fp8 (the QuantizedCache's fp8 backend: a byte a value, `--cache fp8`), as diagnose prices it first,
        # then int4 (quanto): each its own line, so plan and diagnose name the same changes
        fp8 = replace(req, cache="quantized", kv_dtype="fp8", quant_backend="fp8")
        peak = peak_at(fp8, req.batch, req.context)
        found.append(Remedy("quantized_kv", 8, peak, peak <= gpu))
        quantized = replace(req, cache="quantized", kv_dtype="int4")
        peak = peak_at(quantized, req.batch, req.context)
        found.append(Remedy("quantized_kv", 4, peak, peak <= gpu))  # its bits, as diagnose names them
    if req.cache == "dynamic":
        peak = peak_at(replace(req, cache="static"), req.batch, req.context)
        if peak <= gpu:  # only worth a line when dropping the growth peak is enough on its own
            found.append(Remedy("static_cache", None, peak, True))
    longest = req.written_tokens - 1  # a window of every token written keeps them all
    if req.geometry.sliding_window is not None:  # its own window is the static cache's line
        longest = min(longest, req.geometry.sliding_window - 1)
    if req.cache in ("dynamic", "static") and longest >= 1:
        # a static window: a dynamic one holds the whole prompt until its first decode step, so at the worst
        # prompt it saves nothing
        def window_fits(window: int) -> bool:
            return peak_at(replace(req, cache="static_sliding", window=window), req.batch, req.context) <= gpu

        window = _largest(window_fits, cap=longest)
        if window >= 1:
            peak = peak_at(replace(req, cache="static_sliding", window=window), req.batch, req.context)
            found.append(Remedy("sliding_window", window, peak, True))
    return tuple(found)


def _notes(req: PlanRequest) -> tuple[str, ...]:
    """A config that turns generate()'s cache off (`ModelGeometry.cache_off_by`), first: the plan still
    sizes the cache, since a run without one recomputes the whole context at every step and whoever plans
    its KV means to turn it on, but the run they start as is keeps none. A weights figure that is an
    estimate (`weights_note`); layers whose KV is not per token (`kv_note`); a context past the model's
    positions: transformers runs it (the memory figures hold), but the model was not trained for it, and
    vLLM refuses such a max_model_len."""
    geom = req.geometry
    cache_off = None
    if geom.cache_off_by is not None:
        cache_off = (
            f"KV cache OFF by default: {geom.cache_off_by} sets use_cache: false, so generate() keeps no KV "
            "cache (0 B of KV, and every step recomputes the whole context) unless called with "
            "use_cache=True; the KV figures here are for use_cache=True"
        )
    estimate = geom.weights_note if req.measured_weights_bytes is None else None  # else measured
    # quantized weights at their width alone, without the 16-bit embeddings and scales a checkpoint keeps
    quantized = None
    if req.measured_weights_bytes is None:
        quantized = quantized_weights_note(geom, req.weights_dtype)
    prefill = prefill_bound_note(req)  # a recorded run's prefill priced from its peak, not measured
    quantize = quantized_prefill_note(req)  # a quantized prefill's temporaries, which no other run makes
    encoder = encoder_pass_note(req)  # an encoder-decoder's encoder pass, grown to the encoder length
    padding = padding_note(req)  # an sdpa prefill priced as padded (the run does not tell), or unpadded
    cpu = cpu_flash_note(req)  # a CPU run's flash kernel blocks, which outgrow a longer prompt
    # a plan without a recording: its prefill's activations estimated, the formula and what it assumes
    prompt = req.prompt if req.prompt is not None else req.context - 1  # prefill_at's
    activations = None
    if req.recorded is None:
        layer_kv = prompt_kv_by_layer(req, req.batch, prompt)
        activations = prefill_note(geom, req.effective_compute_dtype, req.batch, prompt, layer_kv)
    notes = (
        cache_off,
        estimate,
        quantized,
        geom.kv_note,
        activations,
        prefill,
        quantize,
        encoder,
        padding,
        cpu,
    )
    model_notes = tuple(note for note in notes if note)
    limit = geom.max_position_embeddings
    if limit is None or req.context <= limit:
        return model_notes
    return (
        *model_notes,
        f"the context of {req.context:,} tokens is beyond the {limit:,} positions {geom.name} takes "
        "(max_position_embeddings): the memory figures hold and transformers runs it, but the model was not "
        "trained that long (RoPE models answer worse past it, learned positions fail), and vLLM refuses "
        "such a max_model_len",
    )


def _positions_note(req: PlanRequest, result: PlanResult) -> tuple[str, ...]:
    """Where memory alone would hold a longer context than the model takes (`max_context` past
    max_position_embeddings), while the plan's own context is within it (past it, `_notes` says so)."""
    limit = req.geometry.max_position_embeddings
    longest = result.max_context
    if limit is None or req.context > limit or (longest is not None and longest <= limit):
        return ()
    held = "any context" if longest is None else f"{longest:,} tokens"
    return (
        f"max context is what memory holds at batch {req.batch} ({held}); {req.geometry.name} takes "
        f"{limit:,} positions (max_position_embeddings), the longest context to run it at",
    )


def _two_prompts_note(result: PlanResult) -> tuple[str, ...]:
    """Where a plan without --prompt prices two moments at two prompts, each that moment's worst: the KV at
    the prompt whose KV peak is highest (a dynamic cache's: one decode step, whose growth copy it is), the
    prefill at the longest, since its activations grow with the prompt. Before, the context line named the
    first and the activations line the second, and a reader saw two prompts in one plan without a why."""
    req = result.request
    longest = req.context - 1
    if req.prompt is not None or result.prefill_activations_bytes is None or result.prompt_tokens == longest:
        return ()
    peak = "the prefill's" if result.activations_bytes else "the KV's"
    prompt = f"{a_or_an(format(result.prompt_tokens, ','))}-token prompt"
    kv = (
        f"{prompt}, the same at any prompt (a preallocated cache holds every position from the start)"
        if req.cache in PREALLOCATED_CACHES
        else f"{prompt}, the one whose KV peaks highest at {req.context:,} tokens"
    )
    return (
        f"two prompts, each the worst case of its own figures: the KV figures are for {kv}, and the "
        f"prefill activations for the longest, {longest:,} tokens and one new token, since activations grow "
        f"with the prompt; the peak is the larger moment, here {peak} (--prompt plans one prompt for both)",
    )


def plan(req: PlanRequest) -> PlanResult:
    """Size weights and KV for `req`, decide whether it fits, and if not, what would make it fit."""
    result = _evaluate(req)
    result = replace(result, notes=(*_notes(req), *_two_prompts_note(result), *_positions_note(req, result)))
    return result if result.fits else replace(result, remedies=_remedies(result))
