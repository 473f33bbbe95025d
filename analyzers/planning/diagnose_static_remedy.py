"""The static cache remedy of a run whose cache grows (a DynamicCache), priced against the run's whole peak.
Pure, torch-free.

Why: a static cache (transformers' StaticCache, `cache_implementation='static'`) writes in place, so it has
no torch.cat growth copy, but it allocates every position of max_cache_len, every layer and every row, at
its first update. Priced as "the KV peak less the KV final" it promised to remove a decode step's copy even
where the run peaked at its prefill, which the preallocated cache raises (the tiny Llama at 3 rows, a
10-token prompt and 12 new tokens: 15.00 KiB promised, +50,712 B recorded). So the static cache's KV
replaces the dynamic KV at every moment of the run: the most the run held beside its KV, plus the static
KV, is the static run's peak; its prefill also attends over all of the cache's positions, while its last
layer attends (analyzers.planning.attention_moment), priced as `kvtrace plan --from-run --cache static`
prices it (analyzers.planning.static_prefill's `static_prefill_beside`); under beam search each step's
reorder still copies a layer's K (or V) whole beside the cache (plan_kv), which no static cache removes.

A run whose cache already is a StaticCache is told so: its transient, under beam search, is the reorder's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from analyzers.planning.attention_moment import prefill_attention_moment
from analyzers.planning.diagnose_window_remedies import layer_widths
from analyzers.planning.diagnosis import Remedy, fits
from analyzers.planning.run_moments import HALF_FLOATS, main_timeline, prefill_beside_at, update_beside_at
from analyzers.planning.run_padding import call_padded
from analyzers.planning.static_prefill import static_attention_parts, static_prefill_beside
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.summary import Report

__all__ = ["StaticCacheRun", "already_static_remedy", "static_cache_remedy", "static_cache_run"]

_IN_PLACE = (
    "No transient KV copies at the peak: the cache already writes in place (a static cache would not help)."
)


@dataclass(frozen=True)
class StaticCacheRun:
    """What the run held beside its KV, the figures a static cache's KV goes beside."""

    positions: int  # max_cache_len: the call's context less its last new token, never fed back
    context: int  # prompt + new tokens: the positions the static prefill attends over
    beside_bytes: int  # the most allocated beside the KV at any moment of the run (the moment's request too)
    prefill_beside_bytes: int | None  # the most beside the KV during the prefill (None: not told)
    # beside the KV at the KV log's peak, a cache update's or beam search's reorder (None: no transient)
    update_beside_bytes: int | None
    # beside the KV while the run's last prefill layer attended (None: not told, the prefill's most stands)
    attention_beside_bytes: int | None
    # the static prefill's attention over the positions past the prompt: (held across the layers, made in
    # the attending layer), static_prefill's `static_attention_parts`
    attention_parts: tuple[int, int]
    attention_why: str  # what those bytes are, for the sentence ("" where none)
    # the attention is priced at its most, not as it is: eager's scores (3 copies, a bound), or a run that
    # does not tell where its last layer attended (the prefill's most stands for it)
    attention_bound: bool
    moment_bytes: int  # allocated at the moment, with the request an OOM refused


