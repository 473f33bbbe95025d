"""An engine run's memory budget (analyzers.planning.engine_budget) as text lines and the report page's HTML
section, in the same sentences. Computes nothing."""

from __future__ import annotations

from analyzers.planning.engine_budget import EngineBudget
from analyzers.render.html_text import html_text
from analyzers.units import a_or_an, human_bytes


def _crossing_sentence(b: EngineBudget, name: str) -> str:
    """The crossing (or the fit) in one sentence."""
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
        return (
            f"budget {size}: the run fits, peak {human_bytes(b.peak_bytes)} leaves "
            f"{human_bytes(-b.over_bytes)}{told}."
        )
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
            f"{a_or_an(human_bytes(b.request_bytes))}{kind} allocation{at} on top of "
            f"{human_bytes(b.allocated_before_bytes)} takes it over"
        )
    return (
        f"{name} would run out of memory on {a_or_an(size)} device: {what}; the run peaks at "
        f"{human_bytes(b.peak_bytes)}, {human_bytes(b.over_bytes)} over{told}."
    )


def _room_sentence(b: EngineBudget) -> str:
    """The pool that fits the budget, which the remedies below it make (within it: the most it could take)."""
    if not b.crossed:
        return (
            f"the largest pool it holds is {human_bytes(b.room_bytes)}, beside the "
            f"{human_bytes(b.other_bytes)} its size does not change (now {human_bytes(b.pool_bytes)}):"
        )
    if b.room_bytes > 0:
        return (
            f"a pool of at most {human_bytes(b.room_bytes)} fits beside the {human_bytes(b.other_bytes)} "
            f"its size does not change (now {human_bytes(b.pool_bytes)}):"
        )
    return f"no pool fits: the {human_bytes(b.other_bytes)} besides it exceed the budget on their own:"


def engine_budget_lines(b: EngineBudget, name: str) -> list[str]:
    """The crossing (or the fit) in one sentence, then the largest pool that fits and the knobs that make it.
    `name`: the engine as the diagnosis names it (e.g. "transformers-cb 5.24.0")."""
    lines = [_crossing_sentence(b, name)]
    if not b.remedies:
        return lines
    lines.append(f"  {_room_sentence(b)}")
    return lines + [f"    {remedy.sentence}" for remedy in b.remedies]


def engine_budget_to_html(b: EngineBudget, name: str) -> str:
    """The budget as the report page's <section>, in `kvtrace diagnose`'s sentences (engine_budget_lines),
    so that the page and diagnose say the same of a run that crossed it."""
    esc = html_text
    body = f"<p>{esc(_crossing_sentence(b, name))}</p>"
    if b.remedies:
        remedies = "".join(f"<li>{esc(remedy.sentence)}</li>" for remedy in b.remedies)
        body += f"<p>{esc(_room_sentence(b))}</p><ul>{remedies}</ul>"
    return f"<section class='diagnosis' id='kvtrace-budget'><h2>Memory budget</h2>{body}</section>"
