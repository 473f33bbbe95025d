"""What each usual remedy for an OOM would buy at a diagnosis's moment (analyzers.planning.diagnose),
priced in bytes with this run's own figures. Pure, torch-free.

* the shortfall a remedy must cover is `request - device_free` at an OOM (the allocator could not find
  a fresh segment that big; the reserved-but-free space is treated as unusable, which is what the OOM
  itself proves without expandable segments), under a per-process cap `request - (allowed - reserved)`,
  or `peak - budget` when a budget is given; where fragmentation caused the OOM, a remedy that frees bytes
  fits only if it frees the bytes stranded in fragments too (analyzers.planning.diagnose_fragments);
* KV scales linearly with batch and with the tokens held, so smaller batch and shorter context are exact
  proportions of the KV at that moment; a smaller batch also frees its share of the moment's activations
  whose sizes are batch-first (logits, attention's copies, masks: analyzers.planning.diagnose_rows), the
  others counted as fixed, so its figure is a lower bound; batch and tokens are those held at the end of
  the moment's step (the KV log's per-step figures), not the run's final count; on a hybrid cache a token
  costs the full layers and the sliding layers that hold more than their window at that moment (the
  prompt, at prefill), each kind at its own width (Gemma 4's sliding layers are narrower than its full
  ones);
* a sliding window is priced as the cache with every layer sliding at it would peak (its new K and V made
  before the old are freed, the prompt held whole until the first decode step), each KV figure beside its
  own moment's memory where the run tells it (the prompt's beside the prefill's, as `kvtrace plan
  --from-run RUN --cache sliding` prices it), never as a window that would grow the layers a hybrid model
  already slides;
* a static cache removes the dynamic cache's torch.cat copies but holds every position of max_cache_len
  from its first update: priced against the run's whole peak (analyzers.planning.diagnose_static_remedy),
  it raises a peak at the prefill; a run already on a StaticCache is told so (a beam search's transient is
  its reorder's, which a static cache makes too); where the run does not tell its call or timeline, the KV
  peak - KV final, from the KV log; a static cache, like a sliding window (which transformers'
  QuantizedCache refuses), keeps KV at the model's own dtype: on a quantized cache's run both are priced
  at it, and a static cache adds memory;
* a StaticCache's room is held from its first update, but the quantized caches that would replace it grow:
  they are priced at the run's final context, not at a prefill peak's few tokens; a run that is already a
  quantized cache is not offered its own kind, and the others are priced from what it stores;
* quantized KV keeps 8 bits an element (fp8), or is transformers' int4 QuantizedCache: int4 plus a scale
  and a zero-point per 64 elements in the model's dtype, the prompt quantized and the tokens after it at
  full precision until `residual_length` (128) are due (analyzers.planning.quantized_cache, as
  `kvtrace plan --cache quantized` counts it);
* offloading (transformers' OffloadedCache) keeps about two layers' KV on the device;
* KV in caches beside the model's (an assistant model's draft cache in assisted decoding, an earlier call's)
  is left as it is by a remedy that changes the model's cache (a window, fp8, int4, offloading:
  transformers builds the assistant's cache without the model's cache_implementation), held besides it;
  a shorter context shrinks a draft cache written during the call too, which holds the same sequence;
* `expandable_segments:True` lets the allocator grow segments in place instead of stranding free blocks:
  it recovers up to reserved - allocated; not priced when the moment is the level before the trace's first
  event, whose reserved memory the allocator had cached earlier (analyzers.trace_coverage).

Where the input lacks what a figure needs (a bare snapshot has no KV geometry), the remedy says what is
missing instead of inventing a number. Remedies fit the device: offloading KV to the CPU and the CUDA
allocator's expandable segments are offered only for CUDA devices.

The run's figures the prices need (the KV's dtype, the bytes a token of context costs, which layers slide)
are read from the report in analyzers.planning.run_kv_facts. The remedies that depend on what the cache
is (beam search's rows, layers that all slide, the int4 QuantizedCache) are priced in
analyzers.planning.diagnose_cache_remedies (beam search) and diagnose_window_remedies (windows); a model's
own preallocated buffers (Meta's cache_k/cache_v), whose KV follows neither the rows in use nor the tokens
written, in
analyzers.planning.diagnose_buffer_remedies; DeepSeek-V4's, whose cache runs as a DynamicCache only and
whose KV is not K and V per token, in analyzers.planning.diagnose_compressed_remedies. The smaller
batch's sentences are analyzers.planning.diagnose_batch_text's, the sliding window proposed to a cache
that keeps every token is priced in diagnose_window_remedies, and the allocator's expandable segments in
diagnose_fragments, beside the fragmentation it is aimed at; this module prices the rest and ranks them.
"""

