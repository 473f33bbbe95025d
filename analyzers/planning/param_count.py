"""The parameters, hence the weight bytes, of a model geometry, as transformers builds the model: the
attention, MLP, mixture-of-experts and norm layouts of each family the planner lays out (`gpt_blocks`,
`gemma_layers` say which), a Llama-style estimate with a note for the others."""

from __future__ import annotations

from dataclasses import replace

from analyzers.planning.gemma_layers import LayerShape
from analyzers.planning.presets import ModelGeometry, dtype_bytes_for

__all__ = [
    "buffer_bytes",
    "buffers_as_recorded",
    "end_params",
    "param_count",
    "parameter_bytes",
    "weights_bytes",
]

_FLOAT_DTYPES = ("fp32", "bf16", "fp16")


def _attention_params(geom: ModelGeometry, layer: LayerShape | None = None) -> int:
    """One layer's attention: `layer`'s own widths and projections where layers differ (Gemma 3n, 4)."""
    hidden, heads = geom.hidden_size, geom.num_attention_heads
    mla = geom.mla
    if mla is not None:
        q_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank:  # down-projection, its RMSNorm, up-projection
            query = hidden * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * heads * q_head
        else:
            query = hidden * heads * q_head
        latent = hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank  # with its RMSNorm
        up = mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        bias = 0
        if geom.attention_bias:  # the down-projections' (q and latent) and the output's
            bias = (mla.q_lora_rank or 0) + mla.kv_lora_rank + mla.qk_rope_head_dim + hidden
        return query + latent + up + heads * mla.v_head_dim * hidden + bias
    head_dim = geom.head_dim if layer is None else layer.head_dim
    q_width = heads * head_dim
    kv_width = (geom.num_kv_heads if layer is None else layer.kv_heads) * head_dim
    kv_projections = 2 if layer is None else layer.own_kv + layer.own_v  # a layer reusing K and V has none
    if geom.attention_experts:  # each expert's q and output projections, router row and output bias
        return geom.attention_experts * (2 * hidden * kv_width + hidden) + hidden + 2 * hidden * kv_width
    params = 2 * hidden * q_width + kv_projections * hidden * kv_width
    if geom.qkv_bias or geom.attention_bias:
        params += q_width + kv_projections * kv_width
    if geom.attention_bias or geom.output_bias:  # the output projection's
        params += hidden
    if geom.attention_sinks:
        params += heads
    params += geom.head_dim_vectors * head_dim
    if geom.qk_norm_per_head:
        params += q_width + kv_width
    elif geom.qk_norm:  # Phi's are LayerNorms: a bias beside each weight; no k norm without a k projection
        normed = 1 if layer is not None and not layer.own_kv else 2
        params += normed * head_dim * (2 if geom.norm_bias else 1)
    return params


def _mlp_params(geom: ModelGeometry, intermediate: int, matrices: int) -> int:
    """One MLP of `intermediate` units: its matrices, with `mlp_bias` a bias on each, BitNet's norm."""
    bias = (matrices - 1) * intermediate + geom.hidden_size if geom.mlp_bias else 0
    return matrices * geom.hidden_size * intermediate + bias + (intermediate if geom.mlp_norm else 0)


def _moe_mlp_params(geom: ModelGeometry) -> int:
    hidden = geom.hidden_size
    routed = geom.experts * (3 * hidden * geom.expert_intermediate_size + hidden)  # + its router row
    if geom.expert_score_bias:
        routed += geom.experts
    if geom.expert_bias:  # gate and up, down, the router's
        routed += geom.experts * (2 * geom.expert_intermediate_size + hidden + 1)
    shared = _mlp_params(geom, geom.shared_intermediate_size, 3) if geom.shared_intermediate_size else 0
    gates_and_biases = (hidden if geom.shared_expert_gate else 0) + (hidden if geom.moe_output_bias else 0)
    if geom.moe_beside_mlp:  # Gemma 4's router scales each unit and each expert; 3 norms of its branch
        gates_and_biases += hidden + geom.experts + 3 * hidden
    return routed + shared + gates_and_biases


def _gemma_parts_params(geom: ModelGeometry) -> int:
    """Gemma 3n's and 4's per-layer inputs (PLE), and Gemma 3n's AltUp and LAuReL (`gemma_layers`)."""
    hidden, layers, ple = geom.hidden_size, geom.num_layers, geom.per_layer_input_size
    streams = geom.altup_inputs
    params = 0
    if ple:  # the table, the projection into it and its norm; per layer a gate, a projection and a norm
        params += geom.per_layer_input_vocab * layers * ple + hidden * layers * ple + ple
        params += layers * (2 * hidden * ple + hidden)
    if streams:  # per layer: output scale, correction, prediction, router and its norm; projections in, out
        params += layers * (2 * hidden + streams**2 + streams**3 + hidden * streams)
        params += 2 * (streams - 1) * hidden * hidden
    if geom.laurel_rank:  # per layer: two low-rank matrices and a norm
        params += layers * (2 * hidden * geom.laurel_rank + hidden)
    return params


