"""Whether a recorded `generate()` call's prompts were padded, as the run's manifest tells it
(`generate_calls`, written as the recording ended: kvtrace.call_masks), for the planner's static prefill under
sdpa attention (analyzers.planning.static_prefill), which a padded batch makes far larger. Its own module:
it reads one manifest field, which nothing else in the planner needs."""

from __future__ import annotations

from typing import Any

__all__ = ["call_padded"]


def call_padded(manifest: dict[str, Any], step: int) -> bool | None:
    """Whether the call whose prefill is `step` had padded prompts (its attention_mask masked a position
    out). None: not told, for a call whose mask was freed before the recording ended (null), one that passed
    no attention_mask tensor (no `padded`), or a run recorded before kvtrace wrote `generate_calls`."""
    calls = manifest.get("generate_calls")
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict) and call.get("step") == step:
            padded = call.get("padded")
            return padded if isinstance(padded, bool) else None
    return None
