"""The figures of a diagnosis's moment that a shorter context, a shorter prompt or a chunked prefill change
(analyzers.planning.diagnose_prompt_remedies prices them): the prompt and context of the call `kvtrace plan
--from-run` plans, and, at a moment inside a whole prefill step, the run's prefill moments split by what
they follow, as plan takes them (analyzers.planning.run_moments), what the step never frees, the most the
run held outside the step, and the model's attention; whether the prefill ran in chunks. Pure, torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from analyzers.model import MemorySource
from analyzers.planning.diagnose_prompt_remedies import PrefillPeak
from analyzers.planning.recorded_terms import moments_grown
from analyzers.planning.run_moments import (
    HALF_FLOATS,
    main_timeline,
    outside_prefill_peak,
    prefill_split,
)
from analyzers.planning.static_prefill import eager_pair_bytes
from analyzers.summary import Report

if TYPE_CHECKING:
    from analyzers.planning.run_defaults import CallContext

__all__ = ["chunked_prefill", "prefill_peak", "run_call"]


def chunked_prefill(source: MemorySource, cache: int | None, step: int | None) -> int | None:
    """The tokens a row of the first chunk where the prefill `step` wrote `cache` in chunks (transformers'
    `prefill_chunk_size`: one prefill step, its first KV layer written more than once), else None. Such a
    prefill's activations follow the chunk, not the prompt, so a shorter prompt is not priced from them."""
    run = source.meta.get("run")
    if run is None or step is None:
        return None
    writes = [
        e
        for e in run.kv_events
        if e.step == step and e.cache == cache and e.part == "data" and e.event in ("created", "grown")
    ]
    first = min((e.layer for e in writes), default=None)
    keys = [e for e in writes if e.layer == first and e.kv == "k"]
    if len(keys) < 2:
        return None
    before = max(
        (e.tokens for e in run.kv_events if e.step < step and e.cache == cache and e.layer == first),
        default=0,
    )
    return keys[0].tokens - before if keys[0].tokens > before else None


def prefill_peak(
    source: MemorySource,
    report: Report,
    index: int,
    rows: int | None,
    prompt: int | None,
    context: int | None,
) -> PrefillPeak | None:
    """The moment after the main device's event `index`, inside a whole prefill step of the run (not one its
    forward raised in or was killed in, whose moments are unmeasured), `rows` x `prompt` tokens, `context`
    the run's (prompt + new tokens, as plan counts it): None where the run does not tell its prefill's
    moments, or the moment holds more beside its weights and KV than their most (then it is not theirs)."""
    found = main_timeline(source, report)
    if source.kind != "run" or found is None or index < 0 or not rows or not prompt or not context:
        return None
    split = prefill_split(source, report, rows, prompt, context)  # one pass for its moments and held bytes
    moments = None if split is None else split.moments()
    rest = outside_prefill_peak(source, report, index)
    timeline = found[1]
    if split is None or not moments or rest is None or index >= len(timeline.allocated):
        return None
    if int(timeline.by_category["other"][index]) > moments_grown(moments, 1.0, 1.0):
        return None
    geometry = report.geometry or {}
    heads, kv_heads, head_dim = (geometry.get(k) for k in ("num_attention_heads", "num_kv_heads", "head_dim"))
    compute = HALF_FLOATS.get(str(geometry.get("dtype")), 4)
    expansion = pair = 0
    if isinstance(heads, int) and isinstance(kv_heads, int) and isinstance(head_dim, int) and heads > 0:
        expansion = 2 * heads * head_dim * compute if heads > kv_heads else 0
        pair = eager_pair_bytes(heads, compute)
    attention = geometry.get("attn_implementation")
    return PrefillPeak(
        moments=moments,
        held_bytes=split.held_bytes(),
        rest_bytes=rest,
        allocated_bytes=int(timeline.allocated[index]),
        attn_implementation=attention if isinstance(attention, str) else None,
        expansion_bytes=expansion,
        compute_bytes=compute,
        pair_bytes=pair,
        at=split.moment_at(index),
    )


def run_call(source: MemorySource, report: Report, step: int | None) -> CallContext | None:
    """The generate() call `kvtrace plan --from-run` plans (run_defaults' `call_context`: `reached` below
    `context` where the run was cut short, or is still being recorded, and is planned as launched), where the
    diagnosed moment's `step` is in it and its cache is the report's main one; None otherwise: the moment's
    own tokens then name the context."""
    from analyzers.planning.run_defaults import call_context

    run, kv_log = source.meta.get("run"), source.meta.get("kv")
    if source.kind != "run" or run is None or kv_log is None or step is None:
        return None
    call = call_context(run, kv_log)
    if call is None or call.cache != report.kv.main_cache or step < call.step:
        return None
    return call