def param_count(geom: ModelGeometry) -> int:
    """Exact parameter count of a Llama-style model, its mixture-of-experts and latent-attention variants,
    the GPT-2-style blocks of GPT-2, GPT-BigCode, Falcon, OPT, GPT-NeoX, Bloom, Phi, GPT-J and CodeGen, and
    the Llama-style ones laid out otherwise (`gpt_blocks`: StableLM, StarCoder2, OLMo, Cohere, MPT...), and
    Gemma 3n's and 4's layers, each of its own widths (`gemma_layers`).

    Counted: token embeddings (and OPT's projections in and out of narrower ones, Bloom's norm of them) and
    a learned position table; per layer the attention projections (with biases: Qwen2's on q/k/v, the
    GPT-2 families' and `attention_bias` ones on all four; Qwen3's and Phi's q/k norms, per head in OLMo 2,
    or DeepSeek's latent projections and norms), the gate/up/down MLP (up/down in the GPT-2 families,
    StarCoder2 and MPT; with `mlp_bias`, biases) or, on MoE layers, every expert, the router and the shared
    experts, and the norms (two RMSNorm weight vectors; four in Gemma 2 and 3, one in Phi, none in OLMo;
    LayerNorms also have a bias); GPT-OSS's attention sinks and biased experts, JetMoE's attention experts,
    Apertus' learned activation, BitNet's and DiffLlama's extra norms and vectors; Gemma 3n's and 4's
    per-layer inputs, AltUp and LAuReL; the final norm; and the lm_head unless it shares the embedding
    matrix (Phi's and GPT-J's bias counted either way).
    """
    hidden = geom.hidden_size
    shapes = geom.layer_shapes
    if shapes is None:
        attention = geom.num_layers * _attention_params(geom)
        dense_layers = geom.num_layers - geom.moe_layers
        dense = dense_layers * _mlp_params(geom, geom.intermediate_size, geom.mlp_matrices)
    else:  # layers of their own widths (Gemma 3n, 4), each with a dense MLP (Gemma 4's experts beside it)
        attention = sum(_attention_params(geom, layer) for layer in shapes)
        dense = sum(_mlp_params(geom, layer.intermediate_size, geom.mlp_matrices) for layer in shapes)
    mlp = dense + geom.moe_layers * _moe_mlp_params(geom) + geom.num_layers * geom.activation_params
    norm = 2 * hidden if geom.norm_bias else hidden
    per_layer = geom.layer_norms * norm
    layers = attention + geom.num_layers * per_layer + mlp + _gemma_parts_params(geom)
    return layers + sum(end_params(geom))


def end_params(geom: ModelGeometry) -> tuple[int, int, int]:
    """(embeddings, final norm, lm_head): the parameters outside the decoder layers, which a pipeline's
    first and last stages hold (`param_count` counts them too). The lm_head is 0 where it shares the
    embedding matrix (its bias, if any, counted)."""
    hidden = geom.hidden_size
    norm = 2 * hidden if geom.norm_bias else hidden
    width = geom.embedding_size or hidden
    embeddings = geom.vocab_size * width + geom.position_embeddings * hidden
    if width != hidden:  # OPT's project_in and project_out
        embeddings += 2 * width * hidden
    if geom.embedding_norm:
        embeddings += norm
    lm_head = 0 if geom.tie_word_embeddings else geom.vocab_size * width
    if geom.lm_head_bias:
        lm_head += geom.vocab_size
    final_norm = norm if geom.final_norm else 0
    return embeddings, final_norm, lm_head


def parameter_bytes(geom: ModelGeometry, dtype: str) -> int:
    """Bytes of all parameters stored in `dtype`, but those the model keeps in float32 (`fp32_parameters`).

    Quantized weight formats (int8, int4) also store per-group scales; those are not counted here because
    their layout depends on the quantizer (GPTQ, AWQ, bitsandbytes), so treat int4/int8 as a lower bound.
    """
    return dtype_bytes_for(dtype, param_count(geom) - geom.fp32_parameters) + 4 * geom.fp32_parameters


def buffer_bytes(geom: ModelGeometry, dtype: str) -> int:
    """Bytes of the buffers transformers builds beside the parameters of a model whose weights are `dtype`
    (`buffers`): the float32 ones at 4 B whatever `dtype` says, bool masks at 1 B, the rest in `dtype`
    (in bf16 under a quantized format: they are not quantized)."""
    compute = dtype if dtype in _FLOAT_DTYPES else "bf16"
    return (
        4 * geom.fp32_buffer_elements
        + geom.bool_buffer_bytes
        + dtype_bytes_for(compute, geom.buffer_elements)
    )


def buffers_as_recorded(
    geom: ModelGeometry, run_dtype: str | None, fp32_measured: int | None
) -> ModelGeometry:
    """`geom` with its float32 buffers (`fp32_buffer_elements`: rotary inv_freq) as a run recorded them:
    transformers keeps them at fp32 whatever `dtype=` says, but a model cast by `.to(torch.bfloat16)`
    casts them too, and at another dtype they follow the weights (`buffer_elements`). `fp32_measured`, the
    run's weight bytes recorded in float32, tells how many were kept (no more than the geometry's); `geom`
    itself for a float32 run, one of no known dtype, or where that is not known (kept at fp32)."""
    if fp32_measured is None or run_dtype in (None, "fp32"):
        return geom
    kept = min(fp32_measured // 4, geom.fp32_buffer_elements)
    cast = geom.fp32_buffer_elements - kept  # recorded in the run's dtype: cast with the weights
    return replace(geom, fp32_buffer_elements=kept, buffer_elements=geom.buffer_elements + cast)


def weights_bytes(geom: ModelGeometry, dtype: str) -> int:
    """Bytes transformers' model holds on the device before its first step, as the recorder counts its
    weights: the parameters in `dtype` (`parameter_bytes`: a lower bound for int4/int8) and the buffers."""
    return parameter_bytes(geom, dtype) + buffer_bytes(geom, dtype)
