"""A run's KV figures from its KV log: the main cache's tokens, rows and bytes per token (measured and by
the arithmetic), every cache's figures, the evictions, and the notes they bring.

Apart from `analyzers.summary` so that a report on a snapshot or a Chrome trace, which has no KV log, imports
none of the KV-log analyzers (`kv_log`, `caches`, `kv_views`, `kv_widths`): on a small snapshot the report's
time is mostly start-up (issue 11). `summarize` imports this module for run directories only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from analyzers.caches import (
    cache_roles,
    cache_summaries,
    caches_note,
    cross_attention_parts,
    main_cache,
    measured_bytes_per_token,
    model_caches,
    model_kv_layers,
    module_cache_names,
)
from analyzers.kv_events import SEQ_MAJOR_PARTS, event_rows, is_kv_data
from analyzers.kv_views import tracked_length_note
from analyzers.kv_widths import global_width, kind_token_bytes, window_storage_note

if TYPE_CHECKING:
    from analyzers.kv_log_figures import KvLogAnalysis
    from analyzers.summary import KvSummary
    from kvtrace.format import Run

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "int8": 1}


def add_log_figures(
    kv: KvSummary,
    run: Run,
    kv_log: KvLogAnalysis | None,
    manifest: dict[str, Any],
    geometry: dict[str, Any] | None,
) -> list[str]:
    """Fill `kv` with what the run's KV events and log say beyond the log's totals (`summary._kv_from_log`),
    and return the notes on them, in the report's order: the caches held, a tracked tensor's layout,
    tracked tensors' lengths."""
    held_note = layout_note = length_note = None
    if run.kv_events and kv_log is not None and kv_log.caches:
        data_events = [e for e in run.kv_events if is_kv_data(e) and e.event != "freed" and e.shape]
        given = model_caches(manifest)
        roles = cache_roles(manifest)
        main = main_cache(kv_log.caches, geometry, given, roles)
        data_events = [e for e in data_events if e.cache == main.cache] or data_events
        if data_events:
            last = data_events[-1]
            # A module cache whose forward does not say where it writes (no `start_pos`) logs 0 tokens:
            # unknown (the manifest's warnings say why), not a cache that holds none.
            unknown = not main.tokens and all(e.source == "module" for e in data_events)
            kv.tokens_held = None if unknown else main.tokens
            # Its rows are those its input said (logged as `rows` then, all of the tensor's included), else
            # unknown: a buffer's first dim is its capacity, not the batch
            kv.batch = (last.rows or None) if unknown else event_rows(last)
            follows = _shapes_follow(geometry, data_events)
            expected = (
                _expected_bytes_per_token(geometry, last.dtype, heads_held_by(last))
                if follows and _has_kv_geometry(geometry)
                # the tensors' own arithmetic: a model with no Hugging Face config (a hand-written decoder
                # whose KV comes through kvtrace.track), or multi-head latent attention's widths
                else _bytes_per_token_of_shapes(data_events, model_kv_layers(geometry))
            )
            kv.bytes_per_token_expected = (
                expected + _indexer_bytes_per_token(run.kv_events, main.cache, model_kv_layers(geometry))
                if expected is not None
                else None
            )
            if follows:
                kv.rank_heads = _rank_heads(manifest, geometry, last)
            if kv.tokens_held and kv.batch:
                kv.token_rows = kv.tokens_held * kv.batch
            if main.capacity_rows and main.capacity_tokens:
                # Buffers allocated for max_batch_size x max_seq_len: a slot's bytes, however few are written
                kv.capacity_rows, kv.capacity_tokens = main.capacity_rows, main.capacity_tokens
                kv.capacity_of = main.capacity_of
            # none when the cache was let go before the end (another model's ran after it): nothing held
            kv.bytes_per_token_measured = measured_bytes_per_token(main, kv.tokens_held, kv.batch)
            layout_note = _layout_note(geometry, last)
            length_note = tracked_length_note(data_events, kv.tokens_held)
        parts = cross_attention_parts(manifest)
        modules = module_cache_names(manifest)
        kv.caches = cache_summaries(kv_log.caches, main.cache, geometry, roles, parts, modules)
        kv.main_cache = main.cache
        held_note = caches_note(kv.caches, given)
    if any(e.event in ("evicted", "masked") for e in run.kv_events):
        _add_evictions(kv, run.kv_events)
    if kv.bytes_per_token_measured and kv.batch:
        kv.bytes_per_token_note = _window_storage_note(kv, geometry)
    return [note for note in (held_note, layout_note, length_note) if note]


def heads_held_by(event: Any) -> int | None:
    """KV heads in a cache tensor: [batch, heads, tokens, head_dim] for HF data, [batch, tokens, heads,
    head_dim] for module buffers (Meta's reference code) and tensors tracked with `layout="bshd"`."""
    shape: list[int] = list(event.shape or ())
    if len(shape) != 4:
        return None
    return int(shape[2] if event.part in SEQ_MAJOR_PARTS else shape[1])


