"""The experts' forward a recorded mixture-of-experts run ran, for `kvtrace plan --from-run` (`run_experts`):
its manifest's `experts_implementation`, which the run's model_config.json does not hold (transformers writes
no `_experts_implementation`, and `from_pretrained(experts_implementation=...)` sets it on the loaded model
alone), so that the plan's model is the run's and says when its measured prefill is not what `plan --config`
prices. Pure, torch-free.

Why it matters: transformers' default, grouped_mm, holds S = rows x tokens x k expert rows whatever the
router chose, which `plan --config` counts (`moe_prefill`); eager's loop holds each expert's tokens as the
router sent them (a tiny Qwen3-MoE, 2 rows of 500 tokens: 2,026,788 B beside its weights and KV at its
prefill, grouped_mm's 3,320,056), so a run of one prices the other's prefill by neither.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from analyzers.planning.presets import ModelGeometry

__all__ = ["DEFAULT_EXPERTS", "run_experts"]

DEFAULT_EXPERTS = "grouped_mm"  # transformers 5.x's default experts_implementation, the one `--config` prices


def run_experts(geometry: ModelGeometry, model: Any, run_name: str) -> tuple[ModelGeometry, str | None]:
    """`geometry` with the experts' forward the run's manifest (`model`) says its model ran, and a note where
    that is not grouped_mm; as given for a model without experts or a manifest that does not say (a run of
    kvtrace before it recorded it)."""
    named = model.get("experts_implementation") if isinstance(model, dict) else None
    if not geometry.moe_layers or not isinstance(named, str) or not named:
        return geometry, None
    ran = None if named == DEFAULT_EXPERTS else named
    geometry = replace(geometry, experts_implementation=ran)
    if ran is None:
        return geometry, None
    loop = " (a loop over the experts, each running the tokens the router sent it)" if ran == "eager" else ""
    return geometry, (
        f"experts: {run_name}'s model ran experts_implementation={ran!r}{loop}, as its manifest says: "
        "this plan scales the prefill it measured with the rows and the prompt, an estimate where the "
        "tensors follow the routing, which another prompt changes; transformers' default, "
        f"{DEFAULT_EXPERTS} (k expert rows a token whatever the routing), is what `kvtrace plan --config` "
        "prices, and what a model loaded without experts_implementation runs"
    )
