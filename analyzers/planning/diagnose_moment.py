"""Where a diagnosis's moment sits in the run: the event at or before it, the KV live then by cache and
layer, and the KV log's step it falls in (the rows and tokens held at its end, beam search's beams, the
prompt before it), and what a token of context costs in the caches beside the main one that follow it (an
assistant's draft cache). Pure, torch-free.

The remedies are priced with these figures, not the run's final ones: a peak at prefill holds the prompt,
not every token the run went on to generate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analyzers.caches import CROSS_ATTENTION
from analyzers.model import KV, DeviceEvents
from analyzers.summary import Report

__all__ = [
    "beams_at_step",
    "held_at_step",
    "kv_by_slot_at",
    "layer_tokens_at_step",
    "moment_index",
    "other_token_bytes",
    "peak_held_until",
    "prompt_at_step",
]


def moment_index(ts_us: np.ndarray, when: float | None) -> int:
    """Index of the last event at or before `when` (-1: before every event)."""
    if len(ts_us) == 0:
        return -1
    if when is None:
        return len(ts_us) - 1
    return int(np.searchsorted(ts_us, when, side="right")) - 1


def peak_held_until(allocated: np.ndarray, first: int) -> tuple[int, bool]:
    """(the last event of the level the timeline reaches at `first`, before anything changes it; whether
    that level lasts to the timeline's end). Views of one preallocated tensor (`kvtrace.track(kv[l, 0, :,
    :, :pos])`) hold the whole tensor from the first view's track, when the log has seen one view of one
    layer and the tokens of the first forward: the tensor is as large at the end of that level, with every
    view seen and the most tokens written. So do Meta's buffers, made with the model: without the profiler
    the peak is the weights and buffers from step 0, before any row is written."""
    later = np.flatnonzero(allocated[first:] != allocated[first])
    if len(later):
        return first + int(later[0]) - 1, False
    return len(allocated) - 1, True


def kv_by_slot_at(dev: DeviceEvents, upto: int) -> dict[tuple[int, int], int]:
    """KV bytes live after event `upto` by (cache, layer): the running sum of the events joined to the KV
    log (a free carries its allocation's layer and cache), so mid-step transients count where they were.
    KV the log does not place (a stack rule's, storages held before the trace began) is in no layer."""
    if upto < 0 or dev.category is None or dev.layer is None:
        return {}
    n = upto + 1
    placed = np.flatnonzero((dev.category[:n] == KV) & (dev.layer[:n] >= 0))
    if not len(placed):
        return {}
    caches = dev.kv_cache[placed] if dev.kv_cache is not None else np.zeros(len(placed), dtype=np.int64)
    layers = dev.layer[placed].astype(np.int64)
    order = np.lexsort((layers, caches))
    caches, layers = caches[order], layers[order]
    deltas = dev.delta_bytes[placed][order].astype(np.int64)
    starts = np.flatnonzero(
        np.concatenate(([True], (caches[1:] != caches[:-1]) | (layers[1:] != layers[:-1])))
    )
    sums = np.add.reduceat(deltas, starts)
    return {
        (int(caches[i]), int(layers[i])): int(nbytes)
        for i, nbytes in zip(starts.tolist(), sums.tolist(), strict=True)
        if nbytes > 0
    }


def held_at_step(report: Report, kv_log: Any, step: int) -> tuple[int | None, int | None]:
    """(batch, tokens per row) at the end of `step`: the KV of the moment held that many tokens, not the
    run's final count (a peak at prefill holds the prompt). The main cache's, or, before it existed (two
    generate() calls), the latest cache of the model's shape holding KV then."""
    cache = _cache_at_step(report, kv_log, step)
    tokens = kv_log.step_tokens.get(step) or {}
    if cache not in tokens:
        return report.kv.batch, report.kv.tokens_held
    rows = kv_log.step_rows.get(step, {}).get(cache)
    return rows or report.kv.batch, tokens[cache]


def layer_tokens_at_step(report: Report, kv_log: Any, step: int) -> dict[int, int]:
    """{layer: tokens per row} at the end of `step` of the cache `held_at_step` counts, its layers holding
    KV then. The log's last ended step ends where the report does: its layers' own counts, which differ
    where the run stopped between their updates (the layers before hold one token more; at prefill the
    layers after hold none). An earlier step went through every layer: each holds the step's count
    (a sliding window's would hold fewer; not for a cache with sliding layers)."""
    cache = _cache_at_step(report, kv_log, step)
    if step == max(kv_log.step_cache_live, default=None):
        return report_layer_tokens(report, cache)
    tokens = (kv_log.step_tokens.get(step) or {}).get(cache)
    live = kv_log.step_cache_live.get(step) or {}
    return {layer: tokens for (c, layer), nbytes in live.items() if c == cache and nbytes} if tokens else {}


def report_layer_tokens(report: Report, cache: int | None) -> dict[int, int]:
    """{layer: tokens per row} of `cache`'s layers holding KV where the report ends: at a run's last step,
    or at the moment a forward raised (an OOM), when the layers before the one it reached hold one token
    more (at prefill, the layers after it none)."""
    return {
        layer.layer: layer.tokens
        for layer in report.kv.per_layer
        if layer.cache == cache and layer.tokens and layer.k_bytes + layer.v_bytes
    }


def _cache_at_step(report: Report, kv_log: Any, step: int) -> int | None:
    """The cache `held_at_step` counts: the main one, or the latest of the model's shape holding KV."""
    tokens = kv_log.step_tokens.get(step) or {}
    cache = report.kv.main_cache
    if not tokens or cache in tokens:
        return cache
    shaped = {c.cache for c in report.kv.caches if c.model_shaped is not False and c.role != CROSS_ATTENTION}
    return max((c for c in tokens if c in shaped), default=max(tokens))


def beams_at_step(report: Report, kv_log: Any, step: int, rows: int | None) -> tuple[int | None, bool]:
    """(beams per prompt, whether the rows are beams) of the cache `held_at_step` counts: its beams where
    its log says how many (and they divide its rows), and whether beam search reordered its rows."""
    cache = _cache_at_step(report, kv_log, step)
    figures = next((c for c in kv_log.caches if c.cache == cache), None)
    if figures is None:
        return None, False
    known = figures.beams if figures.beams > 1 and rows and rows % figures.beams == 0 else None
    return known, figures.reordered


def prompt_at_step(report: Report, kv_log: Any, step: int) -> int | None:
    """Tokens per row held after the last prefill up to `step`: the prompt a quantized cache quantizes
    whole at once."""
    prefills = [s for s, phase in kv_log.step_phase.items() if phase == "prefill" and s <= step]
    if not prefills:
        return None
    return held_at_step(report, kv_log, max(prefills))[1]


def other_token_bytes(report: Report, kv_log: object, cross: set[int]) -> float:
    """KV bytes a token of context costs across the rows in the caches beside the main one that were
    written during its call (an assistant model's draft cache, which holds the same sequence): those whose
    bytes grew since the main cache's first step. An earlier call's cache, written before, does not follow
    this call's context."""
    main = report.kv.main_cache
    live = getattr(kv_log, "step_cache_live", None) or {}
    steps = sorted(s for s, slots in live.items() if any(c == main for c, _ in slots))
    total = 0.0
    for c in report.kv.caches:
        if c.cache == main or c.cache in cross or not c.bytes_per_token_measured or not steps:
            continue
        held = [sum(n for (cache, _), n in live[s].items() if cache == c.cache) for s in steps]
        if len(set(held)) > 1:  # it grew (or was cropped) while the main cache was written
            total += c.bytes_per_token_measured * (c.rows or 1)
    return total