def _rank_heads(
    manifest: dict[str, Any], geometry: dict[str, Any] | None, event: Any
) -> dict[str, int] | None:
    """Which rank of how many the run is, and the KV heads its cache tensors hold of the model's (what its
    arithmetic counts: `_expected_bytes_per_token`), so that a rank's report says whose share it shows; None
    outside a group of 2 or more, or where the tensors' heads are not a divisor of the model's."""
    rank, world_size = manifest.get("rank"), manifest.get("world_size")
    heads, held = (geometry or {}).get("num_kv_heads"), heads_held_by(event)
    if not (isinstance(rank, int) and isinstance(world_size, int) and world_size >= 2):
        return None
    if not isinstance(heads, int) or held is None or not 0 < held <= heads or heads % held:
        return None
    if geometry and global_width(geometry) is not None:  # two widths: the heads held do not say the share
        return None
    return {"rank": rank, "world_size": world_size, "kv_heads_held": held, "model_kv_heads": heads}


def _layout_note(geometry: dict[str, Any] | None, event: Any) -> str | None:
    """A tracked tensor read as [batch, heads, tokens, head_dim] whose "heads" the model cannot have: most
    likely a [batch, tokens, heads, head_dim] tensor tracked without `layout="bshd"`, so its tokens were
    read as heads and its heads as tokens."""
    heads = (geometry or {}).get("num_kv_heads")
    held = heads_held_by(event)
    if event.part != "tracked" or not isinstance(heads, int) or held is None or held <= 0:
        return None
    if held <= heads and heads % held == 0:
        return None
    return (
        f"tracked tensors of shape {list(event.shape)} hold {held} KV heads as [batch, heads, tokens, "
        f"head_dim], the model has {heads}: token and head figures are wrong if they are [batch, tokens, "
        'heads, head_dim]; track them with kvtrace.track(..., layout="bshd")'
    )


def _expected_bytes_per_token(
    geometry: dict[str, Any] | None, kv_dtype: str | None, heads_held: int | None = None
) -> int | None:
    """The arithmetic: layers x 2 x KV heads x head_dim x dtype bytes. Layers are those holding KV
    (`kv_layers`, when the config lists layer types: linear-attention layers hold none). A tensor-parallel
    rank's tensors hold a share of the model's KV heads (`heads_held`, a divisor of them): its arithmetic
    counts those. Full layers as wide as their own `global_kv_heads` x `global_head_dim` (Gemma 4's) count
    at that width, beside the sliding ones."""
    if not geometry or kv_dtype not in _DTYPE_BYTES:
        return None
    try:
        heads = int(geometry["num_kv_heads"])
        layers = int(geometry.get("kv_layers") or geometry["num_layers"])
        full_width = global_width(geometry)
        if full_width is not None:
            sliding = int(geometry.get("sliding_layers") or 0)
            elements = sliding * heads * int(geometry["head_dim"]) + (layers - sliding) * full_width
            return 2 * elements * _DTYPE_BYTES[kv_dtype]
        if heads_held is not None and 0 < heads_held < heads and heads % heads_held == 0:
            heads = heads_held
        return layers * 2 * heads * int(geometry["head_dim"]) * (_DTYPE_BYTES[kv_dtype])
    except (KeyError, TypeError, ValueError):
        return None


def _window_storage_note(kv: KvSummary, geometry: dict[str, Any] | None) -> str | None:
    """`window_storage_note` of the main cache's layers whose window let tokens go."""
    layers = model_kv_layers(geometry) or len(kv.per_layer)
    kinds = kind_token_bytes(geometry, kv.bytes_per_token_expected, layers)
    windowed = [
        (layer.k_bytes + layer.v_bytes, layer.tokens)
        for layer in kv.per_layer
        if layer.cache == kv.main_cache and layer.evicted_by_reason.get("window")
    ]
    window = (geometry or {}).get("sliding_window")
    return window_storage_note(
        windowed, kinds[0] if kinds else None, kv.batch, window if isinstance(window, int) else None
    )


def _has_kv_geometry(geometry: dict[str, Any] | None) -> bool:
    """Whether the manifest's geometry says the KV heads and head_dim that `_expected_bytes_per_token`
    multiplies: a model passed to record() with no Hugging Face config or cache buffers has only its class,
    dtype and parameter count there."""
    return bool(geometry) and all(
        isinstance((geometry or {}).get(name), int) for name in ("num_kv_heads", "head_dim")
    )


def _shapes_follow(geometry: dict[str, Any] | None, data_events: list[Any]) -> bool:
    """Whether every K and V tensor is heads x head_dim wide as the config says (Llama and most; Gemma 4's
    full layers: their own global heads x head_dim); not for multi-head latent attention (DeepSeek-V3),
    whose K and V widths are their own, nor for a tensor-parallel rank of a model with two widths."""
    head_dim = (geometry or {}).get("head_dim")
    if not head_dim:
        return True
    assert geometry is not None
    if global_width(geometry) is None:
        return all(e.shape[-1] == head_dim for e in data_events if len(e.shape) == 4)
    own = {
        (geometry.get("num_kv_heads"), head_dim),
        (
            geometry.get("global_kv_heads") or geometry.get("num_kv_heads"),
            geometry.get("global_head_dim") or head_dim,
        ),
    }
    return all((heads_held_by(e), e.shape[-1]) in own for e in data_events if len(e.shape) == 4)


