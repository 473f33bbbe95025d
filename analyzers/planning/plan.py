"""`kvtrace plan`: will this model, batch and context fit on this GPU? Pure arithmetic, no torch.

`plan(request)` turns a `PlanRequest` into a frozen `PlanResult`; `to_json` and `format_text` render a
result and compute nothing. The cache kinds follow transformers' cache classes, because those are what
people run and what kvtrace records.

The context is what `generate()` counts: the prompt plus the new tokens. `generate()` never feeds its last
new token back, so the cache holds one token fewer, context - 1 ("tokens written" below; its own static
caches are sized so). Without `prompt`, a plan is the worst case over prompt lengths: the prompt whose
peak is highest at this context (for a dynamic cache, the context less one or two tokens).

- dynamic: `DynamicCache`. Grows by `torch.cat` every step. At the last step, for one layer's K (then V),
  the old storage of written-1 tokens and the new one of all written tokens are both live, so its peak
  exceeds a static cache's by `batch * (written - 1) * kv_heads * head_dim * kv dtype bytes`. Other layers
  are not concurrent: each cat frees its predecessor as soon as the attribute is rebound, before the next
  one starts. A model's sliding layers (Mistral: all; Gemma 2: every other one) are
  `DynamicSlidingWindowLayer`s: each keeps a view of its last window - 1 tokens in a storage of
  `window` tokens, but at prefill that storage is the whole prompt, and it lets go of it only at the
  first decode step, after making its new K and V: until then a sliding window saves nothing. At each
  step a sliding layer makes both new tensors before it frees either, so its transient is its old K and
  V. With sliding and full layers mixed (Gemma, Qwen2), the step is replayed layer by layer in the
  config's order (`layer_types`): which layer peaks depends on it.
- static: `StaticCache`. The whole `batch * written` is allocated on the first step and written in place:
  the same final KV as dynamic, no growth peak, but all of it from the start (`kv_preallocated_bytes`).
  Its sliding layers hold min(written, window) tokens.
- sliding: a static-shaped window (`StaticSlidingWindowLayer`): holds min(written, window) tokens, all
  allocated at the start, no growth peak; its prefill writes the prompt's last window in place.
- quantized: `QuantizedCache` (quanto/HQQ backends), int4 or int8. `kv_bytes_per_token` stays the packed
  data figure (int4: half a byte an element). Each group of `quant_group_size` elements also stores a
  scale and a zero-point in the compute dtype (bf16 by default): for int4, group 64 and bf16 that is
  4 bytes per 64 elements, +12.5% over the data, reported apart as `kv_scale_bytes_per_token`. The prompt
  is quantized at prefill; each later token stays unquantized in the compute dtype until
  `residual_length` of them are (`kv_residual_bytes`: (written - prompt) mod residual_length tokens, at
  worst residual_length - 1). Every decode step dequantizes one layer's whole K and V and concatenates
  them with the residual, so four full-precision tensors (the dequantized K and V, counted as written-1
  tokens, an upper bound since the residual is not dequantized, and the concatenated K and V of all
  written tokens) are live at once: that is this cache's `dynamic_realloc_peak_bytes`.

fp8, int8 or int4 in a dynamic, static or sliding cache count the data alone: per-tensor scales, as in
vLLM's fp8 KV cache, are a few bytes per layer.

A plan fits when weights + the KV peak + reserve <= GPU memory. The reserve stands for everything
the planner cannot see (CUDA context, cuBLAS workspaces, activations, allocator fragmentation); its
default of 10% of the GPU mirrors vLLM's `gpu_memory_utilization=0.9`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from analyzers.planning.presets import DTYPE_BITS, ModelGeometry, dtype_bytes_for, weights_bytes
from analyzers.planning.quantized_cache import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_RESIDUAL_LENGTH,
    quantized_cache_bytes,
    residual_tokens,
)
from kvtrace.errors import KvtraceError

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

CACHE_KINDS = ("dynamic", "static", "sliding", "quantized")
QUANTIZED_KV_DTYPES = ("int4", "int8")
FLOAT_DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_RESERVE_FRACTION = 0.1
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What to plan for. Invalid combinations raise KvtraceError when the request is built.

    reserve_bytes / reserve_fraction: memory kept out of the plan; give at most one (neither: 10% of
    the GPU). A larger reserve makes the answer safer and the batch smaller.
    window: tokens a sliding cache keeps (default: the model's own `sliding_window`); only for "sliding".
    quant_group_size / residual_length: QuantizedCache's `q_group_size` (64) and `residual_length` (128);
    a smaller group means more scales, a longer residual more full-precision tokens.
    compute_dtype: dtype of a quantized cache's scales and residual; default the weights dtype when it is
    a float type, else bf16.
    block_size: tokens per block when counting paged KV blocks (vLLM's default is 16).
    context: tokens per sequence as generate() counts them, prompt plus new tokens; the cache holds
    context - 1 of them (the last new token is never fed back).
    prompt: the prompt's tokens, below the context; None plans the worst prompt for the context. It
    matters for a dynamic cache's sliding layers (they hold the whole prompt until the first decode step)
    and a quantized cache's residual.
    """

    geometry: ModelGeometry
    weights_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    batch: int = 1
    context: int = 8192
    gpu_memory_bytes: int = 80 * GIB
    reserve_bytes: int | None = None
    reserve_fraction: float | None = None
    cache: str = "dynamic"
    window: int | None = None
    quant_group_size: int = DEFAULT_GROUP_SIZE
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    compute_dtype: str | None = None
    block_size: int = 16
    prompt: int | None = None

    def __post_init__(self) -> None:
        for label, dtype in (("weights", self.weights_dtype), ("KV", self.kv_dtype)):
            if dtype not in DTYPE_BITS:
                raise KvtraceError(f"unknown {label} dtype {dtype!r}; choose one of: {', '.join(DTYPE_BITS)}")
        if self.compute_dtype is not None and self.compute_dtype not in FLOAT_DTYPES:
            raise KvtraceError(f"compute dtype must be one of {', '.join(FLOAT_DTYPES)}")
        if self.cache not in CACHE_KINDS:
            raise KvtraceError(f"unknown cache {self.cache!r}; choose one of: {', '.join(CACHE_KINDS)}")
        for label, value in (
            ("batch", self.batch),
            ("context", self.context),
            ("GPU memory", self.gpu_memory_bytes),
            ("block size", self.block_size),
            ("quantization group size", self.quant_group_size),
            ("residual length", self.residual_length),
        ):
            if value < 1:
                raise KvtraceError(f"{label} must be at least 1, got {value}")
        if self.prompt is not None and not 1 <= self.prompt < self.context:
            raise KvtraceError(
                f"prompt must be at least 1 and below the context ({self.context}: prompt plus at least one "
                f"new token), got {self.prompt}"
            )
        if self.reserve_bytes is not None and self.reserve_fraction is not None:
            raise KvtraceError("give a reserve in bytes or as a fraction, not both")
        if self.reserve_bytes is not None and self.reserve_bytes < 0:
            raise KvtraceError(f"reserve cannot be negative, got {self.reserve_bytes}")
        if self.reserve_fraction is not None and not 0 <= self.reserve_fraction < 1:
            raise KvtraceError(f"reserve fraction must be in [0, 1), got {self.reserve_fraction}")
        if self.cache == "quantized" and self.kv_dtype not in QUANTIZED_KV_DTYPES:
            raise KvtraceError(f"a quantized cache stores int4 or int8, not {self.kv_dtype}")
        if self.cache != "sliding" and self.window is not None:
            raise KvtraceError("a window only applies to the sliding cache")
        if self.cache == "sliding" and self.effective_window is None:
            raise KvtraceError(
                f"{self.geometry.name} has no sliding window: give one with --window (tokens kept)"
            )
        if self.window is not None and self.window < 1:
            raise KvtraceError(f"window must be at least 1, got {self.window}")

    @property
    def written_tokens(self) -> int:
        """Tokens the cache holds at the end: generate() never writes its last new token (a context of 1
        is planned as a one-token prompt)."""
        return max(self.context - 1, 1)

    @property
    def effective_reserve_bytes(self) -> int:
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        fraction = DEFAULT_RESERVE_FRACTION if self.reserve_fraction is None else self.reserve_fraction
        return math.floor(self.gpu_memory_bytes * fraction)

    @property
    def effective_window(self) -> int | None:
        if self.cache != "sliding":
            return None
        return self.window if self.window is not None else self.geometry.sliding_window

    @property
    def effective_compute_dtype(self) -> str:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return self.weights_dtype if self.weights_dtype in FLOAT_DTYPES else "bf16"


