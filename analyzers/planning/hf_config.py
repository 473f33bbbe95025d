"""A local Hugging Face config.json read into a planner geometry (`ModelGeometry`): the fields each family
names its own way, the defaults transformers fills in where a config leaves them out, and the longest
context the model takes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analyzers.planning.buffers import ROPE_TABLE_SHARED_SINCE, buffer_fields
from analyzers.planning.compressed_kv import compressed_shape
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
from analyzers.planning.config_lengths import max_positions, vllm_default_len
from analyzers.planning.encoder_decoder import EncoderDecoderShape, decoder_fields, encoder_decoder_note
from analyzers.planning.gemma_layers import gemma_layer_fields
from analyzers.planning.gpt_blocks import gpt_block_fields
from analyzers.planning.presets import MlaShape, ModelGeometry
from kvtrace.errors import KvtraceError, shown_integer
from kvtrace.format import MAX_LAYERS
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
from kvtrace.json_reads import read_json_file

# Other names of the required fields, as transformers maps them (GPT-2 / GPT-BigCode, GPT-J, Falcon, OPT,
# Bloom, MPT, XGLM, CTRL, T5-style).
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("n_layer", "num_layers", "n_layers"),  # n_layers, n_heads: MPT's
    "num_attention_heads": ("n_head", "num_heads", "n_heads", "attention_heads"),  # XGLM's attention_heads
    "hidden_size": ("n_embd", "n_embed", "d_model"),  # n_embed: Bloom's
    # OPT's, XGLM's; CTRL's; last, all-MoE families (DeepSeek-V4) whose attribute_map makes it the experts'
    "intermediate_size": ("n_inner", "ffn_hidden_size", "d_ff", "ffn_dim", "dff", "moe_intermediate_size"),
}
_QK_NORMED = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text")  # q and k RMSNorms of head_dim (and Gemma 3n, 4)
# Families whose routers are float32 parameters whatever the model's dtype (`_keep_in_fp32_modules_strict`,
# or an `nn.Linear(..., dtype=torch.float32)`)
_FP32_ROUTERS = frozenset(
    {"deepseek_v2", "deepseek_v3", "dots1", "glm4_moe", "glm4_moe_lite", "hunyuan_v1_moe", "ernie4_5_moe"}
)
# The first transformers that keeps those routers float32 (`_keep_in_fp32_modules_strict: gate.weight`):
# 5.17 builds them in the model's dtype, ERNIE 4.5's and HunYuan's aside (a bf16 plan of the tiny
# GLM-4-MoE was 512 B over its model), and DeepSeek-V3's and dots1's expert-score corrections too; the
# releases between are unmeasured
FP32_ROUTERS_SINCE = (5, 25)
_FP32_ROUTERS_BEFORE = frozenset({"ernie4_5_moe", "hunyuan_v1_moe"})  # ERNIE strict, HunYuan built so
_SCORE_BIAS_IN_DTYPE_BEFORE = frozenset({"deepseek_v3", "dots1"})
# Families whose MoE prefill the planner estimates (`moe_prefill`), by the dtype their router's top-k weights
# keep (Qwen's and OLMoE's cast back to the model's, Mixtral's float32, DeepSeek-V2's, V3's and GLM-4-MoE's
# float32 beside float32 logits: `moe_prefill`), and their config class's default
# `num_experts_per_tok`
_EXPERT_ROUTING = {
    "mixtral": ("float32", 2), "qwen2_moe": ("compute", 4), "qwen3_moe": ("compute", 8),
    "olmoe": ("compute", 8), "glm4_moe": ("deepseek", 8), "glm4_moe_lite": ("deepseek", 4),
    "deepseek_v2": ("deepseek", 6), "deepseek_v3": ("deepseek", 8),
}  # fmt: skip
# Decoder families whose transformers model keeps no cache (OpenAIGPTModel.forward takes no past_key_values)
_NO_KV_CACHE = frozenset({"openai-gpt"})
_HUB_REPO_PREFIX = "models--"  # huggingface_hub's cache: models--ORG--NAME/snapshots/REV/config.json
_FOUR_X_MLP = {"n_embd", "n_layer", "multi_query", "new_decoder_architecture"}  # configs whose MLP is 4x
# A width, head count or window past any model's, and small enough for the plan's arithmetic (a range of
# head_dim elements, floats of bytes) to hold
_MAX_WIDTH = 2**40
_REQUIRED_FIELDS = (
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
)

__all__ = ["NEWEST_LAYOUT", "geometry_from_config", "max_positions", "vllm_default_len"]


def geometry_from_config(
    path: str | Path, transformers_version: tuple[int, int] | None = None
) -> ModelGeometry:
    """Read a local Hugging Face config.json (the file, or the folder holding it) into a geometry, its
    caches as the transformers of `transformers_version` (major, minor) lays them out; None: the newest.

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
    raw = read_json_file(config_path, "not a valid JSON config")
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
    encoder_decoder = decoder_fields(fields)  # T5, BART, Whisper: the decoder's layers hold the KV
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
    if model_type in _NO_KV_CACHE:
        raise KvtraceError(
            f"{config_path}: model_type {model_type!r} keeps no KV cache in transformers (its forward takes "
            "no past_key_values: each step runs the whole context again), so there is no KV to plan"
        )
    missing = [name for name in _REQUIRED_FIELDS if fields.get(name) is None]
    if missing:
        raise KvtraceError(f"{config_path}: missing field {', '.join(missing)}")

    def positive_int(name: str, value: Any, most: int | None = _MAX_WIDTH) -> int:
        # bool is an int subclass; `true` as a layer count is a broken file, not 1 layer.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise KvtraceError(f"{config_path}: field {name} must be a positive integer, got {value!r}")
        if most is not None and value > most:  # 10**40 as head_dim: an OverflowError deep in the plan
            said = f"{value:,}" if value < 10**24 else shown_integer(value)
            raise KvtraceError(
                f"{config_path}: field {name} is {said}, expected at most {most:,} (no model is near so big)"
            )
        return value

    # Read as they are: the KV head count is otherwise taken with int(), which made "8" 8 and 2.5 2, and
    # failed on 1e309 (an internal error)
    for name in ("num_key_value_heads", "num_kv_heads" if fields.get("new_decoder_architecture") else ""):
        if fields.get(name):
            positive_int(name, fields[name])
    layers = positive_int("num_hidden_layers", fields["num_hidden_layers"], None)  # bounded below
    if layers > MAX_LAYERS:  # the per-layer loops below would run for minutes, or exhaust memory
        said = f"{layers:,}" if layers < 10**30 else "an integer of more than 30 digits"
        raise KvtraceError(
            f"{config_path}: field num_hidden_layers is {said}, expected a layer count of at most "
            f"{MAX_LAYERS:,} (no model has nearly so many)"
        )
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
    compressed = compressed_shape(fields, model_type, layers, positive_int, transformers_version)
    if compressed is not None:  # DeepSeek-V4: every layer keeps a window (its default 128) beside the rest
        sliding_window = positive_int("sliding_window", fields.get("sliding_window", 128))
        slides = (True,) * layers
    name = fields.get("_name_or_path") or _name_of_folder(config_path)
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
    elif fields.get("new_decoder_architecture") and kv_heads < heads:
        kv_note = (
            f"KV: {kv_heads} KV heads a layer, as transformers 5.25 and later and vLLM cache Falcon's new "
            f"decoder architecture; an earlier transformers caches one per query head, {heads}: "
            f"{heads / kv_heads:g}x this KV"
        )
    if encoder_decoder is not None:
        kv_note = encoder_decoder_note(encoder_decoder)
    gemma_norms = model_type in ("gemma2", "gemma3", "gemma3_text") or bool(gemma)
    indexer = _indexer_head_dim(fields, model_type, layer_types, positive_int)
    if model_type in ("llama4", "llama4_text"):
        experts = _llama4_experts(fields, layers, positive_int)
    elif gemma:  # Gemma 4's experts, only under enable_moe_block: `gemma_layers`
        experts = {}
    else:
        experts = _experts(fields, model_type, layers, positive_int)
    dense_size = experts.pop("intermediate_size", None)  # the dense layers' MLP, when not intermediate_size
    if experts.get("moe_layers") and model_type in _EXPERT_ROUTING:
        routing, default_top_k = _EXPERT_ROUTING[model_type]
        # DeepseekV2Config saves null where not given (its model then cannot route): DeepSeek-V2's own 6
        top_k = positive_int("num_experts_per_tok", fields.get("num_experts_per_tok") or default_top_k)
        experts.update(
            expert_routing=routing, experts_per_token=top_k, experts_implementation=_experts_forward(fields)
        )
    block = gpt_block_fields(fields, model_type, hidden, positive_int, str(config_path))
    buffers = buffer_fields(
        fields, model_type, layers=layers, head_dim=head_dim, full_head_dim=global_head_dim,
        layer_types=layer_types, moe_layers=experts.get("moe_layers", 0), experts=experts.get("experts", 0),
        positive_int=positive_int,
        tables_per_layer=transformers_version is not None and transformers_version < ROPE_TABLE_SHARED_SINCE,
    )  # fmt: skip
    routed = experts.get("moe_layers", 0) * experts.get("experts", 0)
    fp32_routers = transformers_version is None or transformers_version >= FP32_ROUTERS_SINCE
    if model_type in _FP32_ROUTERS and (fp32_routers or model_type in _FP32_ROUTERS_BEFORE):
        # its routers (and ERNIE's score corrections) stay float32 in any dtype
        router = hidden + (1 if experts.get("expert_score_bias") else 0)
        buffers["fp32_parameters"] = routed * router
    if not fp32_routers and model_type in _SCORE_BIAS_IN_DTYPE_BEFORE:  # the score correction in the dtype
        buffers["fp32_buffer_elements"] = buffers.get("fp32_buffer_elements", 0) - routed
        buffers["buffer_elements"] = buffers.get("buffer_elements", 0) + routed
    default_len, default_from = vllm_default_len(fields, model_type)
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
        mla=_mla(
            fields, positive_int, bool(indexer) and _dsa_expanded(transformers_version), heads, model_type
        ),
        indexer_head_dim=indexer,
        max_position_embeddings=max_positions(fields, model_type),
        vllm_default_len=default_len,
        vllm_default_len_from=default_from,
        cached_kv_heads=cached_heads if cached_heads != kv_heads else None,
        global_kv_heads=global_kv_heads,
        global_head_dim=global_head_dim,
        weights_note=_weights_note(raw, model_type, encoder_decoder),
        kv_note=kv_note,
        cross_kv_layers=encoder_decoder.decoder_layers if encoder_decoder is not None else 0,
        encoder_length=encoder_decoder.encoder_length if encoder_decoder is not None else None,
        cache_off_by=_cache_off_by(config_path, fields),
        # Qwen2MoeConfig sets a window of 0 where use_sliding_window is off, and Qwen2MoeModel masks it anyway
        window_zero_mask=model_type == "qwen2_moe" and sliding_window is None,
        compressed=compressed,
        **block,
        **gemma,
        **buffers,
    )


