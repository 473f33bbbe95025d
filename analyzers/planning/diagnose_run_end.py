"""How a diagnosed run ended, when that changes what its diagnosis can say: a run whose manifest still
says running (its process died, or is recording still), and a block that raised before any step (no
inference to diagnose, only what the run held). Pure, torch-free.

Read from the run's manifest and KV log, not from the memory at the moment, so that a diagnosis of a
snapshot or a Chrome trace, which have neither, leaves both None.
"""

from __future__ import annotations

from analyzers.model import MemorySource
from analyzers.run_stop import killed_after_sigterm
from analyzers.summary import Report

__all__ = ["before_first_step", "unfinished"]


def before_first_step(source: MemorySource, report: Report) -> str | None:
    """`Diagnosis.before_first_step`: the exception's type for a run whose block raised (or was
    interrupted) before any step, its KV log empty and no OOM recorded: there was no inference to diagnose,
    only what the run held."""
    run = source.meta.get("run")
    ended = (source.meta.get("manifest") or {}).get("ended") or {}
    if run is None or run.kv_events or report.steps or source.ooms:
        return None
    if ended.get("status") not in ("exception", "interrupted"):
        return None
    kind = ended.get("type")
    return kind if isinstance(kind, str) and kind else "an exception"


def unfinished(source: MemorySource) -> str | None:
    """`Diagnosis.unfinished`: "died", "terminated" (died after a SIGTERM) or "recording" for a run whose
    manifest still says running."""
    ended = (source.meta.get("manifest") or {}).get("ended") or {}
    if ended.get("status") != "running":
        return None
    if source.meta.get("recording_pid") is not None:
        return "recording"
    return "terminated" if killed_after_sigterm(ended) else "died"
