"""A run group against a memory budget: which ranks' devices would run out, and the rank to look at then.

Each rank is one device, so a budget (given to `kvtrace diagnose --budget`, else the one each rank was
recorded with) is checked rank by rank. Where several ranks would run out, the one to diagnose is still the
rank that peaked highest (its shortfall is the largest: a remedy that fits it fits the others), but the
reason names every rank that would run out: "look at rank 1: it peaked" read as if rank 0 fitted. Pure,
torch-free.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from analyzers.budget import budget_crossing
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.group import GroupReport

__all__ = ["budget_focus", "ranks_over_budget"]

# how a reason this module made begins (`budget_focus`), which a later call with another budget makes anew
_PEAKED_HIGHEST = "peaked highest;"


def ranks_over_budget(group: GroupReport, budget_bytes: int | None = None) -> list[int]:
    """The ranks whose device would run out under `budget_bytes`, else under the budget each was recorded
    with (its report's crossing), in rank order."""
    over = []
    for rank in group.ranks:
        if budget_bytes is None:
            crossed = bool(rank.report.budget and rank.report.budget.get("crossed"))
        else:
            unseen = 0
            if rank.source.kind == "run":  # as the report weighs its recorded budget: a vLLM engine's
                from analyzers.engine_report import bytes_before_trace  # weights and pool, before its trace

                unseen = bytes_before_trace(rank.source, rank.report.devices)
            crossed = budget_crossing(rank.source, rank.report.timelines, budget_bytes, unseen).crossed
        if crossed:
            over.append(rank.rank)
    return over


def _ranks_text(ranks: list[int]) -> str:
    """ "ranks 0 and 1", "ranks 0, 1 and 3"."""
    names = [str(rank) for rank in ranks]
    return f"ranks {', '.join(names[:-1])} and {names[-1]}"


def budget_focus(group: GroupReport, budget_bytes: int | None = None) -> GroupReport:
    """The group with `over_budget_ranks` set and, where several ranks would run out and the rank to look at
    is the one that peaked, a reason that names them all; a rank that ran out or failed stays the reason."""
    over = ranks_over_budget(group, budget_bytes)
    # a reason this made for another budget (the recorded one, before `--budget`) is "peaked" again first
    reason = "peaked" if group.focus_reason.startswith(_PEAKED_HIGHEST) else group.focus_reason
    group = dataclasses.replace(group, over_budget_ranks=over, focus_reason=reason)
    if len(over) < 2 or reason != "peaked" or group.focus_rank not in over:
        return group
    budgets = (
        {budget_bytes}
        if budget_bytes is not None
        else {int(r.report.budget["bytes"]) for r in group.ranks if r.rank in over and r.report.budget}
    )
    device = f" on a {human_bytes(budgets.pop())} device" if len(budgets) == 1 else " under their budgets"
    each = "both" if len(over) == 2 else "each"
    reason = f"{_PEAKED_HIGHEST} {_ranks_text(over)} would {each} run out of memory{device}"
    return dataclasses.replace(group, focus_reason=reason)
