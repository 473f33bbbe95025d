"""The remedies whose price depends on a quantized KV: transformers' int4 QuantizedCache (int4 values, a
scale and a zero-point per group in the model's dtype, the tokens since the last quantization at full
precision), fp8 KV for a static cache or after a quantized one, and a static cache for a quantized cache's
run (at the model's dtype, not quantized). Pure, torch-free.

analyzers.planning.diagnose_remedies prices the usual remedies and calls these where they apply.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from analyzers.planning.diagnose_buffer_remedies import PreallocatedBuffers
from analyzers.planning.diagnosis import CONTEXT_COUNTED, Remedy, fits, no_geometry
from analyzers.planning.fp8_update import fp8_prefill_attention_bytes, fp8_update_bytes
from analyzers.planning.quantized_cache import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_RESIDUAL_LENGTH,
    QuantizedBytes,
    group_scale_bytes,
    quantized_cache_bytes,
    quantized_kv_peak,
    residual_tokens,
)
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.planning.diagnose_static_remedy import StaticCacheRun

__all__ = [
    "fp8_after_quantized",
    "fp8_for_static",
    "fp8_remedy",
    "int4_remedy",
    "layer_tokens_of",
    "model_dtype_text",
    "quantized_context",
    "quantized_widening",
    "static_cache_at_model_dtype",
]

_FP8_SCALE_BYTES = 2 * 4  # a float32 scale for a layer's K and one for its V


def int4_remedy(
    d: dict[str, object],
    kv: int,
    kv_bits: int,
    need: int | None,
    preallocated: PreallocatedBuffers | None = None,
) -> Remedy:
    """transformers' QuantizedCache at its defaults (int4, a scale and a zero-point per 64 elements,
    residual_length 128) holding this moment's tokens: the prompt quantized, the tokens after it in the
    compute dtype until 128 are due (analyzers.planning.quantized_cache, as `kvtrace plan` counts it).
    Each layer holds its own tokens (`layer_tokens_of`): a step stopped between its layers' updates leaves
    the later ones a token short, or at prefill with none, and both caches are priced on what is held.
    `preallocated`: a StaticCache, whose room the QuantizedCache replaces; that cache holds the same bytes
    from its first update on, the QuantizedCache grows, so it is priced at the run's final context (the
    most tokens a row of the run wrote), not at the moment's, which a peak at prefill holds few of."""
    batch, tokens, prompt = d["batch"], d["tokens_held"], d.get("prompt_tokens")
    if not isinstance(batch, int) or not isinstance(tokens, int) or not batch or not tokens:
        why = "needs the tokens held, a share of which it keeps at full precision"
        return Remedy("quantized_kv", 4, None, None, f"int4 quantized cache: {no_geometry(d)}; it {why}.")
    final = preallocated.tokens_written if preallocated is not None else None
    if preallocated is not None and final:
        per_token = kv / preallocated.positions  # a StaticCache's bytes are its positions' (every row's)
        tokens = final
    else:
        per_token = _bytes_per_token_all_rows(d, kv, batch, tokens)
    counts, layers = layer_tokens_of(d, tokens)
    per_layer_token = per_token / layers  # one layer's KV of a position, every row
    # What the cache holds at this moment, without a dynamic cache's transient copy: a quantized cache's
    # updates make larger ones (its quantized layer dequantized, whole K and V returned at full precision).
    cache = kv if preallocated is not None else min(kv, round(per_layer_token * sum(counts)))
    elements = _layer_elements(d, batch, layers) or per_layer_token * 8 / kv_bits  # a position of a layer
    compute_bits = d.get("compute_bits")
    compute_bytes = (compute_bits if isinstance(compute_bits, int) else kv_bits) / 8
    known = prompt if isinstance(prompt, int) else None
    per_layer = [
        quantized_cache_bytes(
            held_here,
            residual_tokens(held_here, DEFAULT_RESIDUAL_LENGTH, known),
            data_per_token=elements * 4 / 8,
            scale_per_token=group_scale_bytes(elements, DEFAULT_GROUP_SIZE, compute_bytes),
            full_per_token=elements * compute_bytes,
        )
        for held_here in counts
    ]
    held_bytes = sum(q.total_bytes for q in per_layer)
    fullest = max(per_layer, key=lambda q: q.quantized_tokens + q.residual_tokens)
    residual = fullest.residual_tokens
    saved = max(cache - held_bytes, 0)
    in_update = (
        None
        if preallocated is not None
        else _int4_update_moment(d, elements, layers, compute_bytes, known, max(counts))
    )
    after = (
        f"the {residual:,} after the prompt" if known is not None else f"up to {residual:,} (the worst case)"
    )
    split = (
        f"{fullest.quantized_tokens:,} in int4, {after} at full precision "
        f"({human_bytes(sum(q.residual_bytes for q in per_layer))}) until "
        f"residual_length={DEFAULT_RESIDUAL_LENGTH} are due"
    )
    if preallocated is not None and final:
        text = (
            f"An int4 quantized cache (QuantizedCache, scales included) grows with the tokens, where this "
            f"StaticCache holds its {preallocated.positions:,} positions from its first update: by the "
            f"run's end it holds its {tokens:,} tokens in {human_bytes(held_bytes)} instead of "
            f"{human_bytes(cache)}, saving {human_bytes(saved)}: {split}."
        )
    else:
        text = (
            f"An int4 quantized cache (QuantizedCache, scales included) holds these {tokens:,} tokens"
            f"{_short_layers(counts, tokens, layers)} in {human_bytes(held_bytes)} instead of "
            f"{human_bytes(cache)}, saving {human_bytes(saved)}: {split}."
        )
    run = d.get("static_run")
    moment = getattr(run, "moment_bytes", None)
    if in_update is not None and isinstance(moment, int) and in_update > moment - saved:
        # its update's copies (the layer's K and V dequantized, the residual's cat) beside what the run held
        # at its own KV peak, a cache update, put the int4 run's peak higher than the step's end
        saved = moment - in_update
        text = (
            f"{text[:-1]}; its updates dequantize a layer's K and V beside the cache, which puts the int4 "
            f"run's peak at {_against_this_moment(in_update, saved)}"
        )
    return Remedy("quantized_kv", 4, saved, fits(saved, need), text)


