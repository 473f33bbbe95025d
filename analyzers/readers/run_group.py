"""Reads a run group (one kvtrace run directory per rank of a torch.distributed job) rank by rank.

A group is recognised by its `rank-<r>/manifest.json` children alone (kvtrace.format.is_run_group): the
marker file rank 0 writes is read when present and never required, since rank 0 may be the rank that died.
A rank that raised or was killed still has a readable run (its manifest says how it ended); a rank whose
files cannot be read is named in the notes and left out, so the other ranks still report.
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
from kvtrace.format import GROUP_MARKER, rank_dirs

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
    silent = [r for r in missing if r not in unreadable]
    if silent:
        names = ", ".join(str(r) for r in silent)
        notes.append(f"no run from rank {names}: it stopped before record() started, or wrote elsewhere")
    return RunGroup(root, ranks, world_size, marker, missing, notes)
