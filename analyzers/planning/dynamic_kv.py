"""A DynamicCache's KV (full and sliding layers, beam search's reorders) replayed layer by layer: the one
arithmetic behind `kvtrace plan`'s dynamic and sliding caches (analyzers.planning.plan_kv) and `kvtrace
diagnose`'s sliding-window remedy (analyzers.planning.diagnose_window_remedies). Pure arithmetic, no torch.

A module of its own so that both price a window alike: diagnose once kept a formula of its own, which held
a window longer than the prompt as if its prefill had stored the window (on the tiny Llama at batch 2, a
20-token prompt and 200 new tokens with every prompt position's logits, a window of 100 was priced
81,920 B above `plan --from-run --cache sliding --window 100` and its recording), and left out a beam
search's reorder (2,048 B above at a window of 30).

Widths are whatever unit the caller counts a token in, across the batch: a plan's elements (its KV dtype
applied after), diagnose's bytes. A full layer grows from `held` tokens to one more by `torch.cat`, K then
V, each new storage made before the old one is let go of; a sliding layer (`DynamicSlidingWindowLayer`)
keeps a view of its last window - 1 tokens in a storage of `window` tokens, but at prefill that storage
is the whole prompt, and it lets go of it only at its first decode step, after making both its new K and
V. A beam search's `reorder_cache`, after every forward, copies each layer's K, then V, compact (a sliding
layer's view) beside the old storage; before it, the step's end (its logits, the beams' scores) holds the
window its cat made. Before, a plan put the compact view beside that moment: the tiny Llama's beam search (2
prompts x 2 beams, a 10-token prompt, 30 new tokens) planned at --cache sliding --window 30 was 2,048 B under
its recording, a token of every layer and row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DynamicKv", "Layer", "dynamic_cache_kv", "step_peak"]

# A layer of the cache: whether it keeps a window, and its K and V widths a token across the batch
# (elements in a plan, bytes in diagnose; an int is a float to the type checker)
Layer = tuple[bool, float, float]


@dataclass(frozen=True)
class DynamicKv:
    """A DynamicCache's KV in the layers' unit: at the end, once the prompt is in, the most its own
    storages hold at once, and at the last step's end (`step_end`): under beam search, before that step's
    reorder compacts each sliding layer's window to its view, a token a sliding layer more than the end."""

    final: float
    prefill: float
    peak: float
    step_end: float


def step_peak(layers: Sequence[Layer], held: int, old: int, new: int) -> float:
    """KV live at the worst moment of one decode step, in which each full layer grows from `held` tokens to
    one more and each sliding layer's storage goes from `old` tokens to `new`. The layers update one after
    another. A full layer's cat makes its new K, then frees the old one, then the same for V; a sliding
    layer makes its new K and V before it frees either old one."""
    live = sum((old if slides else held) * (k + v) for slides, k, v in layers)
    peak = live
    for slides, k, v in layers:
        if slides:
            live += new * (k + v)
            peak = max(peak, live)
            live -= old * (k + v)
            continue
        for width in (k, v):
            live += width * (held + 1)
            peak = max(peak, live)
            live -= width * held
    return peak


def _reorder_peak(layers: Sequence[Layer], held: int, storage: int, view: int) -> float:
    """KV live at the worst moment of a beam search's `reorder_cache`, with each full layer holding `held`
    tokens and each sliding layer a view of `view` tokens in a storage of `storage`. The layers are
    reordered one after another, each by `keys.index_select` then `values.index_select`: the copy
    (compact, the view's size) is made while the old storage is live, which is then let go of."""
    live = sum((storage if slides else held) * (k + v) for slides, k, v in layers)
    peak = live
    for slides, k, v in layers:
        for width in (k, v):
            live += width * (view if slides else held)
            peak = max(peak, live)
            live -= width * (storage if slides else held)
    return peak


def dynamic_cache_kv(layers: Sequence[Layer], window: int, prompt: int, new: int, beams: bool) -> DynamicKv:
    """The KV of a `prompt`-token prompt and `new` new tokens (`new` >= 1, of which generate() writes
    prompt + new - 1 into the cache), its sliding layers at `window` (any value where none slides), under
    beam search where `beams`. Its peak is the largest of the prefill, the first decode step (the prompt let
    go of), the last (the longest copies) and, under beam search, the reorders after the prefill and the
    last step."""
    written = prompt + new - 1

    def view(tokens: int) -> int:  # what a sliding layer keeps of its storage: its last window - 1 tokens
        return min(tokens, window - 1)

    # A sliding layer's storage: the whole prompt until the first decode step, then its window; a beam
    # search's reorder after every step (the prefill and the last too) copies its view into a compact storage
    stored = prompt if new == 1 else min(written, window)  # its storage at the last step's end
    kept = view(written) if beams else stored
    final = sum((kept if slides else written) * (k + v) for slides, k, v in layers)
    step_end = sum((stored if slides else written) * (k + v) for slides, k, v in layers)
    prefill = sum(prompt * (k + v) for _, k, v in layers)
    peak = prefill
    if beams:  # the reorder after the prefill, each layer still holding the prompt
        peak = max(peak, _reorder_peak(layers, prompt, prompt, view(prompt)))
    if new >= 2:  # the first decode step (the prompt let go of) and the last (the longest copies)
        first = step_peak(layers, prompt, view(prompt) if beams else prompt, min(prompt + 1, window))
        before_last = prompt if new == 2 else min(written - 1, window)  # compact under beams: its view
        before_last = view(written - 1) if beams else before_last
        last = step_peak(layers, written - 1, before_last, min(written, window))
        peak = max(peak, first, last)
        if beams:  # and the reorder after the last step
            peak = max(peak, _reorder_peak(layers, written, min(written, window), view(written)))
    return DynamicKv(final, prefill, peak, step_end)
