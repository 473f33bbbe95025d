"""`kvtrace plan`'s output: a result as JSON or as a compact table for a terminal, with one sentence per
remedy. Renders a PlanResult and computes nothing.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from analyzers.planning.plan_kv import cache_layout
from analyzers.planning.plan_types import (
    DEFAULT_RESERVE_FRACTION,
    GIB,
    MIB,
    PREALLOCATED_CACHES,
    PlanRequest,
    PlanResult,
    Remedy,
)
from analyzers.units import a_or_an
from kvtrace.errors import printable

__all__ = ["format_text", "to_json"]

_SENTENCE_END = re.compile(r"(?<=\.) (?=[A-Z])")  # a full stop, then a capital: where a sentence starts


def to_json(result: PlanResult) -> dict[str, Any]:
    """A JSON-ready dict: every figure of the result, the request echoed (with its effective reserve and
    window), and the remedies."""
    req = result.request
    request = {name: value for name, value in asdict(req).items() if name != "geometry"}
    fraction = req.reserve_fraction
    if fraction is None and req.reserve_bytes is None:
        fraction = DEFAULT_RESERVE_FRACTION
    request.update(
        geometry=asdict(req.geometry),
        reserve_bytes=req.effective_reserve_bytes,
        reserve_fraction=fraction,
        window=req.effective_window,
        compute_dtype=req.effective_compute_dtype,
    )
    figures = {
        name: value for name, value in asdict(result).items() if name not in ("request", "remedies", "notes")
    }
    # each with the sentence the text prints, so that a script can show what the terminal does
    remedies = [{**asdict(remedy), "sentence": _sentence(remedy, req)} for remedy in result.remedies]
    return {"request": request, **figures, "remedies": remedies, "notes": list(result.notes)}


def _size(num_bytes: int) -> str:
    sign, magnitude = ("-", -num_bytes) if num_bytes < 0 else ("", num_bytes)
    if magnitude >= GIB:
        return f"{sign}{magnitude / GIB:.2f} GiB"
    if magnitude >= MIB:
        return f"{sign}{magnitude / MIB:.2f} MiB"
    if magnitude >= 1024:
        return f"{sign}{magnitude / 1024:.2f} KiB"
    return f"{sign}{magnitude} B"  # as the other commands write a size under 1 KiB: "0 B", not "0.00 KiB"


def _weights_source(req: PlanRequest) -> str:
    """Whose the weights figure is: the run's as measured, or a tensor-parallel rank's measured shard
    re-stored at another dtype (the recorded peak's weights are the run's own)."""
    if req.measured_weights_bytes is None:
        return ""
    restored = req.recorded is not None and req.recorded.weights_bytes != req.measured_weights_bytes
    return f" (the run's, at {req.weights_dtype})" if restored else " (the run's)"


def _sentence(fix: Remedy, req: PlanRequest) -> str:
    outcome = "fits" if fix.fits else "still does not fit"
    if fix.kind == "weights":
        return (
            f"The weights and reserve alone need {_size(fix.peak_bytes)} of {_size(req.gpu_memory_bytes)}: "
            "store the weights in a smaller dtype (fp8, int4) or shard the model across more GPUs."
        )
    if fix.kind == "batch":
        return f"Lower the batch to {fix.setting} (peak {_size(fix.peak_bytes)})."
    if fix.kind == "context":
        return f"Shorten the context to {fix.setting:,} tokens (peak {_size(fix.peak_bytes)})."
    if fix.kind == "quantized_kv" and fix.setting == 8:
        return (
            f"Quantize the KV cache to fp8 (--cache fp8, transformers' QuantizedCache fp8 backend): the peak "
            f"becomes {_size(fix.peak_bytes)}, which {outcome}."
        )
    if fix.kind == "quantized_kv":
        return (
            f"Quantize the KV cache to int{fix.setting} (--cache quantized): the peak becomes "
            f"{_size(fix.peak_bytes)}, which {outcome}."
        )
    if fix.kind == "static_cache":
        windowed = cache_layout(req)[1]
        slides = " and whose sliding layers keep only their window from the prefill on" if windowed else ""
        return (
            f"Preallocate a static cache (--cache static), which never copies itself to grow{slides}: the "
            f"peak becomes {_size(fix.peak_bytes)}, which {outcome}."
        )
    return (
        f"Keep only the last {fix.setting:,} tokens with a static sliding-window cache (--cache "
        f"static_sliding --window {fix.setting}); a model not trained with that window answers worse beyond "
        "it."
    )


# DeepSeek-V4's cache parts (`compressed_kv`), each with what it holds
_PART_LINES = {
    "window": ("  sliding window", "{window}-token window of K = V, held once"),
    "compressed_entries": (
        "  compressed entries",
        "one a CSA layer's every {csa} tokens, an HCA layer's every {hca}",
    ),
    "indexer_keys": ("  indexer keys", "the CSA layers' indexer, one key of {index} a CSA entry"),
    "compressor_state": ("  compressor state", "tokens pending the next entry, and CSA's overlap state"),
}


def _compressed_rows(req: PlanRequest, parts: dict[str, int]) -> list[tuple[str, str]]:
    shape = req.geometry.compressed
    said = {
        "window": req.geometry.sliding_window,
        "csa": shape.csa_rate if shape else None,
        "hca": shape.hca_rate if shape else None,
        "index": shape.index_head_dim if shape else None,
    }
    return [
        (label, f"{_size(parts[name])} ({what.format(**said)})")
        for name, (label, what) in _PART_LINES.items()
        if name in parts
    ]


def format_text(result: PlanResult) -> str:
    """A compact table for a terminal, then one sentence per remedy when the plan does not fit."""
    req = result.request
    whole, windowed, window = cache_layout(req)
    cache = req.cache
    if window is not None:
        cache += f" ({window:,}-token window on {windowed} of {whole + windowed} layers)"
    rows: list[tuple[str, str]] = []
    if req.transformers_layout is not None:  # which release's caches and weights (they differ between some)
        rows.append(("layout", f"transformers {req.transformers_layout}"))
    per_token = result.kv_bytes_per_token
    rows.append(("KV per token", _size(per_token) + (f" ({per_token:,} B)" if per_token >= 1024 else "")))
    if result.kv_scale_bytes_per_token:
        rows.append(("  + scales per token", f"{result.kv_scale_bytes_per_token:,} B"))
    worst = " (the worst case)" if req.prompt is None else ""
    longest = req.context - 1  # the prefill's worst prompt: plan's `_two_prompts_note` says why they differ
    two = result.prefill_activations_bytes is not None and result.prompt_tokens != longest
    if req.prompt is None and two:
        worst = f" (the KV's worst case; the prefill activations' is {longest:,} tokens: note)"
    beams = f": {req.batch // req.beams} x {req.beams} beams" if req.beams > 1 else ""
    rows += [
        (
            "context",
            f"{req.context:,} tokens{_default_context(req)}: "
            f"{a_or_an(format(result.prompt_tokens, ','))}-token prompt{worst} and the new tokens, "
            f"of which the cache holds {req.written_tokens:,}",
        ),
        (
            "weights",
            _size(result.weights_bytes) + _weights_source(req),
        ),
        ("KV cache", f"{_size(result.kv_bytes)} ({req.batch} x {result.kv_tokens:,} tokens{beams})"),
    ]
    if result.kv_cross_attention_bytes:
        own = result.kv_bytes - result.kv_cross_attention_bytes
        rows[-1] = ("KV cache", f"{_size(result.kv_bytes)}, of which:")
        rows += [
            ("  self-attention", f"{_size(own)} ({req.batch} x {result.kv_tokens:,} tokens{beams})"),
            (
                "  cross-attention",
                f"{_size(result.kv_cross_attention_bytes)} ({req.batch} x {result.encoder_tokens:,} encoder "
                f"tokens x {result.kv_cross_attention_bytes_per_token:,} B: grows with the encoder's input "
                "length and the batch, not with the context)",
            ),
        ]
    if result.kv_parts:
        rows[-1] = (
            "KV cache",
            f"{_size(result.kv_bytes)} ({req.batch} x {result.kv_tokens:,} tokens), of which:",
        )
        rows += _compressed_rows(req, result.kv_parts)
    if result.kv_prefill_bytes > result.kv_bytes:  # sliding layers holding the whole prompt
        held = "the prompt's window and compressor projections" if result.kv_parts else "the prompt"
        rows.append(
            (
                "KV at prefill",
                f"{_size(result.kv_prefill_bytes)} ({held} in every layer, until the first decode step)",
            )
        )
        rows.append(("KV peak", _size(result.kv_peak_bytes)))
    elif result.dynamic_realloc_peak_bytes:
        label = "cache growth peak" if req.beams == 1 else "growth and beam reorder peak"
        if req.beams > 1 and req.cache in PREALLOCATED_CACHES:
            label = "beam reorder peak"
        rows.append((label, _size(result.dynamic_realloc_peak_bytes)))
    if req.recorded is not None:
        rows.append(("activations", _recorded_activations(result)))
    elif result.prefill_activations_bytes is not None:
        # the peak's moment when it holds them; else the KV peak's is, later
        where = "at the peak, beside the prompt's KV" if result.activations_bytes else "below the peak"
        shape = f"{req.batch} x {_prefill_prompt(result):,} tokens"
        rows.append(
            (
                "prefill activations",
                f"{_size(result.prefill_activations_bytes)} ({shape}, sdpa, {where}; note)",
            )
        )
    rows += [
        ("reserve", _size(result.reserve_bytes)),
        ("peak", f"{_size(result.peak_bytes)} of {_size(req.gpu_memory_bytes)}{_default_memory(req)}"),
        ("headroom", _size(result.headroom_bytes)),
        ("fits", "yes" if result.fits else "NO"),
        (f"max batch @ {req.context:,}", f"{result.max_batch:,}"),
        (
            f"max context @ batch {req.batch}",
            _longest_context(result),
        ),
        ("KV room", _kv_room(result)),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{req.geometry.name}: {req.weights_dtype} weights, {req.kv_dtype} KV, {cache} cache"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    for note in result.notes:
        lines += _note_lines(printable(note))
    if result.remedies:
        lines.append("To make it fit:")
        lines += [f"  - {_sentence(fix, req)}" for fix in result.remedies]
    return "\n".join(lines)


def _note_lines(note: str) -> list[str]:
    """A note, one sentence a line under its first: a note of several sentences on one line ran to some
    1,500 characters (`plan --from-run`'s on the run's activations)."""
    first, *rest = _SENTENCE_END.split(note)
    return [f"  note: {first}", *(f"        {sentence}" for sentence in rest)]


def _default_context(req: PlanRequest) -> str:
    """Where the context is the default, not typed: said, with the model's own length where it takes more."""
    if "context" not in req.defaults:
        return ""
    limit = req.geometry.max_position_embeddings
    if limit is None:
        return " (the default; --context to change)"
    if limit > req.context:
        return f" (the default; the model takes {limit:,}: --context to change)"
    return f" (the default: the model's {limit:,} positions; --context to change)"


