"""The peak a recorded transformers run reached, for `kvtrace plan --from-run`: the report's device peak,
what it held beside the weights and KV (activations, logits, temporaries), and where it fell, as
`kvtrace diagnose` places its moment. Pure, torch-free.

Why: a plan's KV and weights are exact arithmetic, but the rest of a step's memory is not in a config; a
run measured it. Without it the plan of the run itself said 95.17 MiB where the run peaked at 111.87 MiB
(`kvtrace demo --cache static`: its prefill attends over all of max_cache_len, 10.38 MiB a layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analyzers.budget import step_starts
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.summary import Report

__all__ = [
    "PeakMoment",
    "batch_fixed_bytes",
    "context_token_bytes",
    "dtype_fixed_bytes",
    "peak_moment",
    "prefill_beside",
    "prefill_moments",
    "prefill_prompt_bytes",
    "prompt_row_bytes",
    "recorded_note",
    "token_row_bytes",
    "token_tensors",
    "update_beside",
]

_HALF_FLOATS = {"bfloat16": 2, "float16": 2}  # a model's 16-bit compute dtypes, whose bytes an element
_INT64_BYTES = 8  # an element of generate()'s token ids, attention mask and position ids


@dataclass(frozen=True)
class PeakMoment:
    """The run's peak: bytes, what beside weights and KV, the phase and tokens a row of its step."""

    peak_bytes: int
    activations_bytes: int
    phase: str | None
    tokens: int
    batch: int | None
    cut_short: bool  # the run stopped (an OOM, an exception): its peak is what it reached
    # of activations_bytes, the batch-first ones, which fewer rows free in proportion (diagnose's figure)
    row_activation_bytes: int | None = None
    # the most held beside the weights and KV during the run's prefill (`prefill_beside`); None: not told
    prefill_activations_bytes: int | None = None
    # of the prefill's, the most beside the vocabulary's one-position allocations, which a longer prompt
    # grows (`prefill_prompt_bytes`); None: not told, all grow
    prefill_prompt_bytes: int | None = None
    # the prefill's moments split by what they follow (`prefill_moments`); None: not told
    prefill_moments: tuple[tuple[int, int, int], ...] | None = None
    # held beside the weights and KV at the KV log's peak, a cache update's transient (`update_beside`)
    update_activations_bytes: int | None = None
    # of the activations at the peak, at the prefill's and at the update's, those in no model dtype
    # (`dtype_fixed_bytes`): a wider compute dtype grows the rest; None: not told apart
    dtype_fixed_bytes: int | None = None
    prefill_dtype_fixed_bytes: int | None = None
    update_dtype_fixed_bytes: int | None = None
    # of the activations at the peak, at the prefill's and at the update's, those a larger batch keeps: the
    # logits processors' vectors over the vocabulary (`batch_fixed_bytes`); None: not told apart, all grow
    batch_fixed_bytes: int | None = None
    prefill_batch_fixed_bytes: int | None = None
    update_batch_fixed_bytes: int | None = None
    # bytes generate()'s token tensors live at a decode peak gain per row and token (`token_row_bytes`)
    token_row_bytes: int | None = None
    # bytes the tensors a decode peak holds the prompt's length gain per row and token of the prompt
    # (`prompt_row_bytes`)
    prompt_row_bytes: int | None = None
    # of `update_activations_bytes`, those generate()'s token tensors (`token_tensors`): the update of a
    # sliding run's KV peak comes early, when they were short; None: not told
    update_token_bytes: int | None = None
    # bytes the activations at a decode peak and at the update gain per row and token of the context
    # (`context_token_bytes`); the rest are a step's fixed share (the logits, a position's hidden states)
    context_token_bytes: int | None = None
    update_context_token_bytes: int | None = None
    # the attention the model ran (the manifest's `attn_implementation`: eager, sdpa...); None: not told
    attn_implementation: str | None = None
    # an encoder-decoder run's encoder pass, split by how it grows with the encoder length
    # (analyzers.planning.encoder_pass); None: not told
    encoder_pass: tuple[tuple[int, int], ...] | None = None


