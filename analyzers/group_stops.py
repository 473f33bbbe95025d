"""How a run group's ranks stopped, where some were told to. torchrun SIGTERMs the surviving workers when one
fails; a scheduler's time limit (or a Ctrl-C on torchrun) stops every rank at once. A rank stopped so did not
fail by itself, whatever the order its handlers ran in: the rank to look at is one that did, and the notes
say which ranks were stopped after whose failure. Pure, torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING

from analyzers.run_stop import SIGTERM_SENDERS, interrupted_how, killed_after_sigterm

if TYPE_CHECKING:
    from analyzers.group import RankReport

__all__ = [
    "failed_first",
    "failed_reason",
    "raised_after_sigterm",
    "signalled_ns",
    "stop_mark",
    "stop_notes",
    "stopped_from_outside",
    "stopped_ns",
    "stopped_words",
]


def stopped_from_outside(rank: RankReport) -> bool:
    """The rank's block was ended by a signal, not by a failure of its own: interrupted (a SIGTERM, a
    Ctrl-C), killed while it wrote its end after a SIGTERM, or raised after a SIGTERM reached it."""
    return rank.status == "interrupted" or killed_after_sigterm(rank.ended) or raised_after_sigterm(rank)


def raised_after_sigterm(rank: RankReport) -> bool:
    """The rank's block raised after a SIGTERM reached it: torchrun stops the survivors of a rank that
    died, and a survivor's collective in flight then raises (gloo's "Connection closed by peer", NCCL's
    abort) before the block can stop between steps. The raise is the stop's, not a failure of its own."""
    if rank.status != "exception" or rank.ended.get("signal") != "SIGTERM":
        return False
    told, ended = rank.ended.get("signal_t_ns"), rank.ended.get("t_ns")
    return isinstance(told, int) and (not isinstance(ended, int) or told <= ended)


def _how_stopped(rank: RankReport) -> str:
    """After "was": how a rank stopped from outside was stopped."""
    if rank.status == "running":
        return "killed while writing its end, after a SIGTERM"
    if rank.status == "exception":
        return f"stopped by SIGTERM, after which it raised {rank.ended.get('type') or 'an exception'}"
    return interrupted_how(rank.ended, senders=False)


def stop_mark(rank: RankReport) -> str | None:
    """The ranks table's mark for a rank stopped by SIGTERM ("stopped by SIGTERM"), where its exception's
    type would say `Terminated` (or a collective's RuntimeError, raised by the stop); None for any other
    rank (its exception's type says how it ended)."""
    if not stopped_from_outside(rank) or rank.ended.get("signal") != "SIGTERM":
        return None
    if rank.status == "exception":
        return f"{rank.ended.get('type') or 'raised'} after SIGTERM"
    return "killed after SIGTERM" if rank.status == "running" else "stopped by SIGTERM"


def failed_reason(rank: RankReport) -> str:
    """How a rank that did not end well stopped, as the focus says it ("raised RuntimeError")."""
    if rank.status == "running" and rank.source.meta.get("recording_pid") is not None:
        return "is still being recorded"
    if stopped_from_outside(rank):
        return f"was {_how_stopped(rank)}"
    if rank.status == "running":
        return "never finished (the process died)"
    return f"raised {rank.ended.get('type') or rank.status}"


def stopped_ns(rank: RankReport) -> float:
    """When the rank's block stopped: its `ended` time; for a rank that died (killed, no `ended`), the last
    line of its logs, written within the writer's 0.1 s of its death. The launcher stops the other ranks
    after the first death, so they log on a little longer."""
    ended = rank.ended.get("t_ns")
    if isinstance(ended, int):
        return ended
    run = rank.source.meta.get("run")
    last = [run.kv_events[-1].t_ns] if run is not None and run.kv_events else []
    if run is not None and run.memory_samples and isinstance(run.memory_samples[-1].get("t_ns"), int):
        last.append(run.memory_samples[-1]["t_ns"])
    return max(last, default=float("inf"))


def signalled_ns(rank: RankReport) -> int | None:
    """When the rank was told to stop: its SIGTERM's arrival, or a Ctrl-C's end of the block; None for a
    rank no signal reached."""
    at = rank.ended.get("signal_t_ns")
    if isinstance(at, int):
        return at
    at = rank.ended.get("t_ns")
    return at if rank.status == "interrupted" and isinstance(at, int) else None


def failed_first(failed: list[RankReport]) -> list[RankReport]:
    """The ranks that failed by themselves (raised, died) before any rank of the group was told to stop,
    the first first: the others were stopped after them (torchrun SIGTERMs the survivors of a failure), or
    failed as they were (a collective whose peer a time limit stopped). Empty: the job was stopped from
    outside, no rank failed first."""
    told = min((at for at in map(signalled_ns, failed) if at is not None), default=float("inf"))
    own = [r for r in failed if not stopped_from_outside(r) and stopped_ns(r) < told]
    return sorted(own, key=lambda r: (stopped_ns(r), r.rank))


def stopped_words(failed: list[RankReport], world: int) -> str:
    """Which ranks were stopped from outside, and how: "every rank was stopped by SIGTERM", "rank 1 was
    stopped by SIGTERM; rank 0 raised RuntimeError"."""
    stopped = [r for r in failed if stopped_from_outside(r)]
    hows = {_how_stopped(r) for r in stopped}
    if len(stopped) == world and len(hows) == 1:
        said = [f"every rank was {hows.pop()}"]
    else:
        said = [f"rank {r.rank} {failed_reason(r)}" for r in stopped]
    said += [f"rank {r.rank} {failed_reason(r)}" for r in failed if not stopped_from_outside(r)]
    return "; ".join(said)


def stop_notes(ranks: list[RankReport]) -> list[str]:
    """Why the ranks stopped by SIGTERM were: after a rank that failed first (torchrun SIGTERMs the other
    ranks when one fails, so that rank is where the job failed), or all at once with none failed before (a
    time limit). Each rank's own note names SIGTERM's usual senders; only the group can tell which it was."""
    failed = [r for r in ranks if r.status != "ok"]
    sigtermed = [r for r in failed if stopped_from_outside(r) and r.ended.get("signal") == "SIGTERM"]
    told = [at for at in map(signalled_ns, sigtermed) if at is not None]
    if not told:
        return []
    names = _rank_names([r.rank for r in sigtermed])
    were = "was" if len(sigtermed) == 1 else "were"
    first = failed_first(failed)
    if first:
        culprit = first[0]
        what = (
            f"rank {culprit.rank}'s last logged line (it died)"
            if culprit.status == "running"
            else f"rank {culprit.rank} {failed_reason(culprit)}"
        )
        after = (min(told) - stopped_ns(culprit)) / 1e9
        return [
            f"{names} {were} stopped by SIGTERM {after:.1f} s after {what}: torchrun stops the other ranks "
            f"when one fails, so rank {culprit.rank} is where the job failed"
        ]
    spread = (max(told) - min(told)) / 1e6
    within = f" within {spread:.1f} ms of each other" if len(told) > 1 else ""
    return [
        f"{names} {were} stopped by SIGTERM{within}, no rank having failed before: the job was stopped from "
        f"outside ({SIGTERM_SENDERS}, or torchrun itself stopped)"
    ]


def _rank_names(ranks: list[int]) -> str:
    """ "rank 0", "ranks 0 and 1", "ranks 0, 2 and 3"."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"
