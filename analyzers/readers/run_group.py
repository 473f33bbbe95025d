"""Reads a run group (one kvtrace run directory per rank of a torch.distributed job) rank by rank.

A group is recognised by its `rank-<r>/manifest.json` children alone (kvtrace.format.is_run_group): the
marker file rank 0 writes is read when present and never required, since rank 0 may be the rank that died.
A rank that raised or was killed still has a readable run (its manifest says how it ended); a rank whose
files cannot be read is named in the notes and left out, so the other ranks still report, and in
`RunGroup.unreadable`, which the commands print as errors (exit status 2). So is a folder
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
from kvtrace.format import GROUP_MARKER, LOCK_FILE, MANIFEST, RANK_DIR_PREFIX, rank_dirs
from kvtrace.json_reads import read_json_file

__all__ = ["RankRun", "RunGroup", "folders_left_out", "own_rank_folders", "read_run_group"]


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
    # One line per rank whose run could not be read (a damaged file, files without a manifest), naming the
    # file and the problem: the commands print each on stderr and exit 2, as `kvtrace export` does
    unreadable: list[str] = field(default_factory=list)


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
    left_out: list[str] = []  # why each rank was, for the one line said when none is left
    for rank, folder in rank_dirs(root):
        try:
            source = read_run_source(folder, progress=progress)
        except KvtraceError as exc:
            unreadable.append(rank)
            left_out.append(f"rank {rank} left out: {exc}")
            continue
        ranks.append(RankRun(rank, folder, source, source.meta.get("manifest") or {}))
    notes.extend(left_out)
    ranks, named = _own_ranks(ranks, notes)
    if not ranks:
        # Said with the first rank's reason (which file, what is wrong): "could not be read" alone sent the
        # user to read each rank's run in turn to learn it
        why = left_out or [note for note in notes if note.startswith("rank ")] or notes
        more = f" (and {len(why) - 1} more)" if len(why) > 1 else ""
        said = f": {why[0]}{more}" if why else ""
        raise KvtraceError(f"{root}: no rank of this run group could be read{said}")
    sizes = {int(r.manifest["world_size"]) for r in ranks if isinstance(r.manifest.get("world_size"), int)}
    if len(sizes) > 1:
        notes.append(f"the ranks disagree on the world size ({sorted(sizes)}): several jobs' runs are mixed")
    notes.extend(_apart_in_time(ranks))
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
            lacks = (
                f"holds {held} but no manifest.json, which record() writes before any other file: a partial "
                "copy, or its manifest was removed"
            )
            notes.append(f"rank {rank} left out: {RANK_DIR_PREFIX}{rank}/ {lacks}")
            left_out.append(f"rank {rank} left out: {root / f'{RANK_DIR_PREFIX}{rank}'}/ {lacks}")
        else:
            unrecorded.append(rank)
    if unrecorded:
        names = ", ".join(str(r) for r in unrecorded)
        notes.append(f"no run from rank {names}: it stopped before record() started, or wrote elsewhere")
    return RunGroup(root, ranks, world_size, marker, missing, notes, left_out)


def _apart_in_time(ranks: list[RankRun]) -> list[str]:
    """A note where one rank's run ended before another's started: one job's ranks run together, so the
    group's folders hold runs of different jobs (a rank's folder left over from an earlier one), whose KV
    summed is no one job's."""
    spans = []
    for run in ranks:
        started, ended = _said(run.manifest, "started_ns"), _said(run.manifest.get("ended") or {}, "t_ns")
        if started is not None and ended is not None:
            spans.append((run.rank, started, ended))
    for rank, _started, ended in spans:
        later = next(((other, start) for other, start, _ in spans if start > ended), None)
        if later is not None:
            gap = (later[1] - ended) / 1e9
            return [
                f"rank {rank}'s run ended {gap:,.1f} s before rank {later[0]}'s started: several jobs' runs "
                "are mixed, and their KV summed is no one job's"
            ]
    return []


def _said(manifest: dict[str, Any], key: str) -> int | None:
    value = manifest.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _own_ranks(ranks: list[RankRun], notes: list[str]) -> tuple[list[RankRun], set[int]]:
    """The runs `own_rank_folders` keeps, each under its rank, and the ranks a moved folder names; its
    notes on the folders moved or left out are added to `notes`."""
    kept, _left_out, folder_notes, named = own_rank_folders([(r.rank, r.path, r.manifest) for r in ranks])
    by_path = {run.path: run for run in ranks}
    notes.extend(folder_notes)
    return [
        RankRun(rank, path, by_path[path].source, by_path[path].manifest)
        for rank, path in sorted(kept.items())
    ], named