def peak_moment(
    path: str | Path, prompt: int | None = None, context: int | None = None, encoder_tokens: int | None = None
) -> PeakMoment | str:
    """The run's peak moment, or why it has none to plan from (a sentence for the plan's notes); `prompt`
    and `context`, the run's generate() call's, tell its token tensors apart (`token_row_bytes`);
    `encoder_tokens`, an encoder-decoder run's input length, its encoder pass's (`encoder_pass_moments`)."""
    from analyzers.planning.diagnose import diagnose
    from analyzers.planning.encoder_pass import encoder_pass_moments
    from analyzers.report import build_report

    source, report = build_report(path, timelines=True)
    main = report.main_device
    if source.kv_log_only or main is None:
        # Why, as the report's note says it: a run recorded with the profiler on may have lost its trace
        cause = source.kv_log_cause if source.kv_log_only else None
        why = f" ({cause})" if cause else ""
        unseen = "its activations are unseen, so the reserve stands for them"
        return f"the run has no allocator events{why}: {unseen}"
    leaves_out = source.meta.get("peak_leaves_out")
    if leaves_out:
        return f"the run's peak leaves out {leaves_out}: the reserve stands for its activations"
    diagnosis = diagnose(source, report)
    at_peak = main.categories_at_peak
    beside = main.peak_allocated_bytes - at_peak.get("weights", 0) - at_peak.get("kv", 0)
    prefill, prefill_at = _prefill_beside_at(source, report)
    update, update_at = _update_beside_at(source, report)
    timeline = _main_timeline(source, report)
    peak_at = int(np.argmax(timeline[1].allocated)) if timeline and len(timeline[1].ts_us) else None
    at_peak_tokens = token_tensors(source, report, peak_at, diagnosis.batch, prompt, context)
    at_update_tokens = token_tensors(source, report, update_at, diagnosis.batch, prompt, context)
    at_peak_context = context_token_bytes(source, report, peak_at, diagnosis.batch, prompt, context)
    at_update_context = context_token_bytes(source, report, update_at, diagnosis.batch, prompt, context)
    at_peak_prompt = prompt_row_bytes(source, report, peak_at, diagnosis.batch, prompt)
    decode = diagnosis.step_phase == "decode"

    def batch_fixed(index: int | None) -> int | None:
        return batch_fixed_bytes(source, report, index, diagnosis.batch, prompt, context)

    return PeakMoment(
        peak_bytes=main.peak_allocated_bytes,
        activations_bytes=max(beside, 0),
        phase=diagnosis.step_phase,
        tokens=diagnosis.tokens_held or 0,
        batch=diagnosis.batch,
        cut_short=diagnosis.event == "oom" or diagnosis.step_cut,
        row_activation_bytes=diagnosis.row_activation_bytes,
        prefill_activations_bytes=prefill,
        prefill_prompt_bytes=prefill_prompt_bytes(source, report, diagnosis.batch, prompt),
        prefill_moments=prefill_moments(source, report, diagnosis.batch, prompt, context),
        update_activations_bytes=update,
        dtype_fixed_bytes=dtype_fixed_bytes(source, report, peak_at),
        prefill_dtype_fixed_bytes=dtype_fixed_bytes(source, report, prefill_at),
        update_dtype_fixed_bytes=dtype_fixed_bytes(source, report, update_at),
        batch_fixed_bytes=batch_fixed(peak_at),
        prefill_batch_fixed_bytes=batch_fixed(prefill_at),
        update_batch_fixed_bytes=batch_fixed(update_at),
        token_row_bytes=token_row_bytes(at_peak_tokens) if decode else None,
        prompt_row_bytes=at_peak_prompt if decode else None,
        update_token_bytes=sum(at_update_tokens) if at_update_tokens is not None else None,
        context_token_bytes=at_peak_context if decode else None,
        update_context_token_bytes=at_update_context,
        attn_implementation=_attn_implementation(report.geometry),
        encoder_pass=encoder_pass_moments(source, report, encoder_tokens),
    )


