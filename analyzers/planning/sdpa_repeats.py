"""Which transformers' sdpa copies K and V at a static cache's decode steps, for `kvtrace plan --from-run`
(analyzers.planning.recorded_growth prices the copies): transformers before 5.23 expand them to the query
heads wherever a step has a mask, and the run's manifest says which transformers it ran under. Pure, no
torch.
"""

from __future__ import annotations

from analyzers.planning.plan_types import PREALLOCATED_CACHES, PlanRequest, RecordedPeak
from analyzers.planning.presets import dtype_bytes_for
from kvtrace.geometry import major_minor

__all__ = ["SDPA_PACKS_GQA_SINCE", "sdpa_copies_unmeasured", "sdpa_repeats_kv"]

# The first transformers whose sdpa runs a one-token query on the KV heads as they are (`pack_gqa`) rather
# than expanding K and V to the query heads once the step has a mask (5.22.2 and before: `repeat_kv`)
SDPA_PACKS_GQA_SINCE = (5, 23)


def sdpa_repeats_kv(cache: str, rec: RecordedPeak) -> bool:
    """Whether a decode step on `cache` copies every layer's K and V, in turn, expanded to the query heads
    over all of the cache's positions, under the attention and transformers the run was recorded with: sdpa
    before 5.23 hands the kernel K and V as `repeat_kv` made them wherever the step has a mask, and a static
    cache's decode step always has one (its positions beyond the tokens written are masked), where a
    dynamic cache's unpadded step has none. The tiny Llama (bf16, 8 rows, 20-token prompt, 300 new tokens)
    planned static from its dynamic run under 5.17 said 1,227,256 B where the static recording peaked at
    1,726,948 B, 29% under: the two copies, 653,312 B, at its last steps. A run that does not say its
    transformers is priced with them (an upper bound)."""
    if cache not in PREALLOCATED_CACHES or rec.attn_implementation != "sdpa":
        return False
    version = major_minor(rec.transformers_version)
    return version is None or version < SDPA_PACKS_GQA_SINCE


def sdpa_copies_unmeasured(req: PlanRequest, rec: RecordedPeak) -> bool:
    """Whether the plan's cache makes `sdpa_repeats_kv`'s copies and the run's peak does not hold them. A
    run of such a cache whose peak held a layer's copies counts them among the bytes a row and token adds
    (`context_token_bytes`, K and V at the query heads' width), which grow with the positions attended:
    counted again, the tiny Llama's static run under 5.17 at context 320 planned at 620 was 45% over its
    recording (0.4% without). One that peaked elsewhere (its prefill, a step's end holding the logits)
    never measured them: planned at a longer context without them, the tiny Llama's static run at context
    12 (fp32, 2 rows) planned at 206 was 16.5% under its recording."""
    if not sdpa_repeats_kv(req.cache, rec):
        return False
    if not sdpa_repeats_kv(rec.cache, rec) or rec.phase != "decode":
        return True
    geom = req.geometry
    expanded = geom.num_attention_heads * max(geom.head_dim, geom.global_head_dim or 0)
    compute = dtype_bytes_for(rec.compute_dtype or req.effective_compute_dtype, 1)
    return (rec.context_token_bytes or 0) < 2 * expanded * compute
