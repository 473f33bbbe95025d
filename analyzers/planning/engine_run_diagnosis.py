"""Which diagnosis a serving engine's run gets, chosen once for every view of it: `kvtrace diagnose`, the
report page (`kvtrace report -o`) and the TensorBoard tab. Pure: engine files and budget.

An engine allocates its KV pool at its start, sized by its knobs, so the Hugging Face diagnosis (a shorter
context, a smaller batch) prices nothing there: a vLLM run is explained in vLLM's knobs. First the recorded
memory budget where there is one, crossed or not (analyzers.planning.engine_budget), then the engine's own
diagnosis: the refused start, the preemptions (whose remedies must fit that budget too), or none where the
pool held every request (analyzers.planning.vllm_diagnose).

A run that stopped before its end (its process died, its block raised or was interrupted) shows the run up
to then, said in a note as the Hugging Face diagnosis says it. Its requests still in the engine then had not
reached their final lengths, which vLLM's remedies are priced on. Where each one's `waiting` line says its
max_tokens (analyzers.planning.unfinished_asks), each is counted at the most it may reach, prompt +
max_tokens - 1 tokens, so the demand is an upper bound as a finished run's is, and a remedy that holds it
avoids every preemption ("fits"). Where one's is unknown (runs recorded before kvtrace logged it), that one is
counted at the length it had reached, the others still at their max_tokens: a remedy that avoids every
preemption of what was recorded is then said unknown ("[?]"), never "fits"; transformers' continuous
batching's demand in blocks (`kvtrace diagnose`) is then said "at least", with no num_blocks named, and so is
vLLM's demand if nothing were preempted. An engine that preempted nothing is not said to have run out of
nothing: whether its pool would have sufficed cannot be told (`unfinished_at_stop` for both), unless each
unfinished request's max_tokens is known (vLLM): then the worst case of them all at once says whether the
pool holds them or vLLM may preempt before they finish (`Unfinished.asked_demand_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from analyzers.engine import EngineRun
from analyzers.planning.engine_budget import EngineBudget, run_engine_budget
from analyzers.planning.unfinished_asks import in_engine_at_end
from analyzers.planning.vllm_diagnose import (
    PreemptionDiagnosis,
    RefusedDiagnosis,
    asked_demand_blocks,
    diagnose_engine,
)
from analyzers.planning.vllm_refused import refused_start
from analyzers.run_stop import SIGTERM_SENDERS, interrupted_how, killed_after_sigterm
from kvtrace.errors import KvtraceError

__all__ = [
    "EngineRunDiagnosis",
    "Unfinished",
    "ended_notes",
    "engine_run_diagnosis",
    "explain_engine_run",
    "raised_notes",
    "stopped_short",
    "unfinished_at_stop",
]


@dataclass(frozen=True)
class EngineRunDiagnosis:
    """An engine's run explained in its own knobs. `diagnosis` None: the pool held every request (or, with
    `unpriced`, a refusal that cannot be priced: `unpriced` is why, and only the budget is said)."""

    run: EngineRun
    budget: EngineBudget | None
    diagnosis: RefusedDiagnosis | PreemptionDiagnosis | None
    notes: tuple[str, ...] = ()  # how the run stopped short (`ended_notes`), as `kvtrace diagnose` notes it
    unpriced: str | None = None
    unfinished: Unfinished | None = None  # requests a run that stopped short left: `unfinished_at_stop`
    # the run preempted, and its request log is missing (`EngineRun.requests_missing`): the demand every
    # remedy is priced on is unknown, so the preemptions are said without remedies (`diagnosis` None)
    requests_unknown: bool = False

    @property
    def unfinished_requests(self) -> int:
        """How many requests the run left in the engine, 0 where it ended well or left none."""
        return self.unfinished.requests if self.unfinished is not None else 0

    @property
    def name(self) -> str:
        """The engine as the diagnosis names it ("vLLM 0.32.0")."""
        return f"vLLM {self.run.info.version}".strip()


def raised_notes(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The note on a recorded block that raised (the manifest's `ended`), none for one that ended well."""
    ended = manifest.get("ended")
    if not isinstance(ended, dict) or ended.get("status") != "exception":
        return ()
    from analyzers.run_end_notes import raised_note

    return (raised_note(ended),)


def stopped_short(manifest: dict[str, Any], recording_pid: str | None = None) -> str | None:
    """How the recorded run stopped before its end: "died" (the manifest still says running and no process
    records it: killed), "recording" (`recording_pid` holds it: it goes on), "exception", "interrupted".
    None for a block that ended well."""
    ended = manifest.get("ended")
    status = ended.get("status") if isinstance(ended, dict) else None
    if status == "running":
        return "died" if recording_pid is None else "recording"
    return status if status in ("exception", "interrupted") else None


