"""What transformers assumes for the keys a config.json leaves out, family by family (`model_type`).

`plan --config` reads a config.json without transformers, but published configs often omit what their
family's config class fills in. google/gemma-2-9b's has no `layer_types` (Gemma2Config alternates sliding
and full layers) and no `tie_word_embeddings` (Gemma2Config ties the lm_head to the embeddings).

The rules below are transformers 5.24's. Each config class declares its own `tie_word_embeddings`
default, and a model with none is untied (`PreTrainedModel.get_expanded_tied_weights_keys` reads it with
`getattr(..., False)`); PreTrainedConfig no longer has one. A class derives `layer_types` in its
`__post_init__` (`models/<family>/configuration_<family>.py`), and a config without them falls back to
`cache_utils.get_layer_types_and_kwargs`: every layer slides when there is a window. A family not named
here gets that generic reading: lm_head untied, every layer alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "LLAMA4_CHUNK",
    "default_layer_types",
    "derive_family_fields",
    "kv_shared_by_default",
    "per_layer_overrides",
    "tied_by_default",
    "weights_estimate_note",
    "window_on_by_default",
]

# The families whose weights `param_count.param_count` counts as transformers builds them (tests check each
# against the model built on the meta device); any other is counted as a Llama-style decoder, an estimate.
_WEIGHED_EXACTLY = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma2", "gemma3_text",
        "deepseek_v2", "deepseek_v3", "phi3", "gemma", "gpt2", "gpt_bigcode", "falcon", "opt", "gpt_neox",
        "bloom", "phi", "llama4_text", "llama4", "gptj", "codegen", "stablelm", "starcoder2", "olmo", "olmo2",
        "olmo3", "olmoe", "cohere", "cohere2", "granite", "granitemoe", "phimoe", "mpt", "nemotron", "arcee",
        "apertus", "persimmon", "granitemoeshared", "gpt_oss", "gpt_neo", "jetmoe", "gemma3n", "gemma3n_text",
        "gemma4", "gemma4_text", "ctrl", "biogpt", "xglm", "exaone4", "seed_oss", "helium", "bitnet",
        "diffllama", "ministral", "smollm3", "internlm3", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "dots1",
        "hunyuan_v1_dense", "hunyuan_v1_moe", "ernie4_5", "ernie4_5_moe", "dbrx",
    }
)  # fmt: skip


def weights_estimate_note(raw: dict[str, Any], model_type: str) -> str | None:
    """Why a config's weights figure is an estimate, None where the planner weighs its family exactly:
    a family laid out otherwise than it counts (biases, fused or extra matrices, other norms), or a
    multimodal config, whose vision or audio tower it does not count."""
    towers = [key for key in ("vision_config", "audio_config") if isinstance(raw.get(key), dict)]
    if towers:
        return (
            f"weights: the language model's only; its {' and '.join(towers)} tower is not counted, so the "
            "weights figure is below the checkpoint's"
        )
    if model_type in _WEIGHED_EXACTLY:
        return None
    family = f"model_type {model_type!r}" if model_type else "a config without model_type"
    return (
        f"weights: {family} is weighed as a Llama-style decoder (three MLP matrices, RMSNorms, no "
        "biases), an estimate: its own layout may differ"
    )


# The causal-LM model types (transformers 5.25's MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) whose config class
# defaults `tie_word_embeddings` to True. Llama, Mistral, Mixtral, Qwen, DeepSeek and the rest: False.
_TIED_BY_DEFAULT = frozenset(
    {
        "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "biogpt", "blenderbot",
        "blenderbot-small", "bloom", "camembert", "cohere", "cohere2", "cohere2_moe", "cohere_compass_text",
        "cpmant", "ctrl", "data2vec-text", "electra", "ernie", "ernie4_5", "ernie4_5_moe", "falcon",
        "falcon_mamba", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4",
        "gemma4_assistant", "gemma4_text", "gemma4_unified", "gemma4_unified_assistant",
        "gemma4_unified_text", "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox_japanese",
        "granite_swa", "jetmoe", "lara_mini", "lfm2", "lfm2_moe", "lfm3", "mamba", "marian", "mbart",
        "megatron-bert", "minicpm3", "modernbert-decoder", "moss_transcribe_diarize", "mpt", "mvp",
        "openai-gpt", "opt", "param2moe", "pegasus", "plbart", "prophetnet", "recurrent_gemma", "roberta",
        "roberta-prelayernorm", "roc_bert", "roformer", "smollm3", "starcoder2", "trocr", "vaultgemma",
        "whisper", "xglm", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "xmod", "youtu", "zamba",
        "zamba2", "zaya",
    }
)  # fmt: skip

# Families whose config class declares `use_sliding_window: bool = False`: their `sliding_window` is only
# a size until that flag turns it on (Qwen2Config.__post_init__ sets it to None otherwise).
_WINDOW_OFF_BY_DEFAULT = frozenset({"qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3"})


# Llama4TextConfig's `attention_chunk_size` when a config leaves it out
LLAMA4_CHUNK = 8192
# JetMoeConfig's defaults for the keys its heads and head_dim derive from, and its experts
_JETMOE_DEFAULTS = {
    "num_key_value_heads": 16, "kv_channels": 128, "num_experts_per_tok": 2, "num_local_experts": 8,
}  # fmt: skip


# Config classes whose `head_dim` defaults to a width, not to hidden_size / num_attention_heads: a config.json
# that leaves it out gets these heads (and their KV)
_HEAD_DIM_BY_DEFAULT = {"glm": 128, "glm4": 128, "internlm3": 128, "ernie4_5": 128}
# Config classes whose `sliding_window` defaults to a window, not to none (MinistralConfig and MistralConfig
# slide every layer over it; the others the layers `default_layer_types` gives: Dots1Config's from
# `max_window_layers` on, Gemma 2's every other one, Gemma 3's, Cohere 2's and EXAONE 4's by their pattern)
_WINDOW_BY_DEFAULT = {
    "ministral": 4096, "dots1": 4096, "mistral": 4096, "gemma2": 4096, "gemma3": 4096, "gemma3_text": 4096,
    "cohere2": 4096, "exaone4": 4096,
}  # fmt: skip
# Other names a family's config class maps to the standard ones (its attribute_map)
_FAMILY_ALIASES = {
    "internlm3": {"attention_bias": "qkv_bias", "mlp_bias": "bias"},
    "ernie4_5_moe": {"num_experts": "moe_num_experts"},
    "glm4_moe_lite": {"head_dim": "qk_rope_head_dim"},  # its latent attention's rotary key
}


def derive_family_fields(fields: dict[str, Any], model_type: str) -> None:
    """Set, in `fields`, what a `model_type` config class derives rather than reads: the defaults above,
    its own names of standard keys, DBRX's nested `attn_config` (KV heads) and `ffn_config` (its experts
    and their width). JetMoE's head_dim is `kv_channels` (its attribute_map), not hidden_size / heads, and
    its attention heads are KV heads x `num_experts_per_tok`, whatever the file says
    (JetMoeConfig.__post_init__): its cache holds `num_key_value_heads` heads of `kv_channels` per layer."""
    if model_type in _HEAD_DIM_BY_DEFAULT:
        fields.setdefault("head_dim", _HEAD_DIM_BY_DEFAULT[model_type])
    if model_type in _WINDOW_BY_DEFAULT:
        fields.setdefault("sliding_window", _WINDOW_BY_DEFAULT[model_type])
    for standard, other in _FAMILY_ALIASES.get(model_type, {}).items():
        if fields.get(standard) is None and fields.get(other) is not None:
            fields[standard] = fields[other]
    if model_type == "dbrx":  # DbrxConfig's sub-configs, and their classes' defaults
        attention, ffn = fields.get("attn_config"), fields.get("ffn_config")
        attention = attention if isinstance(attention, dict) else {}
        ffn = ffn if isinstance(ffn, dict) else {}
        fields.setdefault("num_key_value_heads", attention.get("kv_n_heads", 1))
        fields.setdefault("intermediate_size", ffn.get("ffn_hidden_size", 3584))
        fields.setdefault("num_local_experts", ffn.get("moe_num_experts", 4))
    if model_type != "jetmoe":
        return
    for key, default in _JETMOE_DEFAULTS.items():
        if fields.get(key) is None:
            fields[key] = fields.get("head_dim", default) if key == "kv_channels" else default
    fields["head_dim"] = fields["kv_channels"]
    kv_heads, top_k = fields["num_key_value_heads"], fields["num_experts_per_tok"]
    if isinstance(kv_heads, int) and isinstance(top_k, int):  # anything else is refused as a head count
        fields["num_attention_heads"] = kv_heads * top_k


def tied_by_default(model_type: str) -> bool:
    """Whether transformers ties the lm_head to the embeddings of a `model_type` config that does not say."""
    return model_type in _TIED_BY_DEFAULT


def window_on_by_default(model_type: str) -> bool:
    """Whether a `model_type` config's `sliding_window` applies when it leaves `use_sliding_window` out."""
    return model_type not in _WINDOW_OFF_BY_DEFAULT


