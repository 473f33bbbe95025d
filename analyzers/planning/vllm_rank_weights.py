"""The parameters one tensor-parallel rank of vLLM holds: what `kvtrace plan --engine vllm` weighs it by.

Read in vllm 0.32 (`vllm/model_executor/layers/linear.py`, `vocab_parallel_embedding.py`, `layernorm.py`,
`models/llama.py`). A rank does not hold 1/tp of every parameter:

- column-parallel projections (the attention's q, the MLP's gate and up) and their biases, and row-parallel
  ones (the attention's output, the MLP's down) are split over the ranks; a row-parallel layer's bias is
  added after the all-reduce, so it is whole on every rank (`RowParallelLinear`: `output_size`);
- K and V (`QKVParallelLinear`): each rank holds `max(1, kv_heads // tp)` whole heads, so beyond as many
  ranks as KV heads every rank holds a copy of one head, not a fraction of one;
- norms (`RMSNorm`, LayerNorm) are whole on every rank: each layer's, q/k norms of head_dim, the final one;
- the vocabulary (`VocabParallelEmbedding`, `ParallelLMHead` and its bias) is padded to a multiple of 64
  rows (`DEFAULT_VOCAB_PADDING_SIZE`), at tp 1 too, and each rank holds padded / tp rows; a learned position
  table (`nn.Embedding`) and OPT's projections in and out (`ReplicatedLinear`) are whole;
- a mixture of experts' router (`GateLinear`, a `ReplicatedLinear`), its bias and the experts' down biases
  are whole; each expert's matrices are split (`intermediate_size // tp`).

Exact for the Llama layout (`models/llama.py`: Llama, Mistral; Qwen2's q/k/v biases and Qwen3's q/k norms
follow the same rules), checked against the weights each of vLLM's workers loads for a tiny Llama over 2 and
4 ranks (tests/vllm/test_vllm_tp_weights.py). What these rules do not place (`estimated_parts`) is split
evenly over the ranks, an estimate the plan's note names.
"""

from __future__ import annotations

import math

from analyzers.planning.param_count import end_params, param_count
from analyzers.planning.presets import ModelGeometry

__all__ = [
    "VOCAB_PADDING",
    "estimated_parts",
    "padded_vocab",
    "rank_end_params",
    "rank_layer_params",
    "rank_param_count",
    "weights_note",
]

VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


def padded_vocab(vocab_size: int) -> int:
    """The rows vLLM's vocabulary layers hold in all: `pad_vocab_size`, a multiple of 64."""
    return math.ceil(vocab_size / VOCAB_PADDING) * VOCAB_PADDING


def rank_end_params(geom: ModelGeometry, tensor_parallel_size: int = 1) -> tuple[int, int, int]:
    """(embedding, final norm, lm_head) one rank holds: `end_params` with the vocabulary's rows (the
    embedding's, an untied lm_head's and its bias) padded and split over the ranks, the rest whole."""
    embedding, final_norm, lm_head = end_params(geom)
    vocab, width = geom.vocab_size, geom.embedding_size or geom.hidden_size
    rows = math.ceil(padded_vocab(vocab) / tensor_parallel_size)  # vLLM refuses a size that does not divide
    embedding += (rows - vocab) * width
    if not geom.tie_word_embeddings:
        lm_head += (rows - vocab) * width
    if geom.lm_head_bias:
        lm_head += rows - vocab
    return embedding, final_norm, lm_head


def rank_layer_params(geom: ModelGeometry, tensor_parallel_size: int = 1) -> int:
    """All the decoder layers' parameters one rank holds: the replicated ones whole, K and V by the whole
    heads the rank holds, the rest split over the ranks."""
    layers = param_count(geom) - sum(end_params(geom))
    if tensor_parallel_size == 1:
        return layers
    whole = _whole_layer_params(geom)
    kv, kv_held = _kv_params(geom, tensor_parallel_size)
    return math.ceil((layers - whole - kv) / tensor_parallel_size) + whole + kv_held


def rank_param_count(geom: ModelGeometry, tensor_parallel_size: int = 1) -> int:
    """Every parameter one rank of a single pipeline stage holds."""
    return rank_layer_params(geom, tensor_parallel_size) + sum(rank_end_params(geom, tensor_parallel_size))


