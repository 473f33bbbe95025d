"""Why did it run out of memory, and what would each usual remedy buy on THIS run? Pure, torch-free.

`diagnose(source, report)` picks one moment: the first OOM (a snapshot's `oom` trace entry, a run's
recorded OutOfMemoryError) or, without one, the peak of the device that peaks highest. At that moment it
reads what was allocated, reserved and free, how fragmented the reserved segments were (largest free
block vs the request), how much of the memory was KV cache and in which layers and step, and which stacks
held the most live bytes. Then it prices each remedy in bytes with this run's own figures:

* the shortfall a remedy must cover is `request - device_free` at an OOM (the allocator could not find
  a fresh segment that big; the reserved-but-free space is treated as unusable, which is what the OOM
  itself proves without expandable segments), or `peak - budget` when a budget is given;
* KV scales linearly with batch and with the tokens held, so smaller batch, shorter context and a
  sliding window are exact proportions of the KV at that moment (activations also shrink; we don't
  count them, so the figures are lower bounds); batch and tokens are those held at the end of the
  moment's step (the KV log's per-step figures), not the run's final count;
* a static cache removes the dynamic cache's reallocation transient: KV peak - KV final, from the KV log;
* quantized KV keeps 8 bits an element (fp8), or is transformers' int4 QuantizedCache: int4 plus a scale
  and a zero-point per 64 elements in the model's dtype, the prompt quantized and the tokens after it at
  full precision until `residual_length` (128) are due (analyzers.planning.quantized_cache, as
  `kvtrace plan --cache quantized` counts it);
* offloading (transformers' OffloadedCache) keeps about two layers' KV on the device;
* `expandable_segments:True` lets the allocator grow segments in place instead of stranding free blocks:
  it recovers up to reserved - allocated.

Where the input lacks what a figure needs (a bare snapshot has no KV geometry), the remedy says what is
missing instead of inventing a number. Remedies fit the device: offloading KV to the CPU and the CUDA
allocator's expandable segments are offered only for CUDA devices.

A memory budget (`--budget`, or the `gpu_memory` a run was recorded with) is diagnosed as the OOM it
would have been on a device of that size: the step, layer and request that crossed it
(analyzers.budget), with the remedies priced at the run's peak, which must fit under the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyzers.budget import BudgetCrossing, budget_crossing, budget_of
from analyzers.kv_log import is_kv_data
from analyzers.model import KV, DeviceEvents, MemorySource
from analyzers.planning.quantized_cache import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_RESIDUAL_LENGTH,
    quantized_cache_bytes,
    residual_tokens,
)
from analyzers.readers.run_dir import KV_LOG_ONLY_NOTES
from analyzers.stack_frames import heading, kept_frames
from analyzers.summary import Report, clock_time
from analyzers.units import human_bytes

__all__ = ["Diagnosis", "Remedy", "StackShare", "diagnose"]

_DTYPE_BITS = {
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "float64": 64,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    "int8": 8,
}
_OFFLOAD_LAYERS_ON_DEVICE = 2  # the layer computing and the one being prefetched
TOP_STACKS = 10
_NO_STACK = "(no stack recorded: record with with_stack=True)"


@dataclass(frozen=True)
class StackShare:
    """Live bytes at the moment that were allocated from one stack (innermost frame first), without the
    frames torch's memory_viz leaves out (analyzers.stack_frames). `heading`: the frames it is known by
    (its Python frames where it has any), one per line."""

    stack: str
    bytes: int
    allocations: int
    heading: str = ""


@dataclass(frozen=True)
class Remedy:
    """One change, priced on this run. `saved_bytes` None: the input lacks what the figure needs
    (`sentence` says what); `fits` None: there is no shortfall to compare with (no OOM, no budget)."""

    kind: str
    setting: int | None
    saved_bytes: int | None
    fits: bool | None
    sentence: str


@dataclass(frozen=True)
class Diagnosis:
    """The moment (OOM or peak) and what each remedy buys there."""

    path: str
    source_kind: str
    device: str | None
    event: str  # "oom" | "budget" (a run that would have run out on a device of `budget_bytes`) | "peak"
    ts_us: float | None
    requested_bytes: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    free_bytes: int | None  # device memory outside the allocator's reservation
    capacity_bytes: int | None
    reserved_unallocated_bytes: int | None
    largest_free_block_bytes: int | None
    fragmented: bool | None  # enough free bytes in total, but no block or segment large enough
    shortfall_bytes: int | None
    budget_bytes: int | None
    kv_bytes: int | None
    kv_share: float | None
    kv_peak_bytes: int | None
    kv_final_bytes: int | None
    batch: int | None  # cache rows: under beam search, prompts x beams
    tokens_held: int | None
    step: int | None
    step_phase: str | None
    top_layers: tuple[tuple[int, int], ...]  # (layer, KV bytes) live at that moment, largest first
    top_stacks: tuple[StackShare, ...]
    remedies: tuple[Remedy, ...]
    message: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    budget_crossing: BudgetCrossing | None = None
    beams: int | None = None
    """Beams per prompt when beam search made the rows (`batch` / `beams` prompts); None otherwise or when
    the log does not say (a run recorded before kvtrace logged it)."""
    top_cache_layers: tuple[tuple[int, int, int], ...] = ()
    """(cache, layer, KV bytes) at that moment, largest first, when several caches held KV then (an
    assistant model's draft cache next to the model's): `top_layers` sums a layer index over them."""


def _moment_index(ts_us: np.ndarray, when: float | None) -> int:
    """Index of the last event at or before `when` (-1: before every event)."""
    if len(ts_us) == 0:
        return -1
    if when is None:
        return len(ts_us) - 1
    return int(np.searchsorted(ts_us, when, side="right")) - 1


def _live_by_stack(source: MemorySource, dev_index: int, upto: int) -> list[StackShare]:
    """Group the allocations live after event `upto` by their stack text.

    An allocation is live when no later event up to `upto` reuses its address (its free). Vectorised:
    sort events by (address, index) so each event's successor at the same address is the next row.
    """
    dev = source.devices[dev_index]
    if upto < 0:
        return []
    n = upto + 1
    addr = dev.addr[:n]
    order = np.lexsort((np.arange(n), addr))
    same_next = np.zeros(n, dtype=bool)
    same_next[order[:-1]] = addr[order[:-1]] == addr[order[1:]]
    live = (dev.delta_bytes[:n] > 0) & ~same_next & (addr >= 0)
    grouped: dict[str, list[int]] = {}
    frame_ids = dev.frame_id if dev.frame_id is not None else np.full(len(dev), -1, dtype=np.int32)
    kept: dict[int, str] = {}  # frame_id -> its stack without the frames memory_viz leaves out
    for frame_id, nbytes in zip(
        frame_ids[:n][live].tolist(), dev.delta_bytes[:n][live].tolist(), strict=True
    ):
        text = kept.get(frame_id)
        if text is None:
            known = 0 <= frame_id < len(source.frames)
            text = kept[frame_id] = "\n".join(kept_frames(source.frames[frame_id])) if known else _NO_STACK
        entry = grouped.setdefault(text, [0, 0])
        entry[0] += int(nbytes)
        entry[1] += 1
    return [_share(text, total, count) for text, (total, count) in grouped.items()]


def _kv_by_slot_at(dev: DeviceEvents, upto: int) -> dict[tuple[int, int], int]:
    """KV bytes live after event `upto` by (cache, layer): the running sum of the events joined to the KV
    log (a free carries its allocation's layer and cache), so mid-step transients count where they were.
    KV the log does not place (a stack rule's, storages held before the trace began) is in no layer."""
    if upto < 0 or dev.category is None or dev.layer is None:
        return {}
    n = upto + 1
    placed = np.flatnonzero((dev.category[:n] == KV) & (dev.layer[:n] >= 0))
    if not len(placed):
        return {}
    caches = dev.kv_cache[placed] if dev.kv_cache is not None else np.zeros(len(placed), dtype=np.int64)
    layers = dev.layer[placed].astype(np.int64)
    order = np.lexsort((layers, caches))
    caches, layers = caches[order], layers[order]
    deltas = dev.delta_bytes[placed][order].astype(np.int64)
    starts = np.flatnonzero(
        np.concatenate(([True], (caches[1:] != caches[:-1]) | (layers[1:] != layers[:-1])))
    )
    sums = np.add.reduceat(deltas, starts)
    return {
        (int(caches[i]), int(layers[i])): int(nbytes)
        for i, nbytes in zip(starts.tolist(), sums.tolist(), strict=True)
        if nbytes > 0
    }


def _freed_from_before(dev: DeviceEvents, upto: int) -> int:
    """Bytes that events up to `upto` freed of blocks allocated before the trace began: frees that are the
    first event at their address (sorted by (address, index) as in `_live_by_stack`)."""
    if upto < 0:
        return 0
    n = upto + 1
    addr = dev.addr[:n]
    order = np.lexsort((np.arange(n), addr))
    first = np.ones(n, dtype=bool)
    first[order[1:]] = addr[order[1:]] != addr[order[:-1]]
    delta = dev.delta_bytes[:n]
    return -int(delta[(delta < 0) & first & (addr >= 0)].sum())


def _share(stack: str, nbytes: int, allocations: int) -> StackShare:
    return StackShare(stack, nbytes, allocations, "\n".join(heading(stack.splitlines())))


def _snapshot_block_stacks(path: str) -> list[StackShare]:
    """Stacks of the blocks live at a snapshot's dump, read from the pickle itself.

    The snapshot reader folds blocks allocated before the trace began into `baseline_bytes` without their
    stacks; on a snapshot with an empty trace (torch 2.0 dumps) those blocks are everything.
    """
    from analyzers.readers.safe_pickle import load_pickle

    data = load_pickle(path)
    grouped: dict[str, list[int]] = {}
    # The snapshot reader checked sizes and states; stacks it does not keep, so each level is checked here
    # (a damaged history entry or frame loses its stack, not the diagnosis).
    for segment in _list(data.get("segments") if isinstance(data, dict) else None):
        for block in _list(segment.get("blocks") if isinstance(segment, dict) else None):
            if not isinstance(block, dict) or block.get("state") not in _LIVE_STATES:
                continue
            frames = block.get("frames")
            history = _list(block.get("history"))
            if not frames and history and isinstance(history[-1], dict):
                frames = history[-1].get("frames")
            text = "\n".join(
                f"{f.get('filename')}:{f.get('line')}:{f.get('name')}"
                for f in _list(frames)
                if isinstance(f, dict)
            )
            size = block.get("requested_size") or block.get("size", 0)
            entry = grouped.setdefault("\n".join(kept_frames(text)) or "(no stack recorded)", [0, 0])
            entry[0] += size if type(size) is int and size > 0 else 0
            entry[1] += 1
    return [_share(text, total, count) for text, (total, count) in grouped.items()]


_LIVE_STATES = ("active_allocated", "active_pending_free", "active_awaiting_free")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _windowed_layers(report: Report) -> tuple[list[Any], list[Any]]:
    """(layers whose window let tokens go, the others) of the run's final KV."""
    windowed = [layer for layer in report.kv.per_layer if layer.evicted_by_reason.get("window")]
    others = [layer for layer in report.kv.per_layer if not layer.evicted_by_reason.get("window")]
    return windowed, others


def _all_windowed(report: Report) -> bool:
    """Every KV layer slides (Mistral), so the cache's size does not follow the context; a hybrid (Gemma 2:
    sliding and global layers) grows with it through its global layers."""
    windowed, others = _windowed_layers(report)
    return bool(windowed) and not others


def _growing_bytes_per_token(report: Report) -> float | None:
    """KV bytes one more token of context costs per sequence: the run's own figure (storages over tokens
    held), but for the layers that keep every token only when others slide; a fully sliding cache's token
    of window costs the arithmetic (its storages keep a spare slot)."""
    kv = report.kv
    windowed, others = _windowed_layers(report)
    if not windowed:
        return kv.bytes_per_token_measured
    if not others:
        return kv.bytes_per_token_expected or kv.bytes_per_token_measured
    if not kv.batch:
        return None
    return sum((layer.k_bytes + layer.v_bytes) / layer.tokens for layer in others if layer.tokens) / kv.batch


def _held_at_step(report: Report, kv_log: Any, step: int) -> tuple[int | None, int | None]:
    """(batch, tokens per row) at the end of `step`: the KV of the moment held that many tokens, not the
    run's final count (a peak at prefill holds the prompt). The main cache's, or, before it existed (two
    generate() calls), the latest cache of the model's shape holding KV then."""
    cache = _cache_at_step(report, kv_log, step)
    tokens = kv_log.step_tokens.get(step) or {}
    if cache not in tokens:
        return report.kv.batch, report.kv.tokens_held
    rows = kv_log.step_rows.get(step, {}).get(cache)
    return rows or report.kv.batch, tokens[cache]


def _cache_at_step(report: Report, kv_log: Any, step: int) -> int | None:
    """The cache `_held_at_step` counts: the main one, or the latest of the model's shape holding KV."""
    tokens = kv_log.step_tokens.get(step) or {}
    cache = report.kv.main_cache
    if not tokens or cache in tokens:
        return cache
    shaped = {c.cache for c in report.kv.caches if c.model_shaped is not False}
    return max((c for c in tokens if c in shaped), default=max(tokens))


def _beams_at_step(report: Report, kv_log: Any, step: int, rows: int | None) -> tuple[int | None, bool]:
    """(beams per prompt, whether the rows are beams) of the cache `_held_at_step` counts: its beams where
    its log says how many (and they divide its rows), and whether beam search reordered its rows."""
    cache = _cache_at_step(report, kv_log, step)
    figures = next((c for c in kv_log.caches if c.cache == cache), None)
    if figures is None:
        return None, False
    known = figures.beams if figures.beams > 1 and rows and rows % figures.beams == 0 else None
    return known, figures.reordered


def _kv_bits(source: MemorySource, report: Report) -> int | None:
    run = source.meta.get("run")
    dtype = None
    if run is not None:
        dtypes = [e.dtype for e in run.kv_events if is_kv_data(e) and e.dtype]
        dtype = dtypes[-1] if dtypes else None
    if dtype is None and report.geometry:
        dtype = report.geometry.get("dtype")
    return _DTYPE_BITS.get(str(dtype)) if dtype else None


def _fits(saved: int | None, shortfall: int | None) -> bool | None:
    if saved is None or shortfall is None:
        return None
    return saved >= shortfall


_NO_KV = "cannot be computed: this input has no KV cache figures (record the run with kvtrace.record)"
_NO_GEOMETRY = "cannot be computed: this input has no KV geometry (batch, tokens held; record with kvtrace)"


def _beam_search_remedies(kv: int, prompts: int, beams: int, need: int | None) -> list[Remedy]:
    """A smaller batch counted in prompts (each holding `beams` rows), and fewer beams: KV is linear in
    both."""
    each = f"{beams} beams each"
    batch_target, batch_saved = _fewer(kv, prompts, need)
    beams_target, beams_saved = _fewer(kv, beams, need)
    per_prompt, per_beam = human_bytes(kv / prompts), human_bytes(kv / beams)
    if need is None:
        batch_text = f"Each prompt dropped from the batch of {prompts} ({each}) frees {per_prompt} of KV."
        beams_text = f"Each beam dropped (num_beams={beams}, batch {prompts}) frees {per_beam} of KV."
    elif need <= 0:
        room = "the KV alone would leave room up to"
        batch_text = f"Batch {prompts} ({each}) already fits; {room} batch {batch_target}."
        beams_text = f"num_beams={beams} already fits; {room} {beams_target} beams."
    else:
        enough = "of KV, enough to fit."
        batch_text = (
            f"Batch {batch_target} instead of {prompts} ({each}) frees {human_bytes(batch_saved)} {enough}"
            if batch_target >= 1
            else f"Even batch 1 ({each}) does not fit: it still holds {per_prompt} of KV."
        )
        beams_text = (
            f"num_beams={beams_target} instead of {beams} (batch {prompts}) frees "
            f"{human_bytes(beams_saved)} {enough}"
            if beams_target >= 1
            else f"Even num_beams=1 (greedy search, batch {prompts}) does not fit: it still holds {per_beam} "
            "of KV."
        )
    return [
        Remedy("batch", batch_target or None, batch_saved, _fits(batch_saved, need), batch_text),
        Remedy("beams", beams_target or None, beams_saved, _fits(beams_saved, need), beams_text),
    ]


def _fewer(kv: int, count: int, need: int | None) -> tuple[int, int]:
    """(the setting to propose, KV bytes it frees) for a count that KV is linear in (batch, beams): one
    fewer without a shortfall; else the largest count whose KV leaves room for it (0: even 1 is too many),
    freeing what going down to it, or to 1, saves (nothing when the run already fits)."""
    share = kv / count
    if need is None:
        return count - 1, round(share) if count > 1 else 0
    target = max(math.floor(count * (kv - need) / kv), 0)
    return target, 0 if need <= 0 else round(share * (count - max(target, 1)))


def _int4_remedy(d: dict[str, object], kv: int, kv_bits: int, need: int | None) -> Remedy:
    """transformers' QuantizedCache at its defaults (int4, a scale and a zero-point per 64 elements,
    residual_length 128) holding this moment's tokens: the prompt quantized, the tokens after it in the
    compute dtype until 128 are due (analyzers.planning.quantized_cache, as `kvtrace plan` counts it)."""
    batch, tokens, prompt = d["batch"], d["tokens_held"], d.get("prompt_tokens")
    if not isinstance(batch, int) or not isinstance(tokens, int) or not batch or not tokens:
        why = "needs the tokens held, a share of which it keeps at full precision"
        return Remedy("quantized_kv", 4, None, None, f"int4 quantized cache: {_NO_GEOMETRY}; it {why}.")
    per_token = _bytes_per_token_all_rows(d, kv, batch, tokens)
    # What the cache holds at this moment, without a dynamic cache's transient copy: a quantized cache's
    # updates make larger ones (its quantized layer dequantized, whole K and V returned at full precision).
    cache = min(kv, round(per_token * tokens))
    elements = per_token * 8 / kv_bits  # per position, every row
    compute_bits = d.get("compute_bits")
    compute_bytes = (compute_bits if isinstance(compute_bits, int) else kv_bits) / 8
    known = prompt if isinstance(prompt, int) else None
    residual = residual_tokens(tokens, DEFAULT_RESIDUAL_LENGTH, known)
    held = quantized_cache_bytes(
        tokens,
        residual,
        data_per_token=elements * 4 / 8,
        scale_per_token=elements / DEFAULT_GROUP_SIZE * 2 * compute_bytes,
        full_per_token=elements * compute_bytes,
    )
    saved = max(cache - held.total_bytes, 0)
    after = (
        f"the {residual:,} after the prompt" if known is not None else f"up to {residual:,} (the worst case)"
    )
    return Remedy(
        "quantized_kv",
        4,
        saved,
        _fits(saved, need),
        f"An int4 quantized cache (QuantizedCache, scales included) holds these {tokens:,} tokens in "
        f"{human_bytes(held.total_bytes)} instead of {human_bytes(cache)}, saving {human_bytes(saved)}: "
        f"{held.quantized_tokens:,} in int4, {after} at full precision ({human_bytes(held.residual_bytes)}) "
        f"until residual_length={DEFAULT_RESIDUAL_LENGTH} are due.",
    )


def _bytes_per_token_all_rows(d: dict[str, object], kv: int, batch: int, tokens: int) -> float:
    """KV bytes of one position across the batch and all layers: the run's own figure at the end (its
    storages over the tokens they hold), else the moment's KV over its tokens."""
    steady = d.get("bytes_per_token")
    return steady * batch if isinstance(steady, int | float) and steady else kv / tokens


def _prompt_at_step(report: Report, kv_log: Any, step: int) -> int | None:
    """Tokens per row held after the last prefill up to `step`: the prompt a quantized cache quantizes
    whole at once."""
    prefills = [s for s, phase in kv_log.step_phase.items() if phase == "prefill" and s <= step]
    if not prefills:
        return None
    return _held_at_step(report, kv_log, max(prefills))[1]


def _compute_bits(report: Report) -> int | None:
    """Bits of the model's own float dtype: a quantized cache keeps its residual and scales in it."""
    dtype = (report.geometry or {}).get("dtype")
    bits = _DTYPE_BITS.get(str(dtype)) if dtype else None
    return bits if bits is not None and bits >= 16 else None


def _sliding_layers(report: Report) -> int:
    """Layers keeping only a window: the config's (`sliding_layers`; every layer when it gives a window but
    no layer types, as Mistral's), else those whose window let tokens go."""
    geometry = report.geometry or {}
    counted = geometry.get("sliding_layers")
    if isinstance(counted, int):
        return counted
    layers = geometry.get("num_layers")
    if geometry.get("sliding_window") and isinstance(layers, int):
        return layers
    return len(_windowed_layers(report)[0])


def _windowed_remedies(
    kv: int, tokens: int, per_token: float, need: int | None, num_layers: int | None
) -> list[Remedy]:
    """Shorter context and smaller window for a cache whose every layer slides (Mistral's default
    DynamicCache). Such a layer keeps its last `tokens` in a storage one token longer, and makes its new K
    and V before freeing the old ones; but at prefill its storage is the whole prompt, which it lets go of
    only at its first decode step. KV at the moment above the window's own (every layer's window plus one
    layer's new one) is that prompt: a shorter prompt frees it token by token, a smaller window does not."""
    window_kv = per_token * (tokens + 1) * (1 + 1 / (num_layers or 1))
    above = max(kv - round(window_kv), 0)
    out: list[Remedy] = []
    if above >= per_token:  # at least a token of prompt beyond the window
        holds = (
            "every sliding layer holds the whole prompt until its first decode step "
            f"({human_bytes(above)} of the {human_bytes(kv)} of KV at this moment is beyond the window)"
        )
        cut = math.ceil(need / per_token) if need is not None and need > 0 else None
        if cut is not None and cut * per_token <= above:
            saved = round(cut * per_token)
            text = f"A prompt {cut:,} tokens shorter frees {human_bytes(saved)} of KV: {holds}."
        else:
            saved = above
            short = f", less than the {human_bytes(need)} shortfall" if need is not None and need > 0 else ""
            text = f"A prompt no longer than the window frees {human_bytes(saved)} of KV{short}: {holds}."
        out.append(Remedy("context", None, saved, _fits(saved, need), text))
        out.append(
            Remedy(
                "sliding_window",
                None,
                0,
                _fits(0, need),
                "A smaller window does not shrink the prompt that every sliding layer holds until its first "
                f"decode step ({human_bytes(above)} of the KV at this moment): a shorter prompt does.",
            )
        )
        return out
    out.append(
        Remedy(
            "context",
            None,
            0,
            _fits(0, need),
            f"The cache already keeps a sliding window ({tokens:,} tokens held) at this moment: a shorter "
            "context does not shrink it.",
        )
    )
    cut = math.ceil(need / per_token) if need is not None and need > 0 else max(tokens // 4, 1)
    window = tokens - cut
    if window >= 1:
        saved = round(per_token * cut)
        text = (
            f"A window of {window:,} tokens instead of {tokens:,} frees {human_bytes(saved)} of KV "
            f"({human_bytes(per_token)} per token across the batch)."
        )
    elif need is not None and need > 0:
        saved = round(per_token * (tokens - 1))
        text = (
            f"No smaller window fits: a window of 1 token frees {human_bytes(saved)} of KV, less than the "
            f"{human_bytes(need)} shortfall."
        )
    else:
        saved, text = 0, "The window holds 1 token: there is no smaller one."
    out.append(Remedy("sliding_window", window if window >= 1 else None, saved, _fits(saved, need), text))
    return out


def _remedies(
    d: dict[str, object], kv_bits: int | None, num_layers: int | None, on_cuda: bool = True
) -> list[Remedy]:
    """Price every remedy at the moment described by `d` (the Diagnosis fields computed so far)."""
    kv = d["kv_bytes"]
    batch, tokens, need = d["batch"], d["tokens_held"], d["shortfall_bytes"]
    assert kv is None or isinstance(kv, int)
    assert batch is None or isinstance(batch, int)
    assert tokens is None or isinstance(tokens, int)
    assert need is None or isinstance(need, int)
    out: list[Remedy] = []

    beams = d.get("beams")
    if kv and batch and isinstance(beams, int) and beams > 1:
        out += _beam_search_remedies(kv, batch // beams, beams, need)
    elif kv and batch:
        per_seq = kv / batch
        if need is None:
            target = batch - 1
            saved = round(per_seq) if target >= 1 else 0
            text = f"Each sequence dropped from the batch of {batch} frees {human_bytes(per_seq)} of KV."
        elif need <= 0:
            target = math.floor(batch * (kv - need) / kv)
            saved = 0
            text = f"Batch {batch} already fits; the KV alone would leave room up to batch {target}."
        else:
            target = math.floor(batch * (kv - need) / kv)
            saved = round(per_seq * (batch - max(target, 1)))
            text = (
                f"Batch {target} instead of {batch} frees {human_bytes(saved)} of KV, enough to fit."
                if target >= 1
                else f"Even batch 1 does not fit: the {human_bytes(kv)} of KV is not the whole problem."
            )
            if target < 1 and need <= kv:  # all the KV would do, but batch 1 keeps a row of it
                text = (
                    f"Even batch 1 does not fit: it frees {human_bytes(saved)} of the {human_bytes(kv)} of "
                    f"KV, less than the {human_bytes(need)} shortfall."
                )
        if d.get("rows_are_beams"):  # how many per prompt, the log does not say
            text += (
                f" These {batch} cache rows are beam search's (prompts x num_beams): lower either, so that "
                f"their product is at most {max(target, 1)}."
            )
        out.append(Remedy("batch", target if target >= 1 else None, saved, _fits(saved, need), text))
    else:
        out.append(Remedy("batch", None, None, None, f"Smaller batch: {_NO_GEOMETRY}."))

    if kv and tokens:
        # Bytes per position across the whole batch and all layers: the run's own figure at the end (its
        # storages over the tokens they hold), not the peak's, which counts transient copies and a sliding
        # cache's spare room as if they grew with every token.
        steady = d.get("bytes_per_token")
        per_token = steady * batch if isinstance(steady, int | float) and steady and batch else kv / tokens
        cut = math.ceil(need / per_token) if need is not None and need > 0 else max(tokens // 4, 1)
        context = tokens - min(cut, tokens)
        saved = round(per_token * (tokens - max(context, 1)))
        if d.get("windowed"):  # the cache already slides: its size follows the prompt, not the context
            out += _windowed_remedies(kv, tokens, per_token, need, num_layers)
        elif context >= 1:
            text = (
                f"A context of {context:,} tokens instead of {tokens:,} frees {human_bytes(saved)} of KV "
                f"({human_bytes(per_token)} per token across the batch)."
            )
            window = (
                f"A sliding window of {context:,} tokens caps KV at {human_bytes(kv - saved)} however "
                "long generation runs, at the cost of forgetting older tokens."
            )
        else:
            text = f"No shorter context fits: all {tokens:,} tokens of KV are only {human_bytes(kv)}."
            window = f"No sliding window fits: even dropping all {human_bytes(kv)} of KV is not enough."
        if not d.get("windowed"):
            out.append(Remedy("context", context or None, saved, _fits(saved, need), text))
            out.append(Remedy("sliding_window", context or None, saved, _fits(saved, need), window))
    else:
        out.append(Remedy("context", None, None, None, f"Shorter context: {_NO_GEOMETRY}."))
        out.append(Remedy("sliding_window", None, None, None, f"Sliding window: {_NO_GEOMETRY}."))

    kv_peak, kv_final = d["kv_peak_bytes"], d["kv_final_bytes"]
    if isinstance(kv_peak, int) and isinstance(kv_final, int) and kv_peak:
        churn = max(kv_peak - kv_final, 0)
        text = (
            f"A static cache (cache_implementation='static') writes in place, removing the "
            f"{human_bytes(churn)} transient a dynamic cache's torch.cat copies add at its KV peak."
            if churn
            else "No transient KV copies at the peak: the cache already writes in place (a static cache "
            "would not help)."
        )
        out.append(Remedy("static_cache", None, churn, _fits(churn, need), text))
    else:
        out.append(Remedy("static_cache", None, None, None, f"Static cache: {_NO_KV}."))

    if kv and kv_bits:
        fp8 = round(kv * (1 - 8 / kv_bits)) if kv_bits > 8 else 0
        if kv_bits > 8:  # an 8-bit cache already is what this remedy proposes
            out.append(
                Remedy(
                    "quantized_kv",
                    8,
                    fp8,
                    _fits(fp8, need),
                    f"An fp8 KV cache saves {human_bytes(fp8)} of the {human_bytes(kv)} held at {kv_bits} "
                    "bits.",
                )
            )
        sliding = d.get("sliding_layers")
        if isinstance(sliding, int) and sliding:
            text = (
                f"int4 quantized cache: transformers' QuantizedCache takes models whose layers all keep full "
                f"attention, and this one has {sliding:,} sliding layer{'s' if sliding > 1 else ''} (it "
                "raises ValueError)."
            )
            out.append(Remedy("quantized_kv", 4, None, None, text))
        else:
            out.append(_int4_remedy(d, kv, kv_bits, need))
    else:
        why = _NO_KV if not kv else "cannot be computed: the KV dtype is not recorded"
        out.append(Remedy("quantized_kv", None, None, None, f"Quantized KV: {why}."))

    if not on_cuda:
        pass  # the KV cache already lives in host memory: there is nowhere to offload it
    elif kv and num_layers and num_layers > _OFFLOAD_LAYERS_ON_DEVICE:
        saved = round(kv * (1 - _OFFLOAD_LAYERS_ON_DEVICE / num_layers))
        out.append(
            Remedy(
                "offloading",
                None,
                saved,
                _fits(saved, need),
                f"Offloading the KV cache to CPU (cache_implementation='offloaded') keeps about "
                f"{_OFFLOAD_LAYERS_ON_DEVICE} of {num_layers} layers on the device: {human_bytes(saved)} "
                "less, paid in PCIe transfers every step.",
            )
        )
    else:
        out.append(Remedy("offloading", None, None, None, f"Offloading: {_NO_GEOMETRY}."))

    frag = d["reserved_unallocated_bytes"]
    if not on_cuda:
        pass  # a setting of the CUDA caching allocator
    elif isinstance(frag, int):
        out.append(
            Remedy(
                "expandable_segments",
                None,
                frag,
                _fits(frag, need),
                f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lets segments grow in place, recovering "
                f"up to the {human_bytes(frag)} reserved but not allocated.",
            )
        )
    else:
        why = "cannot be computed: this input has no reserved-memory figures"
        out.append(Remedy("expandable_segments", None, None, None, f"expandable_segments: {why}."))
    # Remedies that close the gap first, then by bytes bought; unpriceable ones last.
    return sorted(out, key=lambda r: (r.saved_bytes is None, not r.fits, -(r.saved_bytes or 0)))


def diagnose(source: MemorySource, report: Report, budget_bytes: int | None = None) -> Diagnosis:
    """Diagnose the first OOM of an attributed source, or its peak; `budget_bytes` prices remedies
    against a memory budget when there is no OOM."""
    notes: list[str] = [str(w) for w in (source.meta.get("manifest") or {}).get("warnings") or ()]
    # the moment and its figures are the KV log's: say why
    notes.extend(note for note in KV_LOG_ONLY_NOTES if note in source.meta.get("input_notes", ()))
    if budget_bytes is None:
        budget_bytes = budget_of(source)
    kv_log = source.meta.get("kv")
    oom = source.ooms[0] if source.ooms else None
    main = report.main_device
    device = oom.device if oom is not None else (main.device if main else None)
    dev_index = next((i for i, d in enumerate(source.devices) if d.device == device), None)
    timeline = report.timelines[dev_index] if dev_index is not None and report.timelines else None
    summary = next((d for d in report.devices if d.device == device), None)

    if oom is not None:
        event, when = "oom", oom.ts_us
        index = _moment_index(timeline.ts_us, when) if timeline is not None else -1
        if oom.requested_bytes is None and timeline is not None and index >= 0:
            # A run's recorded exception has no request size; its last state is the moment.
            when = float(timeline.ts_us[index])
    else:
        event = "peak"
        index = int(np.argmax(timeline.allocated)) if timeline is not None and len(timeline.ts_us) else -1
        when = float(timeline.ts_us[index]) if index >= 0 and timeline is not None else None
    # The peak can be the level before the first event (blocks the trace frees but never allocates): the
    # report's peak is then that level, and the moment is the trace's start, not any event's state.
    at_start = (
        oom is None
        and summary is not None
        and timeline is not None
        and index >= 0
        and summary.peak_allocated_bytes > int(timeline.allocated[index])
    )

    allocated = oom.allocated_bytes if oom is not None else None
    reserved = oom.reserved_bytes if oom is not None else None
    if at_start:
        assert summary is not None
        index = 0
        allocated, reserved = summary.peak_allocated_bytes, summary.reserved_at_peak
        notes.append("the peak is the level before the trace's first event")
    if allocated is None and timeline is not None:
        peak = summary.peak_allocated_bytes if summary else None
        allocated = int(timeline.allocated[index]) if index >= 0 else peak
    if reserved is None and timeline is not None and timeline.reserved is not None and index >= 0:
        reserved = int(timeline.reserved[index])
    segments = [s for s in source.segments if s.device == device]
    at_dump = not at_start and (timeline is None or index >= len(timeline.ts_us) - 1)
    if reserved is None and segments and at_dump:
        reserved = sum(s.total_size for s in segments)
    capacity = summary.capacity_bytes if summary else None
    free = oom.device_free_bytes if oom is not None else None
    if free is None and capacity is not None and reserved is not None and source.kind != "run":
        free = capacity - reserved
    largest_free = max((s.largest_free_block for s in segments), default=None) if at_dump else None
    stream = oom.stream if oom is not None else None
    if largest_free is not None and stream is not None and any(s.stream is not None for s in segments):
        # The caching allocator serves a request from the segments of its own stream only.
        own = max((s.largest_free_block for s in segments if s.stream == stream), default=0)
        if own < largest_free:
            notes.append(
                f"the largest free block, {human_bytes(largest_free)}, is in another stream's segment: the "
                f"allocator serves stream {stream}'s requests from its own segments, whose largest is "
                f"{human_bytes(own)}"
            )
        largest_free = own
    if segments and not at_dump:
        notes.append("segments describe the dump, not this moment: no largest-free-block figure")
    reserved_unallocated = reserved - allocated if reserved is not None and allocated is not None else None
    requested = oom.requested_bytes if oom is not None else None
    fragmented = None
    if requested is not None and largest_free is not None and reserved_unallocated is not None:
        total_free = reserved_unallocated + (free or 0)
        fragmented = total_free >= requested > max(largest_free, free or 0)

    shortfall = None
    if requested is not None and free is not None:
        shortfall = requested - free
        if shortfall <= 0:
            # The allocation failed although the device reports enough free memory: a cap such as
            # set_per_process_memory_fraction or another limit applies. At least the request was missing.
            notes.append(
                "the device reported enough free memory for the request, so a per-process limit applied: "
                "the shortfall is taken as the request itself (a lower bound)"
            )
            shortfall = requested
    elif requested is not None and oom is not None:
        shortfall = requested  # an OOM without a free figure: at least the request was missing
    elif budget_bytes is not None and allocated is not None:
        shortfall = allocated - budget_bytes
    crossing = None
    if oom is None and budget_bytes is not None:
        crossing = budget_crossing(source, report.timelines, budget_bytes)
        if crossing.crossed:
            event = "budget"
            notes.append(
                f"remedies are priced at the run's peak ({human_bytes(allocated)}), which must fit under "
                f"the {human_bytes(budget_bytes)} budget, not only at the step that first crossed it"
            )

    kv_bytes: int | None = None
    if at_start and summary is not None and report.kv.measured_from != "none":
        kv_bytes = summary.categories_at_peak.get("kv", 0)
    elif timeline is not None and index >= 0 and report.kv.measured_from != "none":
        kv_bytes = int(timeline.by_category["kv"][index])
    kv_peak = report.kv.peak_bytes if kv_log is not None else None
    kv_final = report.kv.final_bytes if kv_log is not None else None

    step = phase = prompt = beams = None
    rows_are_beams = False
    top_layers: tuple[tuple[int, int], ...] = ()
    top_cache_layers: tuple[tuple[int, int, int], ...] = ()
    batch, tokens_held = report.kv.batch, report.kv.tokens_held
    if kv_log is not None and kv_log.step_start_ns:
        # The moment is a timeline time, an event's t_ns / 1000.0 in a run without a trace: a step's start
        # goes through the same division (as analyzers.budget does), never the float back to ns, which at
        # epoch magnitudes (0.25 µs apart) can land before the event that both opens the step and peaks.
        started = [s for s, t in kv_log.step_start_ns.items() if when is None or t / 1000.0 <= when]
        step = max(started) if started else min(kv_log.step_start_ns)
        phase = kv_log.step_phase.get(step)
        batch, tokens_held = _held_at_step(report, kv_log, step)
        beams, rows_are_beams = _beams_at_step(report, kv_log, step, batch)
        prompt = _prompt_at_step(report, kv_log, step)
        if dev_index is not None and index >= 0 and not at_start:
            by_slot = _kv_by_slot_at(source.devices[dev_index], index)
            by_layer: dict[int, int] = {}
            for (_, layer), nbytes in by_slot.items():
                by_layer[layer] = by_layer.get(layer, 0) + nbytes
            top_layers = tuple(sorted(by_layer.items(), key=lambda item: (-item[1], item[0])))[:8]
            if len({cache for cache, _ in by_slot}) > 1:
                ranked = sorted(by_slot.items(), key=lambda item: (-item[1], item[0]))[:8]
                top_cache_layers = tuple((cache, layer, nbytes) for (cache, layer), nbytes in ranked)
    elif when is not None:
        steps = [m for m in source.markers if m.kind == "step" and m.ts_us <= when]
        if steps:
            step, phase = len(steps), steps[-1].label

    stacks = _live_by_stack(source, dev_index, index) if dev_index is not None and not at_start else []
    baseline = source.devices[dev_index].baseline_bytes if dev_index is not None else 0
    if source.kind == "snapshot" and at_dump:
        stacks = _snapshot_block_stacks(source.path)  # every block live at the dump, with its stack
    elif source.kind == "snapshot" and at_start and summary is not None and summary.alloc_events == 0:
        # Nothing allocated since the start: what was live then is the dump's blocks plus what the trace freed
        stacks = _snapshot_block_stacks(source.path)
        freed = (allocated or 0) - summary.final_allocated_bytes
        if freed > 0:
            stacks.append(StackShare("(freed by the trace before the dump)", freed, 0))
    elif baseline:
        # What was allocated before the trace and is still live: the trace may have freed some of it first
        before = baseline - (
            _freed_from_before(source.devices[dev_index], index) if dev_index is not None else 0
        )
        if before > 0:
            stacks.append(StackShare("(weights and others, allocated before the trace began)", before, 0))
    top = tuple(sorted(stacks, key=lambda s: -s.bytes)[:TOP_STACKS])

    fields: dict[str, object] = {
        "kv_bytes": kv_bytes,
        "batch": batch,
        "tokens_held": tokens_held,
        "shortfall_bytes": shortfall,
        "kv_peak_bytes": kv_peak,
        "kv_final_bytes": kv_final,
        "reserved_unallocated_bytes": reserved_unallocated,
        "bytes_per_token": _growing_bytes_per_token(report),
        "windowed": _all_windowed(report),
        "sliding_layers": _sliding_layers(report),
        "prompt_tokens": prompt,
        "beams": beams,
        "rows_are_beams": rows_are_beams,
        "compute_bits": _compute_bits(report),
    }
    held = [cache for cache in report.kv.caches if cache.final_bytes]
    if len(held) > 1:
        notes.append(
            f"{len(held)} KV caches were held at the end: the KV at this moment counts them all; tokens held "
            f"and the price of a token are the main cache's (cache {report.kv.main_cache})"
        )
    layers = (report.geometry or {}).get("num_layers")
    on_cuda = device is None or device.startswith("cuda")
    if not on_cuda:
        notes.append(
            f"the run is on {device}: offloading KV to the CPU and CUDA allocator settings do not apply"
        )
    remedies = _remedies(
        fields, _kv_bits(source, report), layers if isinstance(layers, int) else None, on_cuda
    )
    return Diagnosis(
        path=source.path,
        source_kind=source.kind,
        device=device,
        event=event,
        ts_us=clock_time(source, device, when) if device is not None else when,
        requested_bytes=requested,
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        free_bytes=free,
        capacity_bytes=capacity,
        reserved_unallocated_bytes=reserved_unallocated,
        largest_free_block_bytes=largest_free,
        fragmented=fragmented,
        shortfall_bytes=shortfall,
        budget_bytes=budget_bytes,
        kv_bytes=kv_bytes,
        kv_share=(kv_bytes / allocated) if kv_bytes is not None and allocated else None,
        kv_peak_bytes=kv_peak,
        kv_final_bytes=kv_final,
        batch=batch,
        tokens_held=tokens_held,
        step=step,
        step_phase=phase,
        top_layers=top_layers,
        top_stacks=top,
        remedies=tuple(remedies),
        message=oom.message if oom is not None else None,
        notes=tuple(notes),
        budget_crossing=crossing,
        beams=beams,
        top_cache_layers=top_cache_layers,
    )
