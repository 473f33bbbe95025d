"""What transformers cache a recorded run's KV log shows, where the model's config does not say: a window
its cache slid at, a QuantizedCache's bits, group size and residual, and the dtype its KV was stored in
(`kvtrace plan --from-run`, `analyzers.planning.run_defaults`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from analyzers.caches import layer_list
from analyzers.kv_events import is_kv_data
from analyzers.kv_log_figures import CacheFigures
from analyzers.model import MemorySource
from analyzers.planning.presets import ModelGeometry
from analyzers.planning.run_kv_facts import PACKED_PARTS
from analyzers.summary import Report
from kvtrace.format import Run

__all__ = [
    "PLAN_DTYPES",
    "kv_dtype_of",
    "logged_quantization",
    "logged_quantized_backend",
    "logged_window",
    "quantized_layout",
]

# The model's float dtypes as the planner names them; others (int8 weights) plan their KV in bf16
PLAN_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# A QuantizedCache's group scales (its packed values: `PACKED_PARTS`)
_SCALE_PARTS = ("q._scale", "q.1.scale")
_PLAN_BITS = {2: "int2", 4: "int4", 8: "int8"}  # nbits=2 packs four values a byte, both backends


def logged_window(
    run: Run, main: CacheFigures, geometry: ModelGeometry, cache: str, notes: list[str]
) -> tuple[ModelGeometry, str, int | None]:
    """The model as the run's cache saw it, where the cache slid at a window the model's config lacks (a
    sliding cache built from a config of its own): its layers that evicted for a window slide at it. With
    it the cache kind, and the window to plan where every layer slid: "sliding" for a DynamicCache's,
    "static_sliding" for a StaticCache's, the names `kvtrace demo --cache` gives the two, so that the plan
    of the run prices what was recorded and a typed --window or --cache keeps its meaning.

    The window is exact from an evicting update: a DynamicSlidingWindowLayer keeps a view of its last
    window - 1 tokens in the larger storage its cat made; a StaticSlidingWindowLayer is its storage of
    max_cache_len positions, min(window, the cache's length), the window once it has evicted. Which of the
    two is told by the update itself, not the cache's storages: a beam search's reorder moves a static
    one's, which then reads as a dynamic cache."""
    held: dict[int, int] = {}
    views = whole = 0
    for ev in run.kv_events:
        if ev.cache != main.cache or ev.reason != "window" or ev.evicted_tokens <= 0 or not ev.tokens:
            continue
        held[ev.layer] = max(held.get(ev.layer, 0), ev.tokens)
        if ev.logical_bytes:  # a log from before kvtrace wrote it: the cache's kind decides
            views += ev.storage_bytes > ev.logical_bytes
            whole += ev.storage_bytes <= ev.logical_bytes
    if not held:
        return geometry, cache, None
    static = whole > 0 and not views if views or whole else cache == "static"
    window = max(held.values()) + (0 if static else 1)
    layers = geometry.layers_with_kv
    slides = tuple(layer in held for layer in range(layers))
    windowed = replace(
        geometry,
        sliding_window=window,
        sliding_layers=len(held),
        layer_slides=slides if sum(slides) == len(held) else None,  # indices past the KV layers: unordered
    )
    every = len(held) >= layers
    kept = (
        f"{window} positions, a StaticSlidingWindowLayer's"
        if static
        else f"{window - 1} tokens, a DynamicSlidingWindowLayer's window - 1"
    )
    kind = ("static_sliding" if static else "sliding") if every else None
    planned = (
        f"planned as a {'static ' if static else ''}sliding cache of that window (--cache {kind} --window "
        f"{window})"
        if kind
        else "planned with the model's layers sliding at that window"
    )
    notes.append(
        f"the run's cache kept a window of {window} tokens on {'every layer' if every else layer_list(held)} "
        f"(its window evictions, each layer holding {kept}), a window the model's config does not give: "
        f"{planned}"
    )
    if kind:
        return windowed, kind, window
    return windowed, "static" if static else "dynamic", None


def kv_dtype_of(run: Run) -> str | None:
    """The planner's name of what the cache stored, from its last KV data event: a float dtype, "fp8"
    (a plain cache in fp8), "quantized" (a QuantizedCache's packed data) or "fp8-quantized" (its fp8
    backend), None when the log says nothing."""
    data = [event for event in run.kv_events if is_kv_data(event) and event.dtype]
    if not data:
        return None
    last = data[-1]
    dtype = str(last.dtype)
    if str(last.part).startswith("q."):
        return "fp8-quantized" if dtype.startswith("float8") else "quantized"
    if dtype.startswith("float8"):
        return "fp8"
    return PLAN_DTYPES.get(dtype)


def logged_quantization(source: MemorySource, report: Report) -> tuple[int | None, int | None]:
    """(q_group_size, residual_length) of the run's quanto or HQQ QuantizedCache (its main cache) as its
    log shows them, each None where it does not (no scales, no requantization), both for another cache or
    another source. Its layers are all as wide: a QuantizedCache takes no sliding or mixed-width layers."""
    run, geometry = source.meta.get("run"), report.geometry or {}
    heads, head_dim, rows = geometry.get("num_kv_heads"), geometry.get("head_dim"), report.kv.batch
    if not isinstance(run, Run) or not isinstance(heads, int) or not isinstance(head_dim, int) or not rows:
        return None, None
    logged = _logged_layout(run, report.kv.main_cache, rows, lambda layer, kv: heads * head_dim)
    return (None, None) if logged is None else logged[1:]


def _logged_layout(
    run: Run, cache: int | None, rows: int, width_of: Callable[[int, str], int]
) -> tuple[float | None, int | None, int | None] | None:
    """(bits a value, group size, residual length) of `cache`'s quantized parts (`q.*`), each None where
    the log does not show it; None for a cache without any. The bits are the packed bytes over the values
    they hold (rows x tokens x the layer's K or V width); the group size those values over the scales; the
    residual length the tokens one requantization adds."""
    parts = [
        ev
        for ev in run.kv_events
        if ev.cache == cache and ev.part.startswith("q.") and ev.event not in ("freed", "written")
    ]
    if not parts:
        return None
    bits: float | None = None
    group = residual = None
    last_tokens: dict[tuple[int, str], int] = {}
    for ev in parts:
        if not ev.tokens or not ev.shape:
            continue
        values = rows * ev.tokens * width_of(ev.layer, ev.kv)  # 0 without rows: no bits, no group
        if ev.part in PACKED_PARTS and bits is None and values:
            bits = (ev.logical_bytes or ev.storage_bytes) * 8 / values
        elif ev.part in _SCALE_PARTS and group is None and values and values % math.prod(ev.shape) == 0:
            group = values // math.prod(ev.shape)
        if ev.part in PACKED_PARTS:
            before = last_tokens.get((ev.layer, ev.kv))
            if before is not None and ev.phase == "decode" and residual is None and ev.tokens > before:
                residual = ev.tokens - before
            last_tokens[(ev.layer, ev.kv)] = ev.tokens
    return bits, group, residual


# The recorder's names of each backend's packed values (kvtrace.integrations.hf_layers): quanto's
# QBitsTensor packs into `_data` (a PackedTensor, its own `_data`), HQQ's `quantize` returns (W_q, meta)
_BACKEND_PARTS = {"q._data._data": "quanto", "q._data": "quanto", "q.0": "hqq"}


def logged_quantized_backend(run: Run, cache: int | None) -> str | None:
    """ "quanto" or "hqq": the backend of `cache`'s QuantizedCache, as its packed values' part names say;
    None where none is logged."""
    return next(
        (_BACKEND_PARTS[ev.part] for ev in run.kv_events if ev.cache == cache and ev.part in _BACKEND_PARTS),
        None,
    )


def quantized_layout(
    run: Run, main: CacheFigures, geometry: ModelGeometry, notes: list[str]
) -> tuple[str, int | None, int | None] | None:
    """(KV dtype, q_group_size, residual_length) of a quanto or HQQ QuantizedCache (any `q.` part of the
    main cache, read as `_logged_layout` says), None for another cache. What the log cannot say is planned
    at transformers' defaults, and a note says so."""
    widths = geometry.layer_kv_widths

    def width_of(layer: int, kv: str) -> int:
        return widths[layer][kv == "v"] if layer < len(widths) else geometry.kv_widths[0]

    logged = _logged_layout(run, main.cache, main.rows, width_of)
    if logged is None:
        return None
    if not main.rows:  # a cache that requantizes every step has no full-precision part to show its rows
        notes.append(
            "the quantized cache kept no full-precision tokens (residual_length=1), whose shape alone shows "
            "the batch: planned at 1 row, its bits and group size unknown, unless --batch, --kv-dtype and "
            "--quant-group-size say"
        )
    bits, group, residual = logged
    kv_dtype = _PLAN_BITS.get(int(bits)) if bits is not None and bits.is_integer() else None
    if kv_dtype is None:
        said = f"{bits:g} bits a value" if bits is not None else "bits the log does not show"
        notes.append(f"a quantized cache of {said}: planned at int4 unless --kv-dtype says")
        kv_dtype = "int4"
    unknown = [name for name, value in (("q_group_size", group), ("residual_length", residual)) if not value]
    if unknown:
        notes.append(
            f"the quantized cache's {' and '.join(unknown)} not in the log (no "
            f"{'requantization' if unknown[-1] == 'residual_length' else 'scales'} seen): planned at "
            "transformers' defaults"
        )
    return kv_dtype, group, residual