def _name_of_folder(config_path: Path) -> str:
    """The model's name where its config does not say it: its folder's as given, links not followed (a
    Hugging Face cache's `snapshots/REV/config.json` is a link into `blobs/`: the plan was named "blobs"),
    and for such a snapshot the repository's, `models--ORG--NAME` read as ORG/NAME."""
    folder = Path(os.path.abspath(config_path)).parent
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith(_HUB_REPO_PREFIX):
        return repo.removeprefix(_HUB_REPO_PREFIX).replace("--", "/")
    return folder.name or str(config_path)


def _weights_note(raw: dict[str, Any], model_type: str, shape: EncoderDecoderShape | None) -> str | None:
    """`weights_estimate_note`, and for an encoder-decoder model what its weights figure leaves out: the
    planner lays out its decoder's layers alone."""
    note = weights_estimate_note(raw, model_type)
    if shape is None:
        return note
    left_out = (
        "weights: the decoder's layers only; the encoder's and the cross-attention projections are not "
        "counted, so the weights figure is below the checkpoint's (--from-run measures them)"
    )
    return left_out if note is None else f"{note}; {left_out}"


def _cache_off_by(config_path: Path, fields: dict[str, Any]) -> str | None:
    """The file that turns generate()'s KV cache off, None when it caches. As `from_pretrained` reads them
    (transformers 5.24): a generation_config.json beside the config decides alone (no `use_cache` there:
    caching); without one, the config's `use_cache` (none: caching)."""
    generation_path = config_path.parent / "generation_config.json"
    if generation_path.is_file():
        generation = read_json_file(generation_path, "not a valid JSON generation config")
        if not isinstance(generation, dict):
            raise KvtraceError(f"{generation_path}: expected a JSON object at the top level")
        return generation_path.name if generation.get("use_cache") is False else None
    return config_path.name if fields.get("use_cache") is False else None


