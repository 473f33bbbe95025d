"""Model geometries for the capacity planner, and the built-in Llama 3.x presets (a local config.json is read
into one by `hf_config`, weighed by `param_count`).

The planner needs only a handful of integers per model (layers, heads, widths), so they live here as a
frozen dataclass rather than as a transformers config: planning must work on a laptop with neither torch
nor transformers installed, and must never touch the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analyzers.planning.gemma_layers import LayerShape
from kvtrace.errors import KvtraceError

__all__ = [
    "DTYPE_BITS",
    "PRESETS",
    "MlaShape",
    "ModelGeometry",
    "dtype_bytes_for",
    "get_preset",
]

# Storage bits per element. Bits rather than bytes because int4 packs two elements into one byte, int2
# (a QuantizedCache of nbits=2, quanto or HQQ) four.
DTYPE_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True)
class MlaShape:
    """Multi-head latent attention (DeepSeek-V2/V3): queries through an optional rank-`q_lora_rank`
    bottleneck, keys and values through a rank-`kv_lora_rank` latent plus a shared rotary key of
    `qk_rope_head_dim`. Both transformers (5.x) and vLLM cache that latent, kv_lora_rank + qk_rope_head_dim
    elements per token and layer, and expand it into heads at each step."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # The heads' K (nope + rope) and V cached instead of the latent: DeepSeek-V3.2's sparse attention
    # under a transformers before 5.25 (`hf_config.DSA_CACHES_LATENT_SINCE`); vLLM caches the latent
    expanded_heads: int | None = None
    # DeepSeek-V2's rotary table: complex `freqs_cis` (r / 2 complex64 a token), not cos and sin
    complex_rotary: bool = False