def token_row_bytes(tensors: list[int] | None) -> int | None:
    """Bytes a row and token adds to generate()'s token tensors among `tensors` (`token_tensors`): 8 for
    each, an int64 a token longer at every step. Where every layer keeps a window, they are what still
    grows with the context (the tiny Llama at batch 2, context 12 to 206: +6,208 B, 2 x 194 x 16)."""
    return None if tensors is None else _INT64_BYTES * len(tensors)


def prompt_row_bytes(
    source: MemorySource, report: Report, index: int | None, rows: int | None, prompt: int | None
) -> int | None:
    """Bytes a row and token of the prompt adds to the allocations beside the weights and KV live after the
    main device's event `index` that are the prompt's length, `rows` x prompt x a width a token
    (`context_token_bytes`' widths: generate() keeps an int64 one through its decode steps), not one of a
    step's fixed sizes (a position of a model width, a vector over the vocabulary): a longer prompt grows
    them, a longer context alone does not. Before, a decode peak planned at a longer prompt missed them:
    the tiny Llama 3 at batch 1, planned from a 16-token prompt at 64, was 384 B (48 x 8) below its
    recording. None where the events carry no addresses, the geometry no heads, or the run does not say
    its rows and prompt."""
    from analyzers.model import OTHER
    from analyzers.planning.diagnose_rows import fixed_sizes
    from analyzers.planning.diagnose_stacks import live_sizes

    main = report.main_device
    widths = _token_widths(report.geometry or {})
    if index is None or index < 0 or main is None or not rows or not prompt:
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if not widths or dev is None or not bool((dev.addr >= 0).any()):
        return None
    # a size a position of a model width has too (the tiny Llama's KV width at 16 tokens) counts as the
    # prompt's, a few bytes a token over at most; a vocabulary-long one never
    vocab = (report.geometry or {}).get("vocab_size")
    other = fixed_sizes(report.geometry) | ({rows * vocab * 4} if isinstance(vocab, int) else set())

    def width(nbytes: int) -> int:
        per_token, left = divmod(nbytes, rows * prompt)
        return per_token if not left and per_token in widths and nbytes not in other else 0

    return sum(width(nbytes) for nbytes in live_sizes(dev, index, OTHER))


def token_tensors(
    source: MemorySource,
    report: Report,
    index: int | None,
    rows: int | None,
    prompt: int | None,
    context: int | None,
) -> list[int] | None:
    """Sizes of the allocations beside the weights and KV live after the main device's event `index` that
    are generate()'s token tensors: int64, `rows` x n, n longer than the prompt and at most the context (its
    input_ids and attention mask, and the position ids some models derive from the mask, each a token
    longer at every step; the caller's own prompt ids and mask are the prompt's length), and not one
    position of a model width (a decode step's hidden states, queries: `row_units`), which an id tensor of
    that many tokens would be taken for too. None where the events carry no addresses or the run does not
    say its prompt and context."""
    from analyzers.model import OTHER
    from analyzers.planning.diagnose_rows import fixed_sizes, row_units
    from analyzers.planning.diagnose_stacks import live_sizes

    main = report.main_device
    if index is None or index < 0 or main is None or not rows or prompt is None or context is None:
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if dev is None or not bool((dev.addr >= 0).any()):
        return None
    # the logits processors' vectors over the vocabulary, and a position of a model width
    other = fixed_sizes(report.geometry) | {rows * unit for unit in row_units(report.geometry)}
    row = rows * _INT64_BYTES
    return [
        nbytes
        for nbytes in live_sizes(dev, index, OTHER)
        if nbytes % row == 0 and prompt < nbytes // row <= context and nbytes not in other
    ]