def static_cache_run(
    source: MemorySource,
    report: Report,
    moment_bytes: int | None,
    kv_moment: int | None,
    rows: int | None,
) -> StaticCacheRun | None:
    """The run's figures for its static cache remedy, from the main device's timeline and the generate()
    call `kvtrace plan --from-run` plans (its prompt and context); None where the run does not tell them (no
    timeline, no call, a moment without allocated bytes)."""
    from analyzers.planning.run_defaults import call_context

    run, kv_log = source.meta.get("run"), source.meta.get("kv")
    found = main_timeline(source, report)
    if source.kind != "run" or run is None or kv_log is None or found is None:
        return None
    if moment_bytes is None or kv_moment is None or not rows:
        return None
    call = call_context(run, kv_log)
    if call is None or call.context is None or call.context < 2:
        return None
    timeline = found[1]
    if not len(timeline.allocated):
        return None
    beside = timeline.allocated - timeline.by_category["kv"]
    most = max(int(np.max(beside)), moment_bytes - kv_moment)
    _, prefill_at = prefill_beside_at(source, report)
    prefill = int(beside[prefill_at]) if prefill_at is not None else None
    _, update_at = update_beside_at(source, report)
    update = int(beside[update_at]) if update_at is not None else None
    attention = prefill_attention_moment(source, report, rows, call.prompt)
    key_bytes = attention.key_bytes if attention is not None else 0
    parts, why = _prefill_attention(
        report, run.manifest, call.step, rows, call.prompt, call.context, key_bytes
    )
    # beside the KV, as `beside` counts it (the weights too), where the last prefill layer attended
    beside_attention = int(beside[attention.index]) if attention is not None else None
    bound = attention is None or (report.geometry or {}).get("attn_implementation") != "sdpa"
    positions = call.context - 1
    return StaticCacheRun(
        positions, call.context, most, prefill, update, beside_attention, parts, why, bound, moment_bytes
    )


def _prefill_attention(
    report: Report,
    manifest: dict[str, object],
    step: int,
    rows: int,
    prompt: int | None,
    context: int,
    key_bytes: int,
) -> tuple[tuple[int, int], str]:
    """(bytes held across the layers and made in the attending layer, what they are) a static prefill's
    attention holds over the cache's positions (its max_cache_len, the context less one) past the prompt,
    as plan prices them (`static_attention_parts`): eager's mask and scores, sdpa's mask where the prompts
    are padded (or the run does not say), K and V expanded to the query heads, a CPU flash kernel's blocks
    (`key_bytes` a position); none for unpadded sdpa."""
    geometry = report.geometry or {}
    attention = geometry.get("attn_implementation")
    eager = attention in ("eager", None)
    padded = call_padded(manifest, step)
    heads, kv_heads, head_dim = (geometry.get(k) for k in ("num_attention_heads", "num_kv_heads", "head_dim"))
    if not prompt or not (eager or (attention == "sdpa" and padded is not False)):
        return (0, 0), ""
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and isinstance(head_dim, int)):
        return (0, 0), ""
    compute = HALF_FLOATS.get(str(geometry.get("dtype")), 4)
    expansions = 2 * heads * head_dim * compute if heads > kv_heads else 0
    more = context - 1 - prompt  # the cache's positions past the prompt
    extra = static_attention_parts(rows, more, prompt, compute, expansions, heads, eager, key_bytes)
    if eager:
        what = "eager attention's mask and scores"
    else:
        told = "its prompts were padded" if padded else "the run does not say whether its prompts were padded"
        what = f"sdpa's mask over them ({told})"
    if expansions:
        what += " and K and V expanded to the query heads"
    if key_bytes and not eager:
        what += ", and torch's CPU flash kernel's blocks over them"
    return extra, what


