"""What a transformers prefill holds beside the weights and the KV, for a plan from a preset or a config (no
recording): `prefill_activations`. Pure arithmetic, no torch.

Read from transformers 5.25's Llama (`models/llama/modeling_llama.py`) under `generate()`, and checked
against kvtrace's own recordings of it (tests/integration/test_plan_prefill_activations.py). `generate()`
runs the whole prompt through the model in one forward (no `prefill_chunk_size`), B rows of T tokens, and
keeps the logits of the last position alone (`logits_to_keep=1`), so the prefill's memory is its layers'.
In the compute dtype's bytes s, with R = B x T:

- held across the layers: the embeddings (`inputs_embeds`, which LlamaModel.forward keeps in a local while
  the layers run: R x hidden), the rotary cos and sin (R x head_dim each, in the compute dtype; a pair for
  each kind of layer where the model keeps a RoPE table for each, Gemma 3's and OLMo 3's sliding and full
  layers), and two int64 tensors of the rows' positions (generate()'s position ids and their copy: 16 B a
  row and token);
- in a layer after the first, the residual stream: its input (the caller's variable keeps it), the residual
  beside the attention or MLP, and the normed input (`input_layernorm`, `post_attention_layernorm`);
- the MLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: the activation, the up projection and their
  product are live together before the first two are freed: 3 x R x intermediate_size;
- the attention's rotary embedding: q, k and v projections with q's rotation's three temporaries (q x cos,
  rotate_half(q), its product with sin) and the rotated q: 4 x R x heads x head_dim, beside the k and v
  projections, R x 2 x KV heads x head_dim, which the layer's cache has not copied yet: as many bytes as the
  layer's KV of the prompt, which the plan counts with every layer's, so not again here;
- sdpa (the default attention) without padding takes no mask: transformers skips it and passes
  `is_causal`, and K and V are not expanded to the query heads (`enable_gqa`); on CUDA its flash and
  memory-efficient kernels, and torch's flash kernel on a CPU, keep no T x T scores;
- eager attention (`attention="eager"`) makes a causal mask of B x T x T in the compute dtype, held across
  the layers, expands K and V to the query heads, and holds per head and (query, key) pair, at the softmax,
  the masked scores and their float32 softmax, with a float32 cast of the scores from a 16-bit dtype (8 B a
  pair in float32, 10 in bf16 or fp16); the layer keeps the probabilities it returns (`hidden_states, _ =
  self.self_attn(...)`) until the layer ends, through its MLP.

The peak is the largest of those moments in the last layer (which holds every layer's KV), with what is held
across the layers; in a mixture of experts with dense layers too, the largest of each kind's in its own last
layer, weighed with the KV of the layers up to it where a dynamic cache writes it layer by layer
(`layer_kv_bytes`), and in layer 0 without an input apart from the embeddings. Not in it: the prompt's ids
and mask the caller made (16 B a row and token), the last position's logits and the logits processors'
vectors (a few rows x vocabulary floats, after the layers free their activations), allocator rounding and
the CUDA context (the reserve).

Fused projections (`ModelGeometry.fused_qkv`, `fused_gate_up`), measured on transformers 5.25's Phi-3 and
GLM: a fused `gate_up_proj` keeps its 2 x R x intermediate_size output whole (gate and up are its halves)
beside the activation and the product, one R x intermediate_size more than Llama's three; a fused `qkv_proj`
keeps its R x (heads + 2 x KV heads) x head_dim output to the attention's end (`qkv` stays in a local, the
cache copies K and V), through sdpa's masked call and eager's softmax, where Llama has freed its
projections. At the rotary moment it takes the place of Llama's three projections, the same bytes.

Planned for Llama-style decoders, the planner's dense families whose MLP is gated (gate, up and down: Llama,
Mistral, Qwen, Gemma...); a sliding window under sdpa adds its bool mask over T x T (transformers cannot skip
it once the prompt reaches the window), its copy in the compute dtype, which torch's sdpa makes of a bool
mask, for the rows, and K and V expanded to the query heads (a mask turns `enable_gqa` off), in the last
sliding layer, its full layers taking no mask unpadded (`_last_masked_layer`). A layer that norms its
attention's and MLP's outputs instead of their inputs (OLMo 2 and 3, EXAONE 4: `norms_after`) holds no
normed input beside its residual stream, one hidden state fewer at every moment.

Measured on their tiny models too (tests/integration/test_plan_moe_prefill.py):
- the mixtures of experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and GLM-4-MoE (DeepSeek-V3's router and
  shared experts, DeepSeek-V2/V3 and GLM-4-MoE-Lite, whose latent attention is `mla_prefill`'s:
  tests/integration/test_plan_moe_experts.py), whose layers are a Llama's but for the
  experts (`moe_prefill`: S = R x k rows whatever the router chose); Qwen2-MoE also holds, across its
  layers, the mask of window 0 its model makes and no layer reads (`window_zero_mask`);
- up/down MLPs without a gate (`ungated_mlp_widths`): the up projection beside its activation's output and
  temporaries, 2 x R x intermediate_size for gelu (GPT-NeoX, StarCoder2's gelu_pytorch_tanh), 3 for relu2
  (Arcee: relu, then its square), 4 for gelu_new's tanh formula (Phi), beside a Llama's stream (GPT-NeoX's
  and Phi's attention output beside their parallel MLP holds what Llama's residual does). Under eager,
  GPT-NeoX keeps its fused q, k and v projection (`fused_qkv`), Phi its q and k projections beside their
  turned parts (`rotary_slices_kept`), to the attention's end. Their attention under sdpa is not derived
  (`attention_unmeasured`): planned only where their MLP outweighs it (`_attention_may_peak`).

Not planned (`unplanned_reason`): other mixtures of experts (PhiMoE's, GraniteMoE's, GPT-OSS's, Llama
4's routers), sparse latent attention (DeepSeek-V3.2, GLM-MoE-DSA: its indexer), other up/down MLPs
(GPT-2's learned positions and Bloom's ALiBi attention hold what a Llama's does not), per-layer shapes
(Gemma 3n, 4), encoder-decoders, DeepSeek-V4's compressed attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analyzers.planning.mla_prefill import (
    COMPLEX_ROTARY_BYTES,
    mla_attention_elements,
    mla_outputs_elements,
    mla_planned,
)
from analyzers.planning.moe_prefill import moe_moments
from analyzers.planning.presets import ModelGeometry, dtype_bytes_for

__all__ = [
    "ATTENTIONS",
    "PrefillActivations",
    "cpu_flash_thread_bytes",
    "eager_score_bytes",
    "prefill_activations",
    "unplanned_reason",
]

ATTENTIONS = ("sdpa", "eager")
POSITION_ROW_BYTES = 16  # generate()'s int64 position ids and their copy, a row and token
FLOAT32 = 4
ATTENTION_UNMEASURED_WIDTHS = 8  # `_attention_may_peak`


@dataclass(frozen=True)
class PrefillActivations:
    """The most a prefill holds beside the weights and the KV, in bytes, and its parts."""

    peak_bytes: int
    moment: str  # where in its layer: "mlp", "rotary", "scores" (eager), "mask" (sdpa with a window)...
    held_bytes: int  # of peak_bytes, held across the layers: embeddings, cos and sin, positions, a mask
    stream_bytes: int  # the residual stream's hidden states at that moment
    layer_bytes: int  # the moment's own tensors (the MLP's three, the rotary's, the scores...)
    layer: int = 0  # the layer it is in: the last, but for a dense layer's or an MoE layer's before it
    # the prompt KV of the layers after `layer`, which they have not written yet (`layer_kv_bytes`): the
    # plan's KV at this moment is every layer's less this
    unwritten_kv_bytes: int = 0


def unplanned_reason(geom: ModelGeometry) -> str | None:
    """Why the planner does not estimate this model's prefill (None: it does): its layers are not a
    Llama's, whose tensors the estimate counts."""
    reasons = (
        (geom.moe_layers > 0 and geom.expert_routing is None, "its mixture-of-experts layers"),
        (geom.experts_implementation is not None, _experts_forward_reason(geom.experts_implementation)),
        (geom.mla is not None and not mla_planned(geom.mla, geom.indexer_head_dim), "its latent attention"),
        (geom.compressed is not None, "its compressed attention"),
        (geom.cross_kv_layers > 0, "its encoder"),
        (geom.layer_shapes is not None, "its layers of different widths"),
        (geom.attention_experts > 0, "its attention experts"),
        (geom.mlp_matrices != 3 and not geom.ungated_mlp_widths, "its MLP without a gate"),
        (_attention_may_peak(geom), "its attention beside an MLP this narrow (not measured)"),
        # a geometry read from a model's cache buffers alone (`plan --from-run` of a hand-written decoder)
        (geom.hidden_size <= 0, "a hidden size and MLP, which nothing of the model says"),
    )
    for applies, what in reasons:
        if applies:
            return what
    return None


