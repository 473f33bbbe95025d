"""A recorded run's activations moved to the compute dtype a plan asks for (`kvtrace plan --from-run RUN
--dtype fp32` of a bf16 run). Pure, torch-free.

Why: the weights and KV of such a plan follow the new dtype by arithmetic, but its activations were
measured in the run's: kept as they were, the plan of a bf16 tiny Llama at fp32 said 93,116,636 B where an
fp32 recording of the same batch and context peaked at 95,168,732 (-2.2%). Not all of them grow: generate()
upcasts the logits it keeps to float32 and its logits processors make int64 and bool vectors over the
vocabulary, whatever the model computes in; at the demo's decode peak those are 21.7 of its 23.75 MiB, and
the model's own bf16 logits (1.96 MiB) are what doubled. So the bytes told apart as such
(`RecordedPeak.dtype_fixed_bytes`, run_peak's sizes) stay, and the rest grows by the ratio of the element
sizes. A narrower dtype keeps them as measured, an upper bound: those same float32 tensors do not shrink.
"""

from __future__ import annotations

import math
from dataclasses import replace

from analyzers.planning.plan_types import RecordedPeak
from analyzers.planning.presets import dtype_bytes_for

__all__ = ["in_compute_dtype"]


def in_compute_dtype(rec: RecordedPeak, dtype: str) -> RecordedPeak:
    """`rec` as a run computing in `dtype` would have measured it: its activations at the peak, at its
    prefill and at its KV peak grown by `dtype`'s element bytes over the run's, less the ones that keep
    their size (`dtype_fixed_bytes`), its peak by as much; `rec` itself for the run's own dtype, a narrower
    one, or a run whose dtype is not known. The batch-first share (`row_activation_bytes`) is kept: fewer
    rows then free no more than measured, an upper bound."""
    if rec.compute_dtype is None or rec.compute_dtype == dtype:
        return rec
    factor = dtype_bytes_for(dtype, 1) / dtype_bytes_for(rec.compute_dtype, 1)
    if factor <= 1:
        return rec

    def grown(activations: int, fixed: int | None) -> int:
        kept = min(fixed or 0, activations)
        return kept + math.ceil((activations - kept) * factor)

    activations = grown(rec.activations_bytes, rec.dtype_fixed_bytes)
    prefill, update = rec.prefill_activations_bytes, rec.update_activations_bytes
    attention = rec.prefill_attention_bytes  # a layer's tensors, none of the vocabulary's: all grow
    # what a token adds grows with the dtype too, as if none were the int64 ids: an upper bound
    context, update_context = rec.context_token_bytes, rec.update_context_token_bytes
    last_update, last_context = rec.last_update_activations_bytes, rec.last_update_context_token_bytes
    decode_context = rec.decode_context_token_bytes
    prompt_bytes = rec.prefill_prompt_bytes  # as if none were the int64 ids or float32: an upper bound
    return replace(
        rec,
        peak_bytes=rec.peak_bytes + activations - rec.activations_bytes,
        activations_bytes=activations,
        prefill_activations_bytes=None if prefill is None else grown(prefill, rec.prefill_dtype_fixed_bytes),
        update_activations_bytes=None if update is None else grown(update, rec.update_dtype_fixed_bytes),
        prefill_attention_bytes=None if attention is None else grown(attention, None),
        prefill_prompt_bytes=None if prompt_bytes is None else math.ceil(prompt_bytes * factor),
        prefill_moments=None,  # not told apart by dtype: `prefill_prompt_bytes`' bound stands
        prefill_peak_moment=None,
        context_token_bytes=None if context is None else math.ceil(context * factor),
        update_context_token_bytes=None if update_context is None else math.ceil(update_context * factor),
        # the last update's as the KV peak's: the same step's tensors, a layer later
        last_update_activations_bytes=(
            None if last_update is None else grown(last_update, rec.update_dtype_fixed_bytes)
        ),
        last_update_context_token_bytes=None if last_context is None else math.ceil(last_context * factor),
        decode_context_token_bytes=None if decode_context is None else math.ceil(decode_context * factor),
    )
