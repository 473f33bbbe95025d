"""What a mixture-of-experts layer holds at a prefill's worst moment, for `prefill_activations`: pure
arithmetic, no torch.

Read from transformers 5.25's Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (`models/<family>/modeling_<family>.py`
and `integrations/moe.py`) and checked against kvtrace's recordings of them
(tests/integration/test_plan_moe_prefill.py). Their experts run `grouped_mm_experts_forward`, transformers'
default `experts_implementation`: every token's k (`num_experts_per_tok`) expert rows are gathered, sorted
by expert, and run through one grouped matmul a projection, so what it holds is S = R x k rows whatever the
router chose (R = batch x prompt tokens); no figure here depends on the routing. In the compute dtype's
bytes s, and the router's top-k weights' w (Qwen's and OLMoE's cast back to s, Mixtral's kept float32):

- through the experts: the router's logits (R x experts in s, kept in the block's `_`), its top-k weights
  and int64 indices (R x k each), the sorted expert ids and the permutation (S int64 each), the sorted
  weights (S in w), histc's 4-byte copy of the ids (S) and its per-expert counts and offsets (4 B each);
- "experts": the gathered rows (S x hidden) beside the gate and up projections' output (S x 2 x
  expert_intermediate_size) and, at their product, the gate's activation and the product: 4 x S x I;
- "expert outputs": the gathered rows and the down projection's output (S x hidden in s each), its product
  with the weights and that reordered (S x hidden each in the wider of s and w), and the inverse permutation
  (S int64): 2 x S x hidden x s + 2 x S x hidden x max(s, w), the usual peak where 3 x hidden > 4 x I;
- "expert sum": the same but the reordered product summed over k (R x hidden in max(s, w)) and, from a
  wider w, its cast back to s; the peak only where k is 1 and w is wider than s.

Qwen2-MoE runs its gated shared expert (3 x R x its width, "shared expert", before the router) first and
keeps its output (R x hidden) through the routed experts. DeepSeek-V3's router (`DeepseekV3TopkRouter`, which
GLM-4-MoE's copies: sigmoid scores, group-limited top-k, a float32 correction) computes its logits in float32
(R x experts x 4 B, kept in the block's `_`) and returns float32 top-k weights, as Mixtral's; its shared
experts (`n_shared_experts` x `moe_intermediate_size`, ungated) run after the routed ones, on the block's
input, beside the router's outputs and the routed experts' sum (R x hidden). Measured on tiny GLM-4-MoE,
DeepSeek-V2/V3 and GLM-4-MoE-Lite models (tests/integration/test_plan_moe_experts.py), whose latent attention
is `mla_prefill`'s; DeepSeek-V2's router takes a softmax, not a sigmoid, and keeps the same tensors.
A model's dense layers (Qwen's `mlp_only_layers`, `decoder_sparse_step`) have a Llama MLP's moment;
`prefill_activations` weighs each kind in its own last layer (`ModelGeometry.layer_moe`), with the KV of the
layers up to it alone and, in layer 0, no input apart from the embeddings (before, both as in the last
layer: a Qwen3-MoE of 2 layers, its first dense and 1,024 wide, planned 512 KB over its recording).
Not planned: `experts_implementation="eager"` (or another than grouped_mm) where a config.json names it,
whose loop holds each expert's tokens (as the router chose) and a one-hot of R x k x (experts + 1) int64:
the plan says so instead of pricing grouped_mm's; and other routers (PhiMoE's sparsemixer, GraniteMoE's,
GPT-OSS's, Llama 4's), whose layers are not these. The router's own transients (DeepSeek-V3's
scores, their masked copy: four R x experts in float32 at most) are freed before the experts run and are not
counted: below the experts' outputs (2 x R x k x hidden x 2 B at least) wherever 4 x experts < k x hidden, as
in DeepSeek-V3's and GLM-4.5's configs (256 experts, 8 a token, 7,168 and 5,120 wide).
"""

from __future__ import annotations

from analyzers.planning.presets import ModelGeometry

__all__ = ["ROUTING_BYTES", "moe_moments"]

# The router's top-k weights: "compute" cast back to the compute dtype (Qwen-MoE, OLMoE), "float32" kept so
# (Mixtral), which makes their products with the experts' outputs float32 too; "deepseek" float32 as well,
# from DeepSeek-V3's router (GLM-4-MoE's), whose logits are float32 too and whose shared experts run after
# the routed ones (`DEEPSEEK_ROUTERS`)
ROUTING_BYTES = {"compute": 0, "float32": 4, "deepseek": 4}
DEEPSEEK_ROUTERS = frozenset({"deepseek"})
INT64 = 8
FLOAT32 = 4
INT32 = 4  # histc's copy of the sorted ids (float32 on a CPU, int32 on CUDA), its counts and offsets


def moe_moments(geom: ModelGeometry, s: int, rows: int) -> list[tuple[str, int]]:
    """The MoE layer's moments (name, bytes beside the residual stream and what the model holds across its
    layers) for `rows` tokens in a compute dtype of `s` bytes (module docstring)."""
    hidden, experts, width = geom.hidden_size, geom.experts, geom.expert_intermediate_size
    k = geom.experts_per_token
    w = ROUTING_BYTES[geom.expert_routing or "compute"] or s
    wide = max(s, w)
    pairs = rows * k  # S: a row per token and chosen expert
    deepseek = geom.expert_routing in DEEPSEEK_ROUTERS
    # the router's outputs, which the block keeps to its end: its logits (float32 from DeepSeek-V3's router),
    # its top-k weights and int64 indices
    kept = rows * experts * (FLOAT32 if deepseek else s) + rows * k * (w + INT64)
    # Qwen2-MoE's shared expert ran before the routed ones: its output (R x hidden)
    shared_out = rows * hidden * s if geom.shared_intermediate_size and not deepseek else 0
    routing = kept + pairs * (2 * INT64 + w + INT32) + experts * 2 * INT32 + shared_out
    gathered = pairs * hidden * s
    cast_back = rows * hidden * s if wide != s else 0
    moments = [
        ("experts", routing + gathered + 4 * pairs * width * s),
        ("expert outputs", routing + 2 * gathered + 2 * pairs * hidden * wide + pairs * INT64),
        ("expert sum", routing + 2 * gathered + (pairs + rows) * hidden * wide + cast_back + pairs * INT64),
    ]
    if geom.shared_intermediate_size:
        shared = 3 * rows * geom.shared_intermediate_size * s
        # DeepSeek-V3's (GLM-4-MoE's) shared experts run after the routed ones, beside the router's outputs
        # and the routed experts' sum (R x hidden)
        moments.append(("shared expert", shared + (kept + rows * hidden * s if deepseek else 0)))
    return moments
