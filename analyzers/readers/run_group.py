"""Reads a run group (one kvtrace run directory per rank of a torch.distributed job) rank by rank.

A group is recognised by its `rank-<r>/manifest.json` children alone (kvtrace.format.is_run_group): the
marker file rank 0 writes is read when present and never required, since rank 0 may be the rank that died.
A rank that raised or was killed still has a readable run (its manifest says how it ended); a rank whose
files cannot be read is named in the notes and left out, so the other ranks still report. So is a folder
whose manifest says a rank another folder holds (a copy of a rank's folder), a rank its own world size does
not have, or a second folder for a rank already read (`rank-01` beside `rank-1`): summed in, it would count
a rank's KV twice. A folder whose manifest says a rank no other folder holds (renamed or swapped folders)
is read as the rank its manifest says, with a note: its run is whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyzers.model import MemorySource
from analyzers.readers.sources import ProgressFn
from kvtrace.errors import KvtraceError
from kvtrace.format import GROUP_MARKER, LOCK_FILE, RANK_DIR_PREFIX, rank_dirs

__all__ = ["RankRun", "RunGroup", "read_run_group"]


@dataclass
class RankRun:
    """One rank's run, read but not yet attributed."""

    rank: int
    path: Path
    source: MemorySource
    manifest: dict[str, Any]

    @property
    def status(self) -> str:
        """How the rank's `record()` block ended: ok, exception, interrupted, or running (it died)."""
        return str((self.manifest.get("ended") or {}).get("status", "running"))


@dataclass
class RunGroup:
    path: Path
    ranks: list[RankRun]
    world_size: int | None  # from the ranks' manifests, else the marker
    marker: dict[str, Any] | None
    missing_ranks: list[int] = field(default_factory=list)  # below world_size, with no readable run
    notes: list[str] = field(default_factory=list)


def _read_marker(root: Path, notes: list[str]) -> dict[str, Any] | None:
    marker_path = root / GROUP_MARKER
    if not marker_path.is_file():
        return None
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, UTF-8 or a huge int
        notes.append(f"{marker_path}: unreadable group marker ignored ({exc.__class__.__name__})")
        return None
    return marker if isinstance(marker, dict) else None


def read_run_group(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> RunGroup:
    """Every readable rank of the group at `path`, in rank order; one line naming the group if none is."""
    from analyzers.readers.run_dir import read_run_source

    root = Path(path)
    notes: list[str] = []
    marker = _read_marker(root, notes)
    ranks: list[RankRun] = []
    unreadable: list[int] = []
    for rank, folder in rank_dirs(root):
        try:
            source = read_run_source(folder, progress=progress)
        except KvtraceError as exc:
            unreadable.append(rank)
            notes.append(f"rank {rank} left out: {exc}")
            continue
        ranks.append(RankRun(rank, folder, source, source.meta.get("manifest") or {}))
    ranks, named = _own_ranks(ranks, notes)
    if not ranks:
        raise KvtraceError(f"{root}: no rank of this run group could be read")
    sizes = {int(r.manifest["world_size"]) for r in ranks if isinstance(r.manifest.get("world_size"), int)}
    if len(sizes) > 1:
        notes.append(f"the ranks disagree on the world size ({sorted(sizes)}): several jobs' runs are mixed")
    world_size = max(sizes) if sizes else None
    if world_size is None and marker is not None and isinstance(marker.get("world_size"), int):
        world_size = int(marker["world_size"])
    present = {r.rank for r in ranks}
    missing = [r for r in range(world_size or 0) if r not in present]
    # a rank a moved folder's note names (its folder's, its manifest's) is not missing unseen, and its folder
    # has a manifest
    silent = [r for r in missing if r not in unreadable and r not in named]
    unrecorded = []
    for rank in silent:
        held = _files_without_manifest(root / f"{RANK_DIR_PREFIX}{rank}")
        if held:
            notes.append(
                f"rank {rank} left out: {RANK_DIR_PREFIX}{rank}/ holds {held} but no manifest.json, which "
                "record() writes before any other file: a partial copy, or its manifest was removed"
            )
        else:
            unrecorded.append(rank)
    if unrecorded:
        names = ", ".join(str(r) for r in unrecorded)
        notes.append(f"no run from rank {names}: it stopped before record() started, or wrote elsewhere")
    return RunGroup(root, ranks, world_size, marker, missing, notes)


def _said(manifest: dict[str, Any], key: str) -> int | None:
    value = manifest.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _own_ranks(ranks: list[RankRun], notes: list[str]) -> tuple[list[RankRun], set[int]]:
    """The ranks each read under the rank its manifest says (a run written outside a group says none, and is
    its folder's), below the world size it says, and no other folder's (the recorder writes `rank-<r>`;
    `rank-01` is another name for rank 1). A folder whose manifest says another rank is read as that rank
    when no folder holds it by name and no other claims it (renamed or swapped folders: the run is whole);
    a copy of a rank already held is left out. Each of these folders gets a note naming it; with them come
    the ranks the notes name (the folder's and its manifest's), which are not missing unseen."""
    kept: dict[int, RankRun] = {}
    named: set[int] = set()
    moved: list[tuple[RankRun, int, int | None]] = []
    # the recorder's own name first, so that a second name for the rank is the one left out
    for run in sorted(ranks, key=lambda r: (r.rank, r.path.name != f"{RANK_DIR_PREFIX}{r.rank}")):
        said, world_size = _said(run.manifest, "rank"), _said(run.manifest, "world_size")
        if said is not None and said != run.rank:
            moved.append((run, said, world_size))
            continue
        if world_size is not None and run.rank >= world_size:
            why = f"its manifest's world size is {world_size}, which has no rank {run.rank}"
        elif run.rank in kept:
            why = f"{kept[run.rank].path.name}/ holds rank {run.rank} already"
        else:
            kept[run.rank] = run
            continue
        notes.append(f"{run.path.name}/ left out: {why}; its KV is not in the group's figures")
    claims = [said for _, said, _ in moved]
    for run, said, world_size in moved:
        named.update((run.rank, said))
        of = f" of {world_size}" if world_size is not None else ""
        if said not in kept and claims.count(said) == 1 and 0 <= said < (world_size or said + 1):
            kept[said] = RankRun(said, run.path, run.source, run.manifest)
            notes.append(
                f"{run.path.name}/ read as rank {said}: its manifest says rank {said}{of}, and no other "
                "folder holds that rank (the group's folders were renamed or swapped)"
            )
            continue
        why = f"its manifest says rank {said}{of} (a copy of that rank's run?)"
        notes.append(f"{run.path.name}/ left out: {why}; its KV is not in the group's figures")
    return [kept[rank] for rank in sorted(kept)], named


def _files_without_manifest(folder: Path) -> str | None:
    """What a rank folder without a manifest holds ("kv_events.jsonl, profiler/ and 3 more"), None when it
    holds nothing but the recording's lock (its recording stopped before it wrote anything) or is absent."""
    try:
        names = sorted(
            f"{child.name}/" if child.is_dir() else child.name
            for child in folder.iterdir()
            if child.name != LOCK_FILE
        )
    except OSError:
        return None
    if not names:
        return None
    shown = ", ".join(names[:3])
    return f"{shown} and {len(names) - 3} more" if len(names) > 3 else shown
