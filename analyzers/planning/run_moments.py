"""The moments of a recorded run that `kvtrace plan --from-run` prices apart from its peak (`run_peak`): the
most held beside the weights and KV during the prefill and at a cache update, the prefill's moments split by
what they follow (fixed, the batch, the prompt), and the bytes of them a wider dtype or a smaller batch does
not change. Pure, torch-free.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from analyzers.budget import step_starts
from analyzers.planning.plan_types import PrefillMoment

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.summary import Report

__all__ = [
    "HALF_FLOATS",
    "PrefillSplit",
    "batch_fixed_bytes",
    "decode_beside_at",
    "dtype_fixed_bytes",
    "last_update_beside_at",
    "main_timeline",
    "outside_prefill_peak",
    "prefill_beside",
    "prefill_beside_at",
    "prefill_split",
    "prefill_windows",
    "update_beside",
    "update_beside_at",
]

HALF_FLOATS = {"bfloat16": 2, "float16": 2}  # a model's 16-bit compute dtypes, whose bytes an element


def dtype_fixed_bytes(source: MemorySource, report: Report, index: int | None) -> int | None:
    """Bytes of the allocations beside the weights and KV live after the main device's event `index` that
    keep their size whatever the model computes in: generate()'s float32 copies of the last position's
    logits (rows x vocab x 4: it upcasts them) and the logits processors' vectors over the vocabulary
    (bool, float32, int64). A plan in a wider compute dtype than the run's (`--dtype fp32` of a bf16 run)
    grows the rest. Their sizes tell them from the model's own tensors only in a 16-bit model (in a
    float32 one every float is float32), so None for another, or where the events carry no addresses;
    the model's own logits (rows x vocab in its dtype) are never counted, whatever their size."""
    from analyzers.model import OTHER
    from analyzers.planning.diagnose_stacks import live_sizes

    geometry, main, rows = report.geometry or {}, report.main_device, report.kv.batch
    element = HALF_FLOATS.get(str(geometry.get("dtype")))
    vocab = geometry.get("vocab_size")
    if index is None or index < 0 or main is None or not element or not isinstance(vocab, int) or not rows:
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if dev is None or not bool((dev.addr >= 0).any()):
        return None
    fixed = {rows * vocab * 4, vocab, vocab * 4, vocab * 8} - {rows * vocab * element}
    return sum(nbytes for nbytes in live_sizes(dev, index, OTHER) if nbytes in fixed)


