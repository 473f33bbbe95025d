"""The plan's note on a prefill's activations (`prefill_note`): what `prefill_activations` counted, in words
and at the plan's figures, what it assumes and what eager attention or padded prompts would add, or why a
model's are not estimated. Text alone: the arithmetic is analyzers.planning.prefill_activations'."""

from __future__ import annotations

from collections.abc import Sequence

from analyzers.planning.mla_prefill import mla_attention_elements
from analyzers.planning.moe_prefill import DEEPSEEK_ROUTERS
from analyzers.planning.prefill_activations import (
    PrefillActivations,
    cpu_flash_thread_bytes,
    prefill_activations,
    unplanned_reason,
)
from analyzers.planning.presets import ModelGeometry, dtype_bytes_for
from analyzers.units import human_bytes

__all__ = ["prefill_note"]


# The MoE moments (`moe_prefill`) in words: S = R x k, a row for each token's k experts
_MOE_TEXT = {
    "experts": "its experts' gathered inputs (R x {k} x hidden) and their gate and up projections "
    "(4 x R x {k} x {width}: the projection, twice that wide, the gate's activation and the product)",
    "expert outputs": "its experts' gathered inputs, down projections, their products with the routing "
    "weights and those reordered (4 x R x {k} x hidden)",
    "expert sum": "its experts' gathered inputs, down projections, weighted outputs (3 x R x {k} x hidden) "
    "and their sum over the {k} experts",
    "shared expert": "its shared expert's gate and up projections (3 x R x its width)",
}


def _moment_text(geom: ModelGeometry, act: PrefillActivations) -> str:
    """What the moment holds, in words and widths."""
    mlp = "its last layer's MLP"
    if act.layer < geom.num_layers - 1:  # a dense layer before an MoE one
        mlp = f"its last dense layer's MLP (layer {act.layer:,} of {geom.num_layers:,})"
    width = f"R x {geom.hidden_size:,}"
    if act.moment == "mlp" and geom.fused_gate_up:
        own = (
            f"{mlp} holds 4 x R x {geom.intermediate_size:,} (its fused gate and up "
            "projection, twice that wide, the activation of the gate and the product)"
        )
    elif act.moment == "mlp" and geom.mlp_matrices == 2:
        temporaries = geom.ungated_mlp_widths - 2
        what = (
            f", its activation and {temporaries} of the activation's temporaries"
            if temporaries
            else " and its activation"
        )
        own = (
            f"{mlp} holds {geom.ungated_mlp_widths} x R x {geom.intermediate_size:,} (the up "
            f"projection{what})"
        )
    elif act.moment == "mlp":
        own = (
            f"{mlp} holds 3 x R x {geom.intermediate_size:,} (the activation of the gate "
            "projection, the up projection and their product)"
        )
    elif act.moment in _MOE_TEXT:
        k, expert_width = geom.experts_per_token, geom.expert_intermediate_size
        moe = "its last MoE layer"
        if act.layer < geom.num_layers - 1:  # before a dense one
            moe += f" (layer {act.layer:,} of {geom.num_layers:,})"
        own = f"{moe} holds {_MOE_TEXT[act.moment].format(k=k, width=expert_width)}"
        if act.moment != "shared expert":
            own += f", with its router's logits (R x {geom.experts}), top-k weights and the sort's indices"
        deepseek = geom.expert_routing in DEEPSEEK_ROUTERS  # its shared experts run after the routed ones
        if geom.shared_intermediate_size and act.moment != "shared expert" and not deepseek:
            own += " and the shared expert's output (R x hidden)"
        if act.moment == "shared expert" and deepseek:
            own += (
                f", after the routed experts, beside their sum (R x hidden) and its router's float32 logits "
                f"(R x {geom.experts}) and top-k weights,"
            )
    elif act.moment == "rotary":
        own = (
            f"its last layer's rotary embedding holds q ({geom.num_attention_heads} heads x {geom.head_dim}) "
            "four times (the projection, its products with cos and sin, its rotated half), its k and v "
            "counted as its KV, which its cache has not copied yet,"
        )
    elif act.moment == "attention" and geom.mla is not None:  # latent attention (`mla_prefill`)
        mla, heads = geom.mla, geom.num_attention_heads
        d = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        own = (
            "its last layer's latent attention holds, as sdpa returns, "
            f"R x {mla_attention_elements(mla, heads):,} (its query projection, the query with its rotated "
            f"part and the keys, {heads} heads x {d} each; "
            f"the rotated part; the latent projection, {mla.kv_lora_rank} + {mla.qk_rope_head_dim}; the "
            f"heads' unrotated keys and values, {heads} x {mla.qk_nope_head_dim + mla.v_head_dim}; the "
            f"output and its transposed copy, {heads} x {mla.v_head_dim} each)"
        )
    else:  # "mask": a masked layer's sdpa
        masked = "its last masked layer's sdpa"
        if act.layer < geom.num_layers - 1:  # the last sliding one, before full layers that take no mask
            masked = f"its last sliding layer's sdpa (layer {act.layer:,} of {geom.num_layers:,})"
        own = (
            f"{masked} holds its mask in the compute dtype for every row (prompt x prompt), the rotated q, "
            "the output, and K and V expanded to the query heads"
        )
    if act.moment in ("mask", "scores") and geom.fused_qkv:
        own += ", and its fused q, k and v projection, kept until the attention returns"
    if act.moment in ("mask", "scores") and geom.rotary_slices_kept:
        own += ", and its q and k projections beside their turned parts, kept until the attention returns"
    streams, stream_names = _stream_text(geom, act)
    tables = geom.rotary_tables
    pairs = f", one pair for each of its {tables} kinds of layer" if tables > 1 else ""
    rotary = geom.rotary_dim or geom.head_dim
    tables_text = f"the rotary cos and sin (R x {rotary} each{pairs})"
    if geom.mla is not None and geom.mla.complex_rotary:  # DeepSeek-V2's
        tables_text = f"the rotary freqs_cis (R x {rotary // 2} complex64)"
    return (
        f"{own} beside {streams} of {width} ({stream_names}), {tables_text} and 16 B of position ids a token"
    )