def _experts_forward_reason(named: str | None) -> str:
    """Why experts run another way than grouped_mm are not estimated: eager's loop holds each expert's
    tokens, as many as the router sent it, which no config tells (the tiny Qwen3-MoE's held 1.29 MB less than
    grouped_mm's estimate of it, tests/integration/test_plan_moe_prefill.py)."""
    if named == "eager":
        return (
            'its experts_implementation="eager" (a loop over the experts, whose tensors follow the tokens '
            "the router sends each: grouped_mm, transformers' default, is the one estimated)"
        )
    return f"its experts_implementation={named!r} (grouped_mm, transformers' default, is the one estimated)"


def _attention_may_peak(geom: ModelGeometry) -> bool:
    """Whether GPT-NeoX's or Phi's unmeasured attention may outweigh its MLP at the prefill: the tiny models
    held 9.3 to 10.4 hidden states a token at their attention (an MLP of a quarter of hidden), and their MLP
    holds 3 beside its own tensors, so those must reach 8 x hidden a token (GPT-NeoX's 4 x MLP, Phi's 2 x)."""
    own = geom.ungated_mlp_widths * geom.intermediate_size
    return geom.attention_unmeasured and own < ATTENTION_UNMEASURED_WIDTHS * geom.hidden_size


def eager_score_bytes(compute: int) -> int:
    """Bytes eager attention holds a head and (query, key) pair at its softmax: the masked scores, their
    float32 softmax, and from a 16-bit dtype the float32 cast of the scores that softmax(dtype=float32)
    makes first."""
    return compute + FLOAT32 + (FLOAT32 if compute != FLOAT32 else 0)


