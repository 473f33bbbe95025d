"""What a static cache's prefill holds over the cache's positions that a recorded run's prefill did not attend
over (`static_prefill_bytes`), for `kvtrace plan --from-run --cache static`: its attention mask over them,
K and V expanded to the query heads, and eager attention's scores. Whether sdpa makes any of it turns on
whether the run's prompts were padded, which the recorder tells once per generate() call
(analyzers.planning.run_padding); a run that does not tell is planned as padded, and said so
(`unknown_padding_note`). Pure arithmetic, no torch; a module of its own, beside recorded_growth, which
moves the run's measured peak and adds this on top.
"""

from __future__ import annotations

from analyzers.planning.plan_kv import cache_layout, kv_sizes
from analyzers.planning.plan_types import PlanRequest, RecordedPeak
from analyzers.planning.presets import dtype_bytes_for
from analyzers.units import human_bytes

__all__ = ["attended", "static_prefill_bytes", "unknown_padding_note"]


def static_prefill_bytes(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int, prompt: int
) -> int:
    """Bytes a static cache's prefill of `prompt` tokens holds over the cache's positions the run's prefill
    did not attend over (a static run's: beyond its own length; another's: beyond its prompt, over which
    its own prefill made all of the below, within its measured prefill: before, all of the positions were
    priced, and the tiny Llama, bf16, 8 rows, 20-token prompt, planned static from its eager dynamic run at
    its context 36, was 35.9% over the static recording, 9.0% after). Eager attention takes all of the
    cache's positions: its mask has a row of them a prompt token, K and V are expanded to the query heads
    (`repeat_kv`, where there are fewer KV heads), and it makes the scores and their float32 softmax (3
    copies of heads x prompt, at 4 bytes: a bound, as recorded_growth's `_attention_copies`), each in one
    layer at a time, added to the most the run held at its prefill wherever that was: an upper bound (the
    tiny Llama, 2 rows, 3-token prompt, context 12 to 206: +259,184 B where its recording held 212,104 B
    more). sdpa's prefill of unpadded prompts takes no mask and keeps K and V to the KV heads (transformers
    5.x `masking_utils._ignore_causal_mask_sdpa` skips the mask where every position past the prompt is the
    static cache's empty future, and sdpa_attention's `use_gqa_in_sdpa` then passes `enable_gqa`), and flash
    attention's neither: none. Padded prompts (`RecordedPeak.padded`; a run that does not tell is planned as
    padded, the safe side, and `unknown_padding_note` says so) make sdpa's prefill a bool mask over all of
    the cache's positions, a byte a prompt token, held across the layers (`sdpa_mask`); with a mask,
    `use_gqa_in_sdpa` is false on CUDA and CPU, so each layer expands K and V to the query heads over them
    (`repeat_kv`), and torch's sdpa turns the bool mask into one of the compute dtype (`aten::where`,
    measured on CPU), one layer at a time; no scores (sdpa's kernels do not hold them). The tiny Llama, fp32,
    2 rows, 20-token prompt half padded, planned static from its dynamic run at its context 36: 528 B below
    the static recording before (its mask beyond the prompt unpriced), 2.7% above after, the layer's copies
    priced beside the run's prefill peak, which did not hold them. A run that does not say its attention is
    priced as eager. 0 for another cache or where the plan's is no longer."""
    eager = rec.attn_implementation in ("eager", None)
    padded_sdpa = rec.attn_implementation == "sdpa" and rec.padded is not False
    if req.cache != "static" or not (eager or padded_sdpa):
        return 0
    # another cache's prefill attended over its prompt's positions (none where the run does not say it)
    held = attended(run, rec.context) if run.cache == "static" else rec.prompt or 0
    more = attended(req, context) - held
    if more <= 0:
        return 0
    geom = req.geometry
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    side = max(max(k, v) for k, v in geom.layer_kv_widths)  # one layer's K (or V) elements a token
    expanded = geom.num_attention_heads * max(geom.head_dim, geom.global_head_dim or 0)
    expansions = 2 * expanded * compute if expanded > side else 0
    if not eager:  # sdpa's: a bool a prompt token and its compute-dtype copy, the expansions, no scores
        return batch * more * (prompt * (1 + compute) + expansions)
    return batch * more * (prompt * compute + expansions + 3 * geom.num_attention_heads * prompt * 4)


def attended(req: PlanRequest, context: int) -> int:
    """Tokens a step attends over, which the activations beside the KV follow: the context, or a window
    when every layer keeps one."""
    whole, _, window = cache_layout(req)
    return context if whole or window is None else min(context, window + 1)


def unknown_padding_note(req: PlanRequest, run: PlanRequest) -> str | None:
    """Why a static plan of an sdpa run may be priced high: the run does not tell whether its prompts were
    padded (`RecordedPeak.padded` None), so its static prefill is priced as padded (`static_prefill_bytes`),
    the side that never plans below a padded batch's recording; unpadded prompts make none of it. None where
    nothing turns on it. `run`: the recorded run as a request (recorded_growth's `_run_request`)."""
    rec = req.recorded
    if rec is None or rec.padded is not None or rec.attn_implementation != "sdpa":
        return None
    prompt = kv_sizes(req, req.batch, req.context).prompt
    priced = static_prefill_bytes(req, run, rec, req.batch, req.context, prompt)
    if not priced:
        return None
    return (
        "the run does not tell whether its generate() call's prompts were padded (its attention_mask was "
        "freed before the recording ended, it passed none, or kvtrace did not note it then): the static "
        f"prefill is priced as padded, {human_bytes(priced)} for sdpa's mask over the cache, its copy in the "
        "compute dtype and K and V expanded to the query heads, which unpadded prompts never make; keep the "
        "mask alive until the recording's block ends to have it told"
    )