from __future__ import annotations

import math
from dataclasses import replace

from analyzers.kv_kept import KeptStorages
from analyzers.planning.decode_step_end import DecodeStepEnd, fewer_rows_to_step_end
from analyzers.planning.diagnose_batch_text import fixed_beyond, smaller_batch_text, step_end_text
from analyzers.planning.diagnose_buffer_remedies import (
    PreallocatedBuffers,
    buffer_remedies,
    held_dtype,
    static_cache_context,
)
from analyzers.planning.diagnose_cache_remedies import at_batch_one, beam_search_remedies, fewer_rows
from analyzers.planning.diagnose_compressed_remedies import CompressedRun, compressed_remedies
from analyzers.planning.diagnose_fp8_window import fp8_over_context, own_window
from analyzers.planning.diagnose_fragments import (
    FRAGMENTS_REMEDY,
    allocator_remedies,
    priced_past_fragments,
    stranded_bytes,
)
from analyzers.planning.diagnose_prompt_remedies import context_remedy, prefill_remedies
from analyzers.planning.diagnose_quantized_remedies import (
    fp8_after_quantized,
    fp8_for_static,
    fp8_remedy,
    int4_remedy,
    layer_tokens_of,
    quantized_context,
    quantized_widening,
    static_cache_at_model_dtype,
)
from analyzers.planning.diagnose_static_remedy import (
    StaticCacheRun,
    already_static_remedy,
    static_cache_remedy,
)
from analyzers.planning.diagnose_window_remedies import (
    moment_bytes_per_token,
    sliding_window_remedy,
    windowed_remedies,
)
from analyzers.planning.diagnosis import (
    NO_KV,
    NO_KV_HELD,
    NO_KV_IN_RUN,
    Remedy,
    fits,
    no_geometry,
)
from analyzers.planning.grad_steps import GradHeld, no_grad_remedy
from analyzers.planning.kept_kv import kept_kv_remedy
from analyzers.planning.kept_outputs import KeptOutputs, kept_outputs_remedy
from analyzers.planning.run_kv_facts import DTYPE_BITS
from analyzers.units import human_bytes

__all__ = ["price_remedies"]

_OFFLOAD_LAYERS_ON_DEVICE = 2  # the layer computing and the one being prefetched


def price_remedies(
    d: dict[str, object], kv_bits: int | None, num_layers: int | None, on_cuda: bool = True
) -> list[Remedy]:
    """Price every remedy at the moment described by `d` (the Diagnosis fields computed so far), ranked.
    Where fragmentation caused the OOM (or may have: `fragmentation_possible`), those that free bytes are
    priced twice, against the shortfall and against it plus the bytes stranded in fragments (reserved but
    unallocated), which only the second can be sure of (analyzers.planning.diagnose_fragments)."""
    stranded = stranded_bytes(d)
    if not stranded:
        return _ranked(_priced(d, kv_bits, num_layers, on_cuda))
    need = d["shortfall_bytes"]
    assert isinstance(need, int)
    tight = _priced(d, kv_bits, num_layers, on_cuda)
    safe = _priced({**d, "shortfall_bytes": need + stranded}, kv_bits, num_layers, on_cuda)
    sure = d.get("fragmented") is True
    return _ranked(priced_past_fragments(safe, tight, need, stranded, sure), lead=FRAGMENTS_REMEDY)


def _priced(
    d: dict[str, object], kv_bits: int | None, num_layers: int | None, on_cuda: bool = True
) -> list[Remedy]:
    """Every remedy at the moment described by `d`, against its `shortfall_bytes`, unranked: the cache's
    and the allocator's, dropping the outputs a generate() call keeps for every step, and running the
    forwards without grad, and dropping what keeps the cache's replaced K/V storages."""
    out = _priced_cache(d, kv_bits, num_layers, on_cuda)
    kept, grad, need = d.get("kept_outputs"), d.get("grad_held"), d["shortfall_bytes"]
    assert need is None or isinstance(need, int)
    if isinstance(kept, KeptOutputs) and kept.held_bytes > 0:
        out.append(kept_outputs_remedy(kept, need))
    if isinstance(grad, GradHeld) and grad.activations_bytes + grad.kv_copies_bytes > 0:
        out.append(no_grad_remedy(grad, need))
    kept_kv = d.get("kept_kv")
    if isinstance(kept_kv, KeptStorages):
        out.append(kept_kv_remedy(kept_kv, need))
    return out


