"""What one rank of a run group holds, to tell data parallelism from tensor parallelism.

Data-parallel ranks each run the whole model on their own sequences: every rank's cache holds all the
model's KV heads, and its attention weights are whole. Tensor-parallel ranks run the same sequences, each
with a share of the attention heads: its cache holds a share of the KV heads, except when there are more
ranks than KV heads (Llama 3 70B at TP 16, 8 KV heads; vLLM and Megatron then give every rank copies of the
KV heads its query heads need), when only its attention weights show the split.
"""

from __future__ import annotations

from analyzers.kv_events import is_kv_data
from analyzers.model import MemorySource
from analyzers.run_kv import heads_held_by
from analyzers.summary import Report

__all__ = ["holds_all_kv_heads", "sharded_attention"]

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
    run = source.meta.get("run")
    data = [e for e in run.kv_events if is_kv_data(e) and e.shape] if run is not None else []
    held = heads_held_by(data[-1]) if data else None
    return isinstance(heads, int) and held == heads
