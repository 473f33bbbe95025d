"""The GPT-2-style blocks of GPT-2, GPT-BigCode, Falcon, OPT, GPT-NeoX, Bloom, Phi, GPT-J, CodeGen, GPT-Neo,
CTRL, BioGPT and XGLM, the Llama-style blocks that differ from a Llama's (StableLM, StarCoder2, OLMo, OLMo
2 and 3, OLMoE, Cohere, PhiMoE, MPT, Nemotron, Arcee, Apertus, Persimmon, GPT-OSS, JetMoE, EXAONE 4,
Seed-OSS, Helium, BitNet, DiffLlama), and the bias flags of Llama-style ones, as their config.json
describes them.

Their parameters differ from a Llama's in ways a Llama-style count misses: an up/down MLP without a gate (two
matrices, not three: the GPT-2 families, StarCoder2, MPT, Nemotron, Arcee, Apertus, Persimmon), biases on the
projections (GPT-Neo's output projection alone; GPT-OSS's experts and router too), LayerNorms with a bias
beside each weight, learned position tables (OPT's and BioGPT's two rows longer: their positions start at 2;
CTRL's and XGLM's are sinusoidal, no weights), OPT's embeddings narrower than its layers, projected in and
out, Bloom's LayerNorm of the embeddings, one norm per layer where attention and MLP run side by side (Phi,
GPT-J, CodeGen, Cohere, StableLM's parallel residual), OLMo's norms without weights, norms of q and k (Phi's
LayerNorms of head_dim; a weight per head in StableLM, OLMo 2 and Cohere), an lm_head's bias (Phi, GPT-J,
CodeGen, CTRL, PhiMoE's when asked), GPT-OSS's attention sinks, Apertus' learned activation, JetMoE's
attention experts, BitNet's norms of the attention's output and of the MLP's intermediate units, and
DiffLlama's four lambda vectors of head_dim. Llama-style families keep their layout, but some take biases from
the config: `attention_bias` (Llama, Qwen3, Gemma, OLMo, Cohere, Granite, Gemma 3n and 4: q, k, v and output
projections; DeepSeek: its latent ones) and `mlp_bias` (Llama, DeepSeek-V2, Granite: every MLP matrix);
Seed-OSS's, Helium's, GLM's (by default) and GLM-4-MoE's `attention_bias` is on q, k and v alone, ERNIE 4.5's
`use_bias` on every projection; GLM-4 norms each block's output too, HunYuan and dots1 norm q and k. The
rules are transformers 5.24's (`models/<family>/modeling_<family>.py`); a key a config leaves out is its
config class's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtrace.errors import KvtraceError

__all__ = ["GPT_FAMILIES", "gpt_block_fields"]

GPT_FAMILIES = frozenset(
    {
        "gpt2", "gpt_bigcode", "falcon", "opt", "gpt_neox", "bloom", "phi", "gptj", "codegen", "gpt_neo",
        "ctrl", "biogpt", "xglm",
    }
)  # fmt: skip
# Llama-style families whose config class has `attention_bias` or `mlp_bias` (default False), and uses it
_ATTENTION_BIAS_FLAG = frozenset(
    {
        "llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "gemma3_text", "deepseek_v2",
        "deepseek_v3", "olmo", "olmo2", "olmo3", "olmoe", "cohere", "cohere2", "granite", "granitemoe",
        "granitemoeshared", "phimoe", "nemotron", "arcee", "apertus", "gemma3n", "gemma3n_text", "gemma4",
        "gemma4_text", "bitnet", "diffllama", "smollm3", "internlm3", "hunyuan_v1_dense", "hunyuan_v1_moe",
        "dots1", "glm4_moe_lite",
    }
)  # fmt: skip
_MLP_BIAS_FLAG = frozenset({"llama", "deepseek_v2", "granite", "nemotron", "arcee", "smollm3", "internlm3"})
# Llama-style families whose `attention_bias` is on q, k and v alone, and its default in their config class
_QKV_BIAS_FLAG = {"glm": True, "glm4": True, "glm4_moe": False}
# Llama-style families with q and k RMSNorms of head_dim, always (HunYuan's query_layernorm and
# key_layernorm, dots1's q_norm and k_norm)
_QK_NORMED = frozenset({"hunyuan_v1_dense", "hunyuan_v1_moe", "dots1"})
# Llama-style families whose q and k norms hold a weight per head, not one head_dim vector for all heads
_QK_NORM_PER_HEAD = frozenset({"olmo2", "olmo3", "olmoe"})
# Llama-style families whose layer norms its attention's and MLP's outputs instead of their inputs
_NORMS_AFTER = frozenset({"olmo2", "olmo3", "exaone4"})
# Up/down MLPs whose prefill the planner estimates, from families whose layer otherwise holds a Llama's (RoPE,
# a layer's input, residual and normed input; GPT-NeoX's and Phi's attention beside the MLP holds as much):
# their config class's activation, and the tensors of R x intermediate_size each activation leaves live (the
# up projection, the activation's output and its temporaries), as kvtrace measured them in transformers 5.25
_UNGATED_PREFILL_ACTIVATION = {
    "gpt_neox": "gelu", "phi": "gelu_new", "starcoder2": "gelu_pytorch_tanh", "arcee": "relu2",
}  # fmt: skip
_ACTIVATION_WIDTHS = {"gelu": 2, "gelu_pytorch_tanh": 2, "relu2": 3, "gelu_new": 4}
# The keys of the learned position table's length (GPT-2's attribute_map: max_position_embeddings)
_POSITIONS_KEYS = {
    "gpt2": ("n_positions", "max_position_embeddings"),
    "gpt_bigcode": ("n_positions", "max_position_embeddings"),
    "opt": ("max_position_embeddings",),
    "gpt_neo": ("max_position_embeddings",),
    "biogpt": ("max_position_embeddings",),
}
# The config classes' defaults
_DEFAULT_POSITIONS = {"gpt2": 1024, "gpt_bigcode": 1024, "opt": 2048, "gpt_neo": 2048, "biogpt": 1024}
# OPTLearnedPositionalEmbedding and BioGptLearnedPositionalEmbedding: max_position_embeddings + 2 rows
_OPT_POSITION_OFFSET = 2


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
    block = _gpt_or_llama_fields(fields, model_type, hidden, positive_int, where)
    activation = _UNGATED_PREFILL_ACTIVATION.get(model_type)
    sequential = model_type == "gpt_neox" and not get("use_parallel_residual", True)  # not measured
    if block.get("mlp_matrices") == 2 and activation is not None and not sequential:
        widths = _ACTIVATION_WIDTHS.get(str(get("hidden_act", activation)), 0)
        block.update({"ungated_mlp_widths": widths} if widths else {})
    return block


def _gpt_or_llama_fields(
    fields: dict[str, Any],
    model_type: str,
    hidden: int,
    positive_int: Callable[[str, Any], int],
    where: str,
) -> dict[str, Any]:
    """`gpt_block_fields` but the prefill's MLP widths."""
    get = fields.get
    if model_type not in GPT_FAMILIES:
        return _llama_style_fields(get, model_type)
    if get("add_cross_attention"):
        raise KvtraceError(
            f"{where}: a {model_type} config with add_cross_attention is the decoder of an encoder-decoder "
            "model: its cross-attention weights and cache are not planned"
        )
    block: dict[str, Any] = {"mlp_matrices": 2, "norm_bias": True, "attention_bias": True, "mlp_bias": True}
    if model_type == "gpt_neox":  # attention_bias: its fused qkv and dense projections; the MLP's always
        neox = {"attention_bias": bool(get("attention_bias", True)), "fused_qkv": True}
        return {**block, **neox, "attention_unmeasured": True}
    if model_type == "bloom":
        return {**block, "embedding_norm": True}
    if model_type == "phi":  # one norm before attention and MLP, which run side by side
        phi = {"layer_norms": 1, "qk_norm": bool(get("qk_layernorm", False)), "lm_head_bias": True}
        return {**block, **phi, "rotary_slices_kept": True, "attention_unmeasured": True}
    if model_type in ("gptj", "codegen"):  # Phi's shape: one norm, q, k, v (fused in CodeGen) unbiased
        return {**block, "layer_norms": 1, "attention_bias": False, "lm_head_bias": True}
    if model_type == "ctrl":  # sinusoidal positions (a buffer, not weights), a biased lm_head
        return {**block, "lm_head_bias": True}
    if model_type == "xglm":  # sinusoidal positions too
        return block
    if model_type == "gpt_neo":  # q, k and v unbiased, the output projection biased
        block.update(attention_bias=False, output_bias=True)
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
    block["position_embeddings"] = positions + (_OPT_POSITION_OFFSET if model_type == "biogpt" else 0)
    return block


