"""The GPT-2-style blocks of GPT-2, GPT-BigCode, Falcon and OPT, as their config.json describes them.

Their parameters differ from a Llama's in ways a Llama-style count misses: an up/down MLP without a gate
(two matrices, not three), biases on the projections, LayerNorms with a bias beside each weight, learned
position tables (OPT's two rows longer: its positions start at 2), and OPT's embeddings narrower than its
layers, projected in and out. The rules are transformers 5.24's (`models/<family>/modeling_<family>.py`);
a key a config leaves out is its config class's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrace.errors import KvtraceError

__all__ = ["GPT_FAMILIES", "gpt_block_fields"]

GPT_FAMILIES = frozenset({"gpt2", "gpt_bigcode", "falcon", "opt"})
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
    `mlp_matrices`, `linear_bias`, `norm_bias`, `layer_norms`, `final_norm`, `position_embeddings` and
    `embedding_size`. `where` names the config in a refusal. A decoder with cross-attention
    (`add_cross_attention`) is refused: it belongs to an encoder-decoder model whose cross-attention weights
    and cache a plan does not size."""
    if model_type not in GPT_FAMILIES:
        return {}
    get = fields.get
    if get("add_cross_attention"):
        raise KvtraceError(
            f"{where}: a {model_type} config with add_cross_attention is the decoder of an encoder-decoder "
            "model: its cross-attention weights and cache are not planned"
        )
    block: dict[str, Any] = {"mlp_matrices": 2, "norm_bias": True, "linear_bias": True}
    if model_type == "falcon":
        block["linear_bias"] = bool(get("bias", False))
        norms_in_parallel = get("num_ln_in_parallel_attn") or (2 if get("new_decoder_architecture") else 1)
        block["layer_norms"] = 2 if not get("parallel_attn", True) or norms_in_parallel == 2 else 1
        return block
    key = next((name for name in _POSITIONS_KEYS[model_type] if get(name) is not None), None)
    positions = _DEFAULT_POSITIONS[model_type] if key is None else positive_int(key, get(key))
    if model_type == "opt":
        affine = bool(get("layer_norm_elementwise_affine", True))
        final = bool(get("do_layer_norm_before", True)) and not get("_remove_final_layer_norm", False)
        width = get("word_embed_proj_dim")
        block.update(
            linear_bias=bool(get("enable_bias", True)),
            layer_norms=2 if affine else 0,
            final_norm=final and affine,
            position_embeddings=positions + _OPT_POSITION_OFFSET,
        )
        if width is not None and positive_int("word_embed_proj_dim", width) != hidden:
            block["embedding_size"] = width
        return block
    block["position_embeddings"] = positions
    return block
