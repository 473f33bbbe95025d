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

from analyzers.planning.attention_moment import prefill_attention_moment
from analyzers.planning.beam_tensors import without_beam_tensors
from analyzers.planning.decode_step_end import row_bytes_at
from analyzers.planning.plan_types import MeasuredPeak
from analyzers.planning.run_moments import (
    HALF_FLOATS,
    batch_fixed_bytes,
    decode_beside_at,
    dtype_fixed_bytes,
    last_update_beside_at,
    main_timeline,
    prefill_beside_at,
    prefill_split,
    update_beside_at,
)
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.readers.sources import ProgressFn
    from analyzers.summary import Report

__all__ = [
    "UNSEEN_ENDS",
    "PeakMoment",
    "context_token_bytes",
    "peak_moment",
    "prompt_row_bytes",
    "recorded_note",
    "token_row_bytes",
    "token_tensors",
    "update_token_row_bytes",
]

_INT64_BYTES = 8  # an element of generate()'s token ids, attention mask and position ids
# How `peak_moment`'s sentence for a run without a moment ends: the reserve stands for the unseen activations
# (a CUDA run's samples may measure them instead: analyzers.planning.sampled_reserve)
UNSEEN_ENDS = (
    ": its activations are unseen, so the reserve stands for them",
    ": the reserve stands for its activations",
)


@dataclass(frozen=True, kw_only=True)
class PeakMoment(MeasuredPeak):
    """The run's peak as it measured it (`MeasuredPeak`), and the rows of the moment's step."""

    batch: int | None  # the moment's rows, diagnose's (a module's buffers: their capacity, not the run's)


def _recorded_without_profiler(root: Path) -> bool:
    """A run (not a group) whose manifest says `profiler=False` and that holds no trace: its source is its KV
    log alone, for that cause (`readers.run_dir`'s first), as its manifest says without its log being read."""
    import json

    from kvtrace.format import MANIFEST, profiler_traces
    from kvtrace.run_layout import is_run_group

    if is_run_group(root):
        return False
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError):  # the report's reader says what is wrong with it
        return False
    options = manifest.get("options") if isinstance(manifest, dict) else None
    return isinstance(options, dict) and options.get("profiler") is False and not profiler_traces(root)