def _masks(geom: ModelGeometry, prompt: int, padded: bool, eager: bool) -> int:
    """Attention masks the prefill makes (one a kind of layer that needs one): eager makes one for each kind
    of layer, full and sliding; sdpa one for the sliding layers once the prompt reaches their window (it
    cannot skip a window's), and one for the full layers where the prompts are padded."""
    windowed = geom.windowed_layers if geom.sliding_window is not None else 0
    full = geom.layers_with_kv - windowed
    if eager:
        return (1 if full else 0) + (1 if windowed else 0)
    window_mask = windowed and (padded or prompt >= (geom.sliding_window or 0))
    return (1 if full and padded else 0) + (1 if window_mask else 0)


def cpu_flash_thread_bytes(prompt: int, head_dim: int, compute: int) -> int:
    """Bytes torch's CPU flash attention kernel (`cpu_flash_attention`, the sdpa a CPU runs) allocates for
    each of its threads while a layer of a `prompt`-token prefill attends: a query split's float32 scores
    over a key split, its running max and sum and its output (split x (keys + 2 + head_dim)), and for a
    16-bit dtype (`compute` bytes) the scores' copy in it. The split is 32 queries, 64 from a 192-token
    prompt, 256 from 768, at most the prompt; the keys at most 512. No GPU kernel holds them, so a plan, of
    a GPU, leaves them out; its note prices them where they sit beside the plan's peak (a masked layer's
    sdpa), what a CPU recording holds more: the tiny Mistral of `kvtrace plan`'s tests (a window of 128, 2
    rows of a 198-token prompt, 2 threads) 110,592 B."""
    split = min(256 if prompt >= 768 else 64 if prompt >= 192 else 32, prompt)
    keys = min(prompt, 512)
    reduced = split * keys * compute if compute < FLOAT32 else 0
    return split * (keys + 2 + head_dim) * FLOAT32 + reduced