@dataclass(frozen=True)
class Remedy:
    """One change that would make a plan fit (or the best the change can do).

    kind: "batch" | "context" | "quantized_kv" | "static_cache" | "sliding_window" | "weights".
    setting: the batch, context or window to use (None otherwise); peak_bytes and fits: the plan with
    that change.
    """

    kind: str
    setting: int | None
    peak_bytes: int
    fits: bool


@dataclass(frozen=True)
class PlanResult:
    """Every figure of a plan, in bytes. `max_context` is None when any context fits (every layer keeps a
    window, and the prompt, when the cache holds it, is given); 0 when none does.

    prompt_tokens: the prompt the figures assume (the request's, else the worst for this context).
    kv_tokens / kv_bytes: what the cache holds at the end; kv_prefill_bytes: once the prompt is in;
    kv_peak_bytes: the most KV live at once (kv_bytes + dynamic_realloc_peak_bytes).
    """

    request: PlanRequest
    kv_bytes_per_token: int
    kv_scale_bytes_per_token: int
    prompt_tokens: int
    kv_tokens: int
    kv_bytes: int
    kv_prefill_bytes: int
    kv_peak_bytes: int
    kv_scale_bytes: int
    kv_residual_bytes: int
    kv_preallocated_bytes: int
    weights_bytes: int
    reserve_bytes: int
    total_bytes: int
    dynamic_realloc_peak_bytes: int
    peak_bytes: int
    headroom_bytes: int
    fits: bool
    max_batch: int
    max_context: int | None
    kv_budget_bytes: int
    kv_blocks: int
    remedies: tuple[Remedy, ...] = field(default=())


