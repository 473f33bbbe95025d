"""torch.profiler's own memory categories (ACTIVATION, GRADIENT, ...) of a memory timeline, as figures.

kvtrace counts every input in its three categories (kv, weights, other); a memory timeline says more: torch
categorised each tensor itself, and its users read their memory in those words. The reader keeps torch's
index per event (`DeviceEvents.torch_category`), the bytes live before the first event by category
(`torch_baseline`) and the bytes a version bump moved between categories without allocating (`torch_moves`),
so the live bytes by torch's category at any event are its baseline, the events so far and the moves so far:
torch's own coalesced `export_memory_timeline` at that instant.
"""

from __future__ import annotations

import numpy as np

from analyzers.model import METHOD_PROFILER, TORCH_CATEGORY_NAMES, DeviceEvents

__all__ = ["torch_categories_allocated", "torch_categories_at"]


def _named(levels: np.ndarray) -> dict[str, int]:
    """Non-zero figures by torch's name, largest first (uncategorised among them by size)."""
    pairs = [(TORCH_CATEGORY_NAMES[code], int(value)) for code, value in enumerate(levels.tolist()) if value]
    return dict(sorted(pairs, key=lambda pair: -pair[1]))


def torch_categories_at(dev: DeviceEvents, index: int) -> dict[str, int] | None:
    """Bytes live by torch's category after event `index` (-1: before the first), with the moves made before
    the next event at that event's instant; None for a source without torch's categories."""
    if dev.torch_category is None or dev.torch_baseline is None or len(dev.torch_category) != len(dev):
        return None
    levels = np.zeros(len(TORCH_CATEGORY_NAMES), dtype=np.int64)
    for code, nbytes in dev.torch_baseline.items():
        levels[code] += nbytes
    codes = dev.torch_category[: index + 1].astype(np.int64)
    known = codes >= 0  # an event kvtrace inserted (none in a timeline's own) has no torch category
    np.add.at(levels, codes[known], dev.delta_bytes[: index + 1][known].astype(np.int64))
    moves = dev.torch_moves
    if moves is not None and len(moves):
        position = moves[:, 0]
        # those before the event, and those right after it at its instant (a coalesced row's own)
        taken = (position <= index) | ((position == index + 1) & (moves[:, 4] == 1))
        np.subtract.at(levels, moves[taken, 2], moves[taken, 1])
        np.add.at(levels, moves[taken, 3], moves[taken, 1])
    return _named(levels)


def torch_categories_allocated(dev: DeviceEvents) -> dict[str, int] | None:
    """Bytes allocated over the run that attribution took from torch's category (method profiler_category),
    by that category: what the report's "torch.profiler's own category" line sums. None without them."""
    if dev.torch_category is None or dev.method is None or len(dev.torch_category) != len(dev):
        return None
    counted = (dev.delta_bytes > 0) & (dev.method == METHOD_PROFILER) & (dev.torch_category >= 0)
    levels = np.zeros(len(TORCH_CATEGORY_NAMES), dtype=np.int64)
    np.add.at(levels, dev.torch_category[counted].astype(np.int64), dev.delta_bytes[counted].astype(np.int64))
    return _named(levels)