def _int4_update_moment(
    d: dict[str, object], elements: float, layers: int, compute_bytes: float, prompt: int | None, tokens: int
) -> int | None:
    """Bytes allocated at the int4 QuantizedCache's worst update over a run to `tokens` tokens a row: what
    the run held beside its KV at its own KV peak (a cache update), the other caches' KV as it is, and the
    cache with its update's copies at their most (`quantized_kv_peak`, as `kvtrace plan --cache quantized`
    prices it: the recorded demo, quanto int4, peaked at 102.00 MiB where the step's end priced 101.73).
    None where the run does not tell that moment, or has no allocator events."""
    run, kv, other = _update_run(d), d.get("kv_bytes"), d.get("other_cache_kv_bytes")
    if run is None or run.update_beside_bytes is None or not isinstance(kv, int) or not tokens:
        return None
    logged = d.get("quantized_layout")
    group, residual_length = logged if isinstance(logged, tuple) else (None, None)
    group = group or DEFAULT_GROUP_SIZE
    residual_length = residual_length or DEFAULT_RESIDUAL_LENGTH
    everywhere = elements * layers  # a position's KV elements, every layer and row
    per_token = (
        everywhere * 4 / 8,
        group_scale_bytes(everywhere, group, compute_bytes),
        everywhere * compute_bytes,
    )
    side = round(elements / 2 * compute_bytes)  # one layer's K (or V) a token, every row
    known = prompt if prompt is not None else tokens - min(residual_length - 1, tokens - 1)
    _, with_copies = quantized_kv_peak(per_token, 1 / (2 * layers), side, residual_length, known, tokens)
    others = other if isinstance(other, int) and 0 < other < kv else 0
    return run.update_beside_bytes + others + with_copies