def blocks(kv_budget_bytes: int, kv_bytes_per_token: int, block_size: int = 16) -> int:
    """Whole paged-KV blocks of `block_size` tokens that fit in `kv_budget_bytes` (a paged allocator
    such as vLLM's cannot use a partial block)."""
    if kv_bytes_per_token < 1 or block_size < 1:
        raise KvtraceError("KV bytes per token and block size must be positive")
    return max(kv_budget_bytes, 0) // (kv_bytes_per_token * block_size)


@dataclass(frozen=True)
class _Sizes:
    """One scenario's KV in bytes: at the end, once the prompt is in, and the most live at once."""

    prompt: int
    kv_tokens: int
    kv_bytes: int
    kv_scale_bytes: int
    kv_residual_bytes: int
    prefill_bytes: int
    peak_bytes: int


def _per_token(req: PlanRequest) -> tuple[int, int, int]:
    """(packed KV data, quantization scales, full-precision KV) bytes per token, all layers, K and V."""
    geom = req.geometry
    k_width, v_width = geom.kv_widths
    elements = geom.layers_with_kv * (k_width + v_width)
    data = dtype_bytes_for(req.kv_dtype, elements)
    full = dtype_bytes_for(req.effective_compute_dtype, elements)
    scales = 0
    if req.cache == "quantized":
        group = req.quant_group_size
        groups = geom.layers_with_kv * (math.ceil(k_width / group) + math.ceil(v_width / group))
        scales = groups * 2 * dtype_bytes_for(req.effective_compute_dtype, 1)  # scale + zero-point
    return data, scales, full


