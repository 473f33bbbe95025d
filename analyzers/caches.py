"""Which cache object the report's headline KV figures describe, when several hold KV at once.

An assistant model's draft cache lives next to the model's own during assisted generation, and two
generate() outputs still referenced keep two caches of the model. Summing them per layer index, or dividing
their total by one cache's tokens, describes neither: each cache's figures are its own, and `tokens_held`,
`batch` and the bytes per token are the main cache's. An encoder-decoder model (BART, T5, Whisper) holds
two caches in one `EncoderDecoderCache`: the decoder's self-attention KV, which grows with every token, and
the cross-attention KV of the encoder's output, written once at the encoder's length. The first is the main
cache; the second counts in the totals, named as what it is. Mllama (Llama 3.2 Vision) holds both kinds in
one cache: its `cross_attention_layers` hold the image's vision tokens, written at prefill and never grown.
The recorder logs those layers under an id of their own (the manifest's `cross_attention_parts`), a
cross-attention cache of that cache, which is handled as an encoder-decoder model's is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from analyzers.kv_log_figures import CacheFigures

__all__ = [
    "MAX_CACHES_AS_ROWS",
    "CacheSummary",
    "LayerOverCaches",
    "biggest_caches",
    "cache_roles",
    "cache_summaries",
    "caches_note",
    "cross_attention_parts",
    "layer_list",
    "layer_tokens",
    "layer_tokens_cell",
    "layers_holding",
    "layers_over_caches",
    "main_cache",
    "measured_bytes_per_token",
    "model_caches",
    "model_kv_layers",
    "module_cache_names",
    "rows_name_caches",
    "written_last",
]

CROSS_ATTENTION = "cross_attention"
SELF_ATTENTION = "self_attention"

MAX_CACHES_AS_ROWS = 8
"""Caches that get rows of their own in a report; with more, each layer's row sums them."""


@dataclass
class CacheSummary:
    """One cache object's own figures: its bytes over its own tokens and rows (preallocated buffers: over
    their room)."""

    cache: int
    layers: int
    final_bytes: int
    tokens: int
    rows: int | None
    bytes_per_token_measured: float | None
    main: bool  # the cache `tokens_held`, `batch` and the bytes per token describe
    model_shaped: bool | None  # has the recorded model's KV layer count (None: no geometry to tell)
    capacity_rows: int | None = None
    capacity_tokens: int | None = None
    """A preallocated cache's room (module buffers' max_batch_size and max_seq_len, a StaticCache's rows and
    max_cache_len, tracked views' rows and max_seq): the bytes per token are then its bytes over these
    slots, not over the tokens and rows written; None for a cache that grows."""
    capacity_of: str | None = None  # "buffers" | "static_cache" | "tracked" (`kv_log_figures.CacheFigures`)
    role: str | None = None
    """In an encoder-decoder cache: "self_attention" (the decoder's tokens) or "cross_attention" (the
    encoder's output, held at the encoder's length); None for any other cache."""
    encoder_decoder: int | None = None  # the id of the encoder-decoder cache it belongs to
    cross_attention_of: int | None = None
    """For the cross-attention layers of a model's cache (Mllama's, the image's vision tokens), logged
    under an id of their own: that cache's id; None for any other cache."""
    cross_layers: list[int] | None = None  # those layers' indices (`cross_attention_of`'s)
    module: str | None = None
    """For a cache held on the model's own modules: which module and attributes (`module_cache_names`), as
    `layers.*.cross_attn (k_cache, v_cache)`; None for other caches and runs from before kvtrace said it."""


def model_kv_layers(geometry: dict[str, Any] | None) -> int | None:
    """The recorded model's layers holding KV: the config's `kv_layers` (no linear-attention, KV-shared or
    cross-attention layers), else all its layers; None without geometry."""
    layers = (geometry or {}).get("kv_layers") or (geometry or {}).get("num_layers")
    return layers if isinstance(layers, int) else None