def own_rank_folders(
    folders: list[tuple[int, Path, dict[str, Any]]],
) -> tuple[dict[int, Path], dict[Path, str], list[str], set[int]]:
    """Which of a group's (folder rank, folder, manifest) are its ranks, from the manifests alone, so that
    `kvtrace export` groups exactly the folders the report sums.

    Each folder is read under the rank its manifest says (a run written outside a group says none, and is
    its folder's), below the world size it says, and no other folder's (the recorder writes `rank-<r>`;
    `rank-01` is another name for rank 1). A folder whose manifest says another rank is read as that rank
    when no folder holds it by name and no other claims it (renamed or swapped folders: the run is whole);
    a copy of a rank already held is left out. Returns the kept {rank: folder}, {left-out folder: why}, the
    group report's note for each folder moved or left out, and the ranks a moved folder names (its folder's
    and its manifest's), which are not missing unseen."""
    kept: dict[int, Path] = {}
    kept_manifests: dict[int, dict[str, Any]] = {}
    left_out: dict[Path, str] = {}
    notes: list[str] = []
    named: set[int] = set()
    moved: list[tuple[Path, int, int, int | None, dict[str, Any]]] = []
    # the recorder's own name first, so that a second name for the rank is the one left out
    for rank, path, manifest in sorted(
        folders, key=lambda f: (f[0], f[1].name != f"{RANK_DIR_PREFIX}{f[0]}")
    ):
        said, world_size = _said(manifest, "rank"), _said(manifest, "world_size")
        if said is not None and said != rank:
            moved.append((path, rank, said, world_size, manifest))
            continue
        if world_size is not None and rank >= world_size:
            left_out[path] = f"its manifest's world size is {world_size}, which has no rank {rank}"
        elif rank in kept:
            left_out[path] = f"{kept[rank].name}/ holds rank {rank} already" + _another_job(
                manifest, kept_manifests[rank], kept[rank]
            )
        else:
            kept[rank], kept_manifests[rank] = path, manifest
            continue
        notes.append(f"{path.name}/ left out: {left_out[path]}; its KV is not in the group's figures")
    claims = [said for _, _, said, _, _ in moved]
    for path, rank, said, world_size, manifest in moved:
        named.update((rank, said))
        of = f" of {world_size}" if world_size is not None else ""
        if said not in kept and claims.count(said) == 1 and 0 <= said < (world_size or said + 1):
            kept[said] = path
            notes.append(
                f"{path.name}/ read as rank {said}: its manifest says rank {said}{of}, and no other "
                "folder holds that rank (the group's folders were renamed or swapped)"
            )
            continue
        other = _another_job(manifest, kept_manifests[said], kept[said]) if said in kept else ""
        left_out[path] = f"its manifest says rank {said}{of}" + (other or " (a copy of that rank's run?)")
        notes.append(f"{path.name}/ left out: {left_out[path]}; its KV is not in the group's figures")
    return kept, left_out, notes, named


def _another_job(manifest: dict[str, Any], kept: dict[str, Any], kept_path: Path) -> str:
    """What to add where two folders' runs say the same rank: a copy of a run has its start time, a run of
    the rank started at another time is another job's (two jobs recorded at once: their ranks' times
    overlap, so `_apart_in_time` does not tell them). "" where the start times agree or are not said."""
    started, other = _said(manifest, "started_ns"), _said(kept, "started_ns")
    if started is None or other is None or started == other:
        return ""
    return (
        f", as {kept_path.name}/'s does, in a run started {abs(started - other) / 1e9:,.1f} s "
        f"{'after' if started > other else 'before'} it: several jobs' runs are mixed"
    )


def folders_left_out(group_dir: Path) -> dict[str, str]:
    """{rank folder's name: why} for each folder of the group at `group_dir` that `kvtrace report` leaves out
    of the group's figures (a copy of another rank's run, a second folder for a rank, a rank its world size
    lacks), so that `kvtrace export` leaves it out of the group too. Reads the manifests only; one that
    cannot be read is passed over here (reading that rank names it)."""
    folders = []
    for rank, folder in rank_dirs(group_dir):
        try:
            manifest = read_json_file(folder / MANIFEST, "corrupt manifest", encoding="utf-8-sig")
        except KvtraceError:
            continue
        folders.append((rank, folder, manifest if isinstance(manifest, dict) else {}))
    _kept, left_out, _notes, _named = own_rank_folders(folders)
    return {path.name: why for path, why in left_out.items()}


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
