"""What one rank of a run group holds, to tell data parallelism from tensor parallelism.

Data-parallel ranks each run the whole model on their own sequences: every rank's cache holds all the
model's KV heads, and its attention weights are whole. Tensor-parallel ranks run the same sequences, each
with a share of the attention heads: its cache holds a share of the KV heads, except when there are more
ranks than KV heads (Llama 3 70B at TP 16, 8 KV heads; vLLM and Megatron then give every rank copies of the
KV heads its query heads need), when only its attention weights show the split. Tensor-parallel ranks
always hold the same rows, and the same tokens once they all finish: ranks that differ there each run their
own sequences, whatever the model's geometry says or omits (a hand-written model's manifest has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from analyzers.kv_events import is_kv_data
from analyzers.model import MemorySource
from analyzers.run_kv import heads_held_by
from analyzers.summary import Report

__all__ = ["Reading", "group_reading", "holds_all_kv_heads", "mixed_head_counts", "sharded_attention"]

# How a group's token figures combine: "data" adds the ranks' rows and token-rows up, "tensor" takes one
# rank's (they hold the same), "unknown" gives neither: either sum would be a guess.
Reading = Literal["data", "tensor", "unknown"]


class RankRun(Protocol):
    """What the reading needs of a rank: its report, its attributed source, how its block ended."""

    report: Report
    source: MemorySource
    status: str


# Attention projections whose width is the query heads x head_dim: [width, hidden] for queries, [hidden,
# width] for the output (Hugging Face's q_proj / o_proj, Meta's reference wq / wo).
_QUERY_WEIGHTS = (".q_proj.weight", ".wq.weight")
_OUTPUT_WEIGHTS = (".o_proj.weight", ".wo.weight")


def sharded_attention(report: Report, source: MemorySource) -> bool | None:
    """Whether the run's attention weights (weights.jsonl) hold a share of the model's query heads, as
    tensor parallelism splits them; None when they do not say (no weights or geometry, a fused or packed
    projection such as a 4-bit one)."""
    geometry = report.geometry or {}
    heads, head_dim, hidden = (geometry.get(k) for k in ("num_attention_heads", "head_dim", "hidden_size"))
    if not (isinstance(heads, int) and isinstance(head_dim, int) and isinstance(hidden, int)):
        return None
    full = heads * head_dim
    run = source.meta.get("run")
    for weight in run.weights if run is not None else ():
        shape = list(weight.shape or ())
        if len(shape) != 2:
            continue
        if weight.name.endswith(_QUERY_WEIGHTS) and shape[1] == hidden:
            width = shape[0]
        elif weight.name.endswith(_OUTPUT_WEIGHTS) and shape[0] == hidden:
            width = shape[1]
        else:
            continue
        if width == full:
            return False
        if 0 < width < full and full % width == 0:
            return True
    return None


def holds_all_kv_heads(report: Report, source: MemorySource) -> bool:
    """Whether the run's cache holds all the model's KV heads. A head count other than the model's is a
    share, or a tensor whose layout the log does not say (a [batch, seq, heads, dim] tensor tracked as
    [batch, heads, seq, dim] shows its tokens as heads): no verdict."""
    heads = (report.geometry or {}).get("num_kv_heads")
    return isinstance(heads, int) and _held_heads(source) == heads


def _holds_kv_share(report: Report, source: MemorySource) -> bool:
    """Whether the run's cache holds a 1/N share of the model's KV heads (a tensor-parallel rank's)."""
    heads = (report.geometry or {}).get("num_kv_heads")
    held = _held_heads(source)
    return isinstance(heads, int) and held is not None and 0 < held < heads and heads % held == 0


def _held_heads(source: MemorySource) -> int | None:
    run = source.meta.get("run")
    data = [e for e in run.kv_events if is_kv_data(e) and e.shape] if run is not None else []
    return heads_held_by(data[-1]) if data else None


def _different_sequences(ranks: Sequence[RankRun]) -> bool:
    """Whether the ranks' caches hold different rows, or (all finished) different tokens: tensor-parallel
    shares of one batch never do. A rank that died early holds fewer tokens, so tokens count only when
    every rank finished; its rows are still the batch's."""
    rows = [r.report.kv.batch for r in ranks]
    if all(isinstance(n, int) and n > 0 for n in rows) and len(set(rows)) > 1:
        return True
    tokens = [r.report.kv.tokens_held for r in ranks]
    finished = all(r.status == "ok" for r in ranks)
    return finished and all(isinstance(n, int) and n > 0 for n in tokens) and len(set(tokens)) > 1


def group_reading(ranks: Sequence[RankRun]) -> tuple[Reading, str | None]:
    """Whether the group's ranks are data parallel (each its own sequences), tensor parallel (shares of the
    same ones) or not to be told apart from what they recorded; the note that says so, None when the
    reading is tensor parallel from the model's own KV heads (the default, said by nothing)."""
    if len(ranks) < 2:
        return "tensor", None  # one rank: either reading gives its own figures
    share = any(_holds_kv_share(r.report, r.source) or sharded_attention(r.report, r.source) for r in ranks)
    different = _different_sequences(ranks)
    if different and share:
        return "unknown", (
            "the ranks hold different rows or tokens, yet a share of the model's KV heads or attention "
            "weights (tensor and data parallel together?): batch, token rows and bytes per token are left "
            "unknown, not summed nor taken from one rank; each rank's own are in `ranks`"
        )
    if all(holds_all_kv_heads(r.report, r.source) for r in ranks) and not share:
        return "data", (
            "every rank holds all KV heads (data parallel: each its own sequences): bytes per token are one "
            "rank's, batch and evicted tokens the ranks' sum"
        )
    if different:
        return "data", (
            "the ranks' caches hold different rows or tokens (data parallel: each its own sequences): bytes "
            "per token are one rank's, batch and evicted tokens the ranks' sum"
        )
    known = all(isinstance((r.report.geometry or {}).get("num_kv_heads"), int) for r in ranks)
    if known or share:
        return "tensor", None
    return "unknown", (
        "the ranks hold the same rows and tokens, and the runs do not give the model's KV heads (no "
        "geometry.num_kv_heads; each rank's cache holds "
        f"{_heads_text(ranks)}): tensor parallel (shares of the same rows) and data parallel (as many rows "
        "again on each rank) cannot be told apart, so the group's batch, token rows, bytes per token and "
        "tokens/s are left unknown; each rank's own are in `ranks`"
    )


def _heads_text(ranks: Sequence[RankRun]) -> str:
    held = {_held_heads(r.source) for r in ranks}
    if len(held) == 1 and (only := held.pop()) is not None:
        return f"{only} KV head{'s' if only != 1 else ''}"
    return "an unknown number of KV heads"


def mixed_head_counts(ranks: Sequence[tuple[int, Report]]) -> str | None:
    """The note for (rank, report)s whose caches hold different numbers of KV heads, one of them a share of
    the model's: one job's ranks hold as many each (tensor parallel: equal shares, or a copy each where
    there are more ranks than heads; data parallel, or tensor and data parallel together: the same count on
    every rank), so runs of two jobs recorded at the same time are mixed, which the ranks' times cannot
    tell. None when every rank holds as many, or a rank's heads are not known (`KvSummary.rank_heads`)."""
    held = [(rank, report.kv.rank_heads) for rank, report in ranks]
    if len(held) < 2 or any(heads is None for _, heads in held):
        return None
    counts = [(rank, heads["kv_heads_held"], heads["model_kv_heads"]) for rank, heads in held if heads]
    models = {model for _, _, model in counts}
    if len(models) != 1 or len({count for _, count, _ in counts}) == 1:
        return None
    model = models.pop()
    if all(count == model for _, count, _ in counts):
        return None
    each = ", ".join(f"rank {rank}: {count}" for rank, count, _ in counts)
    together = sum(count for _, count, _ in counts)
    return (
        f"the ranks' caches hold different numbers of the model's {model} KV heads ({each}; {together} "
        "together): one job's ranks hold as many each, so several jobs' runs are mixed, and their KV summed "
        "is no one job's"
    )