def model_caches(manifest: dict[str, Any] | None) -> set[int]:
    """The manifest's `model_caches`: the caches the recorded model's forwards were given (empty when the
    run does not list them: runs from before kvtrace recorded them, no model passed)."""
    listed = (manifest or {}).get("model_caches")
    if not isinstance(listed, list):
        return set()
    return {c for c in listed if _is_id(c)}


def cache_roles(manifest: dict[str, Any] | None) -> dict[int, tuple[str, int]]:
    """The manifest's `encoder_decoder_caches`: each sub-cache's id -> (its role, "self_attention" or
    "cross_attention", and the id of the encoder-decoder cache holding it). Empty for runs that do not list
    them (decoder-only models, runs from before kvtrace recorded them)."""
    listed = (manifest or {}).get("encoder_decoder_caches")
    roles: dict[int, tuple[str, int]] = {}
    for entry in listed if isinstance(listed, list) else ():
        if not isinstance(entry, dict) or not _is_id(entry.get("cache")):
            continue
        for role in (SELF_ATTENTION, CROSS_ATTENTION):
            if _is_id(entry.get(role)):
                roles[entry[role]] = (role, entry["cache"])
    for part, (owner, _) in cross_attention_parts(manifest).items():
        roles[part] = (CROSS_ATTENTION, owner)
    return roles


def cross_attention_parts(manifest: dict[str, Any] | None) -> dict[int, tuple[int, list[int]]]:
    """The manifest's `cross_attention_parts`: the id the cross-attention layers of a model's cache are
    logged under (Mllama's) -> (that cache's id, the layers). Empty for other models and older runs."""
    listed = (manifest or {}).get("cross_attention_parts")
    parts: dict[int, tuple[int, list[int]]] = {}
    for entry in listed if isinstance(listed, list) else ():
        if isinstance(entry, dict) and _is_id(entry.get("cache")) and _is_id(entry.get("cross_attention")):
            layers = entry.get("layers")
            kept = [i for i in layers if _is_id(i)] if isinstance(layers, list) else []
            parts[entry["cross_attention"]] = (entry["cache"], kept)
    return parts


def module_cache_names(manifest: dict[str, Any] | None) -> dict[int, str]:
    """The manifest's `module_caches`: each module cache's id -> its module path (the layer number as `*`)
    and its K and V attributes, `layers.*.self_attn (k_cache, v_cache)`; several such modules under one id
    (layers whose paths differ) joined by `; `. Empty for runs without module caches and older runs."""
    listed = (manifest or {}).get("module_caches")
    named: dict[int, list[str]] = {}
    for entry in listed if isinstance(listed, list) else ():
        if not isinstance(entry, dict) or not _is_id(entry.get("cache")):
            continue
        module = entry.get("module")
        attrs = [a for a in (entry.get("k"), entry.get("v")) if isinstance(a, str) and a]
        label = f"{module if isinstance(module, str) and module else '(the model)'} ({', '.join(attrs)})"
        if label not in named.setdefault(entry["cache"], []):
            named[entry["cache"]].append(label)
    return {cache: "; ".join(labels) for cache, labels in named.items()}


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def main_cache(
    caches: list[CacheFigures],
    geometry: dict[str, Any] | None,
    given: Iterable[int] = (),
    roles: dict[int, tuple[str, int]] | None = None,
) -> CacheFigures:
    """The cache that `tokens_held`, `batch` and the bytes per token describe: the caches the recorded
    model's forwards were given (`given`, the manifest's `model_caches`), when the run lists them (another
    model's cache is never the run's, however big or late); not a cross-attention cache (`roles`, from
    `cache_roles`: it holds the encoder's tokens, not the generated ones, and beam search reorders it last);
    among those, the ones held at the end (else all), those with the recorded model's KV layer count (an
    assistant model's draft cache has its own), and of those the one written last (two generate() outputs of
    one model: the later)."""
    listed = set(given)
    caches = [c for c in caches if c.cache in listed] or caches
    cross = {cid for cid, (role, _) in (roles or {}).items() if role == CROSS_ATTENTION}
    caches = [c for c in caches if c.cache not in cross] or caches
    held = [c for c in caches if c.final_bytes] or caches
    layers = model_kv_layers(geometry)
    shaped = [c for c in held if c.layers == layers] or held
    return written_last(shaped)


