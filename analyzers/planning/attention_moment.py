"""The moment a recorded prefill's last layer attends, which a static cache's prefill peaks at. Pure,
torch-free.

Why: a static cache's prefill attends over every position of the cache, so its tensors over the keys (K and
V expanded to the query heads, sdpa's mask and its compute-dtype copy, eager's scores) are larger than a
dynamic run's over its prompt, but only while a layer attends: its peak is its last layer's attention (every
layer's KV allocated by then), not the dynamic prefill's most, which may be its logits at the step's end.
Adding the attention's extra to that most counted both at once: the demo's Llama (8 rows, 20-token padded
prompt, 64 new tokens) was priced at 122.29 MiB static where its recording peaks at 111.87 MiB, its last
layer's sdpa call. So the dynamic run's own moment is read here: the most it held beside its weights and KV
while its last prefill layer's K and V, expanded to the query heads, were live (transformers' `repeat_kv`,
made right after the layer's cache update, freed when the layer's attention is done).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from analyzers.planning.run_moments import HALF_FLOATS, main_timeline, prefill_windows

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.summary import Report

__all__ = ["AttentionMoment", "prefill_attention_moment"]


@dataclass(frozen=True)
class AttentionMoment:
    """What a run's prefill held beside its weights and KV while its last layer attended."""

    beside_bytes: int  # the most beside the weights and KV while the layer's expanded K and V were live
    index: int  # the main device's event of it
    # bytes the CPU flash kernel's per-thread blocks hold a key position (0: none told): torch's CPU sdpa
    # keeps, a thread, a (query split x keys) block of float32 scores beside its running max, sum and output
    key_bytes: int


def prefill_attention_moment(
    source: MemorySource, report: Report, rows: int | None, prompt: int | None
) -> AttentionMoment | None:
    """The moment the run's last prefill layer attended (the largest of its whole prefill steps'), read from
    its expanded K and V: the first two allocations of rows x prompt x the query heads' width after the
    step's last KV update, from the second's making to the first free of either. None where the model makes
    no such copies (as many KV heads as query heads, sdpa's own GQA on unpadded prompts or prompts the run
    does not tell padded: `_expands`), or the events do not tell them (no addresses, no categories, no KV
    update in a prefill step)."""
    from analyzers.model import KV, OTHER

    geometry, main, found = report.geometry or {}, report.main_device, main_timeline(source, report)
    heads, kv_heads, head_dim = (geometry.get(k) for k in ("num_attention_heads", "num_kv_heads", "head_dim"))
    if main is None or found is None or not rows or not prompt:
        return None
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and isinstance(head_dim, int)):
        return None
    if heads <= kv_heads or not _expands(source, geometry.get("attn_implementation")):
        return None
    dev = source.devices[found[0]]
    if dev.category is None or not bool((dev.addr >= 0).any()):
        return None
    compute = HALF_FLOATS.get(str(geometry.get("dtype")), 4)
    expanded = rows * prompt * heads * head_dim * compute
    beside = found[1].by_category["other"]
    best: AttentionMoment | None = None
    events = (dev.category, dev.delta_bytes, dev.addr)
    for window in prefill_windows(source, report):
        at = _last_layer_attention(*events, window, expanded, KV, OTHER, beside)
        if at is None or (best is not None and int(beside[at]) <= best.beside_bytes):
            continue
        key_bytes = 0
        if main.device == "cpu" and geometry.get("attn_implementation") == "sdpa":
            key_bytes = _cpu_flash_key_bytes(int(dev.delta_bytes[at]), prompt, head_dim)
        best = AttentionMoment(int(beside[at]), at, key_bytes)
    return best


def _expands(source: MemorySource, attention: object) -> bool:
    """Whether the run's prefill expanded K and V to the query heads: eager attention always does
    (`repeat_kv`), sdpa where its prompts were padded (with a mask, `use_gqa_in_sdpa` is false), told by
    every generate() call of the manifest (analyzers.planning.run_padding). Not told, it may not have: the
    allocations of that size after a layer's update are then its output and `o_proj`'s (a hidden size of
    the query heads' width), not a moment the attention priced beside them holds."""
    if attention == "eager":
        return True
    run = source.meta.get("run")
    calls = run.manifest.get("generate_calls") if attention == "sdpa" and run is not None else None
    if not isinstance(calls, list) or not calls:
        return False
    return all(isinstance(call, dict) and call.get("padded") is True for call in calls)


def _last_layer_attention(
    category: np.ndarray,
    delta: np.ndarray,
    addr: np.ndarray,
    window: np.ndarray,
    expanded: int,
    kv: int,
    other: int,
    beside: np.ndarray,
) -> int | None:
    """The event of the most beside the weights and KV while the window's last expanded K and V were both
    live; None where the window has no KV update or no two such allocations after its last one."""
    updates = window[(category[window] == kv) & (delta[window] > 0)]
    if not len(updates):
        return None
    after = window[window > updates[-1]]
    made = after[(category[after] == other) & (delta[after] == expanded)][:2]
    if len(made) < 2:
        return None
    second = int(made[1])
    tail = np.arange(second + 1, len(delta))
    frees = tail[(delta[tail] < 0) & np.isin(addr[tail], addr[made])]
    end = int(frees[0]) if len(frees) else len(delta)
    return second + int(np.argmax(beside[second:end]))


def _cpu_flash_key_bytes(block: int, prompt: int, head_dim: int) -> int:
    """Bytes a key position adds to torch's CPU flash attention's per-thread blocks, from the block the
    kernel made at the attention's moment (`block`): each thread holds, in float32, a query split's scores
    over the keys, its running max and sum and its output (split x (keys + 2 + head_dim)), so a block of
    that form over the prompt's keys grows by its split x threads x 4 bytes a key. 0 where the allocation
    is of no such form (another kernel, a 16-bit model's extra block)."""
    per_split = prompt + 2 + head_dim  # float32 elements a query split's row holds
    if block <= 0 or block % (4 * per_split):
        return 0
    return block // per_split
