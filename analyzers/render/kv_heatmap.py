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

__all__ = ["MAX_CACHES_AS_ROWS", "LayerGrid", "layer_grid"]


@dataclass(frozen=True)
class LayerGrid:
    title: str  # the subplot's title: says when rows sum several caches
    columns: list[str]  # "step phase", one per step of the KV log, in order
    rows: list[str]  # "L0", "cache 7 L0" or "all caches L0"
    live_bytes: np.ndarray  # int64 (rows x columns): live KV bytes of the row at the end of the step


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
    return LayerGrid(title, columns, names, _grid(steps, layers, lambda step: kv.step_live.get(step, {})))


def _grid(steps: list[int], keys: list[Any], live_at: Callable[[int], Mapping[Any, int]]) -> np.ndarray:
    """rows (keys) x columns (steps) of live bytes, filled from each step's {key: bytes}: as many cells
    are visited as the log has entries, not rows x steps Python lookups."""
    row_of = {key: i for i, key in enumerate(keys)}
    grid = np.zeros((len(keys), len(steps)), dtype=np.int64)
    for column, step in enumerate(steps):
        for key, nbytes in live_at(step).items():
            grid[row_of[key], column] = nbytes
    return grid