_ERNIE_MOE_RANGE = (("moe_layer_start_index", 1), ("moe_layer_end_index", -1))  # -1: the last layer


def _experts(
    fields: dict[str, Any], model_type: str, layers: int, positive_int: Callable[[str, Any], int]
) -> dict[str, Any]:
    """The mixture-of-experts fields of a config, under each family's names and layer rules (empty: dense).

    Experts are `num_local_experts` (Mixtral, DBRX; transformers 5 also saves Qwen-MoE's count so),
    `num_experts` (Qwen-MoE, HunYuan, ERNIE 4.5's `moe_num_experts`) or `n_routed_experts` (DeepSeek, dots1,
    GLM-4-MoE), of `moe_intermediate_size` when given, else `intermediate_size` (Mixtral). Which layers: as
    `mlp_layer_types` says where it lists them ("sparse"); DeepSeek's from `first_k_dense_replace` on, when
    i % `moe_layer_freq` is 0, plus `n_shared_experts` ungated; ERNIE's from `moe_layer_start_index` to
    `moe_layer_end_index`, every `moe_layer_interval`-th, plus `moe_num_shared_experts` ungated; Qwen's
    unless in `mlp_only_layers` and when (i + 1) % `decoder_sparse_step` is 0, plus one gated shared
    expert; HunYuan's every layer with an ungated shared MLP of `intermediate_size`; Mixtral's every layer."""
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
    elif model_type == "ernie4_5_moe":  # Ernie4_5_MoeConfig's defaults: from layer 1 to the last
        start, end = (get(name, default) for name, default in _ERNIE_MOE_RANGE)
        for (name, _), index in zip(_ERNIE_MOE_RANGE, (start, end), strict=True):
            if isinstance(index, bool) or not isinstance(index, int):
                positive_int(name, index)  # refuses it
        interval = positive_int("moe_layer_interval", get("moe_layer_interval", 1))
        end = layers - 1 if end == -1 else end
        moe = [(i + 1) % interval == 0 and start <= i <= end for i in range(layers)]
        shared = (get("moe_num_shared_experts", 2) or 0) * size
    else:
        step = positive_int("decoder_sparse_step", get("decoder_sparse_step") or 1)
        dense = set(get("mlp_only_layers") or ())
        moe = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
        if get("shared_expert_intermediate_size"):
            shared = positive_int("shared_expert_intermediate_size", get("shared_expert_intermediate_size"))
        elif get("shared_intermediate_size"):  # Granite-MoE-shared's, ungated
            shared = positive_int("shared_intermediate_size", get("shared_intermediate_size"))
        elif model_type == "hunyuan_v1_moe":  # its shared MLP, as wide as its experts
            shared = size
    kinds = get("mlp_layer_types")  # GLM-4-MoE-Lite's: "dense" or "sparse" per layer
    if isinstance(kinds, list) and len(kinds) == layers:
        moe = [kind == "sparse" for kind in kinds]
    return {
        "moe_layers": sum(moe),
        "layer_moe": tuple(moe),
        "experts": experts,
        "expert_intermediate_size": size,
        "shared_intermediate_size": shared,
        "shared_expert_gate": bool(get("shared_expert_intermediate_size")) and not get("n_routed_experts"),
        "expert_score_bias": model_type == "ernie4_5_moe",  # its float32 score correction, a parameter
    }