def peak_moment(
    path: str | Path,
    prompt: int | None = None,
    context: int | None = None,
    encoder_tokens: int | None = None,
    progress: ProgressFn | None = None,
) -> PeakMoment | str:
    """The run's peak moment, or why it has none to plan from (a sentence for the plan's notes); `prompt`
    and `context`, the run's generate() call's, tell its token tensors apart (`token_row_bytes`);
    `encoder_tokens`, an encoder-decoder run's input length, its encoder pass's (`encoder_pass_moments`);
    `progress`, called as its trace is read (bytes read, total), the bar `report` draws."""
    from analyzers.planning.diagnose import diagnose
    from analyzers.planning.encoder_pass import encoder_pass_moments
    from analyzers.report import build_report

    if _recorded_without_profiler(Path(path)):
        # What the report below would say of it, without reading its KV log again (plan --from-run has read
        # it for its defaults: a minute more on a long run's, to learn that the run has no trace)
        return f"the run has no allocator events (it was recorded with profiler=False){UNSEEN_ENDS[0]}"
    source, report = build_report(path, progress=progress, timelines=True)
    main = report.main_device
    if source.kv_log_only or main is None:
        # Why, as the report's note says it: a run recorded with the profiler on may have lost its trace
        cause = source.kv_log_cause if source.kv_log_only else None
        why = f" ({cause})" if cause else ""
        return f"the run has no allocator events{why}{UNSEEN_ENDS[0]}"
    leaves_out = source.meta.get("peak_leaves_out")
    if leaves_out:
        return f"the run's peak leaves out {leaves_out}{UNSEEN_ENDS[1]}"
    diagnosis = diagnose(source, report)
    at_peak = main.categories_at_peak
    beside = main.peak_allocated_bytes - at_peak.get("weights", 0) - at_peak.get("kv", 0)
    prefill, prefill_at = prefill_beside_at(source, report)
    update, update_at = update_beside_at(source, report)
    last_update, last_update_at = last_update_beside_at(source, report)
    timeline = main_timeline(source, report)
    peak_at = int(np.argmax(timeline[1].allocated)) if timeline and len(timeline[1].ts_us) else None
    rows, beams = diagnosis.batch, diagnosis.beams  # beam search's own tensors are the plan's arithmetic
    at_peak_tokens = token_tensors(source, report, peak_at, rows, prompt, context, beams)
    at_update_tokens = token_tensors(source, report, update_at, rows, prompt, context, beams)
    at_peak_context = context_token_bytes(source, report, peak_at, rows, prompt, context, beams)
    at_update_context = context_token_bytes(source, report, update_at, rows, prompt, context, beams)
    at_last_tokens = token_tensors(source, report, last_update_at, rows, prompt, context, beams)
    at_last_context = context_token_bytes(source, report, last_update_at, rows, prompt, context, beams)
    at_peak_prompt = prompt_row_bytes(source, report, peak_at, diagnosis.batch, prompt)
    decode = diagnosis.step_phase == "decode"
    attention = prefill_attention_moment(source, report, diagnosis.batch, prompt)
    decode_beside, decode_at = decode_beside_at(source, report)
    split = prefill_split(source, report, diagnosis.batch, prompt, context)  # one pass for four figures

    def batch_fixed(index: int | None) -> int | None:
        return batch_fixed_bytes(source, report, index, diagnosis.batch, prompt, context)

    return PeakMoment(
        peak_bytes=main.peak_allocated_bytes,
        activations_bytes=max(beside, 0),
        phase=diagnosis.step_phase,
        tokens=diagnosis.tokens_held or 0,
        batch=diagnosis.batch,
        cut_short=diagnosis.event == "oom" or diagnosis.step_cut or _stopped_before_its_end(source),
        kv_at_peak_bytes=at_peak.get("kv", 0),
        row_activation_bytes=diagnosis.row_activation_bytes,
        prefill_activations_bytes=prefill,
        prefill_attention_bytes=attention.beside_bytes if attention is not None else None,
        prefill_attention_key_bytes=attention.key_bytes if attention is not None else None,
        prefill_prompt_bytes=None if split is None else split.prompt_bytes(),
        prefill_moments=None if split is None else split.moments(),
        prefill_held_bytes=None if split is None else split.held_bytes(),
        prefill_peak_moment=None if split is None or peak_at is None else split.moment_at(peak_at),
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
        peak_token_bytes=sum(at_peak_tokens) if decode and at_peak_tokens is not None else None,
        update_token_row_bytes=update_token_row_bytes(at_update_tokens),
        context_token_bytes=at_peak_context if decode else None,
        update_context_token_bytes=at_update_context,
        last_update_activations_bytes=last_update,
        last_update_token_bytes=sum(at_last_tokens) if at_last_tokens is not None else None,
        last_update_context_token_bytes=at_last_context,
        attn_implementation=_attn_implementation(report.geometry),
        decode_activations_bytes=decode_beside,
        decode_row_bytes=row_bytes_at(source, report, decode_at, rows),
        decode_context_token_bytes=context_token_bytes(
            source, report, decode_at, rows, prompt, context, beams
        ),
        encoder_pass=encoder_pass_moments(source, report, encoder_tokens),
    )