def _layout(req: PlanRequest) -> tuple[int, int, int | None]:
    """(layers keeping every token, layers keeping a window, that window) of the cache planned. A sliding
    cache asked with --window keeps that window on every layer; otherwise the model's own layers decide
    (Mistral: all slide; Gemma 2: every other one), as transformers' caches do. A quantized cache keeps
    every token."""
    geom = req.geometry
    layers = geom.layers_with_kv
    if req.cache == "quantized":
        return layers, 0, None
    if req.cache == "sliding" and (req.window is not None or not geom.windowed_layers):
        return 0, layers, req.effective_window
    windowed = geom.windowed_layers
    return layers - windowed, windowed, geom.sliding_window if windowed else None


def _slides(req: PlanRequest) -> list[bool]:
    """For each layer of the cache planned, in order, whether it keeps a window. The config's order where
    it gives one; otherwise the layers are all alike, or (a geometry built by hand) the full ones come
    first, the worst order: they copy themselves while the sliding ones still hold the prompt."""
    whole, windowed, _ = _layout(req)
    order = req.geometry.layer_slides
    if whole and windowed and order is not None and len(order) == whole + windowed and sum(order) == windowed:
        return list(order)
    return [False] * whole + [True] * windowed


def _step_peak(slides: list[bool], k: int, v: int, held: int, old: int, new: int) -> int:
    """Elements of KV live at the worst moment of one decode step of a dynamic cache, in which each full
    layer grows from `held` tokens to one more and each sliding layer's storage goes from `old` tokens to
    `new`; `k` and `v` are one layer's K and V elements per token. The layers update one after another. A
    full layer's cat makes its new K, then frees the old one, then the same for V; a sliding layer makes
    its new K and V before it frees either old one."""
    live = sum(old if slides_ else held for slides_ in slides) * (k + v)
    peak = live
    for slides_ in slides:
        if slides_:
            live += new * (k + v)
            peak = max(peak, live)
            live -= old * (k + v)
            continue
        for width in (k, v):
            live += width * (held + 1)
            peak = max(peak, live)
            live -= width * held
    return peak


def _scenario(req: PlanRequest, batch: int, prompt: int, new: int) -> _Sizes:
    """The KV of `batch` sequences of a `prompt`-token prompt and `new` new tokens (`new` >= 1), of which
    generate() writes prompt + new - 1 into the cache."""
    data, scales, full_bytes = _per_token(req)
    written = prompt + new - 1
    k_width, v_width = req.geometry.kv_widths
    if req.cache == "quantized":
        side = batch * max(k_width, v_width)  # elements of one layer's K (or V, the wider) per token
        residual = residual_tokens(written, req.residual_length, prompt)  # since the last requantization
        cache = quantized_cache_bytes(written, residual, batch * data, batch * scales, batch * full_bytes)
        scale_bytes, residual_bytes, kv = cache.scale_bytes, cache.residual_bytes, cache.total_bytes
        prefill = batch * prompt * (data + scales)
        realloc = 0
        if new >= 2:  # a decode step dequantizes one layer's K and V and concatenates them
            realloc = 2 * dtype_bytes_for(req.effective_compute_dtype, side * (2 * written - 1))
        return _Sizes(prompt, written, kv, scale_bytes, residual_bytes, prefill, kv + realloc)
    whole, windowed, window = _layout(req)
    token = batch * (k_width + v_width)  # elements of one layer's K and V per token
    width = window or 0
    if req.cache != "dynamic":  # allocated whole at the first step, written in place; no cat, no copy
        kept = min(written, width)
        final = (whole * written + windowed * kept) * token
        kv = dtype_bytes_for(req.kv_dtype, final)
        return _Sizes(prompt, max(written if whole else 0, kept), kv, 0, 0, kv, kv)
    # A sliding layer's storage: the whole prompt until the first decode step, then its window
    kept = prompt if new == 1 else min(written, width)
    final = (whole * written + windowed * kept) * token
    prefill = (whole + windowed) * prompt * token
    peak = prefill
    if new >= 2:  # the first decode step (the prompt let go of) and the last (the longest copies)
        slides, k, v = _slides(req), batch * k_width, batch * v_width
        first = _step_peak(slides, k, v, prompt, prompt, min(prompt + 1, width))
        before_last = prompt if new == 2 else min(written - 1, width)
        last = _step_peak(slides, k, v, written - 1, before_last, min(written, width))
        peak = max(peak, first, last)
    tokens = max(written if whole else 0, kept if windowed else 0)
    as_bytes = [dtype_bytes_for(req.kv_dtype, elements) for elements in (final, prefill, peak)]
    return _Sizes(prompt, tokens, as_bytes[0], 0, 0, as_bytes[1], as_bytes[2])


