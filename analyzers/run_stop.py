"""What stopped a recorded block short, in the words every report says it with, from the manifest's `ended`:
a Ctrl-C, or a SIGTERM (a scheduler's time limit, `docker stop`), which kvtrace ends as a Ctrl-C before the
process dies of it; or one that killed the process before the run's end was written. Pure, torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SIGTERM_SENDERS", "interrupted_how", "killed_after_sigterm"]

SIGTERM_SENDERS = "a scheduler's time limit, `docker stop`, `timeout` or `kill`"
"""Who sends a SIGTERM, as the notes name them: the user reads which of theirs stopped the run."""


def interrupted_how(ended: Mapping[str, Any], senders: bool = True) -> str:
    """How an `interrupted` block was stopped, after "was": "interrupted (Ctrl-C)", or for one whose
    process got SIGTERM, "stopped by SIGTERM (...)"; `senders` False leaves out who sends one (a group's
    note says which it was)."""
    if ended.get("signal") == "SIGTERM":
        return f"stopped by SIGTERM ({SIGTERM_SENDERS})" if senders else "stopped by SIGTERM"
    return "interrupted (Ctrl-C)"


def killed_after_sigterm(ended: Mapping[str, Any]) -> bool:
    """A manifest still `running` whose process got SIGTERM: it was killed (a SIGKILL at the end of a grace
    period) while it wrote the run's end, after its logs were whole, not by a cause that left no record."""
    return ended.get("status") == "running" and ended.get("signal") == "SIGTERM"
