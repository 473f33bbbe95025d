"""Model geometries for the capacity planner: built-in Llama 3.x presets and local config.json files.

The planner needs only a handful of integers per model (layers, heads, widths), so they live here as a
frozen dataclass rather than as a transformers config: planning must work on a laptop with neither torch
nor transformers installed, and must never touch the network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrace.errors import KvtraceError
from kvtrace.geometry import kv_heads_of, layer_kinds

__all__ = [
    "DTYPE_BITS",
    "PRESETS",
    "ModelGeometry",
    "dtype_bytes_for",
    "geometry_from_config",
    "get_preset",
    "param_count",
    "weights_bytes",
]

# Storage bits per element. Bits rather than bytes because int4 packs two elements into one byte.
DTYPE_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a decoder-only, Llama-style transformer: all the planner needs to size weights and KV.

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

    @property
    def layers_with_kv(self) -> int:
        return self.num_layers if self.kv_layers is None else self.kv_layers

    @property
    def windowed_layers(self) -> int:
        """Layers a cache keeps at the model's window (transformers' caches follow the config: every layer
        without `layer_types`, the sliding ones with it)."""
        if self.sliding_window is None:
            return 0
        return self.layers_with_kv if self.sliding_layers is None else self.sliding_layers


def _llama3(
    name: str, layers: int, heads: int, hidden: int, inter: int, *, head_dim: int = 128, tied: bool = False
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
    )


# Values from each model's published config.json on the Hugging Face Hub (meta-llama/...). The 3.1 and 3.3
# releases changed RoPE scaling and context length, not the geometry, so they repeat 3.0's numbers.
PRESETS: dict[str, ModelGeometry] = {
    geom.name: geom
    for geom in (
        _llama3("llama-3-8b", 32, 32, 4096, 14336),
        _llama3("llama-3-70b", 80, 64, 8192, 28672),
        _llama3("llama-3.1-8b", 32, 32, 4096, 14336),
        _llama3("llama-3.1-70b", 80, 64, 8192, 28672),
        _llama3("llama-3.1-405b", 126, 128, 16384, 53248),
        _llama3("llama-3.2-1b", 16, 32, 2048, 8192, head_dim=64, tied=True),
        _llama3("llama-3.2-3b", 28, 24, 3072, 8192, head_dim=128, tied=True),
        _llama3("llama-3.3-70b", 80, 64, 8192, 28672),
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


def param_count(geom: ModelGeometry) -> int:
    """Exact parameter count of a Llama-style model without biases.

    Counted: token embeddings; per layer the q/k/v/o projections, the gate/up/down MLP and two RMSNorm
    weight vectors; the final norm; and the lm_head unless it shares the embedding matrix. Models with
    attention biases (Qwen2) have a few more parameters than this, well under 0.1% of the total.
    """
    q_width = geom.num_attention_heads * geom.head_dim
    kv_width = geom.num_kv_heads * geom.head_dim
    attention = geom.hidden_size * q_width + 2 * geom.hidden_size * kv_width + q_width * geom.hidden_size
    mlp = 3 * geom.hidden_size * geom.intermediate_size
    norms = 2 * geom.hidden_size
    embeddings = geom.vocab_size * geom.hidden_size
    lm_head = 0 if geom.tie_word_embeddings else embeddings
    return embeddings + geom.num_layers * (attention + mlp + norms) + geom.hidden_size + lm_head


def weights_bytes(geom: ModelGeometry, dtype: str) -> int:
    """Bytes of all parameters stored in `dtype`.

    Quantized weight formats (int8, int4) also store per-group scales; those are not counted here because
    their layout depends on the quantizer (GPTQ, AWQ, bitsandbytes), so treat int4/int8 as a lower bound.
    """
    return dtype_bytes_for(dtype, param_count(geom))


# Other names of the required fields, as transformers maps them (GPT-2 / GPT-BigCode, Falcon, T5-style).
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("n_layer", "num_layers"),
    "num_attention_heads": ("n_head", "num_heads"),
    "hidden_size": ("n_embd", "d_model"),
    "intermediate_size": ("n_inner", "ffn_hidden_size", "d_ff"),
}
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
    `head_dim` to hidden_size / num_attention_heads, as transformers does. `tie_word_embeddings` defaults
    to False, LlamaConfig's default (transformers' generic default is True, but Llama, Mistral and Qwen2
    override it and write it into config.json anyway). A window is kept only when the config enables it:
    Qwen2-style configs carry `sliding_window` with `use_sliding_window: false`.
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
    if not isinstance(raw, dict):
        raise KvtraceError(f"{config_path}: expected a JSON object at the top level")

    text_config = raw.get("text_config")
    fields: dict[str, Any] = {**raw, **text_config} if isinstance(text_config, dict) else dict(raw)
    for standard, others in _ALIASES.items():  # what transformers' `attribute_map`s say (GPT-2, Falcon)
        for other in others:
            if fields.get(standard) is None and fields.get(other) is not None:
                fields[standard] = fields[other]
    if fields.get("intermediate_size") is None and fields.get("hidden_size") and _FOUR_X_MLP & fields.keys():
        fields["intermediate_size"] = 4 * fields["hidden_size"]  # GPT-2's n_inner / Falcon's default: 4x

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
    window_enabled = fields.get("use_sliding_window", True) is not False and window_raw != 0  # 0: none
    sliding_window = None
    if window_enabled and window_raw is not None:
        sliding_window = positive_int("sliding_window", window_raw)

    kinds = layer_kinds(fields.get("layer_types"))
    name = fields.get("_name_or_path") or config_path.resolve().parent.name or str(config_path)
    return ModelGeometry(
        name=str(name),
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=positive_int("intermediate_size", fields["intermediate_size"]),
        vocab_size=positive_int("vocab_size", fields["vocab_size"]),
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        kv_layers=kinds[0] if kinds is not None else None,
        sliding_layers=kinds[1] if kinds is not None else None,
    )
