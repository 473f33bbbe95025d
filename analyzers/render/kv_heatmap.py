"""The HTML timeline's "KV per layer" grid: one column per step of the KV log, one row per layer, exact bytes.

A few caches held side by side (an assistant model's draft next to the model's own, two generate() outputs
still referenced) each get their own rows. A run of many generate() calls makes a cache per call, each
held a few steps: a row per cache and layer would grow the grid with calls x steps, almost all of it zeros,
so past `MAX_CACHES_AS_ROWS` caches a row is a layer index summed over the caches held at that step (as
the TensorBoard tab and the counter track show it): the grid grows with steps, not with steps squared.

The columns are named "step phase", so that the hover says each step's phase from the axis, once per
column, rather than from a text repeated in every cell.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from analyzers.caches import MAX_CACHES_AS_ROWS
from analyzers.eviction_markers import eviction_markers

__all__ = ["MAX_CACHES_AS_ROWS", "EvictionMarks", "LayerGrid", "eviction_marks", "layer_grid"]


@dataclass(frozen=True)
class LayerGrid:
    title: str  # the subplot's title: says when rows sum several caches
    columns: list[str]  # "step phase", one per step of the KV log, in order
    rows: list[str]  # "L0", "cache 7 L0" or "all caches L0"
    live_bytes: np.ndarray  # int64 (rows x columns): live KV bytes of the row at the end of the step
    steps: list[int]  # the KV log's step of each column
    row_layers: list[int]  # the layer index of each row


def layer_grid(kv: Any) -> LayerGrid:
    """The grid of a KV log's `step_live` / `step_cache_live` (a `KvLogAnalysis`)."""
    steps = sorted(kv.step_live)
    columns = [f"{step} {kv.step_phase.get(step, '')}".strip() for step in steps]
    title = "KV bytes per layer at the end of each step"
    caches = {cache for live in kv.step_cache_live.values() for cache, _ in live}
    if 1 < len(caches) <= MAX_CACHES_AS_ROWS:  # one row per cache's layer, not their sum
        slots = sorted({slot for live in kv.step_cache_live.values() for slot in live})
        return LayerGrid(
            title,
            columns,
            [f"cache {cache} L{layer}" for cache, layer in slots],
            _grid(steps, slots, lambda step: kv.step_cache_live.get(step, {})),
            steps,
            [layer for _, layer in slots],
        )
    layers = sorted({layer for live in kv.step_live.values() for layer in live})
    names = [f"L{layer}" for layer in layers]
    if len(caches) > 1:
        at_once = max(
            len({cache for (cache, _), nbytes in live.items() if nbytes})
            for live in kv.step_cache_live.values()
        )
        title += f", summed over the caches held then ({len(caches):,} caches, at most {at_once:,} at once)"
        names = [f"all caches {name}" for name in names]
    grid = _grid(steps, layers, lambda step: kv.step_live.get(step, {}))
    return LayerGrid(title, columns, names, grid, steps, layers)


@dataclass(frozen=True)
class EvictionMarks:
    columns: list[str]  # the grid's column of each marker
    rows: list[str]  # the grid's row: the layer's (its first cache's, where rows are per cache)
    text: list[str]  # the hover: steps, layer, tokens evicted over all rows, by kind
    evicted_tokens: list[int]


_KINDS = {"window": "sliding window", "press": "press", "crop": "crop"}


def eviction_marks(kv: Any, grid: LayerGrid) -> EvictionMarks:
    """Where the grid draws the KV log's evictions: `eviction_markers`, the TensorBoard tab's own markers,
    over the grid's steps. The log counts evictions per layer (summed over caches), so where rows are per
    cache a marker sits on the layer's first row and its hover says it sums the caches."""
    row_of: dict[int, str] = {}
    for name, layer in zip(grid.rows, grid.row_layers, strict=True):
        row_of.setdefault(layer, name)
    summed = len(set(grid.row_layers)) < len(grid.row_layers)
    marks = EvictionMarks([], [], [], [])
    for marker in eviction_markers(kv.evicted_by_step, grid.steps):
        step, first = marker["step"], marker["first_step"]
        where = f"steps {first}-{step}" if first != step else f"step {step}"
        kinds = ", ".join(f"{_KINDS.get(k, k)} {n:,}" for k, n in marker["by_kind"].items())
        caches = ", all caches" if summed else ""
        marks.columns.append(grid.columns[grid.steps.index(step)])
        marks.rows.append(row_of[marker["layer"]])
        marks.text.append(
            f"{where}, L{marker['layer']}: {marker['evicted_tokens']:,} tokens evicted (all rows{caches})"
            + (f"<br>{kinds}" if kinds else "")
        )
        marks.evicted_tokens.append(marker["evicted_tokens"])
    return marks


def _grid(steps: list[int], keys: list[Any], live_at: Callable[[int], Mapping[Any, int]]) -> np.ndarray:
    """rows (keys) x columns (steps) of live bytes, filled from each step's {key: bytes}: as many cells
    are visited as the log has entries, not rows x steps Python lookups."""
    row_of = {key: i for i, key in enumerate(keys)}
    grid = np.zeros((len(keys), len(steps)), dtype=np.int64)
    for column, step in enumerate(steps):
        for key, nbytes in live_at(step).items():
            grid[row_of[key], column] = nbytes
    return grid