def written_last(caches: list[CacheFigures]) -> CacheFigures:
    """The cache written last; where it is a module cache, the one holding the most tokens of the module
    caches written in its step: a model's module caches are all written by each forward, one after
    another, and the main one is the cache that grows with the decode, not a ring buffer or a window of a
    few positions written after it."""
    from kvtrace.format import MODULE_CACHE_IDS  # a run's figures only: a snapshot's report never loads it

    last = max(caches, key=lambda c: c.last_seq)
    if last.cache not in MODULE_CACHE_IDS:
        return last
    peers = [c for c in caches if c.cache in MODULE_CACHE_IDS and c.last_step == last.last_step]
    return max(peers, key=lambda c: (c.tokens, c.last_seq))


def measured_bytes_per_token(c: CacheFigures, tokens: int | None, rows: int | None) -> float | None:
    """The measured bytes per token of a cache holding `tokens` a row in `rows` rows: over its slots where
    it is preallocated (module buffers, a StaticCache: its bytes follow its room, not what is written),
    else each layer's bytes over its own tokens (a sliding window's layers hold fewer); None when it holds
    nothing at the end or its tokens or rows are unknown. The one rule for the headline and each cache."""
    if not c.final_bytes:
        return None
    if c.capacity_rows and c.capacity_tokens:
        return c.final_bytes / (c.capacity_rows * c.capacity_tokens)
    # Here, not at the top: the text renderer uses this module on every report, a snapshot's too, and
    # a snapshot has no KV log to load the log's analyzers for (issue 11)
    from analyzers.kv_log_figures import bytes_per_token_row

    return bytes_per_token_row(c.bytes_by_tokens, rows) if tokens and rows else None


def cache_summaries(
    caches: list[CacheFigures],
    main_id: int,
    geometry: dict[str, Any] | None,
    roles: dict[int, tuple[str, int]] | None = None,
    parts: dict[int, tuple[int, list[int]]] | None = None,
    modules: dict[int, str] | None = None,
) -> list[CacheSummary]:
    """Each cache's own figures; `main_id` is `main_cache(...)`'s, `roles` `cache_roles(...)`, `parts`
    `cross_attention_parts(...)`, `modules` `module_cache_names(...)`."""
    layers = model_kv_layers(geometry)
    roles = roles or {}
    parts = parts or {}
    modules = modules or {}
    return [
        CacheSummary(
            cache=c.cache,
            layers=c.layers,
            final_bytes=c.final_bytes,
            tokens=c.tokens,
            rows=c.rows or None,
            bytes_per_token_measured=measured_bytes_per_token(c, c.tokens, c.rows),
            main=c.cache == main_id,
            # a cross-attention part has the config's cross-attention layers, not the model's KV layers
            model_shaped=(c.layers == layers) if layers is not None and c.cache not in parts else None,
            capacity_rows=c.capacity_rows or None,
            capacity_tokens=c.capacity_tokens or None,
            capacity_of=c.capacity_of or None,
            role=roles[c.cache][0] if c.cache in roles else None,
            encoder_decoder=roles[c.cache][1] if c.cache in roles and c.cache not in parts else None,
            cross_attention_of=parts[c.cache][0] if c.cache in parts else None,
            cross_layers=parts[c.cache][1] if c.cache in parts else None,
            module=modules.get(c.cache),
        )
        for c in caches
    ]