def _update_run(d: dict[str, object]) -> StaticCacheRun | None:
    """What the run held at its own KV peak, a cache update (`diagnose_static_remedy.StaticCacheRun`), where
    a quantized cache's update is priced beside it: None where the diagnosis has none, or the run has no
    allocator events (`profiler=False`: its figures are its KV and weights alone, which no copy of an
    update is)."""
    from analyzers.planning.diagnose_static_remedy import StaticCacheRun  # it imports this module's users

    run = d.get("static_run")
    if not isinstance(run, StaticCacheRun) or d.get("allocator_events") is not True:
        return None
    return run


def _against_this_moment(peak_bytes: int, lower: int) -> str:
    """`X, Y lower than this moment.` (or higher): a quantized run's peak beside the diagnosed moment."""
    side = "lower" if lower >= 0 else "higher"
    return f"{human_bytes(peak_bytes)}, {human_bytes(abs(lower))} {side} than this moment."


def quantized_context(d: dict[str, object], tokens: int, need: int | None) -> tuple[int, int, str] | None:
    """(context, bytes freed, text) of a shorter context for a quanto or HQQ QuantizedCache's run, priced on
    the KV peak of a run to either length, every KV layer holding it (`quantized_kv_peak`, as `kvtrace plan`
    prices it): the tokens after the prompt stay at full precision until residual_length are due, so the
    last ones dropped free a full-precision token each, not the run's average of packed and full-precision
    ones, but a run that ends on the step that requantizes holds the new quantized K and V beside the old
    residual, and frees little (hqq int4, group 16, residual 3, 2 rows, 8 + 12 tokens: 6,656 B of KV at its
    peak, 6,368 B at 17 tokens, not the 4,352 B that 17 tokens hold at the end). What is freed is counted
    from the moment's KV where it holds less than the model's peak, so that the model's bound on the
    shorter run's peak never makes it free more. The context is the longest that frees `need`, else a
    quarter fewer tokens; 0 when none does. None for another cache, or where the moment's geometry is not
    recorded."""
    packed, batch, prompt, compute_bits = (
        d.get("quantized_bits"), d["batch"], d.get("prompt_tokens"), d.get("compute_bits")
    )  # fmt: skip
    if not isinstance(packed, int) or packed >= 8 or not isinstance(batch, int) or not batch:
        return None  # fp8's QuantizedCache keeps every token at 8 bits: the run's average is its price
    if not isinstance(compute_bits, int):
        return None
    layers = layer_tokens_of(d, tokens)[1]
    elements = _layer_elements(d, batch, layers)
    if elements is None:
        return None
    logged = d.get("quantized_layout")
    group, residual_length = logged if isinstance(logged, tuple) else (None, None)
    group = group or DEFAULT_GROUP_SIZE
    residual_length = residual_length or DEFAULT_RESIDUAL_LENGTH
    known = prompt if isinstance(prompt, int) else None
    everywhere = elements * layers  # a position's KV elements, every layer and row
    compute_bytes = compute_bits / 8
    per_token = (
        everywhere * packed / 8,
        group_scale_bytes(everywhere, group, compute_bytes),
        everywhere * compute_bytes,
    )

    def prompt_at(length: int) -> int:  # a shorter prompt where the context is shorter than it; unknown:
        # the worst, residual_length - 1 tokens after it (`residual_tokens`)
        return min(known, length) if known else length - min(residual_length - 1, length - 1)

    def held(length: int) -> QuantizedBytes:  # at the end of a run to `length` tokens
        return quantized_cache_bytes(
            length, residual_tokens(length, residual_length, prompt_at(length)), *per_token
        )

    def peak(length: int) -> int:  # one layer's K (or V) is half a layer's elements
        side = round(elements / 2 * compute_bytes)
        return quantized_kv_peak(
            per_token, 1 / (2 * layers), side, residual_length, prompt_at(length), length
        )[0]

    moment = d.get("kv_bytes")
    highest = peak(tokens)
    highest = min(highest, moment) if isinstance(moment, int) and moment > 0 else highest
    now = held(tokens)
    if need is not None and need > 0:
        context = next((n for n in range(tokens - 1, 0, -1) if highest - peak(n) >= need), 0)
    else:
        context = tokens - min(max(tokens // 4, 1), tokens - 1)
    if context < 1:
        text = (
            f"No shorter context fits: all {tokens:,} tokens of this int{packed} QuantizedCache are only "
            f"{human_bytes(highest)} at their peak on every layer."
        )
        return 0, highest, text
    then = held(context)
    saved = max(highest - peak(context), 0)
    quantized_token = per_token[0] + per_token[1]
    text = (
        f"A context of {context + 1:,} tokens instead of {tokens + 1:,} ({CONTEXT_COUNTED}) frees "
        f"{human_bytes(saved)} of KV at its peak: this int{packed} QuantizedCache keeps the tokens after the "
        f"prompt at full precision ({human_bytes(per_token[2])} a token across the batch, a quantized one "
        f"{human_bytes(quantized_token)} with its scales) until residual_length={residual_length:,} are "
        f"due: {now.residual_tokens:,} of them now, {then.residual_tokens:,} at a context of "
        f"{context + 1:,}; the step that requantizes holds the new quantized K and V beside the old."
    )
    return context, saved, text


def _layer_elements(d: dict[str, object], batch: int, layers: int) -> float | None:
    """KV elements of one position of one layer, every row: the arithmetic (`token_elements`), which does
    not depend on how the run's cache stores them."""
    per_row = d.get("token_elements")
    return per_row * batch / layers if isinstance(per_row, int | float) and per_row else None


def fp8_remedy(d: dict[str, object], own_kv: int, kv_bits: int, held_by: str, need: int | None) -> Remedy:
    """An fp8 cache (QuantizedCache(backend='fp8'), every token at 8 bits) for a run whose cache grows
    by torch.cat: at a step's end it holds the model's KV at 8 bits, but inside each layer's update
    (`Fp8QuantizedLayer.update`) it dequantizes the layer's whole K and V to float32 (three copies of its
    K or V live at once) while the layer's old K and V, and the new token's, are still held beside their
    torch.cat copy. That moment goes beside what the run held at its own KV peak, a cache update
    (`StaticCacheRun.update_beside_bytes`); the larger of the two is the fp8 run's peak. Before, only the
    step's end was priced: the demo's Llama (8 rows, 20-token prompt, 64 new tokens, fp32) was promised
    31.12 MiB off its 110.17 MiB peak, "fits" on an 80 MiB budget, where the fp8 recording peaked at
    80.71 MiB (29.46 MiB off). Where the run does not tell that moment, the step's end alone."""
    # less the float32 scale of each K and V the layers hold by then, which the fp8 cache adds (before, the
    # step's end was priced that many bytes under the fp8 recording: 16 B on the tiny 2-layer Llama)
    saved = round(own_kv * (1 - 8 / kv_bits)) - _fp8_scale_bytes(d, own_kv, kv_bits)
    saved -= _fp8_attending_bytes(d)  # a prefill layer's K and V, its KV in the run, beside the fp8 cache
    text = (
        f"An fp8 KV cache (QuantizedCache(backend='fp8')) saves {human_bytes(saved)} of the "
        f"{human_bytes(own_kv)} {held_by}"
    )
    in_update = _fp8_update_moment(d, own_kv, kv_bits)
    run = _update_run(d)
    if in_update is None or run is None:
        return Remedy("quantized_kv", 8, saved, fits(saved, need), text + ".")
    peak_bytes, copies = in_update
    at_end = run.moment_bytes - saved
    if peak_bytes <= at_end:
        return Remedy("quantized_kv", 8, saved, fits(saved, need), text + ".")
    lower = run.moment_bytes - peak_bytes
    text += (
        f", but each layer's update dequantizes the layer's K and V through float32 ({human_bytes(copies)}: "
        "three float32 copies of its K or V at once) beside its old K and V and their new copy, which puts "
        f"the fp8 run's peak at {_against_this_moment(peak_bytes, lower)}"
    )
    return Remedy("quantized_kv", 8, lower, fits(lower, need), text)


def _fp8_attending_bytes(d: dict[str, object]) -> int:
    """The attending layer's full-precision K and V an fp8 cache's prefill holds beside its 8-bit copy where
    the run peaked inside a prefill layer's attention (`fp8_prefill_attention_bytes`, the figure
    `kvtrace plan --cache fp8` takes too): the run's cache held them as KV, which the remedy saved. 0
    where the run does not tell the moment (`prefill_peak`'s own split) or the KV geometry."""
    peak, batch, tokens, layers = (
        d.get("prefill_peak"),
        d.get("batch"),
        d.get("tokens_held"),
        d.get("kv_layers"),
    )
    at = getattr(peak, "at", None)
    if at is None or not isinstance(batch, int) or not isinstance(tokens, int) or not isinstance(layers, int):
        return 0
    elements = _layer_elements(d, batch, layers) if batch and layers else None
    compute = getattr(peak, "compute_bytes", None)
    if elements is None or not isinstance(compute, int):
        return 0
    return fp8_prefill_attention_bytes(at[3], batch, tokens, elements / batch, compute)


def _fp8_scale_bytes(d: dict[str, object], own_kv: int, kv_bits: int) -> int:
    """Bytes of the float32 scales an fp8 cache keeps at the moment: one for each K and V of every layer
    holding KV then, as many as the moment's `own_kv` fills at the tokens held (at a prefill, the layers
    its step had reached; `layer_tokens` counts them at the step's end). 0 where the run does not tell
    the KV geometry."""
    batch, tokens, layers = d.get("batch"), d.get("tokens_held"), d.get("kv_layers")
    if not isinstance(batch, int) or not isinstance(tokens, int) or not isinstance(layers, int):
        return 0
    elements = _layer_elements(d, batch, layers) if tokens and layers else None
    if elements is None:
        return 0
    layer_bytes = elements * tokens * kv_bits / 8  # one layer's K and V at the tokens held, every row
    return _FP8_SCALE_BYTES * min(layers, math.ceil(own_kv / layer_bytes - 1e-9))


def _fp8_update_moment(d: dict[str, object], own_kv: int, kv_bits: int) -> tuple[int, int] | None:
    """(bytes allocated, of which the dequantized copies) inside an fp8 cache's last layer update at the
    moment's tokens: what the run held beside its KV at its own KV peak, the other caches' KV as it is, the
    model's KV as its cache stores it (without the moment's growth copy) at 8 bits with a float32 scale per
    layer's K and V, the updated layer's old K and V and the new token's at 8 bits beside them (one layer's
    8-bit K and V over the tokens), and three float32 copies of one layer's K (or V). None where the run
    does not tell the update's moment or the KV geometry, or has no allocator events (`profiler=False`: its
    figures are the KV's and the weights', beside which it prices every remedy)."""
    run = _update_run(d)
    batch, tokens, layers, kv = d.get("batch"), d.get("tokens_held"), d.get("kv_layers"), d.get("kv_bytes")
    if run is None or run.update_beside_bytes is None:
        return None
    if not isinstance(batch, int) or not isinstance(tokens, int) or not isinstance(layers, int):
        return None
    if not isinstance(kv, int) or not tokens or not layers:
        return None
    elements = _layer_elements(d, batch, layers)  # K and V of a position of a layer, every row
    if elements is None:
        return None
    # what the model's cache stores, without a growth copy live at the moment (the run's, at full width)
    stored = d.get("kv_stored_bytes")
    stored = min(stored, own_kv) if isinstance(stored, int) and stored else own_kv
    held = round(stored * 8 / kv_bits) + _FP8_SCALE_BYTES * layers
    old_and_new, copies = fp8_update_bytes(elements, elements / 2, tokens)
    return run.update_beside_bytes + (kv - own_kv) + held + old_and_new + copies, copies


def fp8_for_static(
    d: dict[str, object], kv: int, kv_bits: int, static: PreallocatedBuffers, need: int | None
) -> Remedy:
    """An fp8 cache for a StaticCache's run: transformers' QuantizedCache(backend="fp8") keeps every token
    in 8 bits, and grows with them: priced at the run's final context (the most tokens a row wrote) against
    the StaticCache's room, which it holds whatever the moment (`int4_remedy`)."""
    tokens = static.tokens_written or static.positions
    held = round(kv / static.positions * tokens * 8 / kv_bits)
    saved = max(kv - held, 0)
    grows = (
        f"grows with the tokens, where this StaticCache holds its {static.positions:,} positions from its "
        "first update"
    )
    text = (
        f"An fp8 KV cache (QuantizedCache(backend='fp8'), 8 bits a value) {grows}: by the run's end it "
        f"holds its {tokens:,} tokens in {human_bytes(held)} instead of {human_bytes(kv)} at {kv_bits} bits, "
        f"saving {human_bytes(saved)}."
    )
    return Remedy("quantized_kv", 8, saved, fits(saved, need), text)


def fp8_after_quantized(d: dict[str, object], kv: int, packed: int, need: int | None) -> Remedy:
    """An fp8 cache for an int4 QuantizedCache's run: every token in 8 bits, against what the run's cache
    stores at the end of the moment's step (`kv_stored_bytes`: its packed values, their scales and its
    residual at full precision), both without their updates' transient copies. Its width comes from the
    arithmetic (`token_elements`), not from the run's storage, whose last dtype is its residual's."""
    batch, tokens = d["batch"], d["tokens_held"]
    layers = d.get("kv_layers")
    elements = (
        _layer_elements(d, batch, layers) if isinstance(batch, int) and isinstance(layers, int) else None
    )
    if not isinstance(tokens, int) or not tokens or elements is None or not isinstance(layers, int):
        why = "cannot be priced: the KV geometry of a layer is not recorded"
        return Remedy("quantized_kv", 8, None, None, f"fp8 KV cache: {why}.")
    stored = d.get("kv_stored_bytes")
    stored = min(stored, kv) if isinstance(stored, int) and stored else kv
    counts, _ = layer_tokens_of(d, tokens)
    held = round(elements * sum(counts))  # a byte a value
    saved = max(stored - held, 0)
    text = (
        f"An fp8 KV cache (QuantizedCache(backend='fp8'), 8 bits a value, every token) holds these "
        f"{tokens:,} tokens in {human_bytes(held)} instead of the {human_bytes(stored)} this int{packed} "
        f"cache stores (its residual at full precision), saving {human_bytes(saved)}; both without their "
        "updates' transient copies."
    )
    return Remedy("quantized_kv", 8, saved, fits(saved, need), text)


def layer_tokens_of(d: dict[str, object], tokens: int) -> tuple[list[int], int]:
    """(tokens per row of each layer holding KV at the moment, the model's KV layers): the moment's own
    counts (`layer_tokens`, analyzers.planning.diagnose_moment.layer_tokens_at_step) where its fullest layer
    holds `tokens`, else `tokens` on every KV layer (a whole step's)."""
    layers = d.get("kv_layers")
    layers = layers if isinstance(layers, int) and layers > 0 else 1
    held = d.get("layer_tokens")
    if isinstance(held, dict) and held and max(held.values()) == tokens and len(held) <= layers:
        return [int(n) for n in held.values()], layers
    return [tokens] * layers, layers


def _short_layers(counts: list[int], tokens: int, layers: int) -> str:
    """What the layers the moment's step had not reached held, where some hold fewer than `tokens`."""
    fewer: dict[int, int] = {}
    for held in [*counts, *[0] * (layers - len(counts))]:
        if held < tokens:
            fewer[held] = fewer.get(held, 0) + 1
    if not fewer:
        return ""
    said = "; ".join(
        f"{f'{held:,}' if held else 'none'} on {count:,}"
        for held, count in sorted(fewer.items(), reverse=True)
    )
    return f" ({said} of the {layers:,} KV layers, which the step had not reached)"


def _bytes_per_token_all_rows(d: dict[str, object], kv: int, batch: int, tokens: int) -> float:
    """KV bytes of one position across the batch and all layers: the run's own figure at the end (its
    storages over the tokens they hold), else the moment's KV over its tokens."""
    steady = d.get("bytes_per_token")
    return steady * batch if isinstance(steady, int | float) and steady else kv / tokens


def quantized_widening(d: dict[str, object], kv_bits: int | None) -> float | None:
    """How many times larger a token's KV is at the model's own dtype than the run's arithmetic counts it
    (`kv_bits`, the dtype of its last KV data event: fp8 under a float32 model, 4; an int4 cache's residual,
    already the model's dtype, 1), which a static cache or a sliding window would keep; None when the run's
    cache is not quantized, or a dtype is unknown."""
    compute = d.get("compute_bits")
    if not d.get("quantized_cache") or not isinstance(compute, int) or not kv_bits or compute < kv_bits:
        return None
    return compute / kv_bits


def model_dtype_text(d: dict[str, object]) -> str:
    """The model's dtype as a remedy names it: "the model's float32", or its own dtype when unrecorded."""
    dtype = d.get("model_dtype")
    return f"the model's {dtype}" if dtype else "the model's own dtype"


def static_cache_at_model_dtype(
    d: dict[str, object],
    kv: int | None,
    tokens: int | None,
    kv_bits: int | None,
    need: int | None,
    positions: int | None = None,
) -> Remedy:
    """A static cache for a quantized cache's run: StaticCache keeps K and V at the model's dtype, every
    position of its max_cache_len allocated at once; its lack of a transient copy does not make up for
    the wider elements. Priced against this moment's KV, holding the call's `positions` (max_cache_len,
    `StaticCacheRun`) on every layer where the moment held fewer (a run that ran out part-way), else this
    moment's tokens."""
    widen = quantized_widening(d, kv_bits)
    layer_token, layers, batch = d.get("layer_token_bytes"), d.get("kv_layers"), d["batch"]
    if (
        widen is None
        or not kv
        or not tokens
        or not isinstance(layer_token, float)
        or not isinstance(layers, int)
        or not isinstance(batch, int)
    ):
        why = "cannot be priced: the KV geometry of a layer is not recorded"
        return Remedy("static_cache", None, None, None, f"Static cache: {why}.")
    if positions is not None and positions > tokens:
        # preallocated whole at its first update: every layer, every position of the call
        held = round(layer_token * widen * layers * batch * positions)
        these = (
            f"all {positions:,} positions of the call from its first update, where this moment holds "
            f"{tokens:,}"
        )
    else:
        # every layer holding KV then, at max_cache_len: a step stopped before its last layers has fewer
        positions = tokens
        holding = len(layer_tokens_of(d, tokens)[0])
        held = round(layer_token * widen * holding * batch * tokens)
        these = f"these {tokens:,} tokens"
    change = (
        f"A static cache (cache_implementation='static', max_cache_len={positions:,}) holds KV at "
        f"{model_dtype_text(d)}, not quantized: {human_bytes(held)} for {these}"
    )
    if held >= kv:
        text = f"{change}, which adds {human_bytes(held - kv)} to the {human_bytes(kv)} of KV at this moment."
        return Remedy("static_cache", None, 0, fits(kv - held, need), text)
    text = f"{change}, {human_bytes(kv - held)} less than the {human_bytes(kv)} of KV at this moment."
    return Remedy("static_cache", None, kv - held, fits(kv - held, need), text)
