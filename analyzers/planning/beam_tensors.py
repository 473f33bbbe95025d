"""The tensors transformers' beam search makes over the whole generation's length, for `kvtrace plan
--from-run`: they follow the context at every moment of a beam search run, its prefill included, which the
measured activations do not tell. Pure arithmetic, no torch.

Why a term of its own: `_beam_search` (transformers 5.17 and 5.25) allocates its sequences [prompts, beams,
max_length] (int64) and beam indices [prompts, beams, max_length - prompt] (int32) before the prefill, and
each step's top-k candidates beside them. A run's peak grows them with its rows, and at a decode step with
the tokens of the widths it tells (`run_peak.context_token_bytes`), which miss them: 16 B a row over the
context is no width of a model, and in a short run the new tokens are fewer than the prompt. Before, a beam
search planned at a longer context was below its recording: the demo's tiny Llama 3, 2 prompts x 2 beams,
a 20-token prompt, planned from context 28 at 128, by 12,800 B (32 B a row and token added); a 2-layer one
that peaked at its prefill, planned from context 24 at 64, by 3,840 B.
"""

from __future__ import annotations

from collections import Counter

from analyzers.planning.plan_types import RecordedPeak

__all__ = ["beam_search_bytes", "beam_search_growth", "beam_search_sizes", "without_beam_tensors"]

_SEQUENCE_BYTES = 8  # an int64 token id of the sequences
_INDEX_BYTES = 4  # an int32 beam index
# a step's top-k candidates a beam (`topk_running_*`): beams_to_keep = max(2, 1 + eos ids), 2 beams' worth
# a beam with one eos id
_CANDIDATES = 2


def beam_search_sizes(rows: int, beams: int, prompt: int, context: int) -> Counter[int]:
    """Sizes of a beam search's sequences and beam indices, `rows` being prompts x beams, at a `context`
    (prompt + new tokens, generate()'s max_length) of which `prompt` is the prompt, each as many times as
    it makes one: the running and the finished sequences (`running_sequences`, `sequences`) and beam indices
    (`running_beam_indices`, `beam_indices`), and a step's top-k candidates of each. All of them, as a
    step's end holds them (its prefill holds the first four alone: an upper bound there). Empty for a
    greedy search, which makes none."""
    if beams <= 1:
        return Counter()
    new = max(context - prompt, 0)
    sequences, indices = rows * context * _SEQUENCE_BYTES, rows * new * _INDEX_BYTES
    sizes = Counter({sequences: 2})
    sizes[indices] += 2
    sizes[sequences * _CANDIDATES] += 1
    sizes[indices * _CANDIDATES] += 1
    del sizes[0]
    return sizes


def beam_search_bytes(rows: int, beams: int, prompt: int, context: int) -> int:
    """Bytes of `beam_search_sizes`: what a beam search holds over the generation's length."""
    return sum(size * count for size, count in beam_search_sizes(rows, beams, prompt, context).items())


def without_beam_tensors(
    sizes: list[int], rows: int, beams: int | None, prompt: int, context: int
) -> list[int]:
    """`sizes` (allocations live at a moment) less those `beam_search_sizes` names, each at most as many
    times as it names it: `beam_search_growth` grows them by arithmetic, so the widths a run's decode step
    tells (`run_peak.context_token_bytes`, `token_tensors`) leave them out rather than count them twice. A
    size taken for one that was another tensor (generate()'s ids of that length) is grown by the arithmetic
    all the same, at a width at least its own: an upper bound."""
    budget = beam_search_sizes(rows, beams or 1, prompt, context)
    kept = []
    for size in sizes:
        if budget[size] > 0:
            budget[size] -= 1
        else:
            kept.append(size)
    return kept


def beam_search_growth(rec: RecordedPeak, beams: int, batch: int, prompt: int, context: int) -> int:
    """What a plan of `batch` rows in `beams`, a `prompt` and a `context`, adds to the run's measured moments
    for beam search's tensors: theirs at the plan less the run's at the plan's rows, which its activations,
    grown with the rows, already hold (none for a greedy run). Never below 0: a shorter context or fewer
    beams keep them as measured (an upper bound). The widths a run's decode step tells leave them out
    (`without_beam_tensors`), so none is grown twice."""
    run_prompt = rec.prompt if rec.prompt is not None else prompt
    held = beam_search_bytes(batch, rec.beams, run_prompt, rec.context)
    return max(beam_search_bytes(batch, beams, prompt, context) - held, 0)