@dataclass(frozen=True)
class CompressedShape:
    """DeepSeek-V4's cache layers (DeepseekV4HCACache, DeepseekV4CSACache): each keeps a sliding window of
    one K = V head of head_dim, held once, and a compressed layer also one entry of head_dim every `rate`
    tokens, a CSA layer its indexer's compressed keys of `index_head_dim` too (`compressed_kv`).
    `layer_kinds` is each layer's "sliding", "csa" or "hca", in order."""

    layer_kinds: tuple[str, ...]
    csa_rate: int
    hca_rate: int
    index_head_dim: int
    # The CSA overlap gate's dtype: float32 (transformers 5.25), or the model's (before it: `gate_fp32`)
    gate_fp32: bool = True


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a decoder-only, Llama-style transformer (or GPT-2-style: `gpt_blocks`): all the planner
    needs to size weights and KV.

    `head_dim` is explicit because it is not always hidden_size / num_attention_heads (Llama 3.2 3B and
    many newer models decouple them). `sliding_window` is the model's own attention window, None when
    every layer attends to the whole context (all Llama 3.x models).
    """

    name: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    sliding_window: int | None = None
    kv_layers: int | None = None  # layers holding KV, when the config lists layer types (linear: none)
    sliding_layers: int | None = None  # of those, the ones keeping only the window (None: all, if a window)
    # Which of those slide, in order (the config's layer_types; None: all alike): a dynamic cache's peak
    # depends on whether a full layer copies itself before or after the sliding ones let go of the prompt
    layer_slides: tuple[bool, ...] | None = None
    # Mixture of experts (Mixtral, Qwen-MoE, DeepSeek, Llama 4): `moe_layers` of the layers hold `experts`
    # routed MLPs of `expert_intermediate_size` each and a router (every expert is resident: they all count
    # as weights, though only a few run per token), plus shared experts of `shared_intermediate_size` in
    # all. The other layers' MLP is `intermediate_size` (Llama 4's `intermediate_size_mlp`).
    moe_layers: int = 0
    # Which layers those are, in order (the config's `mlp_only_layers`, `decoder_sparse_step`...; None: not
    # told): a prefill's dense and MoE layers each peak in their own last layer (`prefill_activations`)
    layer_moe: tuple[bool, ...] | None = None
    experts: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert (hidden x 1)
    expert_bias: bool = False  # GPT-OSS: a bias on each expert's matrices and on its router
    moe_output_bias: bool = False  # JetMoE: a bias on the MoE's output (hidden)
    expert_score_bias: bool = False  # ERNIE 4.5: a learned correction of each expert's routing score
    # The prefill's MoE layers (`moe_prefill`): experts each token runs (`num_experts_per_tok`), and the
    # router's top-k weights' dtype where measured: "compute" (Qwen-MoE, OLMoE) or "float32" (Mixtral); None:
    # a router whose prefill the planner does not estimate
    experts_per_token: int = 0
    expert_routing: str | None = None
    # the experts' forward a config.json names (its "experts_implementation", which transformers honours when
    # it loads the config: "eager", "batched_mm"...); None: transformers' default, grouped_mm, the one planned
    experts_implementation: str | None = None
    # Qwen2-MoE without `use_sliding_window`: its sliding window is 0, and its model makes a bool mask of that
    # window for every prompt (none can be skipped), which no layer reads but the prefill holds
    window_zero_mask: bool = False
    # JetMoE's mixture of attention: this many experts, each a q and an output projection of num_kv_heads x
    # head_dim, with a router and a bias on the output; K and V from one projection all experts share
    attention_experts: int = 0
    attention_sinks: bool = False  # GPT-OSS: a learned sink logit per attention head
    activation_params: int = 0  # learned parameters of each MLP's activation (Apertus' xIELU: 2)
    mlp_norm: bool = False  # BitNet: an RMSNorm of each MLP's intermediate units
    head_dim_vectors: int = 0  # learned head_dim vectors in each layer's attention (DiffLlama's lambdas: 4)
    qkv_bias: bool = False  # Qwen2's q/k/v projections carry biases
    qk_norm: bool = False  # q and k normed per head (head_dim): Qwen3, Gemma 3 (RMSNorm), Phi (LayerNorm)
    # ... with a weight for each head (StableLM, OLMo 2, Cohere): q's norm holds num_attention_heads x
    # head_dim, k's num_kv_heads x head_dim, and no bias (StableLM's per-head LayerNorms have none)
    qk_norm_per_head: bool = False
    # norm weight vectors per layer: Gemma 2 and 3 also norm each block's output; OLMo's norms have none
    layer_norms: int = 2
    mla: MlaShape | None = None  # multi-head latent attention (DeepSeek-V2/V3)
    # KV heads transformers' cache holds when not num_kv_heads (Falcon's new decoder architecture repeats
    # its KV heads for every query head before caching them; vLLM caches num_kv_heads)
    cached_kv_heads: int | None = None
    # A full (global) layer's own KV heads and head_dim where they differ from the sliding layers' (Gemma 4:
    # `global_head_dim`, and `num_global_key_value_heads` under `attention_k_eq_v`); None: the same
    global_kv_heads: int | None = None
    global_head_dim: int | None = None
    # Sparse attention's indexer keys (DeepSeek-V3.2, GLM-MoE-DSA: `index_head_dim`), one head a token that
    # each indexed layer caches beside its K/V (transformers' DynamicIndexedLayer): counted with K
    indexer_head_dim: int = 0
    # GPT-2-style blocks (GPT-2, GPT-BigCode, Falcon, OPT, GPT-NeoX, Bloom, Phi, GPT-J, CodeGen), Llama-style
    # ones laid out otherwise (StableLM, StarCoder2, OLMo, Cohere, MPT...: `gpt_blocks`), and bias flags
    mlp_matrices: int = 3  # gate, up and down (Llama); 2: up and down
    # An up/down MLP's tensors of R x intermediate_size live at its activation in a prefill (the up projection
    # and the activation's temporaries: 2 for gelu, 3 for relu2, 4 for gelu_new); 0: not measured
    ungated_mlp_widths: int = 0
    # One matmul where Llama has several, whose output the layer keeps whole while it runs (a prefill's
    # activations): Phi-3's `qkv_proj` and GPT-NeoX's `query_key_value` (q, k and v are views of it) and
    # Phi-3's and GLM's `gate_up_proj`
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # Phi's partial RoPE: its q and k projections stay whole (their unturned slices are views of them) beside
    # their turned parts, until the attention returns (a prefill's activations)
    rotary_slices_kept: bool = False
    # GPT-NeoX's and Phi's attention under sdpa, whose prefill moment kvtrace has not derived (measured: some
    # 9 to 10 hidden states a token): their prefill is planned only where their MLP's moment outweighs it
    attention_unmeasured: bool = False
    # the part of each head RoPE turns, where not all of it (GLM's half, Phi-4-mini's 3/4; None: head_dim):
    # the width of the prefill's rotary cos and sin
    rotary_dim: int | None = None
    # the rotary cos and sin pairs the prefill holds across the layers: one for each kind of layer where the
    # model keeps a RoPE table for each (Gemma 3 and OLMo 3 with sliding and full layers: 2); 1 otherwise.
    # Before, one: the tiny Gemma 3 below the 25,088 B of its second pair under its recording at 2 x 98 tokens
    rotary_tables: int = 1
    # The layer norms its attention's and MLP's outputs, not their inputs (OLMo 2 and 3, EXAONE 4: no
    # input_layernorm): its prefill holds no normed input beside the residual stream. Before, counted: the
    # tiny OLMo 3 (2 rows of a 98-token prompt) was planned one hidden state, 50,136 B, over its recording
    norms_after: bool = False
    attention_bias: bool = False  # every attention projection (q, k, v, output) has a bias
    output_bias: bool = False  # the attention's output projection alone has a bias (GPT-Neo)
    mlp_bias: bool = False  # every MLP matrix has a bias (dense layers and shared experts)
    norm_bias: bool = False  # LayerNorms: a bias beside each norm's weight (RMSNorm has none)
    final_norm: bool = True  # a norm with weights after the last layer (not OPT's without pre-norms, OLMo's)
    position_embeddings: int = 0  # rows of a learned position table (GPT-2's n_positions; OPT's + 2)
    embedding_size: int | None = None  # OPT's word_embed_proj_dim: embeddings this wide, projected in/out
    embedding_norm: bool = False  # Bloom's norm of the embeddings, before the first layer
    # Gemma 3n and 4 (`gemma_layers`): each layer's attention and MLP widths, where layers differ (None:
    # every layer as the fields above say); their per-layer inputs (PLE) of this width from a table of this
    # many rows; Gemma 3n's AltUp streams and LAuReL rank; Gemma 4's experts beside each dense MLP
    layer_shapes: tuple[LayerShape, ...] | None = None
    per_layer_input_size: int = 0
    per_layer_input_vocab: int = 0
    altup_inputs: int = 0
    laurel_rank: int = 0
    moe_beside_mlp: bool = False
    lm_head_bias: bool = False  # Phi's lm_head has a bias (its own, even when the weight is tied)
    # Buffers transformers registers beside the parameters (`buffers`): on the device from the start, so
    # weights to the recorder. Elements kept in float32 whatever the weights' dtype (RoPE's inv_freq and
    # its copy, GPT-J's and CTRL's sinusoidal tables), elements in the weights' dtype (XGLM's table,
    # Gemma's scales), and bytes of bool causal masks (GPT-Neo's in each layer, GPT-BigCode's)
    fp32_buffer_elements: int = 0
    buffer_elements: int = 0
    bool_buffer_bytes: int = 0
    # Parameters kept in float32 whatever the weights' dtype (DeepSeek's routers, which transformers'
    # `_keep_in_fp32_modules_strict` names)
    fp32_parameters: int = 0
    # The longest context the model takes, as vLLM derives its limit on max_model_len from the config: the
    # smallest of max_position_embeddings and its other names (n_positions, max_seq_len, seq_length, ...;
    # model_max_length wins), times the factor of a linear or dynamic RoPE scaling. None: the config gives
    # none (vLLM then takes any max_model_len typed).
    max_position_embeddings: int | None = None
    # The max_model_len vLLM takes when none is given, and where it comes from (`hf_config.vllm_default_len`:
    # a LongRoPE model's original_max_position_embeddings, 2,048 for a config that gives no length); None:
    # max_position_embeddings, or not known (a recorded run's engine.json does not keep the config's length)
    vllm_default_len: int | None = None
    vllm_default_len_from: str | None = None
    weights_note: str | None = None  # why the weights figure is an estimate (`weights_estimate_note`)
    kv_note: str | None = None  # layers whose KV is not per token (Mllama's cross-attention: the image's)
    # An encoder-decoder model's (T5, BART, Whisper) decoder layers, each also holding the cross-attention
    # K and V of the encoder's output at its KV width (`kv_widths`), written once at the prefill for the
    # encoder's input length (`analyzers.planning.encoder_decoder`); 0 for a decoder-only model
    cross_kv_layers: int = 0
    # The encoder's output length where the model fixes it (Whisper's max_source_positions); None: the input's
    encoder_length: int | None = None
    # The file whose `use_cache: false` makes generate() keep no KV cache unless called with use_cache=True
    # (MPT's config class defaults to it); None: generate() caches
    cache_off_by: str | None = None
    # DeepSeek-V4's compressed attention (`compressed_kv`): its cache is planned by layer kind; None otherwise
    compressed: CompressedShape | None = None

    @property
    def layers_with_kv(self) -> int:
        return self.num_layers if self.kv_layers is None else self.kv_layers

    @property
    def kv_widths(self) -> tuple[int, int]:
        """Elements of one layer's K and of its V per token, as transformers' caches hold them."""
        mla = self.mla
        if mla is not None and mla.expanded_heads:  # each head's K (nope + rope) and V, as the model uses
            heads = mla.expanded_heads
            k_width = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
            return k_width + self.indexer_head_dim, heads * mla.v_head_dim
        if mla is not None:  # the latent as one head: its normed part as K, the rotary key as V
            return mla.kv_lora_rank + self.indexer_head_dim, mla.qk_rope_head_dim
        side = (self.cached_kv_heads or self.num_kv_heads) * self.head_dim
        return side + self.indexer_head_dim, side

    @property
    def layer_kv_widths(self) -> list[tuple[int, int]]:
        """`kv_widths` of each layer holding KV, in the config's order: the full layers at their own width
        where the model gives them one (Gemma 4), every layer alike otherwise."""
        if self.global_kv_heads is None and self.global_head_dim is None:
            return [self.kv_widths] * self.layers_with_kv
        full = (self.global_kv_heads or self.num_kv_heads) * (self.global_head_dim or self.head_dim)
        sliding = self.sliding_layers or 0
        slides = self.layer_slides or [False] * (self.layers_with_kv - sliding) + [True] * sliding
        return [self.kv_widths if slides_ else (full, full) for slides_ in slides]

    @property
    def windowed_layers(self) -> int:
        """Layers a cache keeps at the model's window (transformers' caches follow the config: the sliding
        ones of `layer_types`, given or derived by the model's family; every layer when neither)."""
        if self.sliding_window is None:
            return 0
        return self.layers_with_kv if self.sliding_layers is None else self.sliding_layers


