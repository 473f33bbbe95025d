"""The KV log's eviction markers. Per layer and step: the KV-per-layer heatmap's, one source for both places
that draw them, the TensorBoard tab's heatmap (`layers` JSON) and the HTML report's "KV per layer" grid,
built from the KV log's `evicted_by_step` (every reason: a sliding window's, a press's, a crop's; all rows),
so the markers add up to the report's evicted tokens. Per step and kind (a sliding window's, a press's, a
crop's): the memory-over-time chart's (`step_marks`), one marker however many layers lost tokens, so a
32-layer model's step is one point with what it dropped, not 32 stacked on each other. Pure, no plotly, no
torch."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from analyzers.kv_events import EVICTION_REASONS, event_rows, eviction_reason
from analyzers.units import human_bytes
from kvtrace.format import KvEvent

__all__ = ["EvictionMark", "eviction_markers", "step_marks"]


def eviction_markers(
    evicted_by_step: dict[int, dict[int, dict[str, int]]], columns: list[int]
) -> list[dict[str, Any]]:
    """The KV log's evictions per step and layer (all rows), summed into the column that ends at or after
    each step (the last column for any later one): one marker per (column, layer) with `step` (the
    column), `first_step` (the first step it stands for), `layer`, `evicted_tokens` and `by_kind`."""
    if not columns:
        return []
    summed: dict[tuple[int, int], dict[str, int]] = {}
    for step, by_layer in evicted_by_step.items():
        at = min(bisect.bisect_left(columns, step), len(columns) - 1)
        for layer, by_kind in by_layer.items():
            into = summed.setdefault((at, layer), {})
            for kind, tokens in by_kind.items():
                into[kind] = into.get(kind, 0) + tokens
    markers = []
    for (at, layer), by_kind in sorted(summed.items()):
        markers.append(
            {
                "step": columns[at],
                "first_step": columns[at - 1] + 1 if at else columns[0],
                "layer": layer,
                "evicted_tokens": sum(by_kind.values()),
                "by_kind": {kind: by_kind[kind] for kind in EVICTION_REASONS if by_kind.get(kind)},
            }
        )
    return markers


_KIND_NAMES = {"window": "sliding window", "press": "evicted", "crop": "cropped"}


@dataclass(frozen=True)
class EvictionMark:
    """What one kind of eviction dropped in one step, every layer and row: a marker on the memory chart."""

    step: int
    kind: str  # analyzers.kv_events.eviction_reason: window, press or crop
    t_ns: int  # the step's first line of this kind
    evicted_tokens: int  # all rows, all layers (a layer's K and V lose the same tokens: counted once)
    evicted_bytes: int  # K's and V's
    layers: int

    @property
    def label(self) -> str:
        layers = f"{self.layers} layer" + ("s" if self.layers != 1 else "")
        return (
            f"{_KIND_NAMES.get(self.kind, self.kind)}, step {self.step}: {self.evicted_tokens:,} tokens "
            f"dropped over {layers}, {human_bytes(self.evicted_bytes)} of K and V"
        )


def _dropped_bytes(ev: KvEvent, tokens: int) -> int:
    """Bytes of `tokens` positions (per row) of the line's tensor, all rows: its bytes over its positions
    (dim 2 of a [batch, heads, positions, dim] data tensor, which a static window preallocates)."""
    positions = ev.shape[2] if ev.part == "data" and len(ev.shape) == 4 else ev.tokens
    return tokens * ev.logical_bytes // positions if positions > 0 else 0


def step_marks(evictions: list[KvEvent]) -> list[EvictionMark]:
    """One mark per step and kind from the KV log's `evictions` (each K line that lost tokens, per row, then
    its slot's V line): the tokens over every row and layer, and the bytes of K and V they held."""
    by_step: dict[tuple[int, str], dict[str, int]] = {}
    evicted: dict[tuple[int, int, int], tuple[int, str]] = {}  # (cache, layer, step) -> K's tokens, kind
    for ev in evictions:
        slot = (ev.cache, ev.layer, ev.step)
        if ev.kv == "k":
            evicted[slot] = (ev.evicted_tokens, eviction_reason(ev))
        tokens, kind = evicted.get(slot, (0, eviction_reason(ev)))
        into = by_step.setdefault((ev.step, kind), {"t_ns": ev.t_ns, "tokens": 0, "bytes": 0, "layers": 0})
        if ev.kv == "k":
            into["tokens"] += tokens * (event_rows(ev) or 1)
            into["layers"] += 1
        into["bytes"] += _dropped_bytes(ev, tokens)
    return [
        EvictionMark(step, kind, into["t_ns"], into["tokens"], into["bytes"], into["layers"])
        for (step, kind), into in sorted(by_step.items(), key=lambda item: (item[1]["t_ns"], item[0]))
    ]
