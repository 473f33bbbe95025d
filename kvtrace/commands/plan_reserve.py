"""`kvtrace plan --from-run`'s reserve for a CUDA run without allocator events, from its memory samples'
allocator peaks (analyzers.planning.sampled_reserve): kept out of plan.py, which builds the request."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analyzers.planning.plan_types import PlanRequest
    from analyzers.planning.run_defaults import RunDefaults

__all__ = ["sampled_reserve_plan"]


def sampled_reserve_plan(
    path: str | Path, reserve_typed: bool, request: PlanRequest, run: RunDefaults
) -> tuple[PlanRequest, RunDefaults]:
    """A CUDA run without allocator events whose samples measured the allocator's peak: the reserve is what
    that peak exceeds the plan's arithmetic by at the run's own shape, not the 10% guess at the activations
    (analyzers.planning.sampled_reserve), a typed --reserve on top; its note replaces the one that said the
    reserve stands for them. Unchanged where the samples measure no step."""
    from analyzers.planning.run_peak import UNSEEN_ENDS
    from analyzers.planning.sampled_reserve import (
        at_run,
        sampled_peaks,
        sampled_reserve,
        sampled_reserve_note,
    )
    from kvtrace.run_reader import read_run

    unseen = next((note for note in run.notes if note.endswith(UNSEEN_ENDS)), None)
    shape = at_run(request, run)
    if unseen is None or shape is None or run.prompt is None:
        return request, run
    measured = sampled_reserve(shape, sampled_peaks(read_run(path), run.prompt))
    if measured is None:
        return request, run
    typed = request.effective_reserve_bytes if reserve_typed else 0
    cause = next(unseen.removesuffix(end) for end in UNSEEN_ENDS if unseen.endswith(end))
    said = sampled_reserve_note(cause, measured, reserve_typed)
    notes = tuple(said if note == unseen else note for note in run.notes)
    request = replace(request, reserve_bytes=measured.reserve_bytes + typed, reserve_fraction=None)
    return request, replace(run, notes=notes)