def _llama_style_fields(get: Callable[[str, Any], Any], model_type: str) -> dict[str, Any]:
    """The fields in which a Llama-style `model_type` config's blocks differ from a Llama's: its bias flags,
    and the layouts of StableLM, StarCoder2, OLMo, OLMo 2 and 3, OLMoE, Cohere, PhiMoE, MPT, Nemotron, Arcee,
    Apertus, Persimmon, GPT-OSS, JetMoE, EXAONE 4, Seed-OSS, Helium, BitNet, DiffLlama, GLM and Phi-3."""
    block: dict[str, Any] = {}
    if model_type in _ATTENTION_BIAS_FLAG and get("attention_bias", False):
        block["attention_bias"] = True
    if model_type in _MLP_BIAS_FLAG and get("mlp_bias", False):
        block["mlp_bias"] = True
    if model_type in _QKV_BIAS_FLAG:
        block["qkv_bias"] = bool(get("attention_bias", _QKV_BIAS_FLAG[model_type]))
    if model_type in _QK_NORM_PER_HEAD:
        block.update(qk_norm=True, qk_norm_per_head=True)
    if model_type in _NORMS_AFTER:
        block["norms_after"] = True
    if model_type in _QK_NORMED or (model_type == "glm4_moe" and get("use_qk_norm", False)):
        block["qk_norm"] = True
    if model_type == "stablelm":  # LayerNorms; its qk LayerNorms are per head and unbiased
        block.update(norm_bias=True, qkv_bias=bool(get("use_qkv_bias", False)))
        if get("qk_layernorm", False):
            block.update(qk_norm=True, qk_norm_per_head=True)
        if get("use_parallel_residual", False):  # attention and MLP side by side, after one norm
            block["layer_norms"] = 1
    elif model_type == "starcoder2":  # an up/down MLP, LayerNorms; `use_bias` on every projection
        bias = bool(get("use_bias", True))
        block.update(mlp_matrices=2, norm_bias=True, attention_bias=bias, mlp_bias=bias)
    elif model_type == "olmo":  # LayerNorms without weight or bias
        block.update(layer_norms=0, final_norm=False)
    elif model_type in ("cohere", "cohere2"):  # one weight-only LayerNorm, attention and MLP side by side
        block["layer_norms"] = 1
        if model_type == "cohere" and get("use_qk_norm", False):
            block.update(qk_norm=True, qk_norm_per_head=True)
    elif model_type == "phimoe":  # LayerNorms, and an lm_head bias when asked
        block.update(norm_bias=True, lm_head_bias=bool(get("lm_head_bias", False)))
    elif model_type == "mpt":  # an up/down MLP; its LayerNorms' biases are removed
        block["mlp_matrices"] = 2
    elif model_type in ("arcee", "nemotron"):  # an up/down MLP (relu2); Nemotron's LayerNorms have biases
        block.update(mlp_matrices=2, norm_bias=model_type == "nemotron")
    elif model_type == "apertus":  # an up/down MLP whose xIELU learns two scalars, q and k RMSNorms
        xielu = get("hidden_act", "xielu") == "xielu"
        block.update(mlp_matrices=2, qk_norm=True, activation_params=2 if xielu else 0)
    elif model_type == "persimmon":  # fused q, k, v and the output biased, a biased up/down MLP, LayerNorms
        block.update(mlp_matrices=2, attention_bias=True, mlp_bias=True, norm_bias=True)
        block["qk_norm"] = bool(get("qk_layernorm", True))  # LayerNorms of head_dim, with biases
    elif model_type == "gpt_oss":  # biased attention by default, a sink per head, biased experts and router
        block.update(attention_bias=bool(get("attention_bias", True)), attention_sinks=True, expert_bias=True)
    elif model_type == "jetmoe":  # a mixture of attention experts, a bias on the MoE's output
        block.update(attention_experts=get("num_local_experts", 0), moe_output_bias=True)
    elif model_type == "exaone4":  # q and k RMSNorms of head_dim
        block["qk_norm"] = True
    elif model_type == "seed_oss":  # q, k and v biased by default, the output when asked
        block.update(qkv_bias=bool(get("attention_bias", True)), mlp_bias=bool(get("mlp_bias", False)))
        block["output_bias"] = bool(get("attention_out_bias", False))
    elif model_type == "helium":  # `attention_bias` on q, k and v only
        block.update(qkv_bias=bool(get("attention_bias", False)), mlp_bias=bool(get("mlp_bias", False)))
    elif model_type == "bitnet":  # a norm of the attention's output and one of the MLP's intermediate units
        block.update(layer_norms=3, mlp_norm=True)
    elif model_type == "diffllama":  # four learned lambda vectors of head_dim per layer
        block["head_dim_vectors"] = 4
    elif model_type == "glm4":  # a norm after the attention and one after the MLP too; a fused gate and up
        block.update(layer_norms=4, fused_gate_up=True)
    elif model_type == "glm":  # a fused gate and up projection
        block["fused_gate_up"] = True
    elif model_type == "phi3":  # fused q, k and v, and a fused gate and up projection
        block.update(fused_qkv=True, fused_gate_up=True)
    elif model_type in ("ernie4_5", "ernie4_5_moe"):  # `use_bias` on every projection; the MoE's lm_head too
        bias = bool(get("use_bias", False))
        block.update(attention_bias=bias, mlp_bias=bias, lm_head_bias=bias and model_type == "ernie4_5_moe")
    return block
