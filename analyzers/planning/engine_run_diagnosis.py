"""Which diagnosis a serving engine's run gets, chosen once for every view of it: `kvtrace diagnose`, the
report page (`kvtrace report -o`) and the TensorBoard tab. Pure: engine files and budget.

An engine allocates its KV pool at its start, sized by its knobs, so the Hugging Face diagnosis (a shorter
context, a smaller batch) prices nothing there: a vLLM run is explained in vLLM's knobs. First the recorded
memory budget where there is one, crossed or not (analyzers.planning.engine_budget), then the engine's own
diagnosis: the refused start, the preemptions (whose remedies must fit that budget too), or none where the
pool held every request (analyzers.planning.vllm_diagnose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analyzers.engine import EngineRun
from analyzers.planning.engine_budget import EngineBudget, run_engine_budget
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, RefusedDiagnosis, diagnose_engine
from analyzers.planning.vllm_refused import refused_start
from kvtrace.errors import KvtraceError

__all__ = ["EngineRunDiagnosis", "engine_run_diagnosis", "explain_engine_run", "raised_notes"]


@dataclass(frozen=True)
class EngineRunDiagnosis:
    """An engine's run explained in its own knobs. `diagnosis` None: the pool held every request (or, with
    `unpriced`, a refusal that cannot be priced: `unpriced` is why, and only the budget is said)."""

    run: EngineRun
    budget: EngineBudget | None
    diagnosis: RefusedDiagnosis | PreemptionDiagnosis | None
    notes: tuple[str, ...] = ()  # the exception the recorded block raised, as `kvtrace diagnose` notes it
    unpriced: str | None = None

    @property
    def name(self) -> str:
        """The engine as the diagnosis names it ("vLLM 0.32.0")."""
        return f"vLLM {self.run.info.version}".strip()


def raised_notes(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The note on a recorded block that raised (the manifest's `ended`), none for one that ended well."""
    ended = manifest.get("ended")
    if not isinstance(ended, dict) or ended.get("status") != "exception":
        return ()
    from analyzers.summary import raised_note

    return (raised_note(ended),)


def explain_engine_run(
    run: EngineRun, budget: EngineBudget | None, notes: tuple[str, ...] = ()
) -> EngineRunDiagnosis:
    """The engine's diagnosis against `budget`. Raises KvtraceError where a refusal cannot be priced."""
    return EngineRunDiagnosis(run, budget, diagnose_engine(run, budget), notes)


def engine_run_diagnosis(source: Any, report: Any) -> EngineRunDiagnosis | None:
    """The diagnosis the report page and the TensorBoard tab give a recorded engine run (`source`, `report`:
    analyzers.report.build_report's), against its recorded budget. None where the run is not explained as an
    engine's: no engine, a run that ended in an OOM, another engine's run that was not refused (vLLM's
    remedies are priced in vLLM's knobs): those get the Hugging Face diagnosis where they crossed a budget."""
    engine = source.meta.get("engine")
    if engine is None or report.oom is not None:
        return None
    if engine.info.name != "vllm" and not refused_start(engine):
        return None
    manifest = source.meta.get("manifest") or {}
    budget = run_engine_budget(engine, report.budget, manifest)
    notes = raised_notes(manifest)
    try:
        return explain_engine_run(engine, budget, notes)
    except KvtraceError as exc:  # `kvtrace diagnose` says why; the budget still stands
        return EngineRunDiagnosis(engine, budget, None, notes, unpriced=str(exc))
