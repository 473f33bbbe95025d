"""The KV-per-layer heatmap's eviction markers, one source for both places that draw them: the TensorBoard
tab's heatmap (`layers` JSON) and the HTML report's "KV per layer" grid. Built from the KV log's
`evicted_by_step` (every reason: a sliding window's, a press's, a crop's; all rows), so the markers add up
to the report's evicted tokens. Pure, no plotly, no torch."""

from __future__ import annotations

import bisect
from typing import Any

from analyzers.kv_events import EVICTION_REASONS

__all__ = ["eviction_markers"]


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