def _experts_forward(fields: dict[str, Any]) -> str | None:
    """The experts' forward a config names, as PreTrainedConfig reads it: "experts_implementation", a name
    or a dict of them whose "" entry is the model's own; None where it names none or grouped_mm (the
    default)."""
    named = fields.get("experts_implementation")
    if isinstance(named, dict):
        named = named.get("")
    return named if isinstance(named, str) and named != "grouped_mm" else None


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


# Families whose every layer is `indexed_attention` when the config lists no layer_types (their config
# classes' default), each caching its indexer's keys (`index_head_dim`, 128 by default) beside the latent
_INDEXED_FAMILIES = frozenset({"deepseek_v32", "glm_moe_dsa"})
# Their layers' name in layer_types: 5.25's, and an earlier transformers' (5.17)
_INDEXED_LAYER_TYPES = ("indexed_attention", "deepseek_sparse_attention")
# The first transformers whose DeepSeek-V3.2 and GLM-MoE-DSA cache the latent: 5.17 caches K and V expanded
# to the heads ("Sparse-attention models cache the expanded K/V, not the compressed latents"), 8x the latent
# and rotary key of the tiny DSA model; the releases between are unmeasured
DSA_CACHES_LATENT_SINCE = (5, 25)


# The transformers whose layouts a plan takes where none is named (no version given, installed or recorded):
# the newest of the releases above that change one (FP32_ROUTERS_SINCE, DSA_CACHES_LATENT_SINCE,
# buffers.ROPE_TABLE_SHARED_SINCE, compressed_kv.GATE_FP32_SINCE)
NEWEST_LAYOUT = (5, 25)