def static_cache_remedy(d: dict[str, object], run: StaticCacheRun, need: int | None) -> Remedy | None:
    """The static cache for a run whose cache grows, against the run's whole peak (`moment_bytes`): its KV,
    every position of every layer for every row, goes beside the most the run held beside its KV; its
    prefill beside the run's prefill and the attention over the positions past the prompt; under beam
    search, the reorder's copy of one layer's K (or V) whole goes beside it too. A model's sliding layers
    hold their window at most (a StaticCache's sliding layers). None where the KV geometry is unknown."""
    rows, layers, kv_moment = d.get("batch"), d.get("kv_layers"), d.get("kv_bytes")
    if not isinstance(rows, int) or not isinstance(layers, int) or not isinstance(kv_moment, int):
        return None
    widths = layer_widths(d, rows, layers)
    if not widths:
        return None
    window, sliding = d.get("window"), d.get("sliding_layer_ids")
    # a StaticCache's sliding layers hold their window at most
    slide = window if isinstance(window, int) and window and isinstance(sliding, tuple) else None
    slides = set(sliding) if slide is not None and isinstance(sliding, tuple) else set()
    held = [
        min(run.positions, slide) if slide is not None and layer in slides else run.positions
        for layer in range(layers)
    ]
    kv_static = round(sum(width * positions for width, positions in zip(widths, held, strict=True)))
    beams = d.get("beams")
    reorder = (
        round(max(width * positions for width, positions in zip(widths, held, strict=True)) / 2)
        if isinstance(beams, int) and beams > 1
        else 0
    )
    steps = run.beside_bytes + kv_static
    if reorder:  # the reorder's copy is live where the run's KV peak was, beside what the run held there
        beside_reorder = run.update_beside_bytes if run.update_beside_bytes is not None else run.beside_bytes
        steps = max(steps, beside_reorder + kv_static + reorder)
    prefill = 0
    across, in_layer = run.attention_parts
    if run.prefill_beside_bytes is not None:
        beside = static_prefill_beside(run.prefill_beside_bytes, run.attention_beside_bytes, across, in_layer)
        prefill = beside + kv_static
    peak = max(steps, prefill)
    saved = run.moment_bytes - peak
    holds = (
        f"all {run.positions:,} positions of every layer for its {rows:,} rows from its first update, "
        f"{human_bytes(kv_static)} of KV, where this moment holds {human_bytes(kv_moment)}"
    )
    parts = []
    bound = prefill >= steps and across + in_layer > 0 and run.attention_bound
    if prefill >= steps and across + in_layer:
        parts.append(
            f"its prefill attends over all {run.positions:,} positions: {'up to ' if bound else ''}"
            f"{human_bytes(across + in_layer)} more while its last layer attends, {run.attention_why}, as "
            "`kvtrace plan --from-run RUN --cache static` prices it"
        )
    if reorder:
        parts.append(
            "beam search's reorder still copies a layer's K (or V) whole beside it "
            f"({human_bytes(reorder)}), as a dynamic cache's does: that transient stays"
        )
    more = "; " + "; ".join(parts) if parts else ""
    if saved > 0:
        text = (
            f"A static cache (cache_implementation='static') writes in place, removing the dynamic cache's "
            f"torch.cat copies: the run would peak at {human_bytes(peak)}, {human_bytes(saved)} lower; it "
            f"preallocates {holds}{more}."
        )
    elif saved == 0:
        text = (
            f"A static cache (cache_implementation='static') would not lower the peak "
            f"({human_bytes(peak)}): it preallocates {holds}{more}."
        )
    else:
        # eager's scores over the positions are priced at their most, as is the attention of a run that
        # does not tell where its last layer attended: a bound
        up_to, to = ("up to ", "at most ") if bound else ("", "")
        text = (
            f"A static cache (cache_implementation='static') would raise the peak by {up_to}"
            f"{human_bytes(-saved)}, to {to}{human_bytes(peak)}: it preallocates {holds}{more}."
        )
    return Remedy("static_cache", None, saved, fits(saved, need), text)


def already_static_remedy(d: dict[str, object], need: int | None) -> Remedy:
    """The static cache remedy of a run whose cache is one already: nothing to gain; a transient at its KV
    peak is beam search's reorder (`index_select` copies of a layer's K and V), which a static cache makes
    too, not a torch.cat copy."""
    kv_peak, kv_final, beams = d.get("kv_peak_bytes"), d.get("kv_final_bytes"), d.get("beams")
    churn = kv_peak - kv_final if isinstance(kv_peak, int) and isinstance(kv_final, int) else 0
    if churn > 0 and isinstance(beams, int) and beams > 1:
        text = (
            "The cache already is a StaticCache, written in place: the "
            f"{human_bytes(churn)} transient at its KV peak is beam search's reorder (num_beams={beams}: "
            "each step copies a layer's K and V by index_select), which a static cache makes too."
        )
    elif churn > 0:
        text = (
            "The cache already is a StaticCache, written in place: the "
            f"{human_bytes(churn)} transient at its KV peak is not a dynamic cache's torch.cat copy (a "
            "static cache would not help)."
        )
    else:
        text = _IN_PLACE
    return Remedy("static_cache", None, 0, fits(0, need), text)