def kv_shared_by_default(model_type: str) -> int:
    """`num_kv_shared_layers` of a config that has none: Gemma3nTextConfig's 15 (its last 15 layers reuse
    an earlier layer's K and V); Gemma4TextConfig's 0, as every other family's."""
    return 15 if model_type in ("gemma3n", "gemma3n_text") else 0


# Gemma4TextConfig and its unified sibling make their full layers `global_head_dim` wide (512 unless given)
_GLOBAL_HEAD_DIM = {"gemma4": 512, "gemma4_text": 512, "gemma4_unified": 512, "gemma4_unified_text": 512}


def per_layer_overrides(
    fields: dict[str, Any], model_type: str, layer_types: Any
) -> dict[int, dict[str, Any]]:
    """What each layer's config changes of the global one, by layer index: the config's `per_layer_config`
    (transformers writes it for a heterogeneous config), else Gemma4TextConfig's rule for one that has
    none, as published configs do: its full layers are `global_head_dim` wide, with
    `num_global_key_value_heads` KV heads when `attention_k_eq_v` (a K that is also the V) is set."""
    given = fields.get("per_layer_config")
    if isinstance(given, dict):
        return {
            int(index): dict(overrides)
            for index, overrides in given.items()
            if str(index).isdigit() and isinstance(overrides, dict)
        }
    if model_type not in _GLOBAL_HEAD_DIM or not isinstance(layer_types, list | tuple):
        return {}
    full: dict[str, Any] = {"head_dim": fields.get("global_head_dim", _GLOBAL_HEAD_DIM[model_type])}
    if fields.get("attention_k_eq_v") and fields.get("num_global_key_value_heads") is not None:
        full["num_key_value_heads"] = fields["num_global_key_value_heads"]
    return {i: full for i, kind in enumerate(layer_types) if kind == "full_attention"}