def _dsa_expanded(transformers_version: tuple[int, int] | None) -> bool:
    """Whether a sparse-attention (DSA) model caches each head's K and V rather than the latent."""
    return transformers_version is not None and transformers_version < DSA_CACHES_LATENT_SINCE


def _indexer_head_dim(
    fields: dict[str, Any], model_type: str, layer_types: Any, positive_int: Callable[[str, Any], int]
) -> int:
    """Elements a token's indexer keys take in each layer's cache (transformers' DynamicIndexedLayer), 0 for
    a model without sparse attention's indexer cache."""
    listed = isinstance(layer_types, list) and any(kind in layer_types for kind in _INDEXED_LAYER_TYPES)
    if not listed and (model_type not in _INDEXED_FAMILIES or isinstance(fields.get("layer_types"), list)):
        return 0
    return positive_int("index_head_dim", fields.get("index_head_dim", 128))


def _mla(
    fields: dict[str, Any],
    positive_int: Callable[[str, Any], int],
    expanded: bool,
    heads: int,
    model_type: str = "",
) -> MlaShape | None:
    """The latent attention's shape; `expanded`: the cache holds the `heads` heads' K and V instead."""
    if not fields.get("kv_lora_rank"):
        return None
    q_lora = fields.get("q_lora_rank")
    return MlaShape(
        q_lora_rank=positive_int("q_lora_rank", q_lora) if q_lora else None,
        **{
            name: positive_int(name, fields.get(name))
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        },
        expanded_heads=heads if expanded else None,
        complex_rotary=model_type == "deepseek_v2",
    )