def _sizes(req: PlanRequest, batch: int, context: int) -> _Sizes:
    """The request's prompt at `context`, or, without one, the prompt whose KV peak is highest: the
    context less one token (a prompt alone: every sliding layer of a dynamic cache holds it whole) or
    less two (one decode step: the growth copy, and a sliding layer's new K and V beside the prompt); a
    quantized cache's worst leaves residual_length - 1 tokens unquantized."""
    written = max(context - 1, 1)
    if req.prompt is not None:
        prompts = [req.prompt]
    elif req.cache == "quantized":
        prompts = [written - min(req.residual_length - 1, written - 1)]
    else:
        prompts = [written - 1, written] if written >= 2 else [written]
    scenarios = [_scenario(req, batch, prompt, written - prompt + 1) for prompt in prompts]
    return max(scenarios, key=lambda sizes: sizes.peak_bytes)


def _peak(req: PlanRequest, batch: int, context: int) -> int:
    fixed = weights_bytes(req.geometry, req.weights_dtype) + req.effective_reserve_bytes
    return fixed + _sizes(req, batch, context).peak_bytes


def _steady_context(req: PlanRequest) -> int | None:
    """The context from which the peak stops growing, None when it grows with every token: only when every
    layer keeps a window, and a dynamic cache's only once the prompt is fixed (its sliding layers hold the
    prompt, and the worst prompt grows with the context)."""
    whole, _, window = _layout(req)
    if whole or window is None:
        return None
    if req.cache == "dynamic":
        return None if req.prompt is None else max(req.prompt, window) + 2
    return window + 1  # min(written, window) tokens: written = context - 1


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
    data, scales, _ = _per_token(req)
    sizes = _sizes(req, req.batch, req.context)
    weights = weights_bytes(req.geometry, req.weights_dtype)
    reserve = req.effective_reserve_bytes
    total = weights + sizes.kv_bytes + reserve
    peak = weights + sizes.peak_bytes + reserve
    gpu = req.gpu_memory_bytes

    def context_fits(context: int) -> bool:
        return _peak(req, req.batch, context) <= gpu

    max_batch = _largest(lambda batch: _peak(req, batch, req.context) <= gpu)
    shortest = 1 if req.prompt is None else req.prompt + 1  # the prompt and one new token
    steady = _steady_context(req)
    max_context: int | None
    if steady is not None and context_fits(steady):
        max_context = None  # every longer context costs what this one does
    else:
        cap = None if steady is None else steady - shortest + 1
        longer = _largest(lambda extra: context_fits(shortest - 1 + extra), cap=cap)
        max_context = shortest - 1 + longer if longer else 0
    budget = gpu - weights - reserve
    return PlanResult(
        request=req,
        kv_bytes_per_token=data,
        kv_scale_bytes_per_token=scales,
        prompt_tokens=sizes.prompt,
        kv_tokens=sizes.kv_tokens,
        kv_bytes=sizes.kv_bytes,
        kv_prefill_bytes=sizes.prefill_bytes,
        kv_peak_bytes=sizes.peak_bytes,
        kv_scale_bytes=sizes.kv_scale_bytes,
        kv_residual_bytes=sizes.kv_residual_bytes,
        kv_preallocated_bytes=sizes.kv_bytes if req.cache in ("static", "sliding") else 0,
        weights_bytes=weights,
        reserve_bytes=reserve,
        total_bytes=total,
        dynamic_realloc_peak_bytes=sizes.peak_bytes - sizes.kv_bytes,
        peak_bytes=peak,
        headroom_bytes=gpu - peak,
        fits=peak <= gpu,
        max_batch=max_batch,
        max_context=max_context,
        kv_budget_bytes=budget,
        kv_blocks=blocks(budget, data + scales, req.block_size),
    )


