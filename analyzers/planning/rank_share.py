"""A tensor-parallel rank's model, for `kvtrace plan --from-run` on one rank of a run group.

The run's config is the whole model's, but a tensor-parallel rank's cache holds a share of its KV heads
(and its attention a share of the query heads): planned from the config, one rank's plan would hold every
rank's KV, twice the recording on 2 ranks. A plain plan is one GPU's, so a rank is planned as the shard it
recorded: its KV heads as its cache tensors hold them (what `kvtrace report` counts a rank's bytes per token
by, `heads_held_by`), its query heads in the same proportion. A rank holding all the KV heads (data
parallel, or tensor parallel over more ranks than KV heads, each rank a copy) is planned as it is. Its
weights at another dtype are its measured shard's, re-stored (`rank_weights_at`): the config's geometry
would weigh the whole model's MLP, embeddings and lm_head, which tensor parallelism splits as well.
"""

from __future__ import annotations

from dataclasses import replace

from analyzers.kv_events import is_kv_data
from analyzers.kv_log_figures import CacheFigures
from analyzers.planning.param_count import buffer_bytes, buffers_as_recorded
from analyzers.planning.presets import DTYPE_BITS, ModelGeometry, dtype_bytes_for
from analyzers.run_kv import heads_held_by
from kvtrace.format import Run

__all__ = ["rank_geometry", "rank_weights_at"]


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _heads(count: int, kind: str) -> str:
    return f"{count} {kind} head{'s' if count != 1 else ''}"


def rank_geometry(run: Run, main: CacheFigures, geometry: ModelGeometry, notes: list[str]) -> ModelGeometry:
    """`geometry` cut to the KV heads a rank's main cache holds, where the run is one rank of several whose
    cache holds a 1/N share of the model's KV heads (a note says so); else `geometry` itself. Not for
    multi-head latent attention (one latent, whatever the heads) nor a model whose full layers have heads
    of their own (Gemma 4), whose share the tensors do not tell alone."""
    world_size = _count(run.manifest.get("world_size"))
    if world_size is None or world_size < 2 or geometry.mla is not None or geometry.global_kv_heads:
        return geometry
    data = [e for e in run.kv_events if e.cache == main.cache and is_kv_data(e) and len(e.shape or ()) == 4]
    if not data or data[-1].shape[-1] != geometry.head_dim:
        return geometry  # not heads x head_dim wide as the config says: no share to read
    held = heads_held_by(data[-1])
    heads = geometry.cached_kv_heads or geometry.num_kv_heads
    if held is None or not 0 < held < heads or heads % held:
        return geometry
    shards = heads // held
    if geometry.num_kv_heads % shards:
        return geometry
    query = geometry.num_attention_heads
    query = query // shards if query % shards == 0 else query
    rank = run.manifest.get("rank")
    who = f"rank {rank} of {world_size}" if isinstance(rank, int) and not isinstance(rank, bool) else "a rank"
    notes.append(
        f"{run.path.name} is {who} (tensor parallel): its cache holds {held} of the model's {heads} KV "
        f"heads, so the plan is this rank's, with {_heads(held, 'KV')} and {_heads(query, 'query')}, and "
        f"the weights its shard; its {shards} tensor-parallel shards together hold {shards}x its KV "
        "(`kvtrace report` on the group)"
    )
    return replace(
        geometry,
        num_kv_heads=geometry.num_kv_heads // shards,
        num_attention_heads=query,
        cached_kv_heads=geometry.cached_kv_heads // shards if geometry.cached_kv_heads else None,
    )


def rank_weights_at(
    measured: int,
    geometry: ModelGeometry,
    run_dtype: str | None,
    dtype: str,
    fp32_measured: int | None = None,
) -> int | None:
    """A rank's weights stored in `dtype`: the parameters it measured in `run_dtype`, re-stored, and the
    buffers its model builds (rotary inv_freq: `buffer_bytes`), which every rank holds whole. Those buffers
    are as the run recorded them: transformers keeps them at fp32 whatever `torch_dtype=` says, but a model
    cast by `.to(torch.bfloat16)` casts them too, and they follow the weights to `dtype`. `fp32_measured`,
    the measured bytes recorded in float32, tells the two apart in a run of another dtype (None: not
    known, kept at fp32; a fp32 run's are taken as kept). None where the run's dtype is not known or its
    parameters are no whole number of that dtype's elements (not stored as the run says): no share to
    scale."""
    bits = DTYPE_BITS.get(run_dtype or "")
    geometry = buffers_as_recorded(geometry, run_dtype, fp32_measured)
    parameters = measured - buffer_bytes(geometry, run_dtype) if bits and run_dtype else -1
    if bits is None or parameters < 0 or (parameters * 8) % bits:
        return None
    return dtype_bytes_for(dtype, parameters * 8 // bits) + buffer_bytes(geometry, dtype)