def estimated_parts(geom: ModelGeometry) -> list[str]:
    """The model's parts whose split over the ranks these rules do not know, split evenly as an estimate."""
    parts = []
    if geom.mla is not None:
        parts.append("latent attention")
    if geom.attention_experts:
        parts.append("attention experts")
    if geom.moe_layers:
        parts.append("the experts (a fused-MoE backend may round their widths)")
    if geom.qk_norm_per_head:
        parts.append("per-head q/k norms")
    if geom.layer_shapes is not None or geom.per_layer_input_size or geom.altup_inputs or geom.laurel_rank:
        parts.append("Gemma's per-layer parts")
    if geom.head_dim_vectors or geom.activation_params or geom.mlp_norm:
        parts.append("the layers' extra vectors")
    return parts


def weights_note(geom: ModelGeometry, tensor_parallel_size: int) -> str:
    """How the plan weighed a worker it computed the weights of: vLLM's padding, and under tensor
    parallelism what a rank holds whole, the KV heads it holds and the parts estimated."""
    padded = padded_vocab(geom.vocab_size)
    padding = f"the vocabulary padded to {padded:,} rows" if padded != geom.vocab_size else ""
    tp = tensor_parallel_size
    if tp == 1:
        how = padding or "no padding"
        return f"weights computed from the geometry as vLLM loads them ({how}; no quantization scales)"
    kv = ""
    if geom.mla is None and not geom.attention_experts and geom.num_kv_heads < tp:
        kv = f", a copy of one of the {geom.num_kv_heads} KV heads' K and V on each"
    row_biases = geom.attention_bias or geom.output_bias or geom.mlp_bias
    biases = " and the row-parallel biases" if row_biases else ""
    estimate = estimated_parts(geom)
    split = f"; {', '.join(estimate)} split evenly (an estimate)" if estimate else ""
    return (
        f"weights computed from the geometry, one of the {tp} tensor-parallel ranks' as vLLM loads them: "
        f"{padding or 'the vocabulary'} split over the ranks, the projections split{kv}, the norms{biases} "
        f"whole on each{split}; no quantization scales"
    )


def _whole_layer_params(geom: ModelGeometry) -> int:
    """The decoder layers' parameters every rank holds whole (`param_count`'s, by the same fields)."""
    hidden, layers = geom.hidden_size, geom.num_layers
    norm = 2 * hidden if geom.norm_bias else hidden
    whole = layers * geom.layer_norms * norm
    if geom.mla is None and not geom.attention_experts:
        if geom.qk_norm and not geom.qk_norm_per_head:
            shapes = geom.layer_shapes
            # no k norm in a layer that reuses another's K and V
            normed = (
                layers * 2 * geom.head_dim
                if shapes is None
                else sum((2 if layer.own_kv else 1) * layer.head_dim for layer in shapes)
            )
            whole += normed * (2 if geom.norm_bias else 1)
        if geom.attention_bias or geom.output_bias:  # the output projection's, row-parallel
            whole += layers * hidden
    dense = layers if geom.layer_shapes is not None else layers - geom.moe_layers
    if geom.mlp_bias:  # the down projection's, row-parallel
        whole += dense * hidden
    if geom.moe_layers:
        experts = geom.experts
        moe = experts * hidden  # the router
        moe += experts if geom.expert_score_bias else 0
        moe += experts * (hidden + 1) if geom.expert_bias else 0  # the down biases, the router's
        moe += hidden if geom.mlp_bias and geom.shared_intermediate_size else 0
        moe += hidden if geom.shared_expert_gate else 0
        moe += hidden if geom.moe_output_bias else 0
        whole += geom.moe_layers * moe
    return whole


def _kv_params(geom: ModelGeometry, tensor_parallel_size: int) -> tuple[int, int]:
    """(the K and V projections' parameters in all, those one rank holds): whole KV heads on each rank,
    `max(1, heads // tp)` of them, with their biases where q/k/v have them."""
    if geom.mla is not None or geom.attention_experts:
        return 0, 0
    # each of a head's head_dim output channels: a row of hidden weights, and its bias where there is one
    per_channel = geom.hidden_size + (1 if geom.qkv_bias or geom.attention_bias else 0)
    if geom.layer_shapes is None:
        shapes = [(2, geom.num_kv_heads, geom.head_dim)] * geom.num_layers
    else:
        shapes = [(s.own_kv + s.own_v, s.kv_heads, s.head_dim) for s in geom.layer_shapes]
    total = held = 0
    for projections, heads, head_dim in shapes:
        total += projections * heads * head_dim * per_channel
        held += projections * max(1, heads // tensor_parallel_size) * head_dim * per_channel
    return total, held