def _default_memory(req: PlanRequest) -> str:
    """Where the GPU's memory is the default, not typed nor a run's."""
    return " (the default --gpu-memory)" if "gpu_memory" in req.defaults else ""


def _recorded_activations(result: PlanResult) -> str:
    """The activations row of a plan from a recording: those of the plan's worst moment, named by the
    moment they are the run's of (`PlanResult.activations_moment`) and by the KV that moment holds, so that
    the weights, that KV and they are the peak. Before, the row did not say which KV: a finished run that
    peaked inside its last cache update showed 79.74 KiB, its 27.24 KiB and the growth copy again, beside
    the "cache growth peak" row; and it called a decode step's end, planned at fewer rows than a run that
    peaked at its prefill, "the run's at the peak's moment", as it did the run's prefill's or KV peak's
    where the plan's prefill or last update was its worst moment."""
    size = _size(result.activations_bytes)
    moment = result.activations_moment
    if moment == "encoder_pass":
        return f"{size} (the run's encoder pass at this plan's encoder length, beside the weights, no KV yet)"
    if moment == "decode_attention":
        return (
            f"{size} (the run's at the peak's moment, scaled to this plan, and one layer's copies of the KV "
            "as the last decode step attends over this context; beside the weights and the final KV cache)"
        )
    kv = result.kv_at_peak_bytes
    growth = result.dynamic_realloc_peak_bytes
    if growth and kv == result.kv_peak_bytes:
        beside = "the KV cache and its growth copy: the peak is inside the last decode step's cache update"
    elif kv == result.kv_bytes:
        beside = "the KV cache" + (" without its growth copy: the peak is at a step's end" if growth else "")
    elif kv == result.kv_prefill_bytes:
        beside = f"the prompt's {_size(kv)} of KV: the peak is the prefill"
    else:
        beside = f"the {_size(kv)} of KV the peak's moment holds"
    recorded = result.request.recorded
    if moment == "prefill":
        return (
            f"{size} (the run's during its prefill, the most it held there beside its weights and KV, scaled "
            f"to this plan's prefill; beside the weights and {beside})"
        )
    if moment == "last_update":
        return (
            f"{size} (the run's at its KV peak, a decode step's cache update, scaled to this plan's last "
            f"update; beside the weights and {beside})"
        )
    if moment == "decode_step_end" and recorded is not None:
        return (
            f"{size} (the run's at a decode step's end, the most its decode steps held, moved from its "
            f"{recorded.batch:,} rows to {result.request.batch:,}, their batch-first share freed: more than "
            f"its peak's moment, its prefill, scaled; beside the weights and {beside})"
        )
    return f"{size} (the run's at the peak's moment, scaled to this plan; beside the weights and {beside})"


