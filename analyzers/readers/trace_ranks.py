"""Which rank of which distributed job a torch.profiler trace is, from its header alone.

Kineto writes `distributedInfo` (backend, rank, world_size) among the top-level fields before
"traceEvents", so a folder of a job's traces (one per rank) is told apart without reading any trace whole:
`kvtrace report` on such a folder reads one trace and says which rank's it read and which it did not, the
traces grouped into jobs as `kvtrace export` groups them (analyzers.export_groups: traces agreeing on backend
and world size are one job's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from analyzers.readers.sources import _head
from kvtrace.errors import KvtraceError, shell_arg

__all__ = ["TraceRank", "snapshots_note", "trace_rank", "traces_note"]

_HEAD_BYTES = 1 << 20  # deviceProperties of 8 GPUs and a pg_config of hundreds of groups fit well within


@dataclass(frozen=True)
class TraceRank:
    """A trace's `distributedInfo`: its rank, and the job's backend and world size (None where unsaid)."""

    rank: int
    backend: str | None
    world_size: int | None


def trace_rank(path: str | os.PathLike[str]) -> TraceRank | None:
    """The rank `path`'s header says; None for a trace of no distributed job, one whose header is not
    Kineto's (its events first) or one that cannot be read here (reading it whole says why)."""
    try:
        head = _head(path, _HEAD_BYTES)
    except (KvtraceError, OSError, EOFError, ValueError):
        return None
    key = head.find(b'"traceEvents"')
    if key < 0:
        return None
    try:
        top = json.loads(head[:key] + b'"traceEvents": []}')
    except (ValueError, RecursionError):
        return None
    info = top.get("distributedInfo") if isinstance(top, dict) else None
    if not isinstance(info, dict):
        return None
    rank, backend, world_size = info.get("rank"), info.get("backend"), info.get("world_size")
    if not isinstance(rank, int) or isinstance(rank, bool):
        return None
    return TraceRank(
        rank,
        backend if isinstance(backend, str) else None,
        world_size if isinstance(world_size, int) and not isinstance(world_size, bool) else None,
    )


def _named(paths: list[tuple[Path, TraceRank | None]], shown: int = 3) -> str:
    """ "rank 0's a.pt.trace.json, rank 2's b.pt.trace.json and 5 more": each trace by its rank and name."""
    names = [f"rank {rank.rank}'s {path.name}" if rank else path.name for path, rank in paths]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def traces_note(folder: str | os.PathLike[str], traces: list[Path]) -> str:
    """The note for a folder of several traces, of which a report reads the last by name: which trace it
    read and, where the traces say their ranks, which ranks' it did not, and that `kvtrace export` reads
    them all, each job's ranks one group. "The newest" the last is only when one worker wrote them all
    (names then differ by their time), so the note says the rule."""
    read = traces[-1]
    ranks = [(path, trace_rank(path)) for path in traces]
    if not any(rank for _, rank in ranks):
        return (
            f"{folder} holds {len(traces)} profiler traces: read the last by name, {read.name} (name a trace "
            "to read another)"
        )
    jobs = sorted({(rank.backend or "?", rank.world_size or 0) for _, rank in ranks if rank})
    shapes = "; ".join(f"{backend}, world size {world_size or '?'}" for backend, world_size in jobs)
    of = f"one distributed job ({shapes})" if len(jobs) == 1 else f"{len(jobs)} distributed jobs ({shapes})"
    unranked = sum(1 for _, rank in ranks if rank is None)
    beside = f", and {unranked} of no job" if unranked else ""
    ranked = len(traces) - unranked
    return (
        f"{folder} holds the profiler traces of {ranked} rank{'s' if ranked > 1 else ''} of {of}{beside}: "
        f"read {_named(ranks[-1:])} alone (the last by name); not read: {_named(ranks[:-1])}. A report reads "
        f"one trace: name another to read it, or `kvtrace export {shell_arg(folder)} -o DIR` to read every "
        "rank, each job's ranks one group (runs.group_id)"
    )


def snapshots_note(folder: str | os.PathLike[str], traces: list[Path], snapshots: list[Path]) -> str:
    """The note for a folder of traces that holds snapshot pickles too: a report reads one trace, so the
    snapshots are named as not read (a folder of snapshots alone is refused, naming one to pass), with the
    two ways to read them."""
    count = f"{len(snapshots)} snapshot pickle{'s' if len(snapshots) > 1 else ''}"
    names = _named([(path, None) for path in snapshots])
    held = (
        f"{folder} holds one profiler trace and {count}: read the trace, {traces[0].name}; not read: {names}"
        if len(traces) == 1
        else f"{folder} also holds {count}, not read: {names}"
    )
    return (
        f"{held}. A report reads one input: name a snapshot to read it, or "
        f"`kvtrace export {shell_arg(folder)} -o DIR` to read every input in the folder"
    )
