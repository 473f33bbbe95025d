"""The KV line: live KV bytes after each line of the KV log, its frees placed where the allocator made them.

The log writes a storage's `freed` line when the recorder notices it gone: at the update that released it,
else at the next observation (a step's start, the block's end). A cache generate() dropped as it returned is
noticed only there: in a tiny Llama's run, 115 ms after the allocator freed it, when the block ended. Drawn
at the log's times, the KV line held those bytes while the allocator's chart beside it showed them freed. In
a run with a profiler trace the KV log's join (`analyzers.attribution`) finds each storage's allocation and
the free after it, on the storage's own device: the line drops there. Only the times move, and only earlier
(the log cannot see a free before the allocator makes it: a trace's free after the log's line is the two
clocks' difference, ~0.15 ms at most), never before a line the log wrote ahead of it: the log's order (a new
storage logged before the old one's free) and so every level the line reaches, its peak and the end
figures, stay the log's.
"""

from __future__ import annotations

import numpy as np

from analyzers.kv_log_figures import KvLogAnalysis

__all__ = ["kv_final_point", "kv_line"]


def kv_line(kv: KvLogAnalysis, frees_us: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(t_ns, live bytes) per line of the log, int64. `frees_us`: per storage of `kv.storages`, the µs of
    its free in the trace (NaN: none), as `attribution.attribute` leaves it in `source.meta[KV_FREES]`
    (`analyzers.attribution`); a free without one keeps the log's time, as every line does without a trace."""
    t_ns = np.asarray(kv.series_t_ns, dtype=np.int64)
    live = np.asarray(kv.series_bytes, dtype=np.int64)
    if frees_us is None or not kv.series_frees or len(frees_us) != len(kv.storages):
        return t_ns, live
    points = np.fromiter(kv.series_frees.keys(), dtype=np.int64, count=len(kv.series_frees))
    freed_us = frees_us[np.fromiter(kv.series_frees.values(), dtype=np.int64, count=len(points))]
    traced = ~np.isnan(freed_us)
    points, freed_ns = points[traced], np.round(freed_us[traced] * 1000.0).astype(np.int64)
    if not len(points):
        return t_ns, live
    # At the allocator's free where that is earlier, but not before any line the log wrote ahead of it
    moved = t_ns.copy()
    moved[points] = np.minimum(freed_ns, t_ns[points])
    before = np.maximum.accumulate(np.concatenate(([np.iinfo(np.int64).min], moved[:-1])))
    retimed = t_ns.copy()
    retimed[points] = np.minimum(np.maximum(moved[points], before[points]), t_ns[points])
    return retimed, live


def kv_final_point(t_ns: np.ndarray, live: np.ndarray, kv: KvLogAnalysis) -> tuple[float, int] | None:
    """(t_ns, bytes) of the point of the KV line (`kv_line`'s) where `kv.final_bytes` is taken, the end of the
    last step, which the HTML page and the TensorBoard tab mark; None where the log has none."""
    point = kv.final_point
    if not 0 <= point < len(live):
        return None
    return float(t_ns[point]), int(live[point])
