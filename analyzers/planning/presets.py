"""Model geometries for the capacity planner: built-in Llama 3.x presets and local config.json files.

The planner needs only a handful of integers per model (layers, heads, widths), so they live here as a
frozen dataclass rather than as a transformers config: planning must work on a laptop with neither torch
nor transformers installed, and must never touch the network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyzers.planning.config_defaults import (
    LLAMA4_CHUNK,
    default_layer_types,
    derive_family_fields,
    kv_shared_by_default,
    per_layer_overrides,
    tied_by_default,
    weights_estimate_note,
    window_on_by_default,
)
from analyzers.planning.gemma_layers import LayerShape, gemma_layer_fields
from analyzers.planning.gpt_blocks import gpt_block_fields
from kvtrace.errors import KvtraceError, too_long_integer
from kvtrace.geometry import (
    cached_kv_heads,
    chunk_window,
    cross_attention_layers,
    kv_heads_of,
    kv_layer_slides,
    kv_shapes_by_kind,
    kv_shared_layers,
    split_kv_shapes,
)

__all__ = [
    "DTYPE_BITS",
    "PRESETS",
    "MlaShape",
    "ModelGeometry",
    "dtype_bytes_for",
    "geometry_from_config",
    "get_preset",
    "max_positions",
    "param_count",
    "weights_bytes",
]

# Storage bits per element. Bits rather than bytes because int4 packs two elements into one byte.
DTYPE_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}


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
    experts: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert (hidden x 1)
    expert_bias: bool = False  # GPT-OSS: a bias on each expert's matrices and on its router
    moe_output_bias: bool = False  # JetMoE: a bias on the MoE's output (hidden)
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
    # GPT-2-style blocks (GPT-2, GPT-BigCode, Falcon, OPT, GPT-NeoX, Bloom, Phi, GPT-J, CodeGen), Llama-style
    # ones laid out otherwise (StableLM, StarCoder2, OLMo, Cohere, MPT...: `gpt_blocks`), and bias flags
    mlp_matrices: int = 3  # gate, up and down (Llama); 2: up and down
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
    # The longest context the model takes, as vLLM derives its limit on max_model_len from the config: the
    # smallest of max_position_embeddings and its other names (n_positions, max_seq_len, seq_length, ...;
    # model_max_length wins), times the factor of a linear or dynamic RoPE scaling. None: the config gives
    # none (vLLM then takes any max_model_len typed).
    max_position_embeddings: int | None = None
    weights_note: str | None = None  # why the weights figure is an estimate (`weights_estimate_note`)
    kv_note: str | None = None  # layers whose KV is not per token (Mllama's cross-attention: the image's)

    @property
    def layers_with_kv(self) -> int:
        return self.num_layers if self.kv_layers is None else self.kv_layers

    @property
    def kv_widths(self) -> tuple[int, int]:
        """Elements of one layer's K and of its V per token, as transformers' caches hold them."""
        if self.mla is not None:  # the latent as one head: its normed part as K, the rotary key as V
            return self.mla.kv_lora_rank, self.mla.qk_rope_head_dim
        side = (self.cached_kv_heads or self.num_kv_heads) * self.head_dim
        return side, side

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
    # Every Llama 3.x model has 8 KV heads (GQA) and the 128,256-token tokenizer.
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
    """Bytes that `elements` values of `dtype` occupy, rounded up to whole bytes (int4 packs two a byte)."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise KvtraceError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BITS)}")
    return math.ceil(elements * bits / 8)


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
    layers = attention + geom.num_layers * per_layer + mlp + _gemma_parts_params(geom)
    return embeddings + layers + final_norm + lm_head


def weights_bytes(geom: ModelGeometry, dtype: str) -> int:
    """Bytes of all parameters stored in `dtype`.

    Quantized weight formats (int8, int4) also store per-group scales; those are not counted here because
    their layout depends on the quantizer (GPTQ, AWQ, bitsandbytes), so treat int4/int8 as a lower bound.
    """
    return dtype_bytes_for(dtype, param_count(geom))