def context_token_bytes(
    source: MemorySource,
    report: Report,
    index: int | None,
    rows: int | None,
    prompt: int | None,
    context: int | None,
) -> int | None:
    """Bytes a row and token of the context adds to the allocations beside the weights and KV live after the
    main device's event `index`: those that are `rows` x n x a width a token, n longer than the prompt and
    at most the context, each counted at the widest width its size fits (the fewest tokens: an upper
    bound). The widths: generate()'s int64 ids and mask (`token_tensors`), a mask's element (bool, the
    model's dtype, float32), and attention's over the context, its scores (query heads) and its K and V
    copied or expanded to the query heads (KV heads or heads x head_dim), in the model's dtype or float32.
    All else (the logits, a position's hidden states, queries and MLP, the vocabulary-long vectors) is a
    step's fixed share, whatever the context: on the tiny Llama at batch 2 planned from context 12 at 206,
    growing it all with the context (57,556 B at the peak, 368 of them the ids and mask) was +918,539 B,
    +109%, over the recording. A size both fixed and one of these (one position of a model width, a
    vocabulary-long vector) counts as fixed, as in `token_tensors`. None where the events carry no
    addresses, the geometry no heads, or the run does not say its prompt and context."""
    from analyzers.model import OTHER
    from analyzers.planning.diagnose_rows import fixed_sizes, row_units
    from analyzers.planning.diagnose_stacks import live_sizes

    main = report.main_device
    widths = _token_widths(report.geometry or {})
    if index is None or index < 0 or main is None or not rows or prompt is None or context is None:
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if not widths or dev is None or not bool((dev.addr >= 0).any()):
        return None
    other = fixed_sizes(report.geometry) | {rows * unit for unit in row_units(report.geometry)}

    def widest(nbytes: int) -> int:
        fits = [w for w in widths if nbytes % (rows * w) == 0 and prompt < nbytes // (rows * w) <= context]
        return max(fits, default=0)

    return sum(widest(nbytes) for nbytes in live_sizes(dev, index, OTHER) if nbytes not in other)


def _attn_implementation(geometry: dict[str, Any] | None) -> str | None:
    """The attention the recorded model ran, as its manifest says (runs before kvtrace wrote it: None)."""
    implementation = (geometry or {}).get("attn_implementation")
    return implementation if isinstance(implementation, str) else None


def _token_widths(geometry: dict[str, Any]) -> set[int]:
    """Bytes a row and token of each tensor a decode step makes over the context (`context_token_bytes`);
    empty where the geometry does not give its heads."""
    head_dim, heads, kv_heads = (
        geometry.get(key) for key in ("head_dim", "num_attention_heads", "num_kv_heads")
    )
    if not all(isinstance(value, int) and value > 0 for value in (head_dim, heads, kv_heads)):
        return set()
    assert isinstance(head_dim, int) and isinstance(heads, int) and isinstance(kv_heads, int)
    elements = {4, _HALF_FLOATS.get(str(geometry.get("dtype")), 4)}
    widths = (1, heads, heads * head_dim, kv_heads * head_dim)
    return {_INT64_BYTES, 1} | {width * element for width in widths for element in elements}


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
    element = _HALF_FLOATS.get(str(geometry.get("dtype")))
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
    vocab_units = {vocab * 4, vocab * _HALF_FLOATS.get(str(geometry.get("dtype")), 4)}
    batch_first = {rows * unit * positions for unit in vocab_units for positions in {1, prompt}}
    other_units = row_units(geometry) - vocab_units

    def follows_rows(nbytes: int) -> bool:
        if nbytes in batch_first:
            return True
        per_row, left = divmod(nbytes, rows)
        return not left and any(not per_row % unit and per_row // unit <= context for unit in other_units)

    fixed = fixed_sizes(geometry)
    return sum(n for n in live_sizes(dev, index, OTHER) if n in fixed and not follows_rows(n))


def _main_timeline(source: MemorySource, report: Report) -> tuple[int, Any] | None:
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
    return _update_beside_at(source, report)[0]


def _update_beside_at(source: MemorySource, report: Report) -> tuple[int | None, int | None]:
    """`update_beside`, and the main device's event index it was read at (None where not told)."""
    kv_log = source.meta.get("kv")
    timeline = _main_timeline(source, report)
    if kv_log is None or timeline is None or kv_log.peak_bytes <= kv_log.final_bytes:
        return None, None
    at = int(np.searchsorted(timeline[1].ts_us, kv_log.peak_t_ns / 1000.0, side="right")) - 1
    return (int(timeline[1].by_category["other"][at]), at) if at >= 0 else (None, None)


def prefill_beside(source: MemorySource, report: Report) -> int | None:
    """The most the main device held beside its weights and KV during the run's prefill steps (the KV log's
    steps of phase "prefill", from the step's start to the next step's, `step_starts`): what a plan prices a
    larger prefill with. The run's peak less its weights and prefill KV bounds it too, but where the peak
    came late that holds the run's decode KV and its growth copy as well (the tour's demo planned at batch
    12, context 40: 66.35 MiB of "activations" where the batch-12 recording held 36.34 MiB). None where
    the run does not tell: no step of its log a whole prefill (cut short in it), no timeline."""
    return _prefill_beside_at(source, report)[0]


def _prefill_beside_at(source: MemorySource, report: Report) -> tuple[int | None, int | None]:
    """`prefill_beside`, and the main device's event index of that most (None where not told)."""
    found = _main_timeline(source, report)
    if found is None:
        return None, None
    beside = found[1].by_category["other"]  # allocated less weights and KV, after each event
    most: int | None = None
    most_at: int | None = None
    for inside in _prefill_windows(source, report):
        at = int(inside[np.argmax(beside[inside])])
        if most is None or int(beside[at]) > most:
            most, most_at = int(beside[at]), at
    return most, most_at


def _prefill_windows(source: MemorySource, report: Report) -> list[np.ndarray]:
    """The main device's event indices of each whole prefill step of the KV log (from the step's start to
    the next step's, `step_starts`); none where the run has no KV log or timeline."""
    kv_log = source.meta.get("kv")
    found = _main_timeline(source, report)
    if kv_log is None or found is None:
        return []
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
            windows.append(inside)
    return windows


def prefill_prompt_bytes(
    source: MemorySource, report: Report, rows: int | None, prompt: int | None
) -> int | None:
    """The most the main device held during the run's prefill steps beside its weights, its KV and the
    allocations over the vocabulary a position long: what a longer prompt's prefill grows, in proportion to
    it (its hidden states, MLP and attention over the prompt, generate()'s ids and mask). The vocabulary's
    stay: the logits processors' vectors, and the logits, which transformers' generate() computes for the
    last position alone (it passes `logits_to_keep=1` where the model takes it, 5.x) and upcasts to float32.
    Logits over every position of the prompt (a model without `logits_to_keep`, or a call giving 0) are
    `rows` x prompt x the vocabulary long, and grow. Each moment counts apart: the most of them may come
    inside a layer, not where the logits live (the prefill's most beside the KV, `prefill_beside`). Before,
    a longer prompt grew all of them: the tiny Llama 3 (128,256-token vocabulary, 4 layers) at batch 1,
    planned from a 16-token prompt at 256, said 111,149,568 B where the recording peaked at 73,190,324
    (+51.9%), the float32 logits' 2.45 MiB grown 16-fold. None where the events carry no addresses or
    categories, or the run does not say its rows and prompt, or has no whole prefill step."""
    parts = _prefill_parts(source, report, rows, prompt, None)
    return None if parts is None else max(int(grows.max()) for _, _, grows in parts)


def prefill_moments(
    source: MemorySource, report: Report, rows: int | None, prompt: int | None, context: int | None
) -> tuple[tuple[int, int, int], ...] | None:
    """The run's prefill moments as (bytes no row count or prompt changes, bytes that follow the rows alone,
    bytes that follow the rows and the prompt) beside its weights and KV: the logits processors' vectors
    over the vocabulary (`batch_fixed_bytes`' sizes), the rest of the vocabulary-long allocations (the last
    position's logits), the rest (`prefill_prompt_bytes`). Only the moments no other exceeds in all three,
    the ones that can be a plan's most at some rows and prompt: the logits' moment at the step's end, one
    inside a layer, whose hidden states and attention a longer prompt grows beyond it (eager's scores at a
    256-token prompt, 2 rows: 8.4 MB beside no logits). None where `prefill_prompt_bytes` is."""
    if not context:
        return None
    parts = _prefill_parts(source, report, rows, prompt, context)
    if parts is None:
        return None
    triples = {
        (int(f), int(r), int(g))
        for fixed, row_only, grows in parts
        for f, r, g in zip(fixed.tolist(), row_only.tolist(), grows.tolist(), strict=True)
    }
    ordered = sorted(triples, reverse=True)  # a moment can be exceeded in all three only by one before it
    kept: list[tuple[int, int, int]] = []
    for moment in ordered:
        if not any(all(a >= b for a, b in zip(other, moment, strict=True)) for other in kept):
            kept.append(moment)
    return tuple(kept)


def _prefill_parts(
    source: MemorySource, report: Report, rows: int | None, prompt: int | None, context: int | None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """For each whole prefill step, at each of its events, the bytes beside the weights and KV split as
    `prefill_moments` splits them (with no `context`, the first two not told apart: all in the second)."""
    from analyzers.model import OTHER
    from analyzers.planning.diagnose_rows import fixed_sizes, row_units

    geometry, main, found = report.geometry or {}, report.main_device, _main_timeline(source, report)
    vocab = geometry.get("vocab_size")
    if main is None or found is None or not rows or not prompt or not isinstance(vocab, int):
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if dev is None or dev.category is None or not bool((dev.addr >= 0).any()):
        return None
    windows = _prefill_windows(source, report)
    if not windows:
        return None
    vocab_units = {vocab * 4, vocab * _HALF_FLOATS.get(str(geometry.get("dtype")), 4)}
    every_position = {rows * unit * prompt for unit in vocab_units} if prompt > 1 else set()
    stays = (fixed_sizes(geometry) | {rows * unit for unit in vocab_units}) - every_position
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
    return [(fixed_live[at], (vocab_live - fixed_live)[at], grows[at]) for at in windows]


def recorded_note(moment: PeakMoment, same_cache: bool, reserve_typed: bool, rows_told: bool) -> str:
    """How the plan's peak counts the run's activations, and what the reserve is then; `rows_told`: the plan
    frees the moment's batch-first activations for a smaller batch (`RecordedPeak.row_activation_bytes`)."""
    measured = (
        f"the peak counts the run's activations as recorded ({human_bytes(moment.activations_bytes)} beside "
        f"the weights and KV at its {human_bytes(moment.peak_bytes)} peak, "
        f"{moment.phase or 'its'} step)"
    )
    row_bytes = human_bytes(moment.row_activation_bytes or 0)
    smaller = (
        f"a smaller batch frees the {row_bytes} of them that are batch-first "
        "(the logits, attention's copies: allocations the rows times a model width long) in proportion, as "
        "`kvtrace diagnose` prices it, and keeps the rest (an upper bound); a smaller context keeps them (an "
        "upper bound, they shrink too)"
        if rows_told
        else "a smaller batch or context keeps them (an upper bound, they shrink too; the recording does not "
        "tell which follow the rows)"
    )
    how = (
        f": the run's own settings plan its own peak; {smaller}; a larger batch grows them in proportion "
        "but for the logits processors' vectors over the vocabulary, which no row count changes, "
        "a larger context those over it (ids, masks, attention's) by the tokens added, a longer prompt's "
        "prefill with the prompt but for its vocabulary-long allocations (the last position's logits, the "
        "processors' vectors), which stay (where every layer slides, by generate()'s ids and mask alone, a "
        "few bytes a token, as the run's peak shows them), and attention's tensors of prompt x prompt "
        "(eager's mask and scores, sdpa's mask where prompts are padded) by arithmetic over the pairs beyond "
        "the run's"
        if same_cache
        else ": beside this cache's KV at the run's peak, or, the larger, its KV peak (inside a cache "
        "update) beside what the run held at its own KV peak, where the run tells it (else added to that KV "
        "peak), an estimate (another cache moves the peak: a static or sliding cache's prefill attends over "
        "its whole length); record it to be sure"
    )
    reserve = (
        "; the --reserve typed is kept out on top"
        if reserve_typed
        else "; they replace the reserve's guess, so none is kept (--reserve keeps memory out on top for "
        "the CUDA context and allocator fragmentation, which allocated bytes do not count)"
    )
    cut = (
        "; the run stopped before its end, so its peak is what it reached, a lower bound"
        if moment.cut_short
        else ""
    )
    return measured + how + reserve + cut
