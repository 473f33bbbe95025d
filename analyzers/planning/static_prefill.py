"""What a plan's prefill holds in attention's tensors that grow with the prompt times the positions it
attends over, beyond what the recorded run's prefill made (`prefill_attention_bytes`), for `kvtrace plan
--from-run`: a static cache's over the cache's positions the run's prefill did not attend over
(`static_prefill_bytes`: its mask, K and V expanded to the query heads, eager's scores), another cache's
over a longer prompt (`dynamic_prefill_bytes`: its mask and eager's scores, prompt x prompt). Whether sdpa
makes any of it turns on whether the run's prompts were padded, which the recorder tells once per
generate() call (analyzers.planning.run_padding); a run that does not tell is planned as padded, and said
so (`unknown_padding_note`). Pure arithmetic, no torch; a module of its own, beside recorded_growth, which
moves the run's measured peak (its prefill's in proportion to the prompt) and adds this on top.
"""

from __future__ import annotations

from analyzers.planning.plan_kv import cache_layout, kv_sizes
from analyzers.planning.plan_types import PREALLOCATED_CACHES, PlanRequest, RecordedPeak
from analyzers.planning.presets import dtype_bytes_for
from analyzers.units import human_bytes

__all__ = [
    "attended",
    "dynamic_prefill_bytes",
    "eager_pair_bytes",
    "eager_pair_sizes",
    "prefill_attention_bytes",
    "static_attention_bytes",
    "static_attention_parts",
    "static_prefill_beside",
    "static_prefill_bytes",
    "static_prefill_parts",
    "unknown_padding_note",
    "window_mask_sizes",
]


def prefill_attention_bytes(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int, prompt: int
) -> int:
    """Bytes the plan's prefill of `prompt` tokens holds in attention's tensors over the positions it attends
    over beyond what the run's measured prefill, grown in proportion to the prompt, holds: a static cache's
    (`static_prefill_bytes`), another's that fills as it goes (`dynamic_prefill_bytes`); none for a static
    sliding cache."""
    if req.cache == "static":
        return static_prefill_bytes(req, run, rec, batch, context, prompt)
    if req.cache in PREALLOCATED_CACHES:
        return 0
    return dynamic_prefill_bytes(req, run, rec, batch, prompt)


def dynamic_prefill_bytes(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, prompt: int
) -> int:
    """Bytes a prefill of `prompt` tokens on a cache that fills as it goes holds in tensors of prompt x
    prompt a row, beyond the run's: its prefill attends over its prompt's positions (a static run's, over
    its cache's), and its measured activations, grown in proportion to the prompt, hold those tensors over
    that many positions for each of the plan's prompt tokens; the positions beyond are priced here (the
    linear ones, K and V expanded, grow with the prompt within the measured prefill). Eager attention holds
    its mask (an element of the compute dtype a pair, across the layers) and one layer's scores
    (`_score_bytes` a head and pair); sdpa's, where the prompts are padded, its bool mask across the layers
    and its copy in the compute dtype, a layer at a time (static_prefill_bytes' reading of transformers).
    Before, the whole prefill grew in proportion to the prompt: a Llama of 4 layers and 4 heads, fp32,
    eager, planned at a 1024-token prompt from a 64-token run said 5.98 MB where the recording peaked at
    41.37 MB (-85.6%; 41.37 MB after, +660 B); sdpa with padded prompts, 2 rows, planned at 1536 from 256,
    14.76 MB for 34.67 (-57.4%; 34.43 after, -0.7%: on a CPU torch's flash kernel keeps per-thread blocks
    that step up at a 768-token prompt, unpriced). A run that does not tell its padding is planned as
    padded beyond its prompt, as `static_prefill_bytes` plans it, and said so (`unknown_padding_note`).
    Where the run's prefill moments tell eager's tensors apart, the plan grows them within their own moment
    instead (recorded_terms' `pairs_squared`) and does not add this."""
    eager = rec.attn_implementation in ("eager", None)
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    if rec.attn_implementation == "sdpa" and rec.padded is False:
        return _window_mask_bytes(req, rec, batch, prompt, compute)
    if not eager and rec.attn_implementation != "sdpa":
        return 0
    pair = eager_pair_bytes(req.geometry.num_attention_heads, compute) if eager else 1 + compute
    held = attended(run, rec.context) if run.cache == "static" else rec.prompt or 0
    return batch * max(prompt - held, 0) * prompt * pair


