"""An engine run's diagnosis (analyzers.planning.engine_run_diagnosis) as `kvtrace diagnose --json` prints it
and as the report page's sections, which the TensorBoard tab shows too. Computes nothing."""

from __future__ import annotations

from typing import Any

from analyzers.planning.engine_budget import EngineBudget
from analyzers.planning.engine_run_diagnosis import EngineRunDiagnosis
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis
from analyzers.render.engine_budget import engine_budget_to_html
from analyzers.render.vllm_diagnosis import (
    preempted_unpriced_to_json,
    preemption_to_html,
    ran_fine_to_html,
    ran_fine_to_json,
    refused_to_html,
    vllm_diagnosis_to_json,
)

__all__ = ["engine_run_diagnosis_to_html", "engine_run_diagnosis_to_json", "with_budget"]


def with_budget(
    result: dict[str, Any], budget: EngineBudget | None, notes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`result` with the budget it was priced against and the run's notes, as `kvtrace diagnose --json` adds
    them to every engine diagnosis."""
    if budget is not None:
        result["budget"] = budget.to_json()
    if notes:
        result["notes"] = [*result.get("notes", ()), *notes]
    return result


def engine_run_diagnosis_to_json(d: EngineRunDiagnosis) -> dict[str, Any] | None:
    """`kvtrace diagnose --json` of the run; None for a refusal that cannot be priced (diagnose says why)."""
    if d.unpriced is not None:
        return None
    if d.requests_unknown:
        result = preempted_unpriced_to_json(d.run)
    elif d.diagnosis is None:
        result = ran_fine_to_json(d.run, d.budget is not None and d.budget.crossed, d.unfinished)
    else:
        result = vllm_diagnosis_to_json(d.diagnosis)
    result["unfinished_requests"] = d.unfinished_requests  # every kind, as transformers' diagnosis gives it
    return with_budget(result, d.budget, d.notes)


def engine_run_diagnosis_to_html(d: EngineRunDiagnosis) -> list[str]:
    """The report page's sections: the budget, then the refusal, the preemptions, or (beside a budget) that
    the pool served every request. [] where there is nothing to explain: no budget and the pool held every
    request, or no budget and a refusal that cannot be priced."""
    sections = [] if d.budget is None else [engine_budget_to_html(d.budget, d.name)]
    if d.unpriced is not None:
        return sections
    if d.requests_unknown:  # the sentence alone: no figure of the requests, no remedy
        return [*sections, ran_fine_to_html(preempted_unpriced_to_json(d.run))]
    if d.diagnosis is None:
        if d.budget is None:
            return []
        return [*sections, ran_fine_to_html(ran_fine_to_json(d.run, d.budget.crossed, d.unfinished))]
    if isinstance(d.diagnosis, PreemptionDiagnosis):
        return [*sections, preemption_to_html(d.diagnosis)]
    return [*sections, refused_to_html(d.diagnosis)]
