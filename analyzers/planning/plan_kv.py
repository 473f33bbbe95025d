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
window - 1 tokens into a compact storage, which is what they hold from then on (never the window its cat
made), so each decode step starts from window - 1 tokens.

fp8, int8 or int4 in a dynamic, static or sliding cache (either kind) count the data alone: per-tensor
scales, as in vLLM's fp8 KV cache, are a few bytes per layer.

Apart from the search for what fits (analyzers.planning.plan), which asks for these figures at many
batches, contexts and windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from analyzers.planning.encoder_pass import encoder_pass_bytes
from analyzers.planning.plan_types import PREALLOCATED_CACHES, SLIDING_CACHES, PlanRequest, RecordedPeak
from analyzers.planning.presets import DTYPE_BITS, dtype_bytes_for
from analyzers.planning.quantized_cache import (
    QuantoPadding,
    group_scale_bytes,
    quantized_cache_bytes,
    quantized_kv_peak,
    residual_tokens,
)
from analyzers.planning.recorded_dtype import in_compute_dtype
from kvtrace.errors import KvtraceError

__all__ = [
    "FP8_SCALE_BYTES",
    "KvSizes",
    "blocks",
    "cache_layout",
    "cross_kv_per_token",
    "kv_per_token",
    "kv_sizes",
    "peak_at",
    "prefill_bound_note",
    "quantized_prefill_note",
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

    @property
    def step_peak_bytes(self) -> int:
        """The most KV and update copies live at once: the KV peak, for a cache whose updates copy nothing
        beside their storages."""
        return self.peak_bytes if self.with_copies_bytes is None else self.with_copies_bytes


def kv_per_token(req: PlanRequest) -> tuple[int, float, int]:
    """(packed KV data, quantization scales, full-precision KV) bytes per token, all layers, K and V. The
    scales are a fraction of a token's where a layer is narrower than a group (`group_scale_bytes`)."""
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


def _step_peak(layers: list[Layer], held: int, old: int, new: int) -> int:
    """Elements of KV live at the worst moment of one decode step of a dynamic cache, in which each full
    layer grows from `held` tokens to one more and each sliding layer's storage goes from `old` tokens to
    `new`. The layers update one after another. A full layer's cat makes its new K, then frees the old
    one, then the same for V; a sliding layer makes its new K and V before it frees either old one."""
    live = sum((old if slides else held) * (k + v) for slides, k, v in layers)
    peak = live
    for slides, k, v in layers:
        if slides:
            live += new * (k + v)
            peak = max(peak, live)
            live -= old * (k + v)
            continue
        for width in (k, v):
            live += width * (held + 1)
            peak = max(peak, live)
            live -= width * held
    return peak


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


def _reorder_peak(layers: list[Layer], held: int, storage: int, view: int) -> int:
    """Elements of KV live at the worst moment of a beam search's `reorder_cache`, with each full layer
    holding `held` tokens and each sliding layer a view of `view` tokens in a storage of `storage`. The
    layers are reordered one after another, each by `keys.index_select` then `values.index_select`: the
    copy (compact, the view's size) is made while the old storage is live, which is then let go of."""
    live = sum((storage if slides else held) * (k + v) for slides, k, v in layers)
    peak = live
    for slides, k, v in layers:
        for width in (k, v):
            live += width * (view if slides else held)
            peak = max(peak, live)
            live -= width * (storage if slides else held)
    return peak


def _quanto_padding(req: PlanRequest, layers: int, side: int) -> QuantoPadding | None:
    """What quanto's packing adds to a quanto or HQQ QuantizedCache of `layers` layers, each K or V `side`
    values a token (every row): none for HQQ, which packs its values as they are; quanto's where the backend
    is quanto or not known, the upper bound of the two."""
    if req.cache != "quantized" or req.quant_backend == "hqq" or req.kv_dtype not in ("int4", "int2"):
        return None
    return QuantoPadding(2 * layers, side, req.quant_group_size, DTYPE_BITS[req.kv_dtype])


def _scenario(req: PlanRequest, batch: int, prompt: int, new: int) -> KvSizes:
    """The KV of `batch` sequences of a `prompt`-token prompt and `new` new tokens (`new` >= 1), of which
    generate() writes prompt + new - 1 into the cache."""
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

    def view(tokens: int) -> int:  # what a sliding layer keeps of its storage: its last window - 1 tokens
        return min(tokens, width - 1)

    # A sliding layer's storage: the whole prompt until the first decode step, then its window; a beam
    # search's reorder after every step (the prefill and the last too) copies its view into a compact storage
    kept = view(written) if beams else prompt if new == 1 else min(written, width)
    final = sum((kept if slides else written) * (k + v) for slides, k, v in layers)
    prefill = sum(prompt * (k + v) for _, k, v in layers)
    peak = prefill
    if beams:  # the reorder after the prefill, each layer still holding the prompt
        peak = max(peak, _reorder_peak(layers, prompt, prompt, view(prompt)))
    if new >= 2:  # the first decode step (the prompt let go of) and the last (the longest copies)
        first = _step_peak(layers, prompt, view(prompt) if beams else prompt, min(prompt + 1, width))
        before_last = prompt if new == 2 else min(written - 1, width)  # compact under beams: its view
        before_last = view(written - 1) if beams else before_last
        last = _step_peak(layers, written - 1, before_last, min(written, width))
        peak = max(peak, first, last)
        if beams:  # and the reorder after the last step
            peak = max(peak, _reorder_peak(layers, written, min(written, width), view(written)))
    # Tokens held, not storage slots: a sliding layer's view is its last window - 1 tokens, even while its
    # storage is still the prompt or the window its last cat made
    tokens = max(written if whole else 0, min(written, width - 1) if windowed else 0)
    as_bytes = [dtype_bytes_for(req.kv_dtype, elements) for elements in (final, prefill, peak)]
    return KvSizes(prompt, tokens, as_bytes[0], 0, 0, as_bytes[1], as_bytes[2])


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
    return replace(
        sizes,
        kv_bytes=sizes.kv_bytes + cross,
        prefill_bytes=sizes.prefill_bytes + cross,
        peak_bytes=peak,
        with_copies_bytes=copies,
        cross_bytes=cross,
    )


def peak_at(req: PlanRequest, batch: int, context: int) -> int:
    """Bytes the plan needs at its worst moment at `batch` and `context`: weights, reserve and the KV peak,
    and a recorded run's activations (`recorded_peak_at`)."""
    fixed = req.weights_bytes + req.effective_reserve_bytes
    if req.recorded is not None:
        return req.effective_reserve_bytes + recorded_peak_at(req, batch, context)
    return fixed + kv_sizes(req, batch, context).step_peak_bytes


def recorded_peak_at(req: PlanRequest, batch: int, context: int) -> int:
    """`_recorded_peak_at`, and no less than a decode step's attention over the longer context holding its
    copies of the KV beside the final KV and the peak's activations (`_attention_floor`), nor than an
    encoder-decoder model's encoder pass at the planned encoder length, before any KV
    (`encoder_pass_bytes`)."""
    encoder = req.weights_bytes + encoder_pass_bytes(replace(req, batch=batch))
    return max(_recorded_peak_at(req, batch, context), _attention_floor(req, batch, context), encoder)


def _recorded_peak_at(req: PlanRequest, batch: int, context: int) -> int:
    """The peak a recorded run would reach at `batch` and `context`, priced as `kvtrace diagnose` prices
    its remedies from the run's peak moment (analyzers.planning.diagnose_remedies): the KV of that moment
    moves as the arithmetic says; a smaller batch frees the moment's batch-first activations in proportion
    (`_rows_freed`, diagnose's figure for that batch), the rest stay as measured, as all do where the rows
    are not told apart and when the context shrinks (they shrink too: an upper bound); they grow in
    proportion when the batch or context grows (an upper bound where they are a fixed part plus parts per
    row and per token). The run's own settings give its own peak exactly.

    The plan's own worst moments can be unlike the run's (a longer prompt's prefill, a last decode step the
    run never reached): each carries the activations the run allows it (`_moment_floors`).

    Another cache kind, KV dtype, window or beams moves the moment (a static cache's prefill attends over
    all of its length, a dynamic cache peaks at its growth copy): its KV with the run's peak activations, or
    its KV peak with what the run held at its own KV peak (`RecordedPeak.update_activations_bytes`), the
    larger, an estimate (analyzers.planning.run_peak's note says so). Either grows from the run's context as
    the planned cache's attended tokens do (`_context_growth`), and generate()'s token tensors with every
    token where that is less (`_token_growth`).

    A compute dtype wider than the run's (`--dtype fp32` of a bf16 run) grows the activations first, all
    but those in no model dtype (`in_compute_dtype`)."""
    assert req.recorded is not None
    rec = in_compute_dtype(req.recorded, req.effective_compute_dtype)  # a wider dtype's activations
    run = _run_request(req, rec)
    rows = max(batch / rec.batch, 1.0)
    stretch = _context_growth(req, rec, context)
    grown = rows * stretch
    gain = _Gain(rows, stretch, max(batch, rec.batch), _attended_gain(req, rec, context))
    tokens = _token_growth(req, rec, batch, context)  # generate()'s ids and mask, where `grown` misses them
    freed = _rows_freed(rec, batch)
    activations = rec.activations_bytes - freed  # at the plan's rows, before the context grows them
    growth = gain.grown(activations, rec.context_token_bytes) - activations
    floors = _moment_floors(req, run, rec, batch, context)
    if not same_cache_as_run(req):
        sizes = kv_sizes(req, batch, context)
        prompt_grown = rows * _prefill_growth(req, run, rec, sizes.prompt, context)
        # a step's end, holding this cache's KV, holds what the run held at its own step's end: where the
        # run peaked elsewhere (a dynamic cache's growth copy), at most its peak less its weights and final
        # KV, the logits it ended with unseen at its peak (a sliding cache planned from a dynamic run at its
        # context 206 was 27,740 B, 4.4%, below the recording), grown as all are (an upper bound)
        unseen = _unseen_at_end(run, rec)
        at_end = activations + growth + gain.grown(unseen, None)
        at_peak = max(at_end, math.ceil((activations + unseen) * prompt_grown))
        beside_update = rec.update_activations_bytes
        if beside_update is None or (req.cache == "quantized" and _prefill_peaks(rec, grown, prompt_grown)):
            # the update's copies beside: a bound
            return req.weights_bytes + sizes.step_peak_bytes + at_peak + tokens
        # Two moments, never live together: the run's peak (a step's end, its logits) holding this cache's
        # KV, and this cache's KV peak (inside an update, or a beam search's reorder) beside what the run
        # held at its own KV peak; fewer rows keep the share of them that `_rows_freed` keeps at the peak
        kept = 1 - _rows_freed(rec, batch) / max(rec.activations_bytes, 1)
        in_update = max(
            gain.grown(beside_update * kept, rec.update_context_token_bytes),
            math.ceil(beside_update * kept * prompt_grown),
        )
        in_update += _update_token_growth(rec, batch, context, kept * max(grown, prompt_grown))
        held = max(sizes.kv_bytes, sizes.prefill_bytes)
        return req.weights_bytes + max(held + at_peak + tokens, sizes.step_peak_bytes + in_update)
    moved = _moment_kv(req, rec, batch, context) - _moment_kv(run, rec, rec.batch, rec.context)
    grew = (req.weights_bytes - rec.weights_bytes) + moved - freed + growth + tokens
    return max(rec.peak_bytes + grew, *floors)


def _attention_floor(req: PlanRequest, batch: int, context: int) -> int:
    """A plan's last decode step while one layer attends over a longer context than the run's: its weights,
    the final KV, the run's peak activations grown as `_recorded_peak_at` grows them (an upper bound: the
    logits are not live then) and that layer's copies of the KV (`_attention_copies`). The run's peak
    moment need not hold those copies: at a short context they are smaller than the logits, and the
    tokens a row its activations gain (`context_token_bytes`) leave them out, yet at a long one they are
    the peak (the tiny Llama with eager attention, planned from context 12 at 240, was 13.3% below its
    recording; an fp8 cache 4.9%, 19.2% planned from a dynamic run). 0 at the run's context and cache:
    its peak is measured."""
    assert req.recorded is not None
    rec = in_compute_dtype(req.recorded, req.effective_compute_dtype)
    fp8_new = req.cache == "quantized" and req.kv_dtype == "fp8" and not (
        rec.cache == "quantized" and rec.kv_dtype == "fp8"
    )
    copies = _attention_copies(req, rec, batch, context)
    if not copies or (not _attended_gain(req, rec, context) and not fp8_new):
        return 0
    rows, more = max(batch / rec.batch, 1.0), _attended_gain(req, rec, context)
    gain = _Gain(rows, _context_growth(req, rec, context), max(batch, rec.batch), more)
    activations = gain.grown(rec.activations_bytes - _rows_freed(rec, batch), rec.context_token_bytes)
    tokens = _token_growth(req, rec, batch, context)
    return req.weights_bytes + kv_sizes(req, batch, context).kv_bytes + activations + tokens + copies


def _attention_copies(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes one layer's attention holds over the attended tokens at a decode step beyond the cache's own
    storages, where they grow with the context: eager attention (the run's `attn_implementation`) expands K
    and V to the query heads (`repeat_kv`, where there are fewer KV heads) and makes the scores, its
    softmax in float32 (3 copies of heads x tokens, at 4 bytes: a bound); an fp8 cache dequantizes K and V
    to float32 (`Fp8QuantizedLayer._dequantize`: 3 of K's or V's copies live at once, measured), a
    quanto or HQQ cache returns its K and V in the compute dtype. 0 for other attention (sdpa's kernels
    take the KV heads as they are) and a run that does not say its own."""
    geom = req.geometry
    attended = _attended(req, context)
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    side = max(max(k, v) for k, v in geom.layer_kv_widths)  # one layer's K (or V) elements a token
    per_token = 0
    if req.cache == "quantized" and req.kv_dtype == "fp8":
        per_token += 3 * side * 4
    eager = rec.attn_implementation == "eager"
    if eager:
        head_dim = max(geom.head_dim, geom.global_head_dim or 0)
        expanded = geom.num_attention_heads * head_dim
        if req.cache == "quantized" and req.kv_dtype != "fp8":
            per_token += 2 * side * compute
        per_token += (2 * expanded * compute if expanded > side else 0) + 3 * geom.num_attention_heads * 4
    return batch * attended * per_token


def _context_growth(req: PlanRequest, rec: RecordedPeak, context: int) -> float:
    """How much a row's activations grow from the run's context to `context`: as the tokens the planned
    cache attends over at each (at least 1: a shorter context keeps them, an upper bound). Measured from the
    run's context in the planned cache, not in the run's: at one context a step ends holding the same
    logits, ids and mask whatever the cache, so a sliding run planned on a full cache at its own context
    keeps its activations (before, they grew by context / (window + 1): on the tiny Llama at batch 2,
    context 12, window 8, +19,186 B, +3.1%, over the full cache's recording; the demo's, +88%)."""
    return max(_attended(req, context) / _attended(req, rec.context), 1.0)


def _unseen_at_end(run: PlanRequest, rec: RecordedPeak) -> int:
    """Bytes a finished run may have held beside its weights and KV at its last step's end beyond those it
    held at its peak moment: its peak less its weights, final KV and the peak's activations (none where the
    peak was that moment, or the run was cut short and never reached it)."""
    if rec.cut_short:
        return 0
    final_kv = kv_sizes(run, rec.batch, rec.context).kv_bytes
    return max(rec.peak_bytes - rec.weights_bytes - final_kv - rec.activations_bytes, 0)


@dataclass(frozen=True)
class _Gain:
    """How a plan grows a moment's activations from the run's: `rows` times the run's rows, `stretch`
    times the tokens it attends over (`_context_growth`), `row_count` rows of `tokens` tokens more."""

    rows: float
    stretch: float
    row_count: int
    tokens: int

    def grown(self, activations: float, token_bytes: int | None) -> int:
        """`activations` at the plan: all follow the rows, and where the run tells the bytes a row and
        token adds (`token_bytes`: run_peak's `context_token_bytes`), those grow by the tokens attended
        more; the logits, a position's hidden states and generate()'s float32 copies of the last position
        stay (before, all grew with the context: the tiny Llama's dynamic cache planned from context 12
        at 206 was +918,539 B, +109.4%, over its recording). Not told: all grow in proportion to the
        context too (an upper bound)."""
        if token_bytes is None:
            return math.ceil(activations * self.rows * self.stretch)
        return math.ceil(activations * self.rows) + token_bytes * self.row_count * self.tokens


def _attended_gain(req: PlanRequest, rec: RecordedPeak, context: int) -> int:
    """Tokens a step attends over more at `context` than at the run's, in the planned cache (none fewer:
    a shorter context keeps the activations, an upper bound)."""
    return max(_attended(req, context) - _attended(req, rec.context), 0)


def _update_token_growth(rec: RecordedPeak, batch: int, context: int, scale: float) -> int:
    """Bytes generate()'s token tensors add to what the run held at its KV peak (`update_token_bytes`,
    grown by `scale`) in a plan whose KV peak is its last step's, `context` tokens a row at most: a sliding
    run's KV peak comes while its window fills, its ids short (the tiny Llama at batch 2, context 206: 288 B
    of them where the full cache's last update held 6,560)."""
    if not rec.token_row_bytes or rec.update_token_bytes is None:
        return 0
    return max(rec.token_row_bytes * batch * context - math.ceil(rec.update_token_bytes * scale), 0)


def _token_growth(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """Bytes generate()'s token tensors (input ids, attention mask, position ids: `token_row_bytes` a row
    and token) add at `batch` and `context` beyond what the activations' `_context_growth` gives them: they
    grow by a token at every step whatever the cache, while a window stops the attended tokens. None where
    the growth is the context's (a full cache); `(context - window - 1)` tokens a row where every layer
    slides (before, none: the tiny Llama at batch 2, planned from context 12 at 206, was 6,208 B below
    its recording, 2 rows x 194 tokens x 16 B)."""
    per_token = rec.token_row_bytes
    if not per_token:
        return 0
    attended, at_run = _attended(req, context), _attended(req, rec.context)
    # tokens a row the growth misses: context - rec.context * growth, over `at_run` to stay in integers;
    # where the activations grow by the tokens attended more (`_Gain`), context - rec.context less those
    missed = context * at_run - rec.context * max(attended, at_run)
    missed = max(missed, (context - rec.context - max(attended - at_run, 0)) * at_run)
    return -(-per_token * batch * missed // at_run) if missed > 0 else 0


def _prefill_peaks(rec: RecordedPeak, grown: float, prompt_grown: float) -> bool:
    """Whether a plan's peak is its prefill as far as the run tells: the run peaked at its own, or the plan's
    prefill grows more than its steps (a longer prompt). A quantized cache's prefill then makes the
    backend's quantize temporaries, which no run on another cache measured (`quantized_prefill_note`):
    such a plan keeps its update's copies on top of the peak's activations, a bound that covers them where
    measured (the tiny Llama, hqq, a 40-token prompt: recorded 1,908,648 B, planned 1,942,424)."""
    return rec.phase == "prefill" or prompt_grown > grown


def _rows_freed(rec: RecordedPeak, batch: int) -> int:
    """Bytes of the run's peak moment's activations that `batch` rows, fewer than the run's, free: the
    batch-first ones (`RecordedPeak.row_activation_bytes`, diagnose_rows' split) in proportion to the rows
    dropped, as `kvtrace diagnose` prices its smaller batch, so that both give one figure. None freed where
    the recording does not tell them apart, or for as many rows or more."""
    row_bytes = rec.row_activation_bytes
    if row_bytes is None or batch >= rec.batch:
        return 0
    return round(min(row_bytes, rec.activations_bytes) * (rec.batch - batch) / rec.batch)


def _prefill_growth(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, prompt: int, context: int
) -> float:
    """How much a prefill's activations grow from the run's to the plan's, for a row: they follow the
    prompt's length, whatever the window (a prefill attends over the whole prompt), and a static cache's
    whole length (its prefill attends over all of it)."""
    run_prompt = kv_sizes(run, rec.batch, rec.context).prompt
    attended = _attended(req, context) / _attended(run, rec.context) if req.cache == "static" else 1.0
    return max(prompt / run_prompt, attended, 1.0)


def _moment_floors(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int
) -> list[int]:
    """The plan's prefill and its KV peak, each with the activations the run allows that moment, grown as
    it grows. The prefill's are what the run held beside its weights and KV during its prefill, where the
    allocator's events tell it (`RecordedPeak.prefill_activations_bytes`); else at most its peak less its
    weights and prefill KV (`prefill_bound_note`). A finished run reached its KV peak, so the memory beside
    its weights and KV there was at most its peak less those. A run cut short never reached its last steps:
    its measured activations stand for theirs (an estimate: a step's activations are a prefill's at most
    where the prefill processes more tokens than a step, as in the tour's runs)."""
    sizes = kv_sizes(req, batch, context)
    run_sizes = kv_sizes(run, rec.batch, rec.context)
    rows = max(batch / rec.batch, 1.0)
    # fewer rows keep the share of the peak moment's activations that stays (`_rows_freed`), at each moment
    kept = 1 - _rows_freed(rec, batch) / max(rec.activations_bytes, 1)
    beside_prefill = rec.prefill_activations_bytes
    if beside_prefill is None:
        beside_prefill = max(rec.peak_bytes - rec.weights_bytes - run_sizes.prefill_bytes, 0)
    if rec.phase == "prefill":  # measured there: its KV may differ from the arithmetic's prompt
        beside_prefill = max(beside_prefill, rec.activations_bytes)
    token_bytes: int | None = None  # what a token adds to `beside_peak`; None: not told, all grow
    if rec.cut_short:
        beside_peak = max(rec.activations_bytes, beside_prefill)
    elif rec.update_activations_bytes is not None and rec.update_context_token_bytes is not None:
        # measured at the run's KV peak, which the plan's KV peak repeats (the bound also holds the logits
        # of the step's end, which come after the update)
        beside_peak, token_bytes = rec.update_activations_bytes, rec.update_context_token_bytes
    else:
        beside_peak = max(rec.peak_bytes - rec.weights_bytes - run_sizes.step_peak_bytes, 0)
        if rec.update_activations_bytes is None and _moment_kv(run, rec, rec.batch, rec.context) >= (
            run_sizes.step_peak_bytes
        ):
            token_bytes = rec.context_token_bytes  # the peak moment held the KV peak: its activations
    stretch = _context_growth(req, rec, context)
    gain = _Gain(rows, stretch, max(batch, rec.batch), _attended_gain(req, rec, context))
    early = rows * _prefill_growth(req, run, rec, sizes.prompt, context)
    late = max(gain.grown(beside_peak * kept, token_bytes), math.ceil(beside_peak * kept * early))
    beside_late = late + _token_growth(req, rec, batch, context)
    floors = [req.weights_bytes + sizes.step_peak_bytes + beside_late]
    if early > 1.0:
        # A prefill of more rows or tokens than the run's: its own moment. Not otherwise: the run's own
        # prefill is within its peak, and the measured figure is the most beside the KV at any moment of
        # it, with the whole prefill KV beside that (an upper bound where its KV was still filling then)
        floors.append(req.weights_bytes + sizes.prefill_bytes + math.ceil(beside_prefill * kept * early))
    return floors


def prefill_bound_note(req: PlanRequest) -> str | None:
    """Why the plan's prefill may be priced high: its rows or prompt outgrow the run's, and the run does not
    tell what it held beside the KV at its prefill, so the bound for it, the run's peak less its weights and
    prefill KV, holds whatever KV the run held later too (its decode steps' and their growth copies)."""
    rec = req.recorded
    if rec is None or rec.prefill_activations_bytes is not None or not same_cache_as_run(req):
        return None
    run = _run_request(req, rec)
    prompt = kv_sizes(req, req.batch, req.context).prompt
    if max(req.batch / rec.batch, 1.0) * _prefill_growth(req, run, rec, prompt, req.context) <= 1.0:
        return None
    return (
        "the run does not tell what it held beside its KV at its prefill (no whole prefill step in its KV "
        "log): this larger prefill counts the run's peak less its weights and prefill KV as activations, "
        "which holds the KV the run held later too (an upper bound, far above where its peak came late)"
    )


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


def same_cache_as_run(req: PlanRequest) -> bool:
    """Whether the request keeps the recorded run's cache (kind, KV dtype, window, beams, quantization) and
    weights, whose peak moment then stays where the run's was: only its batch, context or prompt differ.
    Compared field by field: the run's beams with the plan's batch need not make a valid request."""
    rec = req.recorded
    if rec is None:
        return False
    run = (rec.cache, rec.kv_dtype, rec.window, rec.beams, rec.quant_group_size, rec.residual_length)
    planned = (req.cache, req.kv_dtype, req.window, req.beams, req.quant_group_size, req.residual_length)
    return planned == run and req.measured_weights_bytes == rec.weights_bytes


def _run_request(req: PlanRequest, rec: RecordedPeak) -> PlanRequest:
    """The request of the recorded run itself: the plan's model, weights and memory, the run's settings."""
    return replace(
        req,
        batch=rec.batch,
        context=rec.context,
        prompt=rec.prompt,
        cache=rec.cache,
        kv_dtype=rec.kv_dtype,
        window=rec.window,
        beams=rec.beams,
        quant_group_size=rec.quant_group_size,
        residual_length=rec.residual_length,
        measured_weights_bytes=rec.weights_bytes,
        encoder_tokens=rec.encoder_tokens if rec.encoder_tokens is not None else req.encoder_tokens,
    )


def _attended(req: PlanRequest, context: int) -> int:
    """Tokens a step attends over, which the activations beside the KV follow: the context, or a window
    when every layer keeps one."""
    whole, _, window = cache_layout(req)
    return context if whole or window is None else min(context, window + 1)


def _moment_kv(req: PlanRequest, rec: RecordedPeak, batch: int, context: int) -> int:
    """KV held at the run's peak moment, at `batch` and `context`: at prefill the prompt's (a preallocated
    cache's: all of it); later, a moment holding all of the run's tokens holds all of this context's, and
    one earlier in the run its tokens, at most this context's."""
    sizes = kv_sizes(req, batch, context)
    if rec.phase == "prefill":
        return sizes.prefill_bytes
    if req.cache in PREALLOCATED_CACHES or rec.tokens >= rec.context - 1:
        return sizes.kv_bytes
    tokens = min(rec.tokens, context - 1)
    return kv_sizes(replace(req, prompt=None), batch, tokens + 1).kv_bytes if tokens >= 1 else 0