def _prefill_prompt(result: PlanResult) -> int:
    """The prompt the prefill's activations are estimated for: the request's, else the longest."""
    prompt = result.request.prompt
    return prompt if prompt is not None else result.request.context - 1


def _longest_context(result: PlanResult) -> str:
    """The max context row: what memory holds, marked where that is past the positions the model takes."""
    if result.max_context == 0:  # the shortest context that plan counts (prompt + 1 new token) is over
        prompt = result.request.prompt
        shortest = "2 tokens" if prompt is None else f"{prompt + 1:,} tokens, the prompt and one new token"
        return f"none: not even {shortest}"
    held = "any" if result.max_context is None else f"{result.max_context:,}"
    limit = result.request.geometry.max_position_embeddings
    if limit is not None and (result.max_context is None or result.max_context > limit):
        return f"{held} (memory alone; the model takes {limit:,} positions)"
    return held


def _kv_room(result: PlanResult) -> str:
    """What this plan leaves for KV at its batch's peak: the GPU less the weights, the reserve and the
    activations of the peak's moment (a larger batch's prefill holds more), in tokens and in blocks of
    `block_size` tokens. Not vLLM's pool, which `--engine vllm` sizes by its own rule; where the weights,
    reserve and activations fill the GPU, none, said plainly rather than as 0 blocks."""
    req = result.request
    if result.kv_budget_bytes <= 0:
        taken = req.gpu_memory_bytes - result.kv_budget_bytes
        return (
            f"none at batch {req.batch}: the weights, the reserve and the activations at its peak take "
            f"{_size(taken)} of {_size(req.gpu_memory_bytes)}"
        )
    size, blocks = req.block_size, result.kv_blocks
    return (
        f"{_size(result.kv_budget_bytes)} beside the weights, the reserve and the activations at batch "
        f"{req.batch}'s peak: {blocks:,} blocks of {size} tokens ({blocks * size:,} tokens over all rows); "
        "not vLLM's pool (--engine vllm plans that)"
    )
