"""The KV a plan holds, in bytes, for each cache kind, at a batch and a context. Pure arithmetic, no torch.

The cache kinds follow transformers' cache classes, because those are what people run and what kvtrace
records.

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
- sliding: a `DynamicCache` whose every layer slides at the window (`--window`, else the model's): what
  `kvtrace demo --cache sliding` records, the dynamic cache's sliding layers above on all layers, the
  prompt held whole until the first decode step.
- static_sliding: a `StaticCache` whose every layer slides (`StaticSlidingWindowLayer`): holds
  min(written, window) tokens, all allocated at the start, no growth peak; its prefill writes the prompt's
  last window in place. `kvtrace plan` called this one "sliding" before: now the names are demo's.
- quantized, int2, int4 or int8: `QuantizedCache` (quanto/HQQ backends, `nbits`). `kv_bytes_per_token` stays
  the packed data figure (int4: half a byte an element; int2: a quarter, four a byte in both backends).
  Each group of `quant_group_size` elements also stores a scale and a zero-point in the compute dtype
  (bf16 by default): for int4, group 64 and bf16 that is 4 bytes per 64 elements, +12.5% over the data,
  reported apart as `kv_scale_bytes_per_token`. The groups run over a layer's whole K (or V) tensor,
  flattened (`group_scale_bytes`), so a layer narrower than a group pays a fraction of one a token. The
  prompt is quantized at prefill; each later token stays unquantized in the compute dtype until
  `residual_length` of them are (`kv_residual_bytes`: (written - prompt) mod residual_length tokens, at
  worst residual_length - 1). Every decode step dequantizes one
  layer's quantized K and V, concatenates them with the residual and the new token (the K and V it
  returns, all written tokens), then grows the residual by `torch.cat`, its new V made beside the old:
  at the last step that is the dequantized pair, the returned pair and the old residual V, in the compute
  dtype, this cache's `dynamic_realloc_peak_bytes` (measured: the demo's shape at batch 12, a 20-token
  prompt and 63 in the residual, held 3.75 + 15.56 + 5.81 MiB of them in its last layer's update, hqq and
  quanto alike). Only the old residual V is the cache's own storage, and only it is in the KV peak, as
  a recorded run's KV peak counts the cache's storages: the dequantized and returned pairs are the
  update's (`KvSizes.step_peak_bytes` counts them). A step that requantizes makes the quantized copy of
  all it held instead: its copies priced at the dequantized and returned pairs of every token, a bound for
  the backend's own temporaries, and its KV at the first layer's new quantized K and V beside what all
  layers held (`quantized_step_bytes`); the last such step after the prompt is priced too. One layer's
  only: the dequantized pair dies when its update returns, the returned pair when its attention does,
  before the next layer's update.
- quantized, fp8: `QuantizedCache(backend="fp8")` (`Fp8QuantizedLayer`). The prompt is quantized at
  prefill with one float32 scale per K and per V per layer (`FP8_SCALE_BYTES`, kept for good); each new
  token is quantized with it and `torch.cat`-ed onto the 1-byte store: no residual, no group scales. Its
  update holds the old K and V in locals until it returns, after both new ones exist, so a step's peak is
  the cache plus one layer's old K and V (the last layer's at the last step, written - 1 tokens).

Beam search (`beams` > 1; the batch is then prompts x beams rows): after every forward, the prefill's and
the last one's too, `reorder_cache` rebinds each layer's K, then V, to an `index_select` copy while the old
one is live. A static or static_sliding cache's peak is its KV plus one layer's K (or V, the wider) whole;
a dynamic (or sliding) cache's full layers copy all they hold, and its sliding layers copy their view of
window - 1 tokens into a compact storage, which is what they hold from then on, so each decode step starts
from window - 1 tokens; a step's end, before its reorder, still holds the window its cat made
(`KvSizes.end_bytes`). The arithmetic of a dynamic cache's layers is analyzers.planning.dynamic_kv's,
which `kvtrace diagnose`'s sliding-window remedy shares.

fp8, int8 or int4 in a dynamic, static or sliding cache (either kind) count the data alone: per-tensor
scales, as in vLLM's fp8 KV cache, are a few bytes per layer.

Apart from the search for what fits (analyzers.planning.plan), which asks for these figures at many
batches, contexts and windows, and from a plan priced from a recorded run's peak
(analyzers.planning.recorded_growth), which moves a measurement with these figures. A plan without a
recording has a second moment beside the KV peak, its prefill (`prefill_at`): the prompt's KV with the
activations analyzers.planning.prefill_activations estimates; its peak is the larger (`plan_peak`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from analyzers.planning.compressed_kv import compressed_growth_bytes, compressed_sizes
from analyzers.planning.dynamic_kv import dynamic_cache_kv
from analyzers.planning.plan_types import PREALLOCATED_CACHES, SLIDING_CACHES, PlanRequest
from analyzers.planning.prefill_activations import PrefillActivations, prefill_activations
from analyzers.planning.presets import DTYPE_BITS, dtype_bytes_for
from analyzers.planning.quantized_cache import (
    QuantoPadding,
    group_scale_bytes,
    quantized_cache_bytes,
    quantized_kv_peak,
    residual_tokens,
)
from kvtrace.errors import KvtraceError

__all__ = [
    "FP8_SCALE_BYTES",
    "KvSizes",
    "PlanPeak",
    "blocks",
    "cache_layout",
    "cross_kv_per_token",
    "kv_per_token",
    "kv_sizes",
    "peak_at",
    "plan_peak",
    "prefill_at",
    "prompt_kv_by_layer",
]

FP8_SCALE_BYTES = 4  # Fp8QuantizedLayer's per-tensor scale: one float32 for K and one for V, per layer


def blocks(kv_budget_bytes: int, kv_bytes_per_token: int, block_size: int = 16) -> int:
    """Whole paged-KV blocks of `block_size` tokens that fit in `kv_budget_bytes` (a paged allocator
    such as vLLM's cannot use a partial block)."""
    if kv_bytes_per_token < 1 or block_size < 1:
        raise KvtraceError("KV bytes per token and block size must be positive")
    return max(kv_budget_bytes, 0) // (kv_bytes_per_token * block_size)


@dataclass(frozen=True)
class KvSizes:
    """One scenario's KV in bytes: at the end, once the prompt is in, and the most the cache's own storages
    hold at once (`peak_bytes`, as a recorded run's KV peak counts them). A quantized cache's update makes
    full-precision copies that are not the cache's (its dequantized K and V, the K and V it returns):
    `step_peak_bytes` is the most of both live at once, what a peak of the memory counts."""

    prompt: int
    kv_tokens: int
    kv_bytes: int
    kv_scale_bytes: int
    kv_residual_bytes: int
    prefill_bytes: int
    peak_bytes: int
    with_copies_bytes: int | None = None  # the KV and the update's copies at their worst; None: no copies
    cross_bytes: int = 0  # of kv_bytes, prefill_bytes and peak_bytes: an encoder-decoder's cross-attention KV
    # DeepSeek-V4's kv_bytes by part (`compressed_kv.PART_NAMES`): its window, compressed entries, indexer
    # keys and compressor state; empty for any other cache
    parts: tuple[tuple[str, int], ...] = ()
    # the KV at the last step's end where more than kv_bytes: a beam search's reorder, after it, compacts a
    # dynamic cache's sliding layers to their view (`dynamic_kv`); None: kv_bytes
    step_end_bytes: int | None = None

    @property
    def end_bytes(self) -> int:
        """The KV a step's end holds (its logits, a beam search's scores): the end's, but under beam search
        a sliding layer's window its cat made, which the reorder after it compacts."""
        return self.kv_bytes if self.step_end_bytes is None else self.step_end_bytes

    @property
    def step_peak_bytes(self) -> int:
        """The most KV and update copies live at once: the KV peak, for a cache whose updates copy nothing
        beside their storages."""
        return self.peak_bytes if self.with_copies_bytes is None else self.with_copies_bytes


def kv_per_token(req: PlanRequest) -> tuple[int, float, int]:
    """(packed KV data, quantization scales, full-precision KV) bytes per token, all layers, K and V. The
    scales are a fraction of a token's where a layer is narrower than a group (`group_scale_bytes`).
    DeepSeek-V4's cache (`compressed_kv`) grows by its compressed entries and indexer keys alone, a fraction
    of a token's K each layer, rounded up: its window and compressor state do not grow."""
    compressed = req.geometry.compressed
    if compressed is not None and _plans_compressed(req):
        growth = compressed_growth_bytes(compressed, req.geometry.head_dim, req.kv_dtype)
        full = compressed_growth_bytes(compressed, req.geometry.head_dim, req.effective_compute_dtype)
        return max(math.ceil(growth), 1), 0.0, max(math.ceil(full), 1)
    elements = sum(k + v for k, v in req.geometry.layer_kv_widths)
    data = dtype_bytes_for(req.kv_dtype, elements)
    full = dtype_bytes_for(req.effective_compute_dtype, elements)
    scales = 0.0
    if req.cache == "quantized" and req.kv_dtype != "fp8":  # fp8's scales are per tensor, not per token
        compute = dtype_bytes_for(req.effective_compute_dtype, 1)
        scales = group_scale_bytes(elements, req.quant_group_size, compute)
    return data, scales, full


def cache_layout(req: PlanRequest) -> tuple[int, int, int | None]:
    """(layers keeping every token, layers keeping a window, that window) of the cache planned. A sliding
    cache (either kind) asked with --window keeps that window on every layer; otherwise the model's own
    layers decide (Mistral: all slide; Gemma 2: every other one), as transformers' caches do. A quantized
    cache keeps every token."""
    geom = req.geometry
    layers = geom.layers_with_kv
    if req.cache == "quantized":
        return layers, 0, None
    if req.cache in SLIDING_CACHES and (req.window is not None or not geom.windowed_layers):
        return 0, layers, req.effective_window
    windowed = geom.windowed_layers
    return layers - windowed, windowed, geom.sliding_window if windowed else None


Layer = tuple[bool, int, int]  # a layer of the cache planned: whether it keeps a window, K and V elements


def _layers(req: PlanRequest, batch: int) -> list[Layer]:
    """Each layer of the cache planned, in order: whether it keeps a window, and its K and V elements per
    token across the batch (Gemma 4's full layers wider than its sliding ones). The config's order where it
    gives one; otherwise the layers are all alike, or (a geometry built by hand) the full ones come first,
    the worst order: they copy themselves while the sliding ones still hold the prompt."""
    whole, windowed, _ = cache_layout(req)
    order = req.geometry.layer_slides
    if whole and windowed and order is not None and len(order) == whole + windowed and sum(order) == windowed:
        slides = list(order)
    else:
        slides = [False] * whole + [True] * windowed
    widths = req.geometry.layer_kv_widths
    return [(slides_, batch * k, batch * v) for slides_, (k, v) in zip(slides, widths, strict=True)]


def _fp8_scenario(req: PlanRequest, batch: int, prompt: int, new: int) -> KvSizes:
    """`_scenario` for the fp8 QuantizedCache: 1-byte K and V plus a fixed float32 scale per tensor; a
    decode step's old K and V of one layer live until its update returns."""
    written = prompt + new - 1
    data, _, _ = kv_per_token(req)
    scale_bytes = req.geometry.layers_with_kv * 2 * FP8_SCALE_BYTES
    kv = batch * written * data + scale_bytes
    prefill = batch * prompt * data + scale_bytes
    old = 0
    if new >= 2:  # the last step: a layer's old K and V of written - 1 tokens beside the new ones, while
        # the layers after it still lack their newest token (the last layer's, when all are as wide)
        token = [k + v for _, k, v in _layers(req, batch)]
        old = max((written - 1) * width - sum(token[i + 1 :]) for i, width in enumerate(token))
        old = dtype_bytes_for(req.kv_dtype, old)
    return KvSizes(prompt, written, kv, scale_bytes, 0, prefill, kv + old)


def _quanto_padding(req: PlanRequest, layers: int, side: int) -> QuantoPadding | None:
    """What quanto's packing adds to a quanto or HQQ QuantizedCache of `layers` layers, each K or V `side`
    values a token (every row): none for HQQ, which packs its values as they are; quanto's where the backend
    is quanto or not known, the upper bound of the two."""
    if req.cache != "quantized" or req.quant_backend == "hqq" or req.kv_dtype not in ("int4", "int2"):
        return None
    return QuantoPadding(2 * layers, side, req.quant_group_size, DTYPE_BITS[req.kv_dtype])


def _plans_compressed(req: PlanRequest) -> bool:
    """Whether `req` is DeepSeek-V4's own cache, planned by `compressed_kv`: a DynamicCache at the model's
    window. Its layers refuse a StaticCache, and a quantized cache or another window is not what they hold."""
    if req.geometry.compressed is None or req.cache not in ("dynamic", "sliding"):
        return False
    return req.cache == "dynamic" or req.window in (None, req.geometry.sliding_window)


def _compressed_scenario(req: PlanRequest, batch: int, prompt: int, new: int) -> KvSizes:
    """`_scenario` for DeepSeek-V4's cache (`compressed_kv`). A beam search's reorder, which copies every
    part compact, is not planned."""
    shape, window = req.geometry.compressed, req.geometry.sliding_window
    if shape is None or window is None:  # `_plans_compressed` said it is one; hf_config gives it a window
        raise KvtraceError("not a DeepSeek-V4 geometry with a window")
    if req.beams > 1:
        raise KvtraceError("a beam search of DeepSeek-V4's compressed cache is not planned: plan --beams 1")
    sizes = compressed_sizes(shape, req.geometry.head_dim, window, batch, prompt, new, req.kv_dtype)
    written = prompt + new - 1
    return KvSizes(
        prompt, written, sizes.final_bytes, 0, 0, sizes.prefill_bytes, sizes.peak_bytes, parts=sizes.parts
    )


def _scenario(req: PlanRequest, batch: int, prompt: int, new: int) -> KvSizes:
    """The KV of `batch` sequences of a `prompt`-token prompt and `new` new tokens (`new` >= 1), of which
    generate() writes prompt + new - 1 into the cache."""
    if _plans_compressed(req):
        return _compressed_scenario(req, batch, prompt, new)
    if req.geometry.compressed is not None:
        raise KvtraceError(
            "DeepSeek-V4's cache layers keep their compressed state in their own DynamicCache: --cache "
            f"{req.cache}{'' if req.window is None else f' --window {req.window}'} is not a cache it runs "
            "with; plan --cache dynamic"
        )
    if req.cache == "quantized" and req.kv_dtype == "fp8":
        return _fp8_scenario(req, batch, prompt, new)
    data, scales, full_bytes = kv_per_token(req)
    written = prompt + new - 1
    layers = _layers(req, batch)
    if req.cache == "quantized":
        residual = residual_tokens(written, req.residual_length, prompt)  # since the last requantization
        per_token = (batch * data, batch * scales, batch * full_bytes)
        side = max(max(k, v) for _, k, v in layers)  # elements of one layer's K (or V, the widest) a token
        share = side / sum(k + v for _, k, v in layers)
        padding = _quanto_padding(req, len(layers), side)
        cache = quantized_cache_bytes(written, residual, *per_token, padding)
        scale_bytes, residual_bytes, kv = cache.scale_bytes, cache.residual_bytes, cache.total_bytes
        prefill = quantized_cache_bytes(prompt, 0, *per_token, padding).total_bytes
        side_bytes = dtype_bytes_for(req.effective_compute_dtype, side)
        peak, with_copies = quantized_kv_peak(
            per_token, share, side_bytes, req.residual_length, prompt, written, padding
        )
        return KvSizes(prompt, written, kv, scale_bytes, residual_bytes, prefill, peak, with_copies)
    whole, windowed, window = cache_layout(req)
    width = window or 0
    beams = req.beams > 1
    if req.cache in PREALLOCATED_CACHES:  # allocated whole at the first step, written in place; no cat
        kept = min(written, width)
        final = sum((kept if slides else written) * (k + v) for slides, k, v in layers)
        kv = dtype_bytes_for(req.kv_dtype, final)
        # but a beam search's reorder copies each layer's whole K (then V) beside it, the widest the worst
        copy = max((kept if slides else written) * max(k, v) for slides, k, v in layers)
        peak = kv + (dtype_bytes_for(req.kv_dtype, copy) if beams else 0)
        return KvSizes(prompt, max(written if whole else 0, kept), kv, 0, 0, kv, peak)

    # a full layer's growth copies, a sliding layer's prompt and window, a beam search's reorders (dynamic_kv)
    elements = dynamic_cache_kv(layers, width, prompt, new, beams)
    # Tokens held, not storage slots: a sliding layer's view is its last window - 1 tokens, even while its
    # storage is still the prompt or the window its last cat made
    tokens = max(written if whole else 0, min(written, width - 1) if windowed else 0)
    figures = (elements.final, elements.prefill, elements.peak, elements.step_end)
    final, prefill, peak, end = (dtype_bytes_for(req.kv_dtype, round(n)) for n in figures)
    return KvSizes(prompt, tokens, final, 0, 0, prefill, peak, step_end_bytes=end if end > final else None)


def kv_sizes(req: PlanRequest, batch: int, context: int) -> KvSizes:
    """The request's prompt at `context`, or, without one, the prompt whose KV peak is highest: the
    context less one token (a prompt alone: every sliding layer of a dynamic cache holds it whole) or
    less two (one decode step: the growth copy, and a sliding layer's new K and V beside the prompt); a
    quantized cache's worst leaves residual_length - 1 tokens unquantized (fp8's, with no residual, is a
    dynamic cache's)."""
    written = max(context - 1, 1)
    if req.prompt is not None:
        prompts = [req.prompt]
    elif req.cache == "quantized" and req.kv_dtype != "fp8":
        prompts = [written - min(req.residual_length - 1, written - 1)]
    else:
        prompts = [written - 1, written] if written >= 2 else [written]
    scenarios = [_scenario(req, batch, prompt, written - prompt + 1) for prompt in prompts]
    return _with_cross_attention(req, batch, max(scenarios, key=lambda sizes: sizes.step_peak_bytes))


def cross_kv_per_token(req: PlanRequest) -> int:
    """Bytes of an encoder-decoder model's cross-attention KV per encoder token and row: every decoder
    layer's K and V of the encoder's output (0 for a decoder-only model). A quantized cache quantizes the
    self-attention KV alone: generate() pairs it with a DynamicCache for the cross-attention, in the compute
    dtype."""
    k, v = req.geometry.kv_widths
    dtype = req.effective_compute_dtype if req.cache == "quantized" else req.kv_dtype
    return dtype_bytes_for(dtype, req.geometry.cross_kv_layers * (k + v))


def _with_cross_attention(req: PlanRequest, batch: int, sizes: KvSizes) -> KvSizes:
    """`sizes` of the self-attention KV with an encoder-decoder model's cross-attention KV beside it, held
    whole from the prefill on at the encoder's length. A beam search's reorder copies it too, after the
    self-attention cache (`EncoderDecoderCache.reorder_cache`): one decoder layer's K (or V) of it beside
    all the rest, the self-attention KV at its end."""
    per_token = cross_kv_per_token(req)
    if not per_token:
        return sizes
    cross = batch * req.effective_encoder_tokens * per_token
    peak = sizes.peak_bytes + cross
    if req.beams > 1:
        peak = max(peak, sizes.kv_bytes + cross + cross // (2 * req.geometry.cross_kv_layers))
    copies = None if sizes.with_copies_bytes is None else sizes.with_copies_bytes + cross
    end = None if sizes.step_end_bytes is None else sizes.step_end_bytes + cross
    return replace(
        sizes,
        step_end_bytes=end,
        kv_bytes=sizes.kv_bytes + cross,
        prefill_bytes=sizes.prefill_bytes + cross,
        peak_bytes=peak,
        with_copies_bytes=copies,
        cross_bytes=cross,
    )


@dataclass(frozen=True)
class PlanPeak:
    """A plan's worst moment at a batch and context: the bytes it needs then (weights, KV, activations and
    reserve), and the KV it holds then, which is not the KV peak where the moment is another (a prefill, a
    step's end holding its logits)."""

    peak_bytes: int
    kv_bytes: int
    # with a recording, which moment the activations are (recorded_growth's `ActivationsMoment`); None
    # without one
    activations_moment: str | None = None


def prefill_at(req: PlanRequest, batch: int, context: int) -> tuple[int, PrefillActivations] | None:
    """A plan's prefill without a recording: the KV it holds at its worst moment (every layer's prompt,
    the last layer's included) and its activations (`prefill_activations`, under sdpa, unpadded, the
    plan's assumptions), for the request's prompt, else the longest, context - 1, the worst: its
    activations grow with it. None with a recording (its own prefill is measured) or for a model whose
    prefill the planner does not estimate."""
    if req.recorded is not None:
        return None
    prompt = req.prompt if req.prompt is not None else context - 1
    activations = prefill_activations(
        req.geometry,
        req.effective_compute_dtype,
        batch,
        prompt,
        layer_kv_bytes=prompt_kv_by_layer(req, batch, prompt),
    )
    if activations is None:
        return None
    kv = kv_sizes(replace(req, prompt=prompt, context=context), batch, context).prefill_bytes
    return kv - activations.unwritten_kv_bytes, activations


def prompt_kv_by_layer(req: PlanRequest, batch: int, prompt: int) -> tuple[int, ...]:
    """The prompt KV each layer's cache writes as the prefill reaches it, in order, where a cache grows
    layer by layer (dynamic or sliding: a sliding layer holds the whole prompt until the first decode step):
    a prefill's moment in a layer before the last holds the KV of the layers up to it alone. Empty for a
    cache allocated whole at the start (static), and for a quantized or DeepSeek-V4's, which are priced as
    if every layer held the prompt throughout, the most they can."""
    if req.cache not in ("dynamic", "sliding") or req.geometry.compressed is not None:
        return ()
    return tuple(dtype_bytes_for(req.kv_dtype, prompt * (k + v)) for _, k, v in _layers(req, batch))


def plan_peak(req: PlanRequest, batch: int, context: int) -> PlanPeak:
    """`peak_at`, with the KV its moment holds: without a recording, the larger of the KV peak (the last
    decode step's growth copy, a quantized cache's update) and the prefill's (`prefill_at`), each beside
    the weights and the reserve; with one, the recorded run's peak moved to the plan (`recorded_peak_at`)."""
    fixed = req.weights_bytes + req.effective_reserve_bytes
    if req.recorded is not None:
        # at call time: analyzers.planning.recorded_growth prices its moments with this module's KV
        from analyzers.planning.recorded_growth import recorded_peak_moment

        peak, kv, moment = recorded_peak_moment(req, batch, context)
        return PlanPeak(req.effective_reserve_bytes + peak, kv, moment)
    step = kv_sizes(req, batch, context).step_peak_bytes
    prefill = prefill_at(req, batch, context)
    if prefill is not None and prefill[0] + prefill[1].peak_bytes > step:
        return PlanPeak(fixed + prefill[0] + prefill[1].peak_bytes, prefill[0])
    return PlanPeak(fixed + step, step)


def peak_at(req: PlanRequest, batch: int, context: int) -> int:
    """Bytes the plan needs at its worst moment at `batch` and `context`: weights, reserve and the KV peak,
    or the prefill's KV and activations where those are more (`plan_peak`), and a recorded run's
    activations (`recorded_peak_at`)."""
    return plan_peak(req, batch, context).peak_bytes