def prefill_activations(
    geom: ModelGeometry,
    compute_dtype: str,
    batch: int,
    prompt: int,
    attention: str = "sdpa",
    padded: bool = False,
    layer_kv_bytes: Sequence[int] = (),
) -> PrefillActivations | None:
    """The prefill's activations at its worst moment for `batch` rows of `prompt` tokens (module
    docstring); None for a model `unplanned_reason` names. `padded`: prompts padded to one length (an
    attention_mask with zeros), which makes sdpa's masks of every row. `layer_kv_bytes`: the prompt KV each
    layer's cache writes as the prefill reaches it (a dynamic cache's), so that a moment in a layer before the
    last is weighed without the KV of the layers after it; empty, every layer's is held throughout (a
    preallocated cache's)."""
    if unplanned_reason(geom) is not None:
        return None
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    s = dtype_bytes_for(compute_dtype, 1)
    rows = batch * prompt
    pairs = batch * prompt * prompt  # (query, key) pairs of every row
    hidden, heads, head_dim = geom.hidden_size, geom.num_attention_heads, geom.head_dim
    q_width, kv_width = heads * head_dim, geom.num_kv_heads * head_dim
    # K and V expanded to the query heads (repeat_kv), where a mask or eager makes them; none without GQA
    expanded = 2 * rows * q_width * s if geom.num_kv_heads < heads else 0
    # the embeddings, the rotary cos and sin (a pair for each kind of layer in Gemma 3), the positions
    rotary = 2 * geom.rotary_tables * (geom.rotary_dim or head_dim) * s
    if geom.mla is not None and geom.mla.complex_rotary:  # DeepSeek-V2's freqs_cis, complex64
        rotary = geom.rotary_tables * (geom.rotary_dim or head_dim) * COMPLEX_ROTARY_BYTES
    held = rows * (hidden * s + rotary + POSITION_ROW_BYTES)
    # the MLP's tensors of R x intermediate_size at once: a fused gate_up's output (two) or gate's and up's;
    # an up/down MLP's up projection and its activation's
    mlp_widths = geom.ungated_mlp_widths if geom.mlp_matrices == 2 else 4 if geom.fused_gate_up else 3
    # a fused qkv's output, kept until the attention returns (its K and V are copied into the cache)
    qkv = rows * (q_width + 2 * kv_width) * s if geom.fused_qkv else 0
    if geom.rotary_slices_kept:  # Phi's q and k projections and their turned parts, to the attention's end
        turned = (heads + geom.num_kv_heads) * (geom.rotary_dim or head_dim)
        qkv += rows * (q_width + kv_width + turned) * s
    last = geom.num_layers - 1
    dense_at, moe_at = _last_of_each_kind(geom)

    def stream(layer: int, states: int) -> int:
        """`states` hidden states, and a layer's input after the first (the embeddings are the first's); one
        fewer where the layer norms its outputs, not its inputs (`ModelGeometry.norms_after`): no normed
        input is made beside the residual."""
        unnormed = states - (1 if geom.norms_after else 0)
        return rows * hidden * s * (unnormed + (1 if layer > 0 else 0))

    # (moment, its layer, residual stream, the moment's own tensors)
    moments: list[tuple[str, int, int, int]] = []
    if dense_at is not None:
        moments.append(("mlp", dense_at, stream(dense_at, 2), mlp_widths * rows * geom.intermediate_size * s))
    if moe_at is not None:  # its MoE layers' moments, beside the same stream as a dense MLP's
        moments[:0] = [(name, moe_at, stream(moe_at, 2), own) for name, own in moe_moments(geom, s, rows)]
    feedforward = len(moments)  # the moments in the MLP or the experts
    # the layer's k and v projections are live here too, but its cache update has not run: they stand for the
    # last layer's KV, which the plan counts with every layer's (before, counted twice: a Qwen3 of 4 layers,
    # head_dim twice hidden / heads, was planned one layer's prompt KV over its recording)
    # beside eager's scores: the rotated q (K and V expanded, `expanded`); beside a masked sdpa, with them
    # its output
    beside_scores, beside_mask = rows * q_width * s, 2 * rows * q_width * s
    mla = geom.mla
    if mla is not None:  # latent attention: its tensors as the attention returns (`mla_prefill`)
        at_return = mla_attention_elements(mla, heads)
        moments.append(("attention", last, stream(last, 1), rows * s * at_return))
        beside_scores = rows * s * (at_return - mla_outputs_elements(mla, heads))
        beside_mask = (
            rows * s * (at_return - mla_outputs_elements(mla, heads) // 2)
        )  # inside sdpa: one output
        expanded = 0  # its K and V are every head's already
    else:
        moments.append(("rotary", last, stream(last, 1), rows * s * 4 * q_width))
    masks = _masks(geom, prompt, padded, attention == "eager")
    if attention == "eager":
        held += (masks + geom.window_zero_mask) * pairs * s  # the float masks, every layer's
        probabilities = pairs * heads * s  # a layer's returned weights, kept through its MLP
        for index in range(feedforward):
            name, layer, states, own = moments[index]
            moments[index] = (name, layer, states, own + probabilities)
        # at the softmax: the rotated q, K and V expanded, the scores
        scores = pairs * heads * eager_score_bytes(s) + beside_scores + expanded + qkv
        moments.append(("scores", last, stream(last, 1), scores))
    else:  # bool masks, one for every head (and row, unpadded); Qwen2-MoE's of window 0 read by no layer
        held += (masks + geom.window_zero_mask) * (pairs if padded else prompt * prompt)
    if attention != "eager" and masks:
        # a masked layer's sdpa: the rotated q, K and V expanded, the mask in the compute dtype (torch's sdpa
        # turns a bool mask into one, for every row), the output and its float32 log-sum-exp
        masked = pairs * s + beside_mask + expanded + batch * heads * prompt * FLOAT32 + qkv
        at = _last_masked_layer(geom, padded)
        moments.append(("mask", at, stream(at, 1), masked))
    unwritten = _unwritten_kv(geom, layer_kv_bytes)
    name, layer, states, own = max(moments, key=lambda moment: moment[2] + moment[3] - unwritten(moment[1]))
    return PrefillActivations(held + states + own, name, held, states, own, layer, unwritten(layer))


def _last_masked_layer(geom: ModelGeometry, padded: bool) -> int:
    """The last layer whose sdpa takes a mask, where a masked moment peaks: any layer's with padded prompts
    (a mask for the full layers too), else the last sliding one's, the full layers taking none (`is_causal`);
    the last where the config does not say which layers slide (every layer does), or lists fewer kinds than
    layers (layers without KV of their own). Before, always the last: a Gemma 3 of a sliding layer 0 and a
    full layer 1 (2 rows of a 198-token prompt) was planned 15,792 B over its recording, its sliding layer's
    mask and expanded K and V priced in layer 1, beside both layers' KV and layer 1's input, where its
    recording peaked at layer 1's MLP."""
    last = geom.num_layers - 1
    slides = geom.layer_slides
    if padded or slides is None or len(slides) != geom.num_layers or not any(slides):
        return last
    return max(index for index, sliding in enumerate(slides) if sliding)


def _last_of_each_kind(geom: ModelGeometry) -> tuple[int | None, int | None]:
    """The last dense layer and the last MoE layer (None: none of that kind), where each kind's largest
    moment is, the layers after it holding no more of the prompt than those before. Where the config does
    not say which layers are which (`layer_moe`), both as the last layer: the most either can hold."""
    last = geom.num_layers - 1
    if not geom.moe_layers:
        return last, None
    if geom.moe_layers >= geom.num_layers:
        return None, last
    kinds = geom.layer_moe
    if kinds is None or len(kinds) != geom.num_layers:
        return last, last
    dense = [index for index, moe in enumerate(kinds) if not moe]
    moe = [index for index, moe in enumerate(kinds) if moe]
    return (dense[-1] if dense else None), (moe[-1] if moe else None)


def _unwritten_kv(geom: ModelGeometry, layer_kv_bytes: Sequence[int]) -> Callable[[int], int]:
    """Bytes of prompt KV the layers after a layer have not written when the prefill is in it; none where the
    KV is not given layer by layer, or not for every layer (a model whose layers share KV)."""
    if len(layer_kv_bytes) != geom.num_layers:
        return lambda layer: 0
    return lambda layer: sum(layer_kv_bytes[layer + 1 :])
