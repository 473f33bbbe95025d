"""An engine run's memory budget (analyzers.planning.engine_budget) as text lines. Computes nothing."""

from __future__ import annotations

from analyzers.planning.engine_budget import EngineBudget
from analyzers.units import human_bytes


def engine_budget_lines(b: EngineBudget, name: str) -> list[str]:
    """The crossing in one sentence, then the pool that fits and the knobs that make it; one line when the
    run fits. `name`: the engine as the diagnosis names it (e.g. "transformers-cb 5.24.0")."""
    size = human_bytes(b.budget_bytes)
    counted = []
    if b.unseen_bytes:
        counted.append(
            f"with {human_bytes(b.unseen_bytes)} the engine held before the trace began, from engine.json"
        )
    if b.partial:
        counted.append("the KV cache and weights only: no allocator events were recorded, activations unseen")
    told = f" ({'; '.join(counted)})" if counted else ""
    if not b.crossed:
        return [
            f"budget {size}: the run fits, peak {human_bytes(b.peak_bytes)} leaves "
            f"{human_bytes(-b.over_bytes)}{told}."
        ]
    if b.crossed_by == "pool":
        what = (
            f"its KV pool ({human_bytes(b.pool_bytes)}), allocated at the engine's start before its first "
            f"step, takes the {human_bytes(b.allocated_before_bytes)} already allocated to "
            f"{human_bytes(b.allocated_after_bytes)}"
        )
    elif b.crossed_by == "before":
        what = (
            f"the weights and what the process held before its first step "
            f"({human_bytes(b.allocated_after_bytes)}) already exceed it"
        )
    else:
        at = f" at step {b.step}" if b.step is not None else ""
        at += f" ({b.phase})" if at and b.phase else ""
        kind = f" {b.request_category}" if b.request_category else ""
        what = (
            f"a {human_bytes(b.request_bytes)}{kind} allocation{at} on top of "
            f"{human_bytes(b.allocated_before_bytes)} takes it over"
        )
    lines = [
        f"{name} would run out of memory on a {size} device: {what}; the run peaks at "
        f"{human_bytes(b.peak_bytes)}, {human_bytes(b.over_bytes)} over{told}.",
    ]
    if b.room_bytes > 0:
        lines.append(
            f"  a pool of at most {human_bytes(b.room_bytes)} fits beside the {human_bytes(b.other_bytes)} "
            f"its size does not change (now {human_bytes(b.pool_bytes)}):"
        )
    else:
        lines.append(
            f"  no pool fits: the {human_bytes(b.other_bytes)} besides it exceed the budget on their own:"
        )
    lines += [f"    {remedy.sentence}" for remedy in b.remedies]
    return lines