def _window_mask_bytes(req: PlanRequest, rec: RecordedPeak, batch: int, prompt: int, compute: int) -> int:
    """Bytes an unpadded sdpa prefill of `prompt` tokens holds for its model's sliding window where the run's
    prompt was shorter than the window and the plan's reaches it: transformers then makes the window's bool
    mask (held across the layers) and a sliding layer's sdpa its copy in the compute dtype for every row and
    K and V expanded to the query heads (a mask turns `enable_gqa` off), none of which the run made. Added
    to the most the run's prefill held, grown, wherever that was: an upper bound (where a run's prompt
    reached the window, its moments tell the mask apart and grow it with the prompt squared, run_moments'
    `window_mask_sizes`). Before, none: the tiny Mistral (a window of 128, 2 rows) planned from a 127-token
    prompt at 192 was 43,000 B under its recording beside the CPU kernel's blocks."""
    window = req.geometry.sliding_window
    if window is None or not req.geometry.windowed_layers or prompt < window or (rec.prompt or 0) >= window:
        return 0
    return prompt * prompt + batch * prompt * (prompt * compute + _expansion_bytes(req, compute))


def eager_pair_bytes(heads: int, compute: int) -> int:
    """Bytes eager attention's prefill holds a row and (query, key) pair at its most: its mask in the
    compute dtype, held across the layers, and one layer's scores (`_score_bytes` a head; the layer
    before's are freed by then, measured)."""
    return compute + heads * _score_bytes(compute)