# Other names of the required fields, as transformers maps them (GPT-2 / GPT-BigCode, GPT-J, Falcon, OPT,
# Bloom, MPT, XGLM, CTRL, T5-style).
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("n_layer", "num_layers", "n_layers"),  # n_layers, n_heads: MPT's
    "num_attention_heads": ("n_head", "num_heads", "n_heads", "attention_heads"),  # XGLM's attention_heads
    "hidden_size": ("n_embd", "n_embed", "d_model"),  # n_embed: Bloom's
    "intermediate_size": ("n_inner", "ffn_hidden_size", "d_ff", "ffn_dim", "dff"),  # OPT's, XGLM's; CTRL's
}
_QK_NORMED = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text")  # q and k RMSNorms of head_dim (and Gemma 3n, 4)
_FOUR_X_MLP = {"n_embd", "n_layer", "multi_query", "new_decoder_architecture"}  # configs whose MLP is 4x
_REQUIRED_FIELDS = (
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
)


def geometry_from_config(path: str | Path) -> ModelGeometry:
    """Read a local Hugging Face config.json (the file, or the folder holding it) into a geometry.

    Multimodal configs nest the language model under `text_config`; its fields win, with the top level as
    fallback. `num_key_value_heads` defaults to the attention head count (plain multi-head attention) and
    `head_dim` to hidden_size / num_attention_heads, as transformers does. What else a config leaves out
    is its family's default in transformers (`config_defaults`): `tie_word_embeddings` (True for Gemma,
    False for Llama), `use_sliding_window` (False for Qwen2-style configs, which carry a `sliding_window`
    size all the same) and `layer_types` (Gemma 2 alternates sliding and full layers).
    """
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KvtraceError(f"{config_path}: cannot read model config: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KvtraceError(f"{config_path}: not a valid JSON config: {exc}") from exc
    except ValueError:  # CPython's limit on the digits of an int
        raise KvtraceError(f"{config_path}: not a valid JSON config: {too_long_integer()}") from None
    except RecursionError:
        raise KvtraceError(f"{config_path}: not a valid JSON config: nested too deeply") from None
    if not isinstance(raw, dict):
        raise KvtraceError(f"{config_path}: expected a JSON object at the top level")

    text_config = raw.get("text_config")
    fields: dict[str, Any] = {**raw, **text_config} if isinstance(text_config, dict) else dict(raw)
    for standard, others in _ALIASES.items():  # what transformers' `attribute_map`s say (GPT-2, Falcon)
        for other in others:
            if fields.get(standard) is None and fields.get(other) is not None:
                fields[standard] = fields[other]
    model_type = str(fields.get("model_type") or "")
    derive_family_fields(fields, model_type)
    # GPT-2's n_inner, Falcon's ffn_hidden_size and GPT-Neo's intermediate_size default to 4x; Bloom's MLP
    # is 4x whatever n_inner says, MPT's whatever expansion_ratio says
    unsized = fields.get("intermediate_size") is None
    four_x = unsized and (_FOUR_X_MLP & fields.keys() or model_type == "gpt_neo")
    if fields.get("hidden_size") and (four_x or model_type in ("bloom", "mpt")):
        fields["intermediate_size"] = 4 * fields["hidden_size"]

    sizes = fields.get("intermediate_size")
    mlp_widths = None
    if isinstance(sizes, list) and sizes and all(type(n) is int for n in sizes):
        # Gemma 3n lists one per layer (`gemma_layers` weighs each); the geometry's one figure is their mean
        mlp_widths = sizes
        fields["intermediate_size"] = sum(sizes) // len(sizes)
    missing = [name for name in _REQUIRED_FIELDS if fields.get(name) is None]
    if missing:
        raise KvtraceError(f"{config_path}: missing field {', '.join(missing)}")

    def positive_int(name: str, value: Any) -> int:
        # bool is an int subclass; `true` as a layer count is a broken file, not 1 layer.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise KvtraceError(f"{config_path}: field {name} must be a positive integer, got {value!r}")
        return value

    layers = positive_int("num_hidden_layers", fields["num_hidden_layers"])
    heads = positive_int("num_attention_heads", fields["num_attention_heads"])
    hidden = positive_int("hidden_size", fields["hidden_size"])
    kv_heads_raw = kv_heads_of(fields.get, None)
    kv_heads = heads if kv_heads_raw is None else positive_int("num_key_value_heads", kv_heads_raw)
    cached_heads = cached_kv_heads(fields.get, heads, kv_heads)
    head_dim_raw = fields.get("head_dim")
    if head_dim_raw is None:
        if hidden % heads:
            raise KvtraceError(
                f"{config_path}: missing field head_dim, and hidden_size {hidden} is not a multiple of "
                f"num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    else:
        head_dim = positive_int("head_dim", head_dim_raw)

    window_raw = fields.get("sliding_window")
    window_on = fields.get("use_sliding_window", window_on_by_default(model_type))
    window_enabled = window_on is not False and window_raw != 0  # 0: none
    sliding_window = None
    if window_enabled and window_raw is not None:
        sliding_window = positive_int("sliding_window", window_raw)

    layer_types = fields.get("layer_types")
    if layer_types is None:
        layer_types = default_layer_types(fields, model_type, layers, sliding_window, positive_int)
    fields.setdefault("num_kv_shared_layers", kv_shared_by_default(model_type))
    reused = kv_shared_layers(fields.get, layers)  # Gemma 3n's and 4's last layers: no KV of their own
    slides = kv_layer_slides(layer_types, reused)
    overrides = per_layer_overrides(fields, model_type, layer_types)
    read = {**fields, "num_key_value_heads": kv_heads, "head_dim": head_dim}  # each layer's, before overrides
    gemma = gemma_layer_fields(
        read, model_type, layer_types, overrides, reused, mlp_widths, positive_int, str(config_path)
    )
    global_kv_heads = global_head_dim = None
    if overrides:  # layers of their own width (Gemma 4's full ones): the sliding ones' is the model's
        kinds = kv_shapes_by_kind(lambda i: {**read, **overrides.get(i, {})}.get, layer_types, heads, reused)
        shapes = split_kv_shapes(kinds) if kinds else ((kv_heads, head_dim), None)
        if shapes is None:
            raise KvtraceError(
                f"{config_path}: per_layer_config gives layers of one kind different KV widths"
            )
        (base_heads, base_dim), full = shapes
        kv_heads = positive_int("num_key_value_heads", base_heads)
        head_dim = positive_int("head_dim", base_dim)
        if full is not None:
            global_kv_heads = positive_int("num_global_key_value_heads", full[0])
            global_head_dim = positive_int("global_head_dim", full[1])
    if model_type in ("llama4", "llama4_text"):
        fields.setdefault("attention_chunk_size", LLAMA4_CHUNK)
    chunk = chunk_window(fields.get, layer_types)
    if chunk is not None:  # chunked layers (Llama 4) are cached as sliding ones of the chunk's size
        sliding_window = positive_int("attention_chunk_size", chunk)
    name = fields.get("_name_or_path") or config_path.resolve().parent.name or str(config_path)
    kv_layers = len(slides) if slides is not None else (layers - len(reused) if reused else None)
    cross = cross_attention_layers(fields.get)
    kv_note = None
    if cross and slides is None and len(cross) < layers:
        kv_layers = layers - len(cross)
        many = len(cross) > 1
        kv_note = (
            f"KV: {'its' if many else 'its one'} cross-attention layer{'s' if many else ''} "
            f"({', '.join(str(i) for i in cross)}) hold{'' if many else 's'} the image's KV (its vision "
            f"tokens, written once per image), a fixed cost not counted here: the KV per token is the "
            f"{kv_layers:,} self-attention layers'"
        )
    gemma_norms = model_type in ("gemma2", "gemma3", "gemma3_text") or bool(gemma)
    if model_type in ("llama4", "llama4_text"):
        experts = _llama4_experts(fields, layers, positive_int)
    elif gemma:  # Gemma 4's experts, only under enable_moe_block: `gemma_layers`
        experts = {}
    else:
        experts = _experts(fields, layers, positive_int)
    dense_size = experts.pop("intermediate_size", None)  # the dense layers' MLP, when not intermediate_size
    block = gpt_block_fields(fields, model_type, hidden, positive_int, str(config_path))
    return ModelGeometry(
        name=str(name),
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=dense_size or positive_int("intermediate_size", fields["intermediate_size"]),
        vocab_size=positive_int("vocab_size", fields["vocab_size"]),
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", tied_by_default(model_type))),
        sliding_window=sliding_window,
        kv_layers=kv_layers,
        sliding_layers=sum(slides) if slides is not None else None,
        layer_slides=slides,
        **experts,
        qkv_bias=block.pop(
            "qkv_bias",
            model_type == "qwen2" or (model_type == "qwen2_moe" and bool(fields.get("qkv_bias", True))),
        ),
        qk_norm=block.pop("qk_norm", model_type in _QK_NORMED or bool(gemma)),
        layer_norms=block.pop("layer_norms", 4 if gemma_norms else 2),
        mla=_mla(fields, positive_int),
        max_position_embeddings=max_positions(fields, model_type),
        cached_kv_heads=cached_heads if cached_heads != kv_heads else None,
        global_kv_heads=global_kv_heads,
        global_head_dim=global_head_dim,
        weights_note=weights_estimate_note(raw, model_type),
        kv_note=kv_note,
        **block,
        **gemma,
    )


# Where configs give the longest context, as vLLM reads them (`derive_max_model_len_and_key`, vllm 0.32)
_MAX_LENGTH_KEYS = (
    "max_position_embeddings",  # most
    "n_positions",  # GPT-2
    "max_seq_len",  # MPT
    "seq_length",  # ChatGLM2
    "model_max_length",  # Command-R
    "max_target_positions",  # Whisper
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE kinds whose max_position_embeddings already counts their scaling: vLLM does not apply their factor
_PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def max_positions(fields: dict[str, Any], model_type: str = "") -> int | None:
    """The longest context a config's model takes, derived as vLLM 0.32 derives its limit on max_model_len
    (`vllm/config/model.py`, `_get_and_verify_max_len`): the smallest of the length keys it knows
    (`model_max_length`, when given, wins), times the RoPE scaling factor of the kinds that do not count it
    already (linear, dynamic; Gemma 3's is counted). None when the config gives no length: vLLM then takes
    any max_model_len typed. A value that is not a positive integer is not a length (skipped)."""

    def length(value: Any) -> int | None:
        usable = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        return math.floor(value) if usable and math.isfinite(value) else None

    lengths = [n for n in (length(fields.get(key)) for key in _MAX_LENGTH_KEYS) if n is not None]
    if not lengths:
        return None
    longest: float = length(fields.get("model_max_length")) or min(lengths)
    rope = fields.get("rope_parameters") or fields.get("rope_scaling")
    if isinstance(rope, dict) and "gemma3" not in model_type:
        nested = all(isinstance(value, dict) for value in rope.values())  # one per layer type (Gemma 3)
        factor: Any = 1.0
        for params in [value for value in rope.values() if value] if nested else [rope]:
            kind = params.get("rope_type") or params.get("type") or "default"
            if kind not in _PRESCALED_ROPE:
                factor = params.get("factor", factor)
        if isinstance(factor, int | float) and not isinstance(factor, bool) and factor > 0:
            longest *= factor
    return math.floor(longest)


def _experts(fields: dict[str, Any], layers: int, positive_int: Callable[[str, Any], int]) -> dict[str, Any]:
    """The mixture-of-experts fields of a config, under each family's names and layer rules (empty: dense).

    Experts are `num_local_experts` (Mixtral; transformers 5 also saves Qwen-MoE's count so),
    `num_experts` (Qwen-MoE) or `n_routed_experts` (DeepSeek), of `moe_intermediate_size` when given, else
    `intermediate_size` (Mixtral). Which layers: DeepSeek from `first_k_dense_replace` on, when i %
    `moe_layer_freq` is 0, plus `n_shared_experts` ungated; Qwen unless in `mlp_only_layers` and when
    (i + 1) % `decoder_sparse_step` is 0, plus one gated shared expert; Mixtral every layer."""
    get = fields.get
    name = next((key for key in ("num_local_experts", "num_experts", "n_routed_experts") if get(key)), None)
    if name is None:
        return {}
    experts = positive_int(name, get(name))
    size_name = "moe_intermediate_size" if get("moe_intermediate_size") else "intermediate_size"
    size = positive_int(size_name, get(size_name))
    shared = 0
    if get("n_routed_experts"):
        first, freq = (
            get("first_k_dense_replace") or 0,
            positive_int("moe_layer_freq", get("moe_layer_freq") or 1),
        )
        moe = [i >= first and i % freq == 0 for i in range(layers)]
        shared = (get("n_shared_experts") or 0) * size
    else:
        step = positive_int("decoder_sparse_step", get("decoder_sparse_step") or 1)
        dense = set(get("mlp_only_layers") or ())
        moe = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
        if get("shared_expert_intermediate_size"):
            shared = positive_int("shared_expert_intermediate_size", get("shared_expert_intermediate_size"))
        elif get("shared_intermediate_size"):  # Granite-MoE-shared's, ungated
            shared = positive_int("shared_intermediate_size", get("shared_intermediate_size"))
    return {
        "moe_layers": sum(moe),
        "experts": experts,
        "expert_intermediate_size": size,
        "shared_intermediate_size": shared,
        "shared_expert_gate": bool(get("shared_expert_intermediate_size")) and not get("n_routed_experts"),
    }


def _llama4_experts(
    fields: dict[str, Any], layers: int, positive_int: Callable[[str, Any], int]
) -> dict[str, Any]:
    """Llama 4's layout (Llama4TextConfig, modeling_llama4.py): each MoE layer's Llama4TextMoe holds
    `num_local_experts` routed experts of `intermediate_size` (fused gate_up_proj and down_proj: the same
    three matrices), a router and one ungated shared expert of `intermediate_size`; every other layer
    has a dense MLP of `intermediate_size_mlp`. The MoE layers are `moe_layers` when listed, else every
    `interleave_moe_layer_step`-th from step - 1. A key left out takes Llama4TextConfig's default."""
    get = fields.get
    listed = get("moe_layers")
    if isinstance(listed, list):  # as the decoder layer asks: `layer_idx in config.moe_layers`
        moe = sum(i in listed for i in range(layers))
    else:
        step = positive_int("interleave_moe_layer_step", get("interleave_moe_layer_step", 1))
        moe = len(range(step - 1, layers, step))
    size = positive_int("intermediate_size", fields["intermediate_size"])
    return {
        "moe_layers": moe,
        "experts": positive_int("num_local_experts", get("num_local_experts", 16)),
        "expert_intermediate_size": size,
        "shared_intermediate_size": size,
        "intermediate_size": positive_int("intermediate_size_mlp", get("intermediate_size_mlp", 16384)),
    }


def _mla(fields: dict[str, Any], positive_int: Callable[[str, Any], int]) -> MlaShape | None:
    if not fields.get("kv_lora_rank"):
        return None
    q_lora = fields.get("q_lora_rank")
    return MlaShape(
        q_lora_rank=positive_int("q_lora_rank", q_lora) if q_lora else None,
        **{
            name: positive_int(name, fields.get(name))
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        },
    )