def _stopped_before_its_end(source: MemorySource) -> bool:
    """Whether the run stopped before its generate() call's end between two steps (SIGTERMed or interrupted,
    killed, its block raised, or still being recorded): the call asked for more tokens than it reached
    (run_defaults' `call_context`). Its peak is then what it reached, as a step cut part-way's is, though the
    peak's own step ended whole. Before, such a run read as finished: a SIGTERM between steps 149 and 150 of
    200 was planned as if its peak held the whole context's tokens."""
    from analyzers.planning.run_defaults import call_context

    run, kv_log = source.meta.get("run"), source.meta.get("kv")
    if source.kind != "run" or run is None or kv_log is None:
        return False
    call = call_context(run, kv_log)
    if call is None or call.reached is None or call.context is None:
        return False
    return call.reached < call.context


def token_row_bytes(tensors: list[int] | None) -> int | None:
    """Bytes a row and token adds to generate()'s token tensors among `tensors` (`token_tensors`): 8 for
    each, an int64 a token longer at every step. Where every layer keeps a window, they are what still
    grows with the context (the tiny Llama at batch 2, context 12 to 206: +6,208 B, 2 x 194 x 16)."""
    return None if tensors is None else _INT64_BYTES * len(tensors)


def update_token_row_bytes(tensors: list[int] | None) -> int | None:
    """Bytes a row and token adds to generate()'s token tensors live at a cache update (`token_tensors` at
    the update's moment): 8 for each of the moment's longest, those that are the step's. A decode peak
    elsewhere may hold others beside them: transformers 5.17's sliding run peaks where generate() grows its
    ids and mask by concatenation, the old pair (a token shorter) live beside the new, 32 B a row and token
    where a cache update inside the forward holds 24. A plan whose peak is a cache update (a full cache's
    growth copy) counts these: before, a dynamic cache planned from the tiny Llama's sliding run at context
    206 under 5.17 was 2,576 B over its recording. None where the moment is not told."""
    if not tensors:
        return None
    longest = max(tensors)
    return _INT64_BYTES * sum(nbytes == longest for nbytes in tensors)


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
    beams: int | None = None,
) -> list[int] | None:
    """Sizes of the allocations beside the weights and KV live after the main device's event `index` that
    are generate()'s token tensors: int64, `rows` x n, n longer than the prompt and at most the context (its
    input_ids and attention mask, and the position ids some models derive from the mask, each a token
    longer at every step; the caller's own prompt ids and mask are the prompt's length), and not one
    position of a model width (a decode step's hidden states, queries: `row_units`), which an id tensor of
    that many tokens would be taken for too; under beam search (`beams`), not its own tensors
    (`without_beam_tensors`). None where the events carry no addresses or the run does not say its prompt
    and context."""
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
    live = without_beam_tensors(live_sizes(dev, index, OTHER), rows, beams, prompt, context)
    return [
        nbytes
        for nbytes in live
        if nbytes % row == 0 and prompt < nbytes // row <= context and nbytes not in other
    ]


