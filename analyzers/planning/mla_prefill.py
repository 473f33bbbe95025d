"""What a latent-attention layer (DeepSeek-V2/V3's MLA, GLM-4-MoE-Lite's) holds at a prefill's attention, for
`prefill_activations`: pure arithmetic, no torch.

Read from transformers 5.25's `DeepseekV3Attention` and `DeepseekV2Attention` and checked against kvtrace's
recordings of tiny models (tests/integration/test_plan_moe_experts.py). The layer caches the latent (the
normed `kv_lora_rank` part and the rotated `qk_rope_head_dim` key, one head a token: the plan's KV), then
expands it into every head for the attention. In elements a row and token, with H heads, d =
qk_nope_head_dim + qk_rope_head_dim, v = v_head_dim, c = kv_lora_rank and r = qk_rope_head_dim, when sdpa
returns and its output is transposed into a contiguous copy, the layer holds:

- the query projection (H x d), which `q_pass`, a view of it, keeps to the layer's end; its rotated part
  (H x r) and the two concatenated (`query_states`, H x d);
- the latent projection `compressed_kv` (c + r), kept by its local to the layer's end;
- `kv_b_proj`'s output (H x (d - r + v): the heads' unrotated keys and their values, a view of it) and
  the keys with the rotated part copied in (`key_states`, H x d);
- sdpa's output and its transposed copy (2 x H x v).

A query bottleneck (`q_lora_rank`) is freed before then. That is the moment's own "attention" beside the
embeddings, the layer's input and its normed input; under eager attention the scores' moment holds the same
less the outputs, with the scores (`eager_score_bytes`) and the mask; sdpa with padded prompts, inside the
kernel, the same with one output, its float32 log-sum-exp and the mask's copy in the compute dtype. Each
measured on CPUs, where sdpa runs its flash kernel only with v = d (the tests' tiny models): with v != d
(DeepSeek's own, 128 beside 192) a CPU runs the math kernel, which holds scores over prompt x prompt, and a
GPU its memory-efficient kernel, which holds none and is assumed to hold what the flash kernel does (not
measured here: no GPU).

The rotary tables held across the layers: DeepSeek-V3's cos and sin (r each, in the compute dtype), and
DeepSeek-V2's complex `freqs_cis` (r / 2 complex64: 4 B an element of r, whatever the dtype).
"""

from __future__ import annotations

from analyzers.planning.presets import MlaShape

__all__ = ["COMPLEX_ROTARY_BYTES", "mla_attention_elements", "mla_outputs_elements", "mla_planned"]

COMPLEX_ROTARY_BYTES = 4  # DeepSeek-V2's freqs_cis: a complex64 (8 B) for each pair of rotary elements


def mla_planned(mla: MlaShape, indexer_head_dim: int) -> bool:
    """Whether `prefill_activations` estimates this latent attention: one that caches the latent, without
    sparse attention's indexer (DeepSeek-V3.2, GLM-MoE-DSA), whose layers are not these."""
    return mla.expanded_heads is None and not indexer_head_dim


def mla_outputs_elements(mla: MlaShape, heads: int) -> int:
    """Elements a row and token of sdpa's output and its transposed copy."""
    return 2 * heads * mla.v_head_dim


def mla_attention_elements(mla: MlaShape, heads: int) -> int:
    """Elements a row and token the layer holds as its attention returns (module docstring), its outputs
    included."""
    d = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    query = 2 * heads * d + heads * mla.qk_rope_head_dim
    latent = mla.kv_lora_rank + mla.qk_rope_head_dim
    expanded = heads * (mla.qk_nope_head_dim + mla.v_head_dim) + heads * d
    return query + latent + expanded + mla_outputs_elements(mla, heads)