def _priced_cache(
    d: dict[str, object], kv_bits: int | None, num_layers: int | None, on_cuda: bool = True
) -> list[Remedy]:
    """The remedies of the KV cache, the batch, the context and the allocator, unranked."""
    kv = d["kv_bytes"]
    batch, tokens, need = d["batch"], d["tokens_held"], d["shortfall_bytes"]
    assert kv is None or isinstance(kv, int)
    assert batch is None or isinstance(batch, int)
    assert tokens is None or isinstance(tokens, int)
    assert need is None or isinstance(need, int)
    out: list[Remedy] = []
    unpriced = no_geometry(d)
    buffers = d.get("buffers")
    static = buffers if isinstance(buffers, PreallocatedBuffers) and buffers.kind == "static_cache" else None
    if kv and isinstance(buffers, PreallocatedBuffers) and static is None:
        # Preallocated module buffers: priced in their own settings (those live at the moment, over their
        # bytes and dtype then); no static cache to become
        held = min(kv, buffers.held_bytes) if buffers.held_bytes else kv
        dtype = held_dtype(buffers, held)
        bits = DTYPE_BITS.get(dtype, kv_bits) if dtype else kv_bits
        out += buffer_remedies(held, buffers, need, bits, on_cuda)
        out += allocator_remedies(d, need, on_cuda)
        return out

    beams = d.get("beams")
    beyond_weights = d.get("beyond_weights_bytes")
    assert beyond_weights is None or isinstance(beyond_weights, int)
    if kv and batch and isinstance(beams, int) and beams > 1:
        out += beam_search_remedies(kv, batch // beams, beams, need, beyond_weights)
    elif kv and batch:
        per_seq = kv / batch
        if need is None:
            target = batch - 1
            saved = round(per_seq) if target >= 1 else 0
            text = (
                f"Each sequence dropped from the batch of {batch} frees {human_bytes(per_seq)} of KV."
                if batch > 1
                else at_batch_one()
            )
        elif need <= 0:
            target = math.floor(batch * (kv - need) / kv)
            saved = 0
            text = f"Batch {batch} already fits; the KV alone would leave room up to batch {target}."
        else:
            acts = d.get("row_activation_bytes")
            acts = acts if isinstance(acts, int) else 0
            # The vocabulary-long vectors are the moment's, whatever the batch: out of what a row's share
            # of the memory beyond the weights prices ("estimate", "bound"), or it overstates what goes
            vectors = d.get("fixed_vector_bytes")
            vectors = vectors if isinstance(vectors, int) and beyond_weights else 0
            pool = beyond_weights - vectors if beyond_weights else beyond_weights
            target, saved, basis, kv_saved = fewer_rows(kv, batch, need, pool, acts)
            text = smaller_batch_text(target, batch, saved, basis, kv_saved, kv, need, pool, vectors)
            if basis == "rows":
                text += fixed_beyond(beyond_weights, kv, acts)
            end, moment = d.get("decode_step_end"), d.get("moment_bytes")
            if isinstance(end, DecodeStepEnd) and isinstance(moment, int) and 1 <= target < batch:
                # a prefill peak's batch: fewer rows can make a decode step's end the peak
                rows, falls = fewer_rows_to_step_end(end, moment, batch, target, saved, need)
                said = step_end_text(end, moment - need, batch, target, rows, falls, saved)
                if rows < target:
                    text = said
                elif falls < saved:
                    text += said
                target, saved = rows, falls
        if d.get("rows_are_beams"):  # how many per prompt, the log does not say
            text += (
                f" These {batch} cache rows are beam search's (prompts x num_beams): lower either, so that "
                f"their product is at most {max(target, 1)}."
            )
        out.append(Remedy("batch", target if target >= 1 else None, saved, fits(saved, need), text))
    else:
        out.append(Remedy("batch", None, None, None, f"Smaller batch: {unpriced}."))

    compressed, written, prompt = d.get("compressed"), d.get("tokens_written"), d.get("prompt_tokens")
    if isinstance(compressed, CompressedRun):  # DeepSeek-V4: no static, quantized or sliding cache to become
        if kv and batch and isinstance(written, int) and isinstance(prompt, int):
            out += compressed_remedies(compressed, kv, batch, prompt, written, need, num_layers, on_cuda)
        else:
            out.append(Remedy("context", None, None, None, f"Shorter context: {unpriced}."))
        out += allocator_remedies(d, need, on_cuda)
        return out

    # The KV in caches beside the main one (an assistant model's draft cache): the main model's cache
    # settings do not reach them, so a remedy that changes the cache prices the main one's KV alone
    other = d.get("other_cache_kv_bytes")
    others = other if isinstance(other, int) and kv and 0 < other < kv else 0
    own_kv = kv - others if kv else kv
    besides = _besides(others)
    if kv and tokens:
        # Bytes per position across the whole batch and all layers: the run's own figure at the end (its
        # storages over the tokens they hold), not the peak's, which counts transient copies and a sliding
        # cache's spare room as if they grew with every token.
        steady = d.get("bytes_per_token")
        per_token = steady * batch if isinstance(steady, int | float) and steady and batch else kv / tokens
        moment = moment_bytes_per_token(d, batch) if batch else None
        held_too = ""
        if moment is not None:  # sliding layers holding the prompt shrink with it
            per_token, following = moment
            held_too = (
                f"; its {following:,} sliding layers hold more than their window now"
                if following > 1
                else "; its sliding layer holds more than its window now"
            )
        drafts = d.get("other_cache_token_bytes")
        if isinstance(drafts, float) and drafts > 0:  # an assistant's draft cache holds the sequence too
            per_token += drafts
            held_too += (
                f"; {human_bytes(drafts)} of it in the assistant model's draft cache, which follows it"
            )
        holding, layers = layer_tokens_of(d, tokens)
        partial = len(holding) < layers  # a step stopped before its last layers held KV: a token costs all
        if partial:
            held_too += f"; every KV layer's, of which the step had reached {len(holding):,} of {layers:,}"
        # The window a shorter context proposes (`sliding_window_remedy`): the shortfall's tokens fewer, else
        # a quarter fewer
        cut = math.ceil(need / per_token) if need is not None and need > 0 else max(tokens // 4, 1)
        window = tokens - min(cut, tokens)
        # a quanto or HQQ QuantizedCache: the last tokens dropped are its residual's, at full precision
        quantized = quantized_context(d, tokens, need) if d.get("step_phase") != "prefill" else None
        if static is not None:  # a StaticCache: its bytes follow max_cache_len, not the tokens written
            out += static_cache_context(kv, static, need)
        elif d.get("windowed"):  # the cache already slides: its size follows the prompt, not the context
            out += windowed_remedies(kv, tokens, per_token, need, num_layers)
        else:
            if quantized is not None:
                context, saved, text = quantized
                out.append(
                    Remedy("context", context + 1 if context else None, saved, fits(saved, need), text)
                )
            elif partial and need is not None and need > 0 and math.ceil(need / per_token) >= tokens:
                # priced at every layer's KV, of which the moment holds a part
                fixed = d.get("cross_kv_bytes")
                own = kv - fixed if isinstance(fixed, int) else kv
                text = (
                    f"No shorter context fits: all {tokens:,} tokens of KV are only "
                    f"{human_bytes(per_token * tokens)} on every layer ({human_bytes(own)} at this moment, "
                    f"on the {len(holding):,} of {layers:,} KV layers the step had reached)."
                )
                out.append(Remedy("context", None, round(per_token * (tokens - 1)), False, text))
            else:  # named as `kvtrace plan --from-run --context` takes it, never below the prompt
                out.append(context_remedy(d, tokens, per_token, need, held_too))
            out += prefill_remedies(d, per_token, need, held_too)  # at a prefill: shorter prompt, chunks
            out.append(sliding_window_remedy(d, kv, tokens, window, need, num_layers, kv_bits, others))
    else:
        out.append(Remedy("context", None, None, None, f"Shorter context: {unpriced}."))
        out.append(Remedy("sliding_window", None, None, None, f"Sliding window: {unpriced}."))

    kv_peak, kv_final, run = d["kv_peak_bytes"], d["kv_final_bytes"], d.get("static_run")
    if quantized_widening(d, kv_bits) is not None:
        positions = run.positions if isinstance(run, StaticCacheRun) else None
        out.append(static_cache_at_model_dtype(d, kv, tokens, kv_bits, need, positions))
    elif static is not None and kv_peak:
        out.append(already_static_remedy(d, need))
    elif isinstance(run, StaticCacheRun) and (priced := static_cache_remedy(d, run, need)) is not None:
        out.append(priced)  # against the run's whole peak: its preallocated KV at every moment
    elif isinstance(kv_peak, int) and isinstance(kv_final, int) and kv_peak:
        churn = max(kv_peak - kv_final, 0)
        text = (
            f"A static cache (cache_implementation='static') writes in place, removing the "
            f"{human_bytes(churn)} transient a dynamic cache's torch.cat copies add at its KV peak."
            if churn
            else "No transient KV copies at the peak: the cache already writes in place (a static cache "
            "would not help)."
        )
        out.append(Remedy("static_cache", None, churn, fits(churn, need), text))
    else:
        why = NO_KV_IN_RUN if d.get("kv_logged") and kv_peak == 0 else NO_KV  # recorded, but no KV held
        out.append(Remedy("static_cache", None, None, None, f"Static cache: {why}."))

    if kv and kv_bits:
        packed = d.get("quantized_bits")
        packed = packed if isinstance(packed, int) else None
        if packed is not None and packed < 8:  # priced from what the int4 cache stores, not its last dtype
            out.append(fp8_after_quantized(d, kv, packed, need))
        elif packed is None and static is not None and kv_bits > 8:
            out.append(fp8_for_static(d, kv, kv_bits, static, need))
        elif packed is None and kv_bits > 8:  # an 8-bit cache already is what this remedy proposes
            assert own_kv is not None
            held_by = f"the model's cache holds at {kv_bits} bits" if others else f"held at {kv_bits} bits"
            if own_window(d):  # a QuantizedCache keeps every token: priced over the context, as plan does
                fp8_priced = fp8_over_context(d, own_kv, kv_bits, need)
            else:
                fp8_priced = fp8_remedy(d, own_kv, kv_bits, held_by, need)
            out.append(replace(fp8_priced, sentence=fp8_priced.sentence + besides))
        sliding = d.get("model_sliding_layers")
        if packed is not None and packed <= 4:
            pass  # the run's cache already is an int4 (or narrower) QuantizedCache: nothing to propose
        elif isinstance(sliding, int) and sliding:
            text = (
                f"int4 quantized cache: transformers' QuantizedCache takes models whose layers all keep full "
                f"attention, and this one has {sliding:,} sliding layer{'s' if sliding > 1 else ''} (it "
                "raises ValueError)."
            )
            out.append(Remedy("quantized_kv", 4, None, None, text))
        elif d.get("sliding_layers"):
            # The window was the cache's own (a sliding cache on a full-attention model): a QuantizedCache
            # takes the model, but keeps every token, which these windowed tokens held do not price
            text = (
                "int4 quantized cache: transformers' QuantizedCache keeps every token, where this run's "
                "cache kept a window the model's config does not give, so the tokens held here do not price "
                "it; `kvtrace plan --from-run RUN --cache quantized` does."
            )
            out.append(Remedy("quantized_kv", 4, None, None, text))
        else:
            int4 = int4_remedy(d, kv, kv_bits, need, preallocated=static)
            if others and int4.saved_bytes is not None:
                int4 = replace(int4, sentence=int4.sentence + besides)
            out.append(int4)
    else:
        if kv:
            why = "cannot be computed: the KV dtype is not recorded"
        else:
            why = NO_KV_HELD if d.get("kv_logged") else NO_KV
        out.append(Remedy("quantized_kv", None, None, None, f"Quantized KV: {why}."))

    if not on_cuda:
        pass  # the KV cache already lives in host memory: there is nowhere to offload it
    elif own_kv and num_layers and num_layers > _OFFLOAD_LAYERS_ON_DEVICE:
        saved = round(own_kv * (1 - _OFFLOAD_LAYERS_ON_DEVICE / num_layers))
        out.append(
            Remedy(
                "offloading",
                None,
                saved,
                fits(saved, need),
                f"Offloading the KV cache to CPU (cache_implementation='offloaded') keeps about "
                f"{_OFFLOAD_LAYERS_ON_DEVICE} of {num_layers} layers on the device: {human_bytes(saved)} "
                f"less, paid in PCIe transfers every step.{besides}",
            )
        )
    else:
        out.append(Remedy("offloading", None, None, None, f"Offloading: {unpriced}."))

    out += allocator_remedies(d, need, on_cuda)
    return out


def _besides(others: int) -> str:
    """What a remedy on the model's cache leaves as it is: the `others` bytes of KV in the caches beside it
    at the moment (an assistant model's draft cache), which transformers builds without the model's
    cache_implementation or cache_config (candidate_generator sets the assistant's to None)."""
    if not others:
        return ""
    return (
        f" The other {human_bytes(others)} of KV at this moment is in other caches (an assistant model's "
        "draft cache, an earlier call's), which the model's cache settings do not reach: left as it is."
    )


def _ranked(out: list[Remedy], lead: str | None = None) -> list[Remedy]:
    """Remedies that close the gap first, then by bytes bought; unpriceable ones last. `lead`: the kind that
    goes first among those that close it, the one aimed at what caused the OOM."""
    return sorted(
        out, key=lambda r: (r.saved_bytes is None, not r.fits, r.kind != lead, -(r.saved_bytes or 0))
    )