def _remedies(result: PlanResult) -> tuple[Remedy, ...]:
    req = result.request
    gpu = req.gpu_memory_bytes
    if result.weights_bytes + result.reserve_bytes >= gpu:
        return (Remedy("weights", None, result.weights_bytes + result.reserve_bytes, False),)
    found: list[Remedy] = []
    if 1 <= result.max_batch < req.batch:
        found.append(Remedy("batch", result.max_batch, _peak(req, result.max_batch, req.context), True))
    if result.max_context is not None and 1 <= result.max_context < req.context:
        found.append(Remedy("context", result.max_context, _peak(req, req.batch, result.max_context), True))
    if req.cache in ("dynamic", "static"):
        quantized = replace(req, cache="quantized", kv_dtype="int4")
        peak = _peak(quantized, req.batch, req.context)
        found.append(Remedy("quantized_kv", None, peak, peak <= gpu))
    if req.cache == "dynamic":
        peak = _peak(replace(req, cache="static"), req.batch, req.context)
        if peak <= gpu:  # only worth a line when dropping the growth peak is enough on its own
            found.append(Remedy("static_cache", None, peak, True))
    longest = req.written_tokens - 1  # a window of every token written keeps them all
    if req.geometry.sliding_window is not None:  # its own window is the static cache's line
        longest = min(longest, req.geometry.sliding_window - 1)
    if req.cache in ("dynamic", "static") and longest >= 1:

        def window_fits(window: int) -> bool:
            return _peak(replace(req, cache="sliding", window=window), req.batch, req.context) <= gpu

        window = _largest(window_fits, cap=longest)
        if window >= 1:
            peak = _peak(replace(req, cache="sliding", window=window), req.batch, req.context)
            found.append(Remedy("sliding_window", window, peak, True))
    return tuple(found)


def plan(req: PlanRequest) -> PlanResult:
    """Size weights and KV for `req`, decide whether it fits, and if not, what would make it fit."""
    result = _evaluate(req)
    return result if result.fits else replace(result, remedies=_remedies(result))


# --- rendering: computes nothing -------------------------------------------------------------------


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
    figures = {name: value for name, value in asdict(result).items() if name not in ("request", "remedies")}
    return {"request": request, **figures, "remedies": [asdict(remedy) for remedy in result.remedies]}


def _size(num_bytes: int) -> str:
    sign, magnitude = ("-", -num_bytes) if num_bytes < 0 else ("", num_bytes)
    if magnitude >= GIB:
        return f"{sign}{magnitude / GIB:.2f} GiB"
    if magnitude >= MIB:
        return f"{sign}{magnitude / MIB:.2f} MiB"
    return f"{sign}{magnitude / 1024:.2f} KiB"


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
    if fix.kind == "quantized_kv":
        return (
            f"Quantize the KV cache to int4 (--cache quantized): the peak becomes {_size(fix.peak_bytes)}, "
            f"which {outcome}."
        )
    if fix.kind == "static_cache":
        windowed = _layout(req)[1]
        slides = " and whose sliding layers keep only their window from the prefill on" if windowed else ""
        return (
            f"Preallocate a static cache (--cache static), which never copies itself to grow{slides}: the "
            f"peak becomes {_size(fix.peak_bytes)}, which {outcome}."
        )
    return (
        f"Keep only the last {fix.setting:,} tokens with a sliding-window cache (--cache sliding --window "
        f"{fix.setting}); a model not trained with that window answers worse beyond it."
    )