def context_token_bytes(
    source: MemorySource,
    report: Report,
    index: int | None,
    rows: int | None,
    prompt: int | None,
    context: int | None,
    beams: int | None = None,
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
    vocabulary-long vector) counts as fixed, as in `token_tensors`; beam search's own tensors not at all
    (`without_beam_tensors`: the plan grows them by arithmetic). None where the events carry no addresses,
    the geometry no heads, or the run does not say its prompt and context."""
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

    live = without_beam_tensors(live_sizes(dev, index, OTHER), rows, beams, prompt, context)
    return sum(widest(nbytes) for nbytes in live if nbytes not in other)


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
    elements = {4, HALF_FLOATS.get(str(geometry.get("dtype")), 4)}
    widths = (1, heads, heads * head_dim, kv_heads * head_dim)
    return {_INT64_BYTES, 1} | {width * element for width in widths for element in elements}


def _shorter_prompt(moment: PeakMoment) -> str:
    """How a shorter prompt moves a run that peaked at its prefill, where its moments tell what follows the
    prompt (recorded_terms' `shorter_prefill`)."""
    if moment.phase != "prefill" or not moment.prefill_moments:
        return ""
    return (
        " A shorter prompt's prefill, this run's peak, holds what follows the prompt in proportion to it, "
        "but for what the step never frees (its ids and mask for the next step), as `kvtrace diagnose` "
        "prices a shorter prompt."
    )


def _decode_step_end(moment: PeakMoment, rows_told: bool) -> str:
    """How fewer rows price a decode step's end of a run that peaked at its prefill (recorded_terms'
    `decode_beside_fewer_rows`), where the run tells what its decode steps held and which of it follows
    the rows: the activations row says when that moment is the plan's."""
    decode, rows = moment.decode_activations_bytes, moment.decode_row_bytes
    if moment.phase != "prefill" or not rows_told or decode is None or rows is None:
        return ""
    return (
        f" Fewer rows also price a decode step's end, the most the run's decode steps held beside their "
        f"weights and KV ({human_bytes(decode)}), their {human_bytes(rows)} batch-first freed in proportion "
        "and the rest (the logits processors' vectors over the vocabulary) kept: it can outweigh the "
        "prefill's, scaled down."
    )


def recorded_note(moment: PeakMoment, same_cache: bool, reserve_typed: bool, rows_told: bool) -> str:
    """How the plan's peak counts the run's activations, and what the reserve is then; `rows_told`: the plan
    frees the moment's batch-first activations for a smaller batch (`RecordedPeak.row_activation_bytes`).
    One sentence a rule, so that the text can set each on its own line: it was one sentence of some 1,500
    characters."""
    measured = (
        f"the peak counts the run's activations as recorded ({human_bytes(moment.activations_bytes)} beside "
        f"the weights and KV at its {human_bytes(moment.peak_bytes)} peak, "
        f"{moment.phase or 'its'} step)"
    )
    row_bytes = human_bytes(moment.row_activation_bytes or 0)
    smaller = (
        f" A smaller batch frees the {row_bytes} of them that are batch-first "
        "(the logits, attention's copies: allocations the rows times a model width long) in proportion, as "
        "`kvtrace diagnose` prices it, and keeps the rest (an upper bound). A smaller context keeps them (an "
        f"upper bound, they shrink too).{_decode_step_end(moment, rows_told)}"
        if rows_told
        else " A smaller batch or context keeps them (an upper bound, they shrink too; the recording does "
        "not tell which follow the rows)."
    )
    how = (
        f": the run's own settings plan its own peak.{smaller} A larger batch grows them in proportion, "
        "but for the logits processors' vectors over the vocabulary, which no row count changes; a larger "
        "context grows those over it (ids, masks, attention's) by the tokens added. A longer prompt's "
        "prefill grows them with the prompt, but for its vocabulary-long allocations (the last position's "
        "logits, the processors' vectors), which stay; where every layer slides, it grows them by "
        "generate()'s ids and mask alone, a few bytes a token, as the run's peak shows them. Attention's "
        "tensors of prompt x prompt (eager's mask and scores, sdpa's mask where prompts are padded or "
        "reach a sliding window) grow by arithmetic over the pairs beyond the run's."
        f"{_shorter_prompt(moment)}"
        if same_cache
        else ": beside this cache's KV at the run's peak, or, the larger, its KV peak (inside a cache "
        "update) beside what the run held at its own KV peak, where the run tells it (else added to that KV "
        "peak). That is an estimate (another cache moves the peak: a static or sliding cache's prefill "
        "attends over its whole length): record it to be sure."
    )
    reserve = (
        " The --reserve typed is kept out on top."
        if reserve_typed
        else " They replace the reserve's guess, so none is kept (--reserve keeps memory out on top for "
        "the CUDA context and allocator fragmentation, which allocated bytes do not count)."
    )
    cut = (
        " The run stopped before its end, so its peak is what it reached, a lower bound."
        if moment.cut_short
        else ""
    )
    return (measured + how + reserve + cut).removesuffix(".")  # a note ends bare, as every other
