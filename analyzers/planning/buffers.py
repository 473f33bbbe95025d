"""The buffers transformers registers beside a model's parameters (`register_buffer`, `nn.Buffer`), read
from a config.json: persistent or not, they sit on the device with the weights from the moment the model
is built, and the recorder counts them as weights (every distinct storage of parameters and buffers).

Most are small, but not all: GPT-Neo keeps a causal mask of max_position_embeddings^2 bools in every
layer (32 x 4 MiB in GPT-Neo 2.7B), GPT-BigCode one for the model, GPT-J and CodeGen a float32 sinusoidal
table of max_position_embeddings x rotary_dim, CTRL one of n_positions x n_embd, XGLM one in the model's
dtype. Every RoPE model keeps `inv_freq` and a copy, `original_inv_freq` (head_dim / 2 float32 each, of the
rotary part of the head), one pair per kind of layer in Gemma 3, 3n, 4 and OLMo 3. Some keep float32
whatever the model's dtype (RoPE's, GPT-J's, CTRL's tables, DeepSeek-V3's expert-score bias), some take
it (XGLM's table, Gemma's scales, Apertus' xIELU constants). The rules are transformers 5.24's, built with
`from_config(..., dtype=...)` or `from_pretrained(..., dtype=...)`; a key a config leaves out is its
config class's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ROPE_TABLE_SHARED_SINCE", "buffer_fields"]

# Families without a RoPE table: learned or sinusoidal positions, or ALiBi (Bloom, MPT)
_NO_ROPE = frozenset(
    {"gpt2", "gpt_bigcode", "opt", "bloom", "mpt", "biogpt", "ctrl", "xglm", "gpt_neo", "gptj", "codegen"}
)
# Families whose RoPE covers a part of each head unless the config says otherwise (their config class's
# `partial_rotary_factor`; GPT-NeoX's `rotary_pct`)
_PARTIAL_ROTARY = {"gpt_neox": 0.25, "phi": 0.5, "stablelm": 0.25, "persimmon": 0.5, "nemotron": 0.5}
# Families with a RoPE table per kind of layer (`{layer_type}_inv_freq`), the kinds their layers have
_ROPE_PER_LAYER_TYPE = frozenset(
    {"gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "olmo3"}
)
# The keys of a sinusoidal table's or a causal mask's length, and the config class's default
_TABLE_POSITIONS: dict[str, tuple[tuple[str, ...], int]] = {
    "gpt_bigcode": (("n_positions", "max_position_embeddings"), 1024),
    "gpt_neo": (("max_position_embeddings",), 2048),
    "gptj": (("n_positions", "max_position_embeddings"), 2048),
    "codegen": (("n_positions", "max_position_embeddings"), 2048),
    "ctrl": (("n_positions", "max_position_embeddings"), 256),
    "xglm": (("max_position_embeddings",), 2048),
}
_GPTJ_ROTARY_DIM = 64  # GPTJConfig's and CodeGenConfig's rotary_dim
_XGLM_OFFSET = 2  # XGLMSinusoidalPositionalEmbedding: max_position_embeddings + 2 rows


def _rotary_factor(fields: dict[str, Any], model_type: str) -> float:
    """The part of each head RoPE turns: the config's `partial_rotary_factor` (in `rope_parameters` as
    transformers 5 saves it, at the top level in older files; GPT-NeoX's `rotary_pct`), else the family's."""
    rope = fields.get("rope_parameters") or fields.get("rope_scaling")
    for value in (
        rope.get("partial_rotary_factor") if isinstance(rope, dict) else None,
        fields.get("partial_rotary_factor"),
        fields.get("rotary_pct") if model_type == "gpt_neox" else None,
    ):
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
            return float(value)
    return _PARTIAL_ROTARY.get(model_type, 1.0)


# The first transformers whose GPT-J and CodeGen share one sinusoidal table (`rotary_emb.embed_positions`):
# 5.17 builds one in each attention layer (a plan of the tiny 2-layer GPT-J was 4,096 B under its model);
# the releases between are unmeasured
ROPE_TABLE_SHARED_SINCE = (5, 25)


def _inv_freq_elements(rotary_dim: int) -> int:
    """`inv_freq` and `original_inv_freq`: one float32 for every other dimension of the rotary part."""
    return 2 * len(range(0, rotary_dim, 2))


def buffer_fields(
    fields: dict[str, Any],
    model_type: str,
    *,
    layers: int,
    head_dim: int,
    full_head_dim: int | None,
    layer_types: Any,
    moe_layers: int,
    experts: int,
    positive_int: Callable[[str, Any], int],
    tables_per_layer: bool = False,
) -> dict[str, Any]:
    """ModelGeometry's buffer fields for a `model_type` config: `fp32_buffer_elements`,
    `buffer_elements` (in the weights' dtype) and `bool_buffer_bytes` (empty when it has none), and
    `rotary_dim` where RoPE turns a part of each head (GLM's half), `rotary_tables` where the model makes a
    RoPE table for each kind of layer (Gemma 3's sliding and full), and its prefill a cos and sin of each.
    `head_dim` is each head's width (the latent attention's rotary key, `qk_rope_head_dim`, where it has
    one), `full_head_dim` Gemma 4's full layers' where it differs; `layer_types` the config's, given or
    derived; `moe_layers` and `experts` its mixture of experts; `positive_int` checks a field or raises;
    `tables_per_layer`: GPT-J's and CodeGen's sinusoidal table in each attention layer (transformers before
    5.25: `ROPE_TABLE_SHARED_SINCE`), not one the model shares."""
    get = fields.get
    fp32 = elements = masks = 0
    rotary_dim = None
    rotary_tables = 1
    if model_type not in _NO_ROPE:
        if get("qk_rope_head_dim") and get("kv_lora_rank"):  # DeepSeek's latent attention
            head_dim = positive_int("qk_rope_head_dim", get("qk_rope_head_dim"))
        if model_type in _ROPE_PER_LAYER_TYPE and isinstance(layer_types, list | tuple):
            kinds = set(layer_types)  # one table per kind present, each of its layers' head width
            # and the prefill computes a cos and sin of each (`position_embeddings[layer_type]`)
            rotary_tables = len(kinds)
            fp32 += sum(
                _inv_freq_elements(full_head_dim or head_dim if kind == "full_attention" else head_dim)
                for kind in kinds
            )
        else:
            turned = _inv_freq_elements(int(head_dim * _rotary_factor(fields, model_type)))
            fp32 += turned
            if turned != head_dim and not get("kv_lora_rank"):  # the prefill's cos and sin are this wide
                rotary_dim = turned
    if model_type in _TABLE_POSITIONS:
        keys, default = _TABLE_POSITIONS[model_type]
        key = next((name for name in keys if get(name) is not None), None)
        positions = default if key is None else positive_int(key, get(key))
        hidden = positive_int("hidden_size", get("hidden_size"))
        if model_type == "gpt_bigcode":  # one causal mask for every layer
            masks = positions * positions
        elif model_type == "gpt_neo":  # a causal mask (a banded one in local layers) in each layer
            masks = layers * positions * positions
        elif model_type in ("gptj", "codegen"):
            rotary = get("rotary_dim", _GPTJ_ROTARY_DIM)
            table = positions * (hidden if rotary is None else positive_int("rotary_dim", rotary))
            fp32 += table * (layers if tables_per_layer else 1)
        elif model_type == "ctrl":
            fp32 += positions * hidden
        else:  # XGLM
            elements += (positions + _XGLM_OFFSET) * hidden
    if model_type in ("gemma", "gemma2", "gemma3", "gemma3_text"):  # the embeddings' scale
        elements += 1
    elif model_type in ("gemma3n", "gemma3n_text"):  # and the per-layer inputs', AltUp's router's each layer
        elements += 4 + layers
    elif model_type in ("gemma4", "gemma4_text"):  # and each layer's scalar, the per-layer inputs' scale
        elements += 1 + layers + (1 if get("hidden_size_per_layer_input", 256) else 0)
    elif model_type in ("deepseek_v3", "dots1", "glm4_moe", "glm4_moe_lite"):
        # each MoE layer's expert-score correction, kept in float32
        fp32 += moe_layers * experts
    elif model_type == "apertus" and get("hidden_act", "xielu") == "xielu":  # xIELU's beta and eps
        elements += 2 * layers
    found = {
        "fp32_buffer_elements": fp32, "buffer_elements": elements, "bool_buffer_bytes": masks,
        "rotary_dim": rotary_dim, "rotary_tables": rotary_tables if rotary_tables > 1 else 0,
    }  # fmt: skip
    return {name: value for name, value in found.items() if value}