def _kinds(slides: list[bool]) -> list[str]:
    return ["sliding_attention" if slide else "full_attention" for slide in slides]


def default_layer_types(
    fields: dict[str, Any],
    model_type: str,
    layers: int,
    window: int | None,
    positive_int: Callable[[str, Any], int],
) -> list[str] | None:
    """The `layer_types` transformers derives for a config that has none, as its family's config class
    does; None for a family without such a rule (every layer alike). `window` is the config's sliding
    window once `use_sliding_window` is applied; `positive_int` checks a field or raises."""
    get = fields.get

    def full_every(name: str | None, period: int) -> list[str]:  # layer 0 slides, every period-th is full
        if name is not None:
            period = positive_int(name, get(name, period))
        return _kinds([(i + 1) % period != 0 for i in range(layers)])

    def layer_count(name: str, default: int) -> int:  # 0 is a count too
        value = get(name, default)
        return 0 if value == 0 and not isinstance(value, bool) else positive_int(name, value)

    if model_type in ("gemma2", "vaultgemma", "gpt_oss"):  # alternating
        return full_every(None, 2)
    if model_type in ("gemma3", "gemma3_text"):  # Gemma3TextConfig: from `sliding_window_pattern`, 6
        return full_every("sliding_window_pattern", 6)
    if model_type in ("gemma3n", "gemma3n_text"):  # Gemma3nTextConfig: every 5th layer is full
        return full_every(None, 5)
    if model_type in ("gemma4", "gemma4_text"):  # Gemma4TextConfig: every 6th, and the last one, are full
        return [*full_every(None, 6)[:-1], "full_attention"]
    if model_type in ("cohere2", "exaone4"):  # Cohere2Config, Exaone4Config: `sliding_window_pattern`, 4
        # Exaone4Config without a window makes its pattern 0 (and fails): no window, no types needed
        return None if window is None else full_every("sliding_window_pattern", 4)
    if model_type == "olmo3":
        return full_every(None, 4)
    if model_type in ("qwen2", "qwen3"):  # the layers from `max_window_layers` on slide
        first = layer_count("max_window_layers", 28)
        return _kinds([window is not None and i >= first for i in range(layers)])
    if model_type == "dots1":  # Dots1Config: the layers from `max_window_layers` (62) on slide
        first = layer_count("max_window_layers", 62)
        return _kinds([window is not None and i >= first for i in range(layers)])
    if model_type == "qwen2_moe":  # the even layers below `max_window_layers` slide
        below = layer_count("max_window_layers", 28)
        return _kinds([window is not None and i % 2 == 0 and i < below for i in range(layers)])
    if model_type in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"):  # linear attention: no KV
        period = positive_int("full_attention_interval", get("full_attention_interval", 4))
        return ["linear_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    if model_type in ("llama4", "llama4_text"):  # Llama4TextConfig: its RoPE layers are chunked
        interval = positive_int("no_rope_layer_interval", get("no_rope_layer_interval", 4))
        uses_rope = get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
        if not isinstance(uses_rope, list) or len(uses_rope) != layers:
            return None
        chunked = get("attention_chunk_size", LLAMA4_CHUNK) is not None
        return ["chunked_attention" if chunked and rope else "full_attention" for rope in uses_rope]
    if model_type == "smollm3":  # its NoPE layers (`no_rope_layers` 0, every 4th by default) slide
        interval = positive_int("no_rope_layer_interval", get("no_rope_layer_interval", 4))
        no_rope = get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
        if not isinstance(no_rope, list) or len(no_rope) != layers:
            return None
        return _kinds([window is not None and not has_rope for has_rope in no_rope])
    return None
