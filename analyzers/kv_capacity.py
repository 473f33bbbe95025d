"""A preallocated cache's room, read from the KV log: what a module cache's buffers (Meta's
cache_k/cache_v) or a transformers StaticCache were allocated to hold, and the module buffers' storages over
the run (a run that re-makes its caches holds buffers of several shapes in turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analyzers.kv_log_figures import KvLogAnalysis


def preallocated_capacity(shape: list[int] | None, in_place: bool, tokens: int, rows: int) -> tuple[int, int]:
    """(rows, positions) a module cache's buffers have room for where they are preallocated (Meta's
    cache_k/cache_v: [max_batch_size, max_seq_len, kv_heads, head_dim], allocated once and written in
    place), else (0, 0). `shape`: its last buffer's as [batch, seq, ...] (`buffer_shape`; None: a cache not
    made of module buffers alone);
    `in_place`: a buffer was written in place; `tokens`, `rows`: what it held. A buffer rebound to a grown
    tensor at every step (torch.cat) is as large as what it holds and never written in place: it follows
    the tokens, as a dynamic cache does."""
    if shape is None or len(shape) != 4:
        return 0, 0
    if in_place or shape[1] > tokens or shape[0] > rows:
        return shape[0], shape[1]
    return 0, 0


def static_capacity(positions: dict[int, int], spare: set[int], rows: int) -> tuple[int, int]:
    """(rows, positions) of a transformers StaticCache's storages ([batch, kv_heads, max_cache_len,
    head_dim], allocated at its first update for the batch it is given and written in place), else (0, 0).
    `positions`: each of its layers' last K/V data tensor's third dimension; `spare`: the layers seen with
    room beyond the tokens they held, which a cache that grows with its tokens (torch.cat) never has. Only
    when every layer had room and all have the same length (a hybrid cache's sliding layers are shorter:
    then no one length is the cache's)."""
    lengths = set(positions.values())
    if rows and len(lengths) == 1 and set(positions) <= spare:
        return rows, lengths.pop()
    return 0, 0


@dataclass
class BufferStorage:
    """One module buffer's storage (Meta's cache_k/cache_v): its own shape and dtype, and what forwards wrote
    into it. A run that re-makes its caches holds buffers of several shapes in turn, so a moment's settings
    are those of the buffers live then, never the last ones'."""

    rows: int  # max_batch_size: its first dimension
    positions: int  # max_seq_len: its positions' dimension (`buffer_shape`)
    dtype: str
    rows_written: int = 0  # the most rows a forward wrote into it (0: no forward wrote it)
    tokens_written: int = 0  # the most tokens per row it held after a forward's write


def buffers_live_at(kv_log: KvLogAnalysis, cache: int, at_us: float) -> dict[int, BufferStorage]:
    """`cache`'s module buffer storages live at a moment (`at_us`, a storage's `t_ns` / 1000, as
    `kv_views.split_by_view` reads them): index in `storages` -> its facts. A storage a scan found counts
    from just after the log's last line before the step that found it (`scanned_after_ns`), where code
    before that forward may have made it: a moment of a trace inside that span can hold both a re-made
    buffer and the one it replaced."""
    live: dict[int, BufferStorage] = {}
    for index, facts in kv_log.buffer_storages.items():
        _, _, first_ns, last_ns, _, _, owner = kv_log.storages[index]
        after_ns = kv_log.scanned_after_ns.get(index, 0)
        began = after_ns / 1000.0 < at_us if after_ns else first_ns / 1000.0 <= at_us
        if owner == cache and began and (last_ns < 0 or last_ns / 1000.0 > at_us):
            live[index] = facts
    return live