def eager_pair_sizes(rows: int, prompt: int, heads: int, compute: int) -> set[int]:
    """The sizes of eager attention's prefill tensors over `prompt` x `prompt` a row (transformers 5.x
    `eager_mask`, `eager_attention_forward`), as the allocator reports them: the bool mask it builds first
    and its copy in the compute dtype (a head for all), and each head's scores in the compute dtype and in
    float32 (their cast, their softmax); each also as the CUDA caching allocator rounds it (512 B blocks)."""
    pairs = rows * prompt * prompt
    exact = {pairs, pairs * compute, pairs * heads * compute, pairs * heads * 4}
    return exact | {-(-size // _CUDA_BLOCK) * _CUDA_BLOCK for size in exact}


def window_mask_sizes(rows: int, prompt: int, compute: int) -> set[int]:
    """The sizes of the tensors over `prompt` x `prompt` an sdpa prefill makes for a sliding window the
    prompt reaches (transformers 5.x `sdpa_mask`, torch's sdpa), as the allocator reports them: the bool
    mask, one for all rows (unpadded) or a row each (padded), and the copy in the compute dtype torch's sdpa
    makes of it, a row each; each also as the CUDA caching allocator rounds it (512 B blocks)."""
    pairs = rows * prompt * prompt
    exact = {prompt * prompt, pairs, pairs * compute}
    return exact | {-(-size // _CUDA_BLOCK) * _CUDA_BLOCK for size in exact}


_CUDA_BLOCK = 512  # c10's kMinBlockSize: a CUDA allocation is reported rounded up to a multiple of it


def _score_bytes(compute: int) -> int:
    """Bytes one head's eager scores hold a (query, key) pair at their most in a layer: the masked scores
    in the compute dtype, their float32 cast (none from float32) and the float32 softmax of it
    (`eager_attention_forward`'s `softmax(..., dtype=float32)`; 8 in float32, 10 in bf16, measured)."""
    return compute + (4 if compute != 4 else 0) + 4


def _expansion_bytes(req: PlanRequest, compute: int) -> int:
    """Bytes one layer's K and V expanded to the query heads (`repeat_kv`) hold a token and row, where
    there are fewer KV heads than query heads (0 otherwise)."""
    geom = req.geometry
    side = max(max(k, v) for k, v in geom.layer_kv_widths)  # one layer's K (or V) elements a token
    expanded = geom.num_attention_heads * max(geom.head_dim, geom.global_head_dim or 0)
    return 2 * expanded * compute if expanded > side else 0


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
    return sum(static_prefill_parts(req, run, rec, batch, context, prompt))


def static_prefill_parts(
    req: PlanRequest, run: PlanRequest, rec: RecordedPeak, batch: int, context: int, prompt: int
) -> tuple[int, int]:
    """`static_prefill_bytes` as `static_attention_parts` splits it: (held across the layers, made in the
    attending layer). The cache's positions are its max_cache_len, the context less the last new token
    (never fed back): a static run's expanded K and V and its mask are over those, one fewer than the
    context, which was priced before."""
    eager = rec.attn_implementation in ("eager", None)
    padded_sdpa = rec.attn_implementation == "sdpa" and rec.padded is not False
    if req.cache != "static" or not (eager or padded_sdpa):
        return 0, 0
    # another cache's prefill attended over its prompt's positions (none where the run does not say it)
    held = attended(run, rec.context) if run.cache == "static" else (rec.prompt or 0) + 1
    more = attended(req, context) - held
    if more <= 0:
        return 0, 0
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    heads = req.geometry.num_attention_heads
    expansions = _expansion_bytes(req, compute)
    key_bytes = (rec.prefill_attention_key_bytes or 0) if run.cache != "static" else 0
    return static_attention_parts(batch, more, prompt, compute, expansions, heads, eager, key_bytes)


def static_attention_bytes(
    rows: int, more: int, prompt: int, compute: int, expansions: int, heads: int, eager: bool
) -> int:
    """`static_attention_parts`, both together: what a static prefill holds at its most beyond the run's
    attention (`unknown_padding_note`'s figure)."""
    return sum(static_attention_parts(rows, more, prompt, compute, expansions, heads, eager))


def static_attention_parts(
    rows: int,
    more: int,
    prompt: int,
    compute: int,
    expansions: int,
    heads: int,
    eager: bool,
    key_bytes: int = 0,
) -> tuple[int, int]:
    """`static_prefill_bytes`' arithmetic over `more` positions beyond those the run's prefill attended
    over, `rows` x `prompt` tokens, `compute` bytes an element, `expansions` one layer's K and V expanded to
    the query heads a token and row, as (held across the layers, made in the attending layer alone): sdpa's
    (padded) bool mask, a byte a prompt token, lives through the model's forward, its compute-dtype copy
    (`aten::where`), the expansions and, on a CPU, the flash kernel's per-thread blocks (`key_bytes` a
    position: analyzers.planning.attention_moment) while a layer attends; eager's mask in the compute dtype
    across the layers, its expansions and its scores at their most (`_score_bytes` a head and pair: the
    scores, their float32 cast, the softmax) in the layer. Before, the scores were 3 float32 copies, 12
    bytes where bf16 holds 10: the tiny Llama (bf16, 8 rows, 20-token prompt, 16 new tokens) planned static
    from its eager dynamic run 19,200 B over the static recording, now exactly it. Shared with `kvtrace
    diagnose`'s static cache remedy (analyzers.planning.diagnose_static_remedy), which `static_prefill_beside`
    puts beside the same moments."""
    if more <= 0:
        return 0, 0
    if not eager:
        return rows * more * prompt, rows * more * (prompt * compute + expansions) + key_bytes * more
    return rows * more * prompt * compute, rows * more * (expansions + heads * prompt * _score_bytes(compute))


def static_prefill_beside(prefill: int, attention: int | None, across: int, in_layer: int) -> int:
    """The most a static cache's prefill holds beside its weights and KV, from a run's prefill on another
    cache: the run's prefill most (`prefill`: its logits at the step's end, a layer's rotary or MLP) with the
    mask held across the layers (`across`), or the run's last layer's attention (`attention`:
    analyzers.planning.attention_moment), every layer's KV allocated by then, with that and what the layer
    makes over the cache's positions (`in_layer`), the larger. Not told where the run attended (None), the
    layer's go beside the prefill's most: an upper bound. Before, they always did: the demo's Llama (8
    rows, 20-token padded prompt, 64 new tokens, sdpa) was priced at 122.29 MiB, its recording 111.87 MiB,
    its float32 logits beside its last layer's expanded K and V, never live together. `kvtrace plan
    --from-run --cache static` and `kvtrace diagnose`'s static cache remedy both price it here."""
    at_attention = (prefill if attention is None else attention) + in_layer
    return max(prefill, at_attention) + across


def attended(req: PlanRequest, context: int) -> int:
    """Tokens a step attends over, which the activations beside the KV follow: the context, or a window
    when every layer keeps one."""
    whole, _, window = cache_layout(req)
    return context if whole or window is None else min(context, window + 1)


def unknown_padding_note(req: PlanRequest, run: PlanRequest) -> str | None:
    """Why a plan of an sdpa run may be priced high: the run does not tell whether its prompts were padded
    (`RecordedPeak.padded` None), so its prefill beyond the run's is priced as padded
    (`prefill_attention_bytes`), the side that never plans below a padded batch's recording; unpadded
    prompts make none of it. None where nothing turns on it. `run`: the recorded run as a request
    (recorded_growth's `_run_request`)."""
    rec = req.recorded
    if rec is None or rec.padded is not None or rec.attn_implementation != "sdpa":
        return None
    prompt = kv_sizes(req, req.batch, req.context).prompt
    priced = prefill_attention_bytes(req, run, rec, req.batch, req.context, prompt)
    if not priced:
        return None
    static = req.cache == "static"
    return (
        "the run does not tell whether its generate() call's prompts were padded (its attention_mask was "
        "freed before the recording ended, it passed none, or kvtrace did not note it then): the "
        f"{'static ' if static else ''}prefill is priced as padded, {human_bytes(priced)} for sdpa's mask "
        f"over the {'cache' if static else 'prompt'}, its copy in the compute dtype"
        f"{' and K and V expanded to the query heads' if static else ''}, which unpadded prompts never make; "
        "keep the mask alive until the recording's block ends to have it told"
    )


def unpadded_prompts_note(req: PlanRequest) -> str | None:
    """What padded prompts would add to a plan of several rows from an sdpa run whose prompts were not
    padded (`RecordedPeak.padded` False), which the plan assumes of its own: their prefill makes sdpa's
    bool mask over the positions it attends over (the prompt's; a static cache's, all of its) and its copy
    in the compute dtype, and expands K and V to the query heads (`static_prefill_bytes`' reading of
    transformers), none of which the run measured. None for one row (nothing to pad) or other attention."""
    rec = req.recorded
    if rec is None or rec.padded is not False or rec.attn_implementation != "sdpa" or req.batch <= 1:
        return None
    if req.cache in PREALLOCATED_CACHES and req.cache != "static":
        return None
    prompt = kv_sizes(req, req.batch, req.context).prompt
    positions = attended(req, req.context) if req.cache == "static" else prompt
    compute = dtype_bytes_for(req.effective_compute_dtype, 1)
    padded = req.batch * positions * (prompt * (1 + compute) + _expansion_bytes(req, compute))
    return (
        f"the plan assumes its {req.batch} prompts are not padded, as the run's were not: padded ones "
        f"(an attention_mask with zeros, prompts of unequal lengths) add up to {human_bytes(padded)} at the "
        "prefill, sdpa's mask over the attended positions, its copy in the compute dtype and K and V "
        "expanded to the query heads; record a run with padded prompts to plan them"
    )
