"""How wide a layer's KV is by its kind: Gemma 4's full-attention layers keep `global_kv_heads` x
`global_head_dim` per token, its sliding layers `num_kv_heads` x `head_dim`; every other model's layers are
all as wide. A figure that prices layers one kind at a time (what a shorter context frees when only the full
layers follow it, the bytes of a sliding layer's window) needs each kind's own width, not the average over
all layers. Pure, stdlib-only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["global_width", "kind_token_bytes", "window_storage_note"]


def global_width(geometry: dict[str, Any]) -> int | None:
    """KV heads x head_dim of a full layer whose width is its own (Gemma 4's `global_head_dim`), else None."""
    if geometry.get("global_head_dim") is None and geometry.get("global_kv_heads") is None:
        return None
    heads = geometry.get("global_kv_heads") or geometry["num_kv_heads"]
    return int(heads) * int(geometry.get("global_head_dim") or geometry["head_dim"])


def kind_token_bytes(
    geometry: dict[str, Any] | None, expected: float | None, layers: int | None
) -> tuple[float, float] | None:
    """(a sliding layer's, a full layer's) KV bytes of one token of one row: the arithmetic `expected` (a
    token's bytes over all `layers` KV layers) shared by the layers' widths, so that it stays the figure the
    report checks the run against. Equal widths (every model but Gemma 4) share it evenly: expected /
    layers for both. None without the arithmetic."""
    if not expected or not layers:
        return None
    even = expected / layers
    geometry = geometry or {}
    sliding = geometry.get("sliding_layers")
    try:
        full_width = global_width(geometry)
        sliding_width = int(geometry["num_kv_heads"]) * int(geometry["head_dim"])
    except (KeyError, TypeError, ValueError):
        return even, even
    if full_width is None or not isinstance(sliding, int) or not 0 < sliding < layers:
        return even, even
    unit = expected / (sliding * sliding_width + (layers - sliding) * full_width)
    return unit * sliding_width, unit * full_width


def window_storage_note(
    windowed: list[tuple[int, int]], slide_token: float | None, rows: int | None, window: int | None
) -> str | None:
    """Why the measured bytes per token exceeds the arithmetic on sliding layers: transformers keeps a
    sliding layer's last window-1 tokens as a view of a storage of `window` positions (at prefill, of the
    prompt's), and the measured figure is storages over tokens. `windowed`: (bytes, tokens a row) of each
    layer whose window let tokens go; `slide_token`: a sliding layer's bytes of a token of one row (its
    arithmetic). None where no such layer's storage is longer than its tokens."""
    if not windowed or not slide_token or not rows:
        return None
    spans: dict[tuple[int, int], int] = {}  # (tokens, positions) -> layers
    spare = 0.0
    for nbytes, tokens in windowed:
        positions = round(nbytes / (slide_token * rows))
        if tokens and positions > tokens:
            spans[(tokens, positions)] = spans.get((tokens, positions), 0) + 1
            spare += nbytes / (tokens * rows) - slide_token
    if not spans:
        return None
    held = "; ".join(
        f"{'window-1 = ' if window and positions == window and tokens == window - 1 else ''}{tokens:,} "
        f"tokens in storages of {positions:,} positions on {layers:,} layer{'s' if layers != 1 else ''}"
        for (tokens, positions), layers in sorted(spans.items())
    )
    return (
        f"sliding layers hold {held}: their spare positions are {spare:,.1f} of the measured bytes per "
        "token (storages over tokens held), which the arithmetic (a token's own bytes) does not count"
    )