def _bytes_per_token_of_shapes(data_events: list[Any], model_layers: int | None = None) -> int | None:
    """The arithmetic from the tensors themselves: per KV layer, K heads x K width + V heads x V width, times
    the element size, from each slot's last tensor. Like the config's, it counts the model's `model_layers`:
    a run that stopped in its first step before the last layers held KV has no tensor of theirs, which
    cost what the layers seen cost on average."""
    last: dict[tuple[int, str], Any] = {}
    for event in data_events:
        if len(event.shape) == 4 and event.dtype in _DTYPE_BYTES:
            last[(event.layer, event.kv)] = event
    if not last:
        return None
    seen = sum((heads_held_by(e) or 0) * e.shape[-1] * _DTYPE_BYTES[e.dtype] for e in last.values())
    layers = len({layer for layer, _ in last})
    return round(seen * model_layers / layers) if model_layers and layers < model_layers else seen


# A sparse-attention (DSA) layer's state that grows a token at a time beside its K and V: the indexer's
# keys ([batch, tokens, index_head_dim]) and, where the layer keeps them, their positions
_INDEXER_PARTS = ("aux.indexer_keys", "aux.indexer_position_ids")
_STATE_BYTES = {**_DTYPE_BYTES, "int64": 8, "int32": 4}


def _indexer_bytes_per_token(events: list[Any], cache: int, model_layers: int | None) -> int:
    """What a token of one sequence adds to a DSA cache's layers beside K and V (`_INDEXER_PARTS`), from
    each layer's last tensor, every layer of the model's as `_bytes_per_token_of_shapes` counts them; 0 for
    any other cache. DeepSeek-V3.2's tiny model under transformers 5.17 held 2,560 B a token, 256 of them
    its indexer keys, which the arithmetic left out (2,304)."""
    last: dict[tuple[int, str], Any] = {}
    for event in events:
        kept = event.part in _INDEXER_PARTS and event.cache == cache and event.event != "freed"
        if kept and len(event.shape or ()) >= 2 and event.dtype in _STATE_BYTES:
            last[(event.layer, event.part)] = event
    if not last:
        return 0
    seen = sum(math.prod(e.shape[2:]) * _STATE_BYTES[e.dtype] for e in last.values())
    layers = len({layer for layer, _ in last})
    return round(seen * model_layers / layers) if model_layers and layers < model_layers else seen


def _add_evictions(kv: KvSummary, events: list[Any]) -> None:
    """Per-layer evicted tokens and what the evictions really released (analyzers.evictions)."""
    from analyzers.evictions import REASONS, analyze_evictions

    ev_summary = analyze_evictions(events)
    per_layer_ev = ev_summary.per_layer()
    per_slot = ev_summary.per_cache_layer()
    for layer in kv.per_layer:
        slot = per_slot.get((layer.cache, layer.layer)) if layer.cache is not None else None
        if slot is not None:
            # What the press removed, as the eviction analysis counts it, plus the layer's window and crops.
            press = slot["evicted_tokens"]
            window = layer.evicted_by_reason.get("window", 0)
            crop = layer.evicted_by_reason.get("crop", 0)
            layer.evicted_tokens = press + window + crop
            layer.evicted_by_reason = {
                k: n for k, n in (("window", window), ("press", press), ("crop", crop)) if n
            }
    kv.evicted_tokens = sum(layer.evicted_tokens for layer in kv.per_layer)
    by_reason: dict[str, int] = {}
    for layer in kv.per_layer:
        for reason, count in layer.evicted_by_reason.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    kv.evictions_by_reason = {reason: count for reason, count in by_reason.items() if count}
    kv.evictions = {
        "events": len(ev_summary.evictions),
        "claimed_bytes": ev_summary.claimed_bytes,
        "freed_bytes": ev_summary.freed_bytes,
        # A contiguous eviction copies the kept tokens to a new storage: what it really released is the old
        # storage less that copy (negative when the old one stays alive: grad on, or referenced).
        "new_storage_bytes": ev_summary.new_storage_bytes,
        "released_bytes": ev_summary.freed_bytes - ev_summary.new_storage_bytes,
        "per_layer": [{"layer": k, **v} for k, v in per_layer_ev.items()],
        "freed_nothing": [
            {
                "step": e.step,
                "layer": e.layer,
                "kv": e.kv,
                "claimed_bytes": e.claimed_bytes,
                "reason": e.reason,
                "explanation": REASONS[e.reason],
            }
            for e in ev_summary.freed_nothing
        ],
    }