def batch_fixed_bytes(
    source: MemorySource,
    report: Report,
    index: int | None,
    rows: int | None,
    prompt: int | None,
    context: int | None,
) -> int | None:
    """Bytes of the allocations beside the weights and KV live after the main device's event `index` that a
    larger batch keeps: the vectors over the vocabulary generate()'s logits processors make, whatever the
    rows (an int64 `arange`, bool masks: diagnose_rows' `fixed_sizes`), where their size is no batch-first
    tensor's. A batch-first one is `rows` x a model width (`row_units`) x positions: the vocabulary's
    logits over one position (generate() keeps the last one's) or the prompt's (a model computing them all
    at its prefill), the other widths over at most the context. A size both (at batch 1 the float32 logits
    are a float32 vector's) counts as the rows', so the batch grows it: an upper bound. Before, a larger
    batch grew them too: the demo's tiny Llama at batch 1, planned at batch 8, held 33,831,072 B beside its
    weights and KV where the batch-8 recording held 25,790,108 (+8.5% on its peak), 1,154,304 of the 4,233,236
    it held at batch 1 being those vectors. None where the events carry no addresses or the run does not
    say its rows, prompt and context."""
    from analyzers.model import OTHER
    from analyzers.planning.diagnose_rows import fixed_sizes, row_units
    from analyzers.planning.diagnose_stacks import live_sizes

    geometry, main = report.geometry or {}, report.main_device
    vocab = geometry.get("vocab_size")
    if index is None or index < 0 or main is None or not rows or prompt is None or context is None:
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if not isinstance(vocab, int) or dev is None or not bool((dev.addr >= 0).any()):
        return None
    vocab_units = {vocab * 4, vocab * HALF_FLOATS.get(str(geometry.get("dtype")), 4)}
    batch_first = {rows * unit * positions for unit in vocab_units for positions in {1, prompt}}
    other_units = row_units(geometry) - vocab_units

    def follows_rows(nbytes: int) -> bool:
        if nbytes in batch_first:
            return True
        per_row, left = divmod(nbytes, rows)
        return not left and any(not per_row % unit and per_row // unit <= context for unit in other_units)

    fixed = fixed_sizes(geometry)
    return sum(n for n in live_sizes(dev, index, OTHER) if n in fixed and not follows_rows(n))


def main_timeline(source: MemorySource, report: Report) -> tuple[int, Any] | None:
    """(index among the source's devices, timeline) of the report's main device; None without one."""
    main = report.main_device
    if main is None or not report.timelines:
        return None
    dev_index = next((i for i, d in enumerate(source.devices) if d.device == main.device), None)
    if dev_index is None or dev_index >= len(report.timelines):
        return None
    return dev_index, report.timelines[dev_index]


def update_beside(source: MemorySource, report: Report) -> int | None:
    """What the main device held beside its weights and KV at the KV log's peak, where that peak is a cache
    update's transient (above the final KV: a dynamic cache's growth copy): the activations alive during a
    decode step's cache update. Another cache's update copies (a QuantizedCache's dequantized and returned
    K and V) sit beside these, not beside the run's peak moment's, which are the logits a step ends with
    (the tour's demo at batch 8: 8.12 MiB at its update, 24.61 MiB at its peak). None where the run does not
    tell: no transient, no timeline."""
    return update_beside_at(source, report)[0]


def update_beside_at(source: MemorySource, report: Report) -> tuple[int | None, int | None]:
    """`update_beside`, and the main device's event index it was read at (None where not told)."""
    kv_log = source.meta.get("kv")
    timeline = main_timeline(source, report)
    if kv_log is None or timeline is None or kv_log.peak_bytes <= kv_log.final_bytes:
        return None, None
    at = int(np.searchsorted(timeline[1].ts_us, kv_log.peak_t_ns / 1000.0, side="right")) - 1
    return (int(timeline[1].by_category["other"][at]), at) if at >= 0 else (None, None)


def last_update_beside_at(source: MemorySource, report: Report) -> tuple[int | None, int | None]:
    """What the main device held beside its weights and KV at the run's last cache update (the KV log's
    last storage made, its last layer's in its last step), and the event index of it: the moment a full
    cache's KV peak repeats, a step's last layer holding the previous layer's hidden states beside the
    embeddings, and generate()'s ids over all but the last token. A sliding cache's KV peak
    (`update_beside_at`) comes instead as its window fills, in its first layer, with its ids short: the
    demo's Llama (8 rows, window 16) held 2,048 B (a position's hidden states) less there than at its last
    update. (None, None) where the run does not tell: no storage made in a decode step, no timeline."""
    kv_log = source.meta.get("kv")
    timeline = main_timeline(source, report)
    if kv_log is None or timeline is None or not kv_log.storages:
        return None, None
    made_ns = max(storage[2] for storage in kv_log.storages)
    begun = [step for step, start_ns in kv_log.step_start_ns.items() if start_ns <= made_ns]
    if not begun or kv_log.step_phase.get(max(begun)) != "decode":
        return None, None
    at = int(np.searchsorted(timeline[1].ts_us, made_ns / 1000.0, side="right")) - 1
    return (int(timeline[1].by_category["other"][at]), at) if at >= 0 else (None, None)


def prefill_beside(source: MemorySource, report: Report) -> int | None:
    """The most the main device held beside its weights and KV during the run's prefill steps (the KV log's
    steps of phase "prefill", from the step's start to the next step's, `step_starts`): what a plan prices a
    larger prefill with. The run's peak less its weights and prefill KV bounds it too, but where the peak
    came late that holds the run's decode KV and its growth copy as well (the tour's demo planned at batch
    12, context 40: 66.35 MiB of "activations" where the batch-12 recording held 36.34 MiB). None where
    the run does not tell: no step of its log a whole prefill (cut short in it), no timeline."""
    return prefill_beside_at(source, report)[0]


def prefill_beside_at(source: MemorySource, report: Report) -> tuple[int | None, int | None]:
    """`prefill_beside`, and the main device's event index of that most (None where not told)."""
    found = main_timeline(source, report)
    if found is None:
        return None, None
    beside = found[1].by_category["other"]  # allocated less weights and KV, after each event
    most: int | None = None
    most_at: int | None = None
    for inside in prefill_windows(source, report):
        at = int(inside[np.argmax(beside[inside])])
        if most is None or int(beside[at]) > most:
            most, most_at = int(beside[at]), at
    return most, most_at


def decode_beside_at(source: MemorySource, report: Report) -> tuple[int | None, int | None]:
    """The most the main device held beside its weights and KV after the run's first whole prefill step,
    outside every prefill step (its decode steps: the logits a step ends with, the logits processors'
    vectors over the vocabulary), and the event index of it. A run that peaked at its prefill measured no
    decode step at its peak, yet fewer rows shrink its prefill's activations more than a step's end, whose
    vocabulary-long vectors no row count changes. (None, None) where the run does not tell: no whole prefill
    step, no timeline, no event after it."""
    found = main_timeline(source, report)
    windows = prefill_windows(source, report)
    if found is None or not windows:
        return None, None
    beside = found[1].by_category["other"]
    after = np.zeros(len(beside), dtype=bool)
    after[windows[0][-1] + 1 :] = True
    for window in windows[1:]:
        after[window] = False
    candidates = np.flatnonzero(after)
    if not len(candidates):
        return None, None
    at = int(candidates[np.argmax(beside[candidates])])
    return int(beside[at]), at


def prefill_windows(source: MemorySource, report: Report) -> tuple[np.ndarray, ...]:
    """The main device's event indices of each whole prefill step of the KV log (from the step's start to
    the next step's, `step_starts`); none where the run has no KV log or timeline. Found once a report
    (`_moments_of`): a plan of a prefill-peaking run read them in four figures, and again in its diagnosis;
    the arrays are read-only."""
    memo = _moments_of(source, report)
    if memo.windows is None:
        memo.windows = _find_prefill_windows(source, report)
    return memo.windows


def _find_prefill_windows(source: MemorySource, report: Report) -> tuple[np.ndarray, ...]:
    """`prefill_windows`, computed."""
    kv_log = source.meta.get("kv")
    found = main_timeline(source, report)
    if kv_log is None or found is None:
        return ()
    timeline = found[1]
    # Where each step began as `diagnose` counts it: a module cache's first KV line (`cache_k`, scanned at
    # the forward's end) would put the prefill's own activations outside its window and the next decode
    # forward's inside it
    starts = step_starts(source)
    cut_step = kv_log.cut.step if kv_log.cut is not None else None
    windows = []
    for i, (start_us, step, phase) in enumerate(starts):
        if (kv_log.step_phase.get(step) or phase) != "prefill" or step == cut_step:
            continue
        end_us = starts[i + 1][0] if i + 1 < len(starts) else np.inf
        inside = np.flatnonzero((timeline.ts_us >= start_us) & (timeline.ts_us < end_us))
        if len(inside):
            inside.setflags(write=False)  # shared by every caller of the report
            windows.append(inside)
    return tuple(windows)


@dataclass
class _RunMoments:
    """What `prefill_windows` and `prefill_split` found for one report of `source`, kept while the report
    lives: `kvtrace plan --from-run` diagnoses the run, then reads the same figures for its peak."""

    source: MemorySource
    windows: tuple[np.ndarray, ...] | None = None
    # by (rows, prompt, context): diagnose's and plan's are the run's call's, so one split serves both
    splits: dict[tuple[int | None, int | None, int | None], PrefillSplit | None] = field(default_factory=dict)


# by id(report), each entry dropped when its report is collected (a Report is a dataclass, unhashable)
_MOMENTS: dict[int, _RunMoments] = {}


def _moments_of(source: MemorySource, report: Report) -> _RunMoments:
    """The report's `_RunMoments`, made on first use (anew where the report is read with another source)."""
    key = id(report)
    memo = _MOMENTS.get(key)
    if memo is None or memo.source is not source:
        if memo is None:
            weakref.finalize(report, _MOMENTS.pop, key, None)
        memo = _MOMENTS[key] = _RunMoments(source)
    return memo


@dataclass(frozen=True)
class PrefillSplit:
    """The run's whole prefill steps (`prefill_windows`) and, at each of their events, the bytes beside the
    weights and KV split by what they follow (`prefill_split`): one numpy pass over the main device's events
    that `kvtrace plan --from-run` and `kvtrace diagnose` read their four prefill figures from. Before, each
    figure made the pass again, and the windows with it (seven passes for a plan of a prefill-peaking run).

    `context`: the run's, which tells the bytes no row count changes from those that follow the rows alone
    (None: not told apart, all in the second, and no `moments`). The prompt's bytes do not depend on it.
    """

    windows: tuple[np.ndarray, ...]
    # each window's (fixed, rows alone, rows and prompt, rows and prompt squared) bytes at its events
    parts: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    context: int | None

    def prompt_bytes(self) -> int:
        """The most the main device held during the run's prefill steps beside its weights, its KV and the
        allocations over the vocabulary a position long: what a longer prompt's prefill grows, in proportion
        to it (its hidden states, MLP and attention over the prompt, generate()'s ids and mask). The
        vocabulary's stay: the logits processors' vectors, and the logits, which transformers' generate()
        computes for the last position alone (it passes `logits_to_keep=1` where the model takes it, 5.x)
        and upcasts to float32. Logits over every position of the prompt (a model without
        `logits_to_keep`, or a call giving 0) are `rows` x prompt x the vocabulary long, and grow. Each
        moment counts apart: the most of them may come inside a layer, not where the logits live (the
        prefill's most beside the KV, `prefill_beside`). Before, a longer prompt grew all of them: the tiny
        Llama 3 (128,256-token vocabulary, 4 layers) at batch 1, planned from a 16-token prompt at 256, said
        111,149,568 B where the recording peaked at 73,190,324 (+51.9%), the float32 logits' 2.45 MiB grown
        16-fold."""
        return max(int((grows + pairs).max()) for _, _, grows, pairs in self.parts)

    def moments(self) -> tuple[PrefillMoment, ...] | None:
        """The run's prefill moments as (bytes no row count or prompt changes, bytes that follow the rows
        alone, bytes that follow the rows and the prompt, bytes that follow the rows and the prompt squared)
        beside its weights and KV: the logits processors' vectors over the vocabulary (`batch_fixed_bytes`'
        sizes), the rest of the vocabulary-long allocations (the last position's logits), the rest but
        attention's tensors over prompt x prompt (eager's mask and one layer's scores: `eager_pair_sizes`;
        sdpa's window mask and its copy where the prompt reached the window: `window_mask_sizes`), those (0
        under any other attention, which a plan prices apart). Only the moments no other exceeds in all
        four, the ones that can be a plan's most at some rows and prompt: the logits' moment at the step's
        end, one inside a layer, whose hidden states and attention a longer prompt grows beyond it (eager's
        scores at a 256-token prompt, 2 rows: 8.4 MB beside no logits), the MLP's, which holds no scores.
        None without a `context`."""
        if not self.context:
            return None
        found = {
            (int(f), int(r), int(g), int(q))
            for fixed, row_only, grows, pairs in self.parts
            for f, r, g, q in zip(
                fixed.tolist(), row_only.tolist(), grows.tolist(), pairs.tolist(), strict=True
            )
        }
        ordered = sorted(found, reverse=True)  # a moment can be exceeded in all four only by one before it
        kept: list[PrefillMoment] = []
        for moment in ordered:
            if not any(all(a >= b for a, b in zip(other, moment, strict=True)) for other in kept):
                kept.append(moment)
        return tuple(kept)

    def moment_at(self, index: int) -> PrefillMoment | None:
        """The bytes beside the weights and KV after the main device's event `index` split as `moments`
        splits them, where `index` is inside a whole prefill step: the peak's own moment, which a shorter
        prompt shrinks (recorded_terms' `shorter_prefill`). The prefill's most beside the KV may be another
        moment, one holding less KV (an earlier layer's), whose shrink is not the peak's. None elsewhere, or
        without a `context`."""
        if not self.context:
            return None
        for window, (fixed, row_only, grows, pairs) in zip(self.windows, self.parts, strict=True):
            found = np.flatnonzero(window == index)
            if len(found):
                at = int(found[0])
                return int(fixed[at]), int(row_only[at]), int(grows[at]), int(pairs[at])
        return None

    def held_bytes(self) -> int:
        """Of the bytes the run's prefill steps hold beside their weights and KV that `moments` grows with
        the prompt, the most any of those steps still holds at its end (the next step's ids, a CUDA math
        library's workspace made at the first matmul and kept): what a shorter prompt's prefill keeps, each
        moment shrinking by the rest only, so that none is priced below what the step never frees."""
        return max(max(int(grows[-1]), 0) for _, _, grows, _ in self.parts)


def outside_prefill_peak(source: MemorySource, report: Report, index: int) -> int | None:
    """The most the main device held at any event outside the whole prefill step holding event `index`:
    the rest of the run, which a shorter prompt or a chunked prefill leaves as it was (its decode steps hold
    fewer tokens of that prompt: an upper bound). None where `index` is in no whole prefill step, or no
    event is outside it (0)."""
    found = main_timeline(source, report)
    if found is None:
        return None
    window = next((w for w in prefill_windows(source, report) if w[0] <= index <= w[-1]), None)
    if window is None:
        return None
    allocated = found[1].allocated
    outside = np.ones(len(allocated), dtype=bool)
    outside[window] = False
    return int(allocated[outside].max()) if outside.any() else 0


def prefill_split(
    source: MemorySource, report: Report, rows: int | None, prompt: int | None, context: int | None
) -> PrefillSplit | None:
    """For each whole prefill step, at each of its events, the bytes beside the weights and KV split as
    `PrefillSplit.moments` splits them (with no `context`, the first two not told apart: all in the second).
    None where the events carry no addresses or categories, or the run does not say its rows and prompt, or
    has no whole prefill step. Made once a report and call (`_moments_of`): `kvtrace plan --from-run` read
    it for its diagnosis's prefill moment, then for its own peak."""
    splits = _moments_of(source, report).splits
    key = (rows, prompt, context)
    if key not in splits:
        splits[key] = _split_prefill(source, report, rows, prompt, context)
    return splits[key]


def _split_prefill(
    source: MemorySource, report: Report, rows: int | None, prompt: int | None, context: int | None
) -> PrefillSplit | None:
    """`prefill_split`, computed."""
    from analyzers.model import OTHER
    from analyzers.planning.diagnose_rows import fixed_sizes, row_units
    from analyzers.planning.static_prefill import eager_pair_bytes, eager_pair_sizes, window_mask_sizes

    geometry, main, found = report.geometry or {}, report.main_device, main_timeline(source, report)
    vocab = geometry.get("vocab_size")
    if main is None or found is None or not rows or not prompt or not isinstance(vocab, int):
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if dev is None or dev.category is None or not bool((dev.addr >= 0).any()):
        return None
    windows = prefill_windows(source, report)
    if not windows:
        return None
    vocab_units = {vocab * 4, vocab * HALF_FLOATS.get(str(geometry.get("dtype")), 4)}
    every_position = {rows * unit * prompt for unit in vocab_units} if prompt > 1 else set()
    # A token's scalar over the prompt (rows x prompt: an int64 position or id, a norm's float32 variance, a
    # router's two float32 weights) is as long as a vector over the vocabulary where the rows and prompt
    # make the vocabulary (or half, a quarter, an eighth of it): counted as the prompt's, which a longer one
    # grows, an upper bound at the logits' moment. Before, they stayed: the tiny Qwen3-MoE (vocabulary 1,000)
    # recorded at 2 x 500 tokens, planned at 2 x 1,000, was 39,944 B under, its five 8,000 B tensors kept
    per_token = {rows * prompt * element for element in (1, 2, 4, 8)}
    stays = (fixed_sizes(geometry) | {rows * unit for unit in vocab_units}) - every_position - per_token
    # of those, the ones no row count changes, as `batch_fixed_bytes` tells them (none without a context)
    other_units = row_units(geometry) - vocab_units

    def follows_rows(nbytes: int) -> bool:
        per_row, left = divmod(nbytes, rows)
        return not left and (
            nbytes in {rows * unit for unit in vocab_units} | every_position
            or any(not per_row % unit and per_row // unit <= (context or 0) for unit in other_units)
        )

    no_rows = {n for n in fixed_sizes(geometry) if context and not follows_rows(n)} & stays
    delta = dev.delta_bytes.astype(np.int64)
    sizes = np.abs(delta)
    other = dev.category == OTHER

    def live(of: set[int]) -> np.ndarray:
        # live bytes of those sizes after each event: a free carries its block's category and minus its size
        return np.maximum(np.cumsum(np.where(other & np.isin(sizes, list(of)), delta, 0)), 0)

    vocab_live, fixed_live = live(stays), live(no_rows)
    grows = found[1].by_category["other"] - vocab_live
    pairs = np.zeros_like(grows)
    heads, window = geometry.get("num_attention_heads"), geometry.get("sliding_window")
    attention = geometry.get("attn_implementation")
    compute = HALF_FLOATS.get(str(geometry.get("dtype")), 4)
    most, pair_sizes = 0, set()
    if attention == "eager" and isinstance(heads, int) and heads > 0:
        # Told by their sizes, and no more than eager's mask and one layer's scores hold at once (the bool
        # mask is gone by then): a linear tensor of a pair's size (at a prompt as long as a head, a hidden
        # state is a score's size) counts as one up to that, an upper bound
        most = rows * prompt * prompt * eager_pair_bytes(heads, compute)
        pair_sizes = eager_pair_sizes(rows, prompt, heads, compute)
    elif attention == "sdpa" and isinstance(window, int) and 0 < window <= prompt:
        # sdpa's window mask, which a prompt reaching the window makes (a bool mask across the layers, its
        # copy in the compute dtype in a sliding layer's sdpa), told the same way: at most a bool mask of
        # every row for each kind of layer (padded prompts mask the full layers too) and the copy. Before,
        # they grew with the prompt alone: the tiny Mistral (a window of 128, 2 rows) planned from a
        # 184-token prompt at 192 was 13,824 B under its recording for them
        most = rows * prompt * prompt * (2 + compute)
        pair_sizes = window_mask_sizes(rows, prompt, compute)
    if most:
        told = live(pair_sizes - stays)
        pairs = np.clip(np.minimum(told, most), 0, np.maximum(grows, 0))
        grows = grows - pairs
    parts = tuple((fixed_live[at], (vocab_live - fixed_live)[at], grows[at], pairs[at]) for at in windows)
    return PrefillSplit(windows=tuple(windows), parts=parts, context=context)
