"""The layers of Gemma 3n and Gemma 4, as their config.json describes them: unlike other families', they
differ from one another, and they carry parts no other family has.

A layer that reuses an earlier layer's K and V (the last `num_kv_shared_layers`) has no k or v projection
and no k norm of its own; Gemma 4's full layers are `global_head_dim` wide (q and output projections
too), with `num_global_key_value_heads` and no v projection under `attention_k_eq_v` (its K is its V), and
its KV-sharing layers' MLP is twice as wide under `use_double_wide_mlp`; Gemma 3n lists one MLP width a
layer. Both feed each layer a per-layer input (PLE): an embedding table of `vocab_size_per_layer_input`
rows holding `hidden_size_per_layer_input` units for every layer, a projection of the hidden state to it,
and per layer a gate, a projection back and a norm (Gemma 4 only while `hidden_size_per_layer_input` is
not 0). Gemma 3n adds AltUp (`altup_num_inputs` streams: per layer, its coefficients, router and norm; and
the projections into and out of the streams) and a LAuReL block of `laurel_rank` per layer; Gemma 4's
`enable_moe_block` runs `num_experts` experts beside each layer's dense MLP, with a router that scales
each hidden unit and each expert, and three more norms. The rules are transformers 5.24's
(`models/gemma3n/modeling_gemma3n.py`, `models/gemma4/modeling_gemma4.py`); a key a config leaves out is
its config class's default.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from kvtrace.errors import KvtraceError

__all__ = ["GEMMA_LAYERED", "LayerShape", "gemma_layer_fields"]

GEMMA_LAYERED = frozenset({"gemma3n", "gemma3n_text", "gemma4", "gemma4_text"})
# Gemma3nTextConfig's and Gemma4TextConfig's defaults for the keys their extra parts are sized by
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3n": {
        "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262_144, "altup_num_inputs": 4,
        "laurel_rank": 64,
    },
    "gemma4": {"hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262_144},
}  # fmt: skip


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's attention and MLP widths, where a model's layers differ (Gemma 3n, Gemma 4)."""

    kv_heads: int
    head_dim: int  # of its q heads too
    own_kv: bool  # its own k and v projections and k norm: False where it reads an earlier layer's K and V
    own_v: bool  # a v projection: False under Gemma 4's attention_k_eq_v on a full layer (its K is its V)
    intermediate_size: int


def gemma_layer_fields(
    fields: dict[str, Any],
    model_type: str,
    layer_types: Any,
    overrides: dict[int, dict[str, Any]],
    reused: Collection[int],
    mlp_widths: list[int] | None,
    positive_int: Callable[[str, Any], int],
    where: str,
) -> dict[str, Any]:
    """ModelGeometry's fields for a Gemma 3n or Gemma 4 config (empty for another family): `layer_shapes`,
    `per_layer_input_size`, `per_layer_input_vocab`, `altup_inputs`, `laurel_rank`, and Gemma 4's experts.
    `fields` hold the config's KV heads and head_dim as read, `overrides` each layer's changes to them
    (`per_layer_overrides`), `reused` the layers that read an earlier layer's K and V (`kv_shared_layers`),
    `mlp_widths` Gemma 3n's list of MLP widths, one a layer. `positive_int` checks a field or raises;
    `where` names the config in a refusal."""
    if model_type not in GEMMA_LAYERED:
        return {}
    family = "gemma3n" if model_type.startswith("gemma3n") else "gemma4"
    get = {**_DEFAULTS[family], **{k: v for k, v in fields.items() if v is not None}}.get
    layers = positive_int("num_hidden_layers", fields["num_hidden_layers"])
    widths = mlp_widths or [fields["intermediate_size"]] * layers
    if len(widths) != layers:
        raise KvtraceError(f"{where}: intermediate_size lists {len(widths)} widths for {layers} layers")
    kinds = layer_types if isinstance(layer_types, list | tuple) else ["full_attention"] * layers
    k_is_v = family == "gemma4" and bool(get("attention_k_eq_v"))
    double_wide = family == "gemma4" and bool(get("use_double_wide_mlp"))
    shapes = []
    for i in range(layers):
        layer = {**fields, **overrides.get(i, {})}
        own_kv = i not in reused
        full = i < len(kinds) and kinds[i] != "sliding_attention"
        mlp = positive_int("intermediate_size", widths[i])
        shapes.append(
            LayerShape(
                kv_heads=positive_int("num_key_value_heads", layer.get("num_key_value_heads")),
                head_dim=positive_int("head_dim", layer.get("head_dim")),
                own_kv=own_kv,
                own_v=own_kv and not (k_is_v and full),
                intermediate_size=2 * mlp if double_wide and not own_kv else mlp,
            )
        )
    ple = get("hidden_size_per_layer_input") or 0
    block: dict[str, Any] = {"layer_shapes": tuple(shapes)}
    if ple:
        block["per_layer_input_size"] = positive_int("hidden_size_per_layer_input", ple)
        block["per_layer_input_vocab"] = positive_int(
            "vocab_size_per_layer_input", get("vocab_size_per_layer_input")
        )
    if family == "gemma3n":
        block["altup_inputs"] = positive_int("altup_num_inputs", get("altup_num_inputs"))
        block["laurel_rank"] = positive_int("laurel_rank", get("laurel_rank"))
    elif get("enable_moe_block"):
        block.update(
            moe_layers=layers,
            experts=positive_int("num_experts", get("num_experts")),
            expert_intermediate_size=positive_int("moe_intermediate_size", get("moe_intermediate_size")),
            moe_beside_mlp=True,
        )
    return block