def _stream_text(geom: ModelGeometry, act: PrefillActivations) -> tuple[str, str]:
    """How many hidden states the moment holds, and which: the embeddings, the layer's input after the
    first, the residual beside the MLP, the normed input (none where the layer norms its outputs)."""
    names = ["the embeddings" if act.layer > 0 else "the embeddings (the layer's input)"]
    if act.layer > 0:
        names.append("the layer's input")
    if act.moment not in ("rotary", "mask", "scores", "attention"):
        names.append("its residual")
    if not geom.norms_after:
        names.append("the normed input")
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{len(names)} hidden state{'s' if len(names) != 1 else ''}", listed


def _layer_kind(geom: ModelGeometry) -> str:
    """Which of transformers' layers the estimate follows: a Llama's, or its MLP or MoE in another's."""
    if geom.mla is not None:
        return "latent-attention layer" + (" with its MoE block" if geom.moe_layers else "")
    if geom.moe_layers:
        return "Llama layer with this family's MoE block"
    if geom.norms_after:
        return "Llama layer with its norms after the attention and the MLP"
    return "Llama layer with this family's up/down MLP" if geom.mlp_matrices == 2 else "Llama layer"


def prefill_note(
    geom: ModelGeometry, compute_dtype: str, batch: int, prompt: int, layer_kv_bytes: Sequence[int] = ()
) -> str:
    """The plan's note on its prefill activations: the formula at the prompt planned, what it assumes
    (sdpa, unpadded, one forward) and what eager attention or padded prompts would add; or why the model's
    are not estimated. `layer_kv_bytes` as `prefill_activations` takes it, the plan's."""
    why = unplanned_reason(geom)
    act = prefill_activations(geom, compute_dtype, batch, prompt, layer_kv_bytes=layer_kv_bytes)
    if why is not None or act is None:
        return (
            f"prefill activations are not estimated for {geom.name}: the estimate counts a Llama layer's "
            f"tensors, not {why}; the reserve stands for them (record a run and plan it --from-run to "
            "measure them)"
        )
    rows = batch * prompt
    eager = prefill_activations(geom, compute_dtype, batch, prompt, "eager", layer_kv_bytes=layer_kv_bytes)
    padded = prefill_activations(
        geom, compute_dtype, batch, prompt, padded=True, layer_kv_bytes=layer_kv_bytes
    )
    assert eager is not None and padded is not None

    def more(other: PrefillActivations) -> str:  # with the KV each moment holds
        return human_bytes(
            other.peak_bytes - other.unwritten_kv_bytes - act.peak_bytes + act.unwritten_kv_bytes
        )

    more_eager = more(eager)
    extras = [f"eager attention holds {more_eager} more (its mask and a layer's scores over prompt x prompt)"]
    if batch > 1:
        more_padded = more(padded)
        extras.append(f"padded prompts {more_padded} more (sdpa's mask over prompt x prompt, K, V expanded)")
    moment = _moment_text(geom, act)
    cpu = ""
    if act.moment == "mask":  # a masked layer's sdpa is the peak: on a CPU, its kernel's blocks beside it
        thread = cpu_flash_thread_bytes(prompt, geom.head_dim, dtype_bytes_for(compute_dtype, 1))
        cpu = (
            f". On a CPU, not a GPU, torch's flash kernel holds {human_bytes(thread)} ({thread:,} B) more "
            "for each of its threads beside that sdpa (its blocks of scores): not counted"
        )
    experts = ""
    if geom.moe_layers:  # the experts' forward a config.json does not name, the loading code may
        experts = (
            "Planned for transformers' default experts (grouped_mm); a model loaded with "
            'experts_implementation="eager" runs a loop whose tensors follow the routing, not estimated. '
        )
    kv = "every layer's KV of the prompt"
    if act.unwritten_kv_bytes:  # a moment before the last layer: those after it have not written theirs
        layers = "layer 0's" if act.layer == 0 else f"layers 0 to {act.layer:,}'s"
        kv = f"{layers} KV of the prompt (the layers after it have not run yet)"
    # one sentence a step of the reasoning, which the text sets on lines of their own: the first was some
    # 650 characters
    return (
        f"prefill activations: generate() runs the {prompt:,}-token prompt of {batch} row"
        f"{'s' if batch != 1 else ''} through the model in one forward (R = {rows:,} rows x tokens). "
        f"{moment[0].upper()}{moment[1:]}, in {compute_dtype}: {human_bytes(act.peak_bytes)} beside the "
        f"weights and {kv}. That is transformers 5.25's {_layer_kind(geom)} as "
        "kvtrace measured it, whatever version the layout line names. Planned for sdpa "
        "attention (transformers' default: on a GPU its flash and memory-efficient kernels hold no prompt x "
        f"prompt scores) and unpadded prompts: {' and '.join(extras)}. {experts}Not in it: the last "
        f"position's logits and the CUDA context (the reserve's), generate()'s prefill_chunk_size{cpu}"
    )