def format_text(result: PlanResult) -> str:
    """A compact table for a terminal, then one sentence per remedy when the plan does not fit."""
    req = result.request
    whole, windowed, window = _layout(req)
    cache = req.cache
    if window is not None:
        cache += f" ({window:,}-token window on {windowed} of {whole + windowed} layers)"
    rows: list[tuple[str, str]] = [
        ("KV per token", f"{_size(result.kv_bytes_per_token)} ({result.kv_bytes_per_token:,} B)"),
    ]
    if result.kv_scale_bytes_per_token:
        rows.append(("  + scales per token", f"{result.kv_scale_bytes_per_token:,} B"))
    worst = " (the worst case)" if req.prompt is None else ""
    rows += [
        (
            "context",
            f"{req.context:,} tokens: a {result.prompt_tokens:,}-token prompt{worst} and the new tokens, "
            f"of which the cache holds {req.written_tokens:,}",
        ),
        ("weights", _size(result.weights_bytes)),
        ("KV cache", f"{_size(result.kv_bytes)} ({req.batch} x {result.kv_tokens:,} tokens)"),
    ]
    if result.kv_prefill_bytes > result.kv_bytes:  # sliding layers holding the whole prompt
        rows.append(
            (
                "KV at prefill",
                f"{_size(result.kv_prefill_bytes)} (the prompt in every layer, until the first decode step)",
            )
        )
        rows.append(("KV peak", _size(result.kv_peak_bytes)))
    elif result.dynamic_realloc_peak_bytes:
        rows.append(("cache growth peak", _size(result.dynamic_realloc_peak_bytes)))
    rows += [
        ("reserve", _size(result.reserve_bytes)),
        ("peak", f"{_size(result.peak_bytes)} of {_size(req.gpu_memory_bytes)}"),
        ("headroom", _size(result.headroom_bytes)),
        ("fits", "yes" if result.fits else "NO"),
        (f"max batch @ {req.context:,}", f"{result.max_batch:,}"),
        (
            f"max context @ batch {req.batch}",
            "any" if result.max_context is None else f"{result.max_context:,}",
        ),
        (f"KV blocks of {req.block_size}", f"{result.kv_blocks:,}"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{req.geometry.name}: {req.weights_dtype} weights, {req.kv_dtype} KV, {cache} cache"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    if result.remedies:
        lines.append("To make it fit:")
        lines += [f"  - {_sentence(fix, req)}" for fix in result.remedies]
    return "\n".join(lines)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"([0-9.eE+-]+)\s*([A-Za-z]*)")


MAX_SIZE = 2**64  # bytes


def parse_size(text: str, flag: str | None = None, positive: bool = False) -> int:
    """Bytes from "80GiB" (2**30), "80GB" (10**9), "1.5e9" or "12345"; fractions of a byte of a larger unit
    round down, but a byte count must be whole ("1.5B" reads as 1.5 billion to some: refused, not 1 byte).

    Bare K/M/G are refused: whether they mean 10**9 or 2**30 is a 7% difference at 80 GiB. `flag` (the
    option the text came from, "--budget") starts every error; `positive` refuses 0.
    """
    try:
        size = _parse_size(text)
    except KvtraceError as exc:
        if flag is None:
            raise
        raise KvtraceError(f"{flag}: {exc}") from None
    if positive and size == 0:
        said = f"{flag} {text.strip()}" if flag else repr(text)
        raise KvtraceError(f"{said}: a memory size must be positive")
    return size


def _parse_size(text: str) -> int:
    match = _SIZE_PATTERN.fullmatch(text.strip())
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise KvtraceError(f"cannot read size {text!r}: write e.g. 80GiB, 80GB, 1.5e9 or 12345")
    try:
        value = Decimal(match.group(1))
    except InvalidOperation:
        raise KvtraceError(f"cannot read size {text!r}: {match.group(1)!r} is not a number") from None
    if not value.is_finite():
        raise KvtraceError(f"cannot read size {text!r}")
    if value < 0:
        raise KvtraceError(f"size cannot be negative: {text!r}")
    if _SIZE_UNITS[unit] == 1 and value != value.to_integral_value():
        hint = "B means bytes: 1.5GB is 1.5e9 bytes" if unit else "or give a unit: 1.5GiB"
        raise KvtraceError(f"a size in bytes must be a whole number, got {text!r} ({hint})")
    size = int((value * _SIZE_UNITS[unit]).to_integral_value(rounding=ROUND_FLOOR))
    if size > MAX_SIZE:  # a typo (1e99), and beyond what the float arithmetic of a plan can hold
        raise KvtraceError(f"size too large: {text!r} (at most 16 EiB)")
    return size
