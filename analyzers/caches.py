"""Which cache object the report's headline KV figures describe, when several hold KV at once.

An assistant model's draft cache lives next to the model's own during assisted generation, and two
generate() outputs still referenced keep two caches of the model. Summing them per layer index, or dividing
their total by one cache's tokens, describes neither: each cache's figures are its own, and `tokens_held`,
`batch` and the bytes per token are the main cache's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from analyzers.kv_log import CacheFigures, bytes_per_token_row

__all__ = ["CacheSummary", "cache_summaries", "caches_note", "main_cache", "model_caches", "rows_name_caches"]


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
    max_cache_len): the bytes per token are then its bytes over these slots, not over the tokens and rows
    written; None for a cache that grows."""
    capacity_of: str | None = None  # "buffers" | "static_cache" (`analyzers.kv_log.CacheFigures`)


def _model_layers(geometry: dict[str, Any] | None) -> int | None:
    layers = (geometry or {}).get("kv_layers") or (geometry or {}).get("num_layers")
    return layers if isinstance(layers, int) else None


def model_caches(manifest: dict[str, Any] | None) -> set[int]:
    """The manifest's `model_caches`: the caches the recorded model's forwards were given (empty when the
    run does not list them: runs from before kvtrace recorded them, no model passed)."""
    listed = (manifest or {}).get("model_caches")
    if not isinstance(listed, list):
        return set()
    return {c for c in listed if isinstance(c, int) and not isinstance(c, bool)}


def main_cache(
    caches: list[CacheFigures], geometry: dict[str, Any] | None, given: Iterable[int] = ()
) -> CacheFigures:
    """The cache that `tokens_held`, `batch` and the bytes per token describe: the caches the recorded
    model's forwards were given (`given`, the manifest's `model_caches`), when the run lists them (another
    model's cache is never the run's, however big or late); among those, the ones held at the end (else
    all), those with the recorded model's KV layer count (an assistant model's draft cache has its own), and
    of those the one written last (two generate() outputs of one model: the later)."""
    listed = set(given)
    caches = [c for c in caches if c.cache in listed] or caches
    held = [c for c in caches if c.final_bytes] or caches
    layers = _model_layers(geometry)
    shaped = [c for c in held if c.layers == layers] or held
    return max(shaped, key=lambda c: c.last_seq)


def _bytes_per_token(c: CacheFigures) -> float | None:
    """A cache's bytes over its tokens and rows (each layer's over its own tokens), or over its slots where
    it is preallocated buffers."""
    if not c.final_bytes:
        return None
    if c.capacity_rows and c.capacity_tokens:
        return c.final_bytes / (c.capacity_rows * c.capacity_tokens)
    return bytes_per_token_row(c.bytes_by_tokens, c.rows) if c.tokens and c.rows else None


def cache_summaries(
    caches: list[CacheFigures], main_id: int, geometry: dict[str, Any] | None
) -> list[CacheSummary]:
    """Each cache's own figures; `main_id` is `main_cache(...)`'s."""
    layers = _model_layers(geometry)
    return [
        CacheSummary(
            cache=c.cache,
            layers=c.layers,
            final_bytes=c.final_bytes,
            tokens=c.tokens,
            rows=c.rows or None,
            bytes_per_token_measured=_bytes_per_token(c),
            main=c.cache == main_id,
            model_shaped=(c.layers == layers) if layers is not None else None,
            capacity_rows=c.capacity_rows or None,
            capacity_tokens=c.capacity_tokens or None,
            capacity_of=c.capacity_of or None,
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
    others = [c for c in held if not c.main]
    listed = set(given)
    if main.cache in listed and not all(c.cache in listed for c in others):
        why = "given to the recorded model's forwards"
    elif main.model_shaped and not all(c.model_shaped for c in others):
        why = "the recorded model's layer count"
    else:
        why = "written last"
    return (
        f"{len(held)} KV caches were held at the end (an assistant model's draft cache, another model's "
        f"cache, or an earlier generate()'s output still referenced): per-layer rows name their cache; "
        f"tokens held and bytes per token are cache {main.cache}'s ({main.layers} layers, {why})"
    )


def rows_name_caches(row_caches: Iterable[int | None], main: int | None) -> bool:
    """Whether per-layer rows of these caches must say whose each is: they hold several caches, or one that
    is not the main cache (the recorded model's let go before the end, another model's held then), whose
    tokens and bytes a reader would otherwise take for the recorded model's."""
    held = set(row_caches)
    return len(held) > 1 or (main is not None and bool(held) and held != {main})