def caches_note(caches: list[CacheSummary], given: Iterable[int] = ()) -> str | None:
    """Why the per-layer table holds a layer index more than once, and which cache the headline is;
    `given`: the caches the recorded model's forwards were given (the manifest's `model_caches`)."""
    held = [c for c in caches if c.final_bytes]
    main = next((c for c in caches if c.main), None)
    if len(held) < 2 or main is None:
        return None
    cross = [c for c in held if c.role == CROSS_ATTENTION]
    others = [c for c in held if not c.main and c.role != CROSS_ATTENTION]
    if cross:
        said = _cross_note(cross, main)
        if not others:
            return said
        return f"{said}; {_others_note(held, main, others, given)}"
    return _others_note(held, main, others, given)


def _cross_note(cross: list[CacheSummary], main: CacheSummary) -> str:
    """The cross-attention caches of encoder-decoder caches, named as such: their KV counts in the totals,
    held at the encoder's length; or the cross-attention layers of the model's cache (Mllama: the image's
    vision tokens)."""
    if all(c.cross_attention_of is not None for c in cross):
        return _image_note(cross, main)
    held = ", ".join(
        f"{c.cache} (of encoder-decoder cache {c.encoder_decoder}: {c.tokens} tokens x {c.rows or '-'} rows)"
        for c in cross
    )
    caches = f"cache {held} holds" if len(cross) == 1 else f"caches {held} hold"
    own = "the decoder's self-attention KV, " if main.role == SELF_ATTENTION else ""
    return (
        f"{caches} the cross-attention KV, the encoder's output at the encoder's length: counted in the KV "
        f"totals; tokens held and bytes per token are cache {main.cache}'s ({own}{main.layers} layers)"
    )


def _image_note(cross: list[CacheSummary], main: CacheSummary) -> str:
    """The cross-attention layers of the model's cache (Mllama's), logged as caches of their own: the KV of
    the image's vision tokens, a fixed cost written at prefill, counted in the totals but not per token."""
    held = ", ".join(
        f"{c.cache} ({layer_list(c.cross_layers or [])} of cache {c.cross_attention_of}: {c.tokens} vision "
        f"tokens x {c.rows or '-'} rows, {c.final_bytes:,} bytes)"
        for c in cross
    )
    caches = f"cache {held} holds" if len(cross) == 1 else f"caches {held} hold"
    return (
        f"{caches} the cross-attention KV of the image(s), written at prefill and never grown: counted in "
        f"the KV totals, not per token; tokens held and bytes per token are cache {main.cache}'s (its "
        f"{main.layers} self-attention layers)"
    )


def layer_list(layers: Iterable[int]) -> str:
    """`layer 2`, `layers 3, 8, 13`."""
    listed = sorted(layers)
    return f"layer{'s' if len(listed) != 1 else ''} {', '.join(str(i) for i in listed)}"


def _others_note(
    held: list[CacheSummary], main: CacheSummary, others: list[CacheSummary], given: Iterable[int]
) -> str:
    """Several caches held besides the main one (and its cross-attention KV): whose they may be, and why the
    headline is the main one's."""
    listed = set(given)
    if main.cache in listed and not all(c.cache in listed for c in others):
        why = "given to the recorded model's forwards"
    elif main.model_shaped and not all(c.model_shaped for c in others):
        why = "the recorded model's layer count"
    else:
        why = "written last"
    count = len([c for c in held if c.role != CROSS_ATTENTION])
    if all(c.module for c in (main, *others)):  # the model's own modules, each named
        named = ", ".join(f"{c.cache} {c.module}" for c in sorted((main, *others), key=lambda c: c.cache))
        return (
            f"{count} KV caches were held at the end, on the model's own modules: {named}; per-layer rows "
            f"name their cache; tokens held and bytes per token are cache {main.cache}'s ({main.layers} "
            f"layers, {why})"
        )
    return (
        f"{count} KV caches were held at the end (an assistant model's draft cache, another model's "
        f"cache, or an earlier generate()'s output still referenced): per-layer rows name their cache; "
        f"tokens held and bytes per token are cache {main.cache}'s ({main.layers} layers, {why})"
    )