def ended_notes(manifest: dict[str, Any], recording_pid: str | None = None) -> tuple[str, ...]:
    """The note on a run that stopped short (`stopped_short`), in the words of the Hugging Face report's
    (analyzers.run_end_notes.ended_notes): engine steps reach their file at most every 0.1 s, so a killed run
    ends at its last flushed step. None for one that ended well."""
    stopped = stopped_short(manifest, recording_pid)
    raw = manifest.get("ended")
    ended: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if stopped == "died" and killed_after_sigterm(ended):
        return (
            f"the run never finished (killed while writing its end, after a SIGTERM from {SIGTERM_SENDERS}): "
            "read up to its last flushed step",
        )
    if stopped == "died":
        return ("the run never finished (the process died): read up to its last flushed step",)
    if stopped == "recording":
        by = f" by pid {recording_pid}" if recording_pid else ""
        return (f"the run is still being recorded{by}: figures cover what it has written so far",)
    if stopped == "interrupted":
        return (f"the recorded block was {interrupted_how(ended)}: the figures cover the run up to then",)
    return raised_notes(manifest)


@dataclass(frozen=True)
class Unfinished:
    """Requests still in the engine when the run stopped short. Counted at the lengths they had reached, not
    their final ones, any demand read from the run is a lower bound: every engine's diagnosis says so
    through this one place (vLLM's remedies, transformers' num_blocks), unless the diagnosis counted each at
    its max_tokens (`PreemptionDiagnosis.asked_requests`)."""

    requests: int
    how: str  # why it stopped, as a clause: "its process died"
    # vLLM's run that preempted nothing: the most blocks its requests may need at once, each unfinished one
    # at its max_tokens (`vllm_diagnose.asked_demand_blocks`); None where one's is unknown or not asked
    asked_demand_blocks: int | None = None

    def clause(self) -> str:
        """The requests as the sentences say them: "3 request(s) unfinished (its process died)"."""
        return f"{self.requests} request(s) unfinished ({self.how})"


_HOW_STOPPED = {
    "died": "its process died",
    "recording": "it is still being recorded",
    "exception": "its block raised",
    "interrupted": "it was interrupted",
}


def unfinished_at_stop(run: EngineRun, stopped: str | None) -> Unfinished | None:
    """The requests left in the engine by a run that stopped short (`stopped`: `stopped_short`), None for a
    run that ended well or left none."""
    if stopped not in _HOW_STOPPED:
        return None
    left = in_engine_at_end(run)
    return Unfinished(left, _HOW_STOPPED[stopped]) if left else None


def _short_of_final(
    diagnosis: RefusedDiagnosis | PreemptionDiagnosis | None, run: EngineRun, stopped: str | None
) -> RefusedDiagnosis | PreemptionDiagnosis | None:
    """`diagnosis` with each remedy that avoids every recorded preemption said unknown where the run stopped
    with requests in the engine (`unfinished_at_stop`) counted at the lengths they had reached: the run's
    own demand may be larger. Where each was counted at its max_tokens, the demand is an upper bound and
    the remedies stand. A remedy found short stays short: more demand cannot make it fit."""
    if not isinstance(diagnosis, PreemptionDiagnosis):
        return diagnosis
    left = unfinished_at_stop(run, stopped)
    if left is None:
        return diagnosis
    if diagnosis.asked_requests >= left.requests:
        return replace(diagnosis, unfinished_requests=left.requests)
    counted = "counted at the lengths they had reached"
    if diagnosis.asked_requests:  # some at their max_tokens, the rest at the lengths reached
        others = left.requests - diagnosis.asked_requests
        counted = (
            f"{diagnosis.asked_requests} counted at their max_tokens and the other {others} at the lengths "
            "they had reached"
        )
    caveat = (
        f" The run stopped with {left.clause()}, {counted}, not their final ones: whether it avoids the "
        "preemptions to come cannot be told; rerun to completion to know."
    )
    remedies = tuple(
        replace(r, fits=None, sentence=r.sentence + caveat) if r.fits else r for r in diagnosis.remedies
    )
    return replace(diagnosis, remedies=remedies, unfinished_requests=left.requests)


def explain_engine_run(
    run: EngineRun, budget: EngineBudget | None, notes: tuple[str, ...] = (), stopped: str | None = None
) -> EngineRunDiagnosis:
    """The engine's diagnosis against `budget`; `stopped`: how the run stopped short (`stopped_short`).
    Raises KvtraceError where a refusal cannot be priced."""
    diagnosis = _short_of_final(diagnose_engine(run, budget), run, stopped)
    left = unfinished_at_stop(run, stopped)
    if left is not None and diagnosis is None and run.requests_missing is None:
        # nothing preempted yet: each unfinished request at its max_tokens may still tell the pool's verdict
        left = replace(left, asked_demand_blocks=asked_demand_blocks(run))
    if run.requests_missing is not None:
        notes = (*notes, run.requests_missing)
        if isinstance(diagnosis, PreemptionDiagnosis):  # priced on requests the run has lost: none is said
            return EngineRunDiagnosis(run, budget, None, notes, unfinished=left, requests_unknown=True)
    return EngineRunDiagnosis(run, budget, diagnosis, notes, unfinished=left)


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
    recording = source.meta.get("recording_pid")
    notes = ended_notes(manifest, recording)
    try:
        return explain_engine_run(engine, budget, notes, stopped_short(manifest, recording))
    except KvtraceError as exc:  # `kvtrace diagnose` says why; the budget still stands
        return EngineRunDiagnosis(engine, budget, None, notes, unpriced=str(exc))