def _llama3(
    name: str,
    layers: int,
    heads: int,
    hidden: int,
    inter: int,
    *,
    positions: int,
    head_dim: int = 128,
    tied: bool = False,
) -> ModelGeometry:
    # Every Llama 3.x model has 8 KV heads (GQA) and the 128,256-token tokenizer; its RoPE table, inv_freq
    # and original_inv_freq, holds head_dim / 2 float32 each.
    return ModelGeometry(
        name=name,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=8,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=inter,
        vocab_size=128256,
        tie_word_embeddings=tied,
        max_position_embeddings=positions,
        fp32_buffer_elements=head_dim,
    )


# Values from each model's published config.json on the Hugging Face Hub (meta-llama/...). The 3.1 and 3.3
# releases changed RoPE scaling and context length (max_position_embeddings 8,192 -> 131,072, the "llama3"
# RoPE scaling, whose factor is already in that figure), not the geometry, so they repeat 3.0's numbers.
_LLAMA_3, _LLAMA_3_1 = 8192, 131072
PRESETS: dict[str, ModelGeometry] = {
    geom.name: geom
    for geom in (
        _llama3("llama-3-8b", 32, 32, 4096, 14336, positions=_LLAMA_3),
        _llama3("llama-3-70b", 80, 64, 8192, 28672, positions=_LLAMA_3),
        _llama3("llama-3.1-8b", 32, 32, 4096, 14336, positions=_LLAMA_3_1),
        _llama3("llama-3.1-70b", 80, 64, 8192, 28672, positions=_LLAMA_3_1),
        _llama3("llama-3.1-405b", 126, 128, 16384, 53248, positions=_LLAMA_3_1),
        _llama3("llama-3.2-1b", 16, 32, 2048, 8192, positions=_LLAMA_3_1, head_dim=64, tied=True),
        _llama3("llama-3.2-3b", 28, 24, 3072, 8192, positions=_LLAMA_3_1, head_dim=128, tied=True),
        _llama3("llama-3.3-70b", 80, 64, 8192, 28672, positions=_LLAMA_3_1),
    )
}


def get_preset(name: str) -> ModelGeometry:
    """The built-in geometry called `name` (case-insensitive); KvtraceError listing the choices if unknown."""
    geom = PRESETS.get(name.strip().lower())
    if geom is None:
        raise KvtraceError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return geom


def dtype_bytes_for(dtype: str, elements: int) -> int:
    """Bytes that `elements` values of `dtype` occupy, rounded up to whole bytes (int4 packs two a byte, int2
    four)."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise KvtraceError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BITS)}")
    return math.ceil(elements * bits / 8)