def rows_name_caches(row_caches: Iterable[int | None], main: int | None) -> bool:
    """Whether per-layer rows of these caches must say whose each is: they hold several caches, or one that
    is not the main cache (the recorded model's let go before the end, another model's held then), whose
    tokens and bytes a reader would otherwise take for the recorded model's."""
    held = set(row_caches)
    return len(held) > 1 or (main is not None and bool(held) and held != {main})


class _LayerRow(Protocol):
    """A per-layer row of one cache (`analyzers.summary.LayerSummary`,
    `analyzers.kv_log_figures.LayerFigures`)."""

    layer: int
    k_bytes: int
    v_bytes: int
    tokens: int
    k_tokens: int
    v_tokens: int
    evicted_tokens: int
    cache: int | None


def layer_tokens(row: _LayerRow) -> set[int]:
    """The tokens per row a layer's K and V hold: one count, or two where a run stopped between its K and
    V updates; the layer's `tokens` where neither is known, empty where that is not either."""
    return {tokens for tokens in (row.k_tokens, row.v_tokens) if tokens} or ({row.tokens} - {0})


def layer_tokens_cell(row: _LayerRow) -> str:
    """A per-layer table's tokens per row: the count, or K's and V's where they differ ("K 257 V 256")."""
    if row.k_tokens and row.v_tokens and row.k_tokens != row.v_tokens:
        return f"K {row.k_tokens:,} V {row.v_tokens:,}"
    return f"{row.tokens:,}"


def layers_holding(rows: Iterable[_LayerRow], cache: int | None) -> set[int]:
    """The layers of `cache` holding KV and a known count of tokens: those its measured bytes per token
    count. Fewer than the model's KV layers (`model_kv_layers`) where a run stopped in its first step before
    the last layers held KV; the arithmetic counts them all."""
    return {row.layer for row in rows if row.cache == cache and row.tokens and row.k_bytes + row.v_bytes}


@dataclass(frozen=True)
class LayerOverCaches:
    """One layer index summed over the caches whose rows hold it."""

    layer: int
    k_bytes: int
    v_bytes: int
    caches: int  # the rows summed: one per cache holding this layer index
    min_tokens: int  # tokens a row of the emptiest and the fullest of them (0: none holds bytes)
    max_tokens: int
    evicted_tokens: int  # all rows, all the caches


def layers_over_caches(rows: Iterable[_LayerRow]) -> list[LayerOverCaches]:
    """Each layer index's rows summed over their caches, by layer index: the per-layer table of a run with
    too many caches for a row each. The tokens range over the rows that hold bytes (another cache's
    rows holding none are there only for their evicted tokens)."""
    by_layer: dict[int, list[_LayerRow]] = {}
    for row in rows:
        by_layer.setdefault(row.layer, []).append(row)
    summed = []
    for layer in sorted(by_layer):
        of_layer = by_layer[layer]
        tokens = [t for r in of_layer if r.k_bytes + r.v_bytes for t in layer_tokens(r) or {r.tokens}] or [0]
        summed.append(
            LayerOverCaches(
                layer=layer,
                k_bytes=sum(r.k_bytes for r in of_layer),
                v_bytes=sum(r.v_bytes for r in of_layer),
                caches=len(of_layer),
                min_tokens=min(tokens),
                max_tokens=max(tokens),
                evicted_tokens=sum(r.evicted_tokens for r in of_layer),
            )
        )
    return summed


def biggest_caches(caches: list[CacheSummary], count: int = 3) -> list[CacheSummary]:
    """The main cache, then the `count` others holding the most bytes at the end (the lower id first among
    equals): the few a summary of many caches names."""
    main = [c for c in caches if c.main]
    held = sorted(
        (c for c in caches if c.final_bytes and not c.main), key=lambda c: (-c.final_bytes, c.cache)
    )
    return main + held[:count]
