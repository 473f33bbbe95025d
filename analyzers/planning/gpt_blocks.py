"""The GPT-2-style blocks of GPT-2, GPT-BigCode, Falcon, OPT, GPT-NeoX, Bloom and Phi, and the bias flags
of Llama-style ones, as their config.json describes them.

Their parameters differ from a Llama's in ways a Llama-style count misses: an up/down MLP without a gate
(two matrices, not three), biases on the projections, LayerNorms with a bias beside each weight, learned
position tables (OPT's two rows longer: its positions start at 2), OPT's embeddings narrower than its
layers, projected in and out, Bloom's LayerNorm of the embeddings, Phi's one norm per layer (attention and
MLP side by side), its LayerNorms of q and k and its lm_head's bias. Llama-style families keep their
layout, but some take biases from the config: `attention_bias` (Llama, Qwen3, Gemma: q, k, v and output
projections; DeepSeek: its latent ones) and `mlp_bias` (Llama, DeepSeek-V2: every MLP matrix). The rules
are transformers 5.24's (`models/<family>/modeling_<family>.py`); a key a config leaves out is its config
class's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrace.errors import KvtraceError

__all__ = ["GPT_FAMILIES", "gpt_block_fields"]

GPT_FAMILIES = frozenset({"gpt2", "gpt_bigcode", "falcon", "opt", "gpt_neox", "bloom", "phi"})
# Llama-style families whose config class has `attention_bias` or `mlp_bias` (default False), and uses it
_ATTENTION_BIAS_FLAG = frozenset(
    {"llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "gemma3_text", "deepseek_v2", "deepseek_v3"}
)
_MLP_BIAS_FLAG = frozenset({"llama", "deepseek_v2"})
# The keys of the learned position table's length (GPT-2's attribute_map: max_position_embeddings)
_POSITIONS_KEYS = {
    "gpt2": ("n_positions", "max_position_embeddings"),
    "gpt_bigcode": ("n_positions", "max_position_embeddings"),
    "opt": ("max_position_embeddings",),
}
_DEFAULT_POSITIONS = {"gpt2": 1024, "gpt_bigcode": 1024, "opt": 2048}  # the config classes' defaults
_OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding: max_position_embeddings + 2 rows


def gpt_block_fields(
    fields: dict[str, Any],
    model_type: str,
    hidden: int,
    positive_int: Callable[[str, Any], int],
    where: str,
) -> dict[str, Any]:
    """ModelGeometry's block fields for a config of `model_type` (empty for a family not named here):
    `mlp_matrices`, `attention_bias`, `mlp_bias`, `norm_bias`, `layer_norms`, `final_norm`,
    `position_embeddings`, `embedding_size`, `embedding_norm`, `qk_norm` and `lm_head_bias`; for a
    Llama-style family, its bias flags. `where` names the config in a refusal. A decoder with cross-attention
    (`add_cross_attention`) is refused: it belongs to an encoder-decoder model whose cross-attention weights
    and cache a plan does not size."""
    get = fields.get
    if model_type not in GPT_FAMILIES:
        flags = {
            "attention_bias": model_type in _ATTENTION_BIAS_FLAG and bool(get("attention_bias", False)),
            "mlp_bias": model_type in _MLP_BIAS_FLAG and bool(get("mlp_bias", False)),
        }
        return {name: True for name, on in flags.items() if on}
    if get("add_cross_attention"):
        raise KvtraceError(
            f"{where}: a {model_type} config with add_cross_attention is the decoder of an encoder-decoder "
            "model: its cross-attention weights and cache are not planned"
        )
    block: dict[str, Any] = {"mlp_matrices": 2, "norm_bias": True, "attention_bias": True, "mlp_bias": True}
    if model_type == "gpt_neox":  # attention_bias: its fused qkv and dense projections; the MLP's always
        return {**block, "attention_bias": bool(get("attention_bias", True))}
    if model_type == "bloom":
        return {**block, "embedding_norm": True}
    if model_type == "phi":  # one norm before attention and MLP, which run side by side
        return {**block, "layer_norms": 1, "qk_norm": bool(get("qk_layernorm", False)), "lm_head_bias": True}
    if model_type == "falcon":
        block["attention_bias"] = block["mlp_bias"] = bool(get("bias", False))
        norms_in_parallel = get("num_ln_in_parallel_attn") or (2 if get("new_decoder_architecture") else 1)
        block["layer_norms"] = 2 if not get("parallel_attn", True) or norms_in_parallel == 2 else 1
        return block
    key = next((name for name in _POSITIONS_KEYS[model_type] if get(name) is not None), None)
    positions = _DEFAULT_POSITIONS[model_type] if key is None else positive_int(key, get(key))
    if model_type == "opt":
        affine = bool(get("layer_norm_elementwise_affine", True))
        final = bool(get("do_layer_norm_before", True)) and not get("_remove_final_layer_norm", False)
        width = get("word_embed_proj_dim")
        bias = bool(get("enable_bias", True))
        block.update(
            attention_bias=bias,
            mlp_bias=bias,
            layer_norms=2 if affine else 0,
            final_norm=final and affine,
            position_embeddings=positions + _OPT_POSITION_OFFSET,
        )
        if width is not None and positive_int("word_embed_proj_dim", width) != hidden:
            block["embedding_size"] = width
        return block
    block["position_embeddings"] = positions
    return block
