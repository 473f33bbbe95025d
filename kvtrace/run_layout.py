"""Which folders are kvtrace runs: a run directory (a folder holding manifest.json) and a run group (one
run directory per rank of a torch.distributed job, `<group>/rank-<r>/`); and which folders a search for runs
looks in, one rule for every reader that looks (`kvtrace export`, `report` on a folder, TensorBoard's tab).

Part of the on-disk format (`kvtrace.format` re-exports every name here), kept apart because a command
asks it of every input before reading a byte: a snapshot's or a trace's report then loads none of the
format's event records (issue 11: start-up is most of a small snapshot's report). Stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"
PROFILER_DIR = "profiler"
SNAPSHOT_DIR = "snapshots"
# Written into a run by `kvtrace report` (and the demo), replaced when the run is recorded again.
DERIVED_DIRS = ("tb_scalars",)
# The folders a run owns: replacing a run removes them; a search for runs never looks in them (a long run's
# profiler/ holds thousands of trace files, none of them a run).
RUN_DIRS = (PROFILER_DIR, SNAPSHOT_DIR, *DERIVED_DIRS)
# The files of its own a run writes in each folder it owns, by name (fnmatch), as the readers take them. A
# run's manifest lists those of profiler/ and snapshots/; replacing a run removes them, and what its writers
# leave when killed (RUN_DIR_LEFTOVERS). Any other file in those folders is the user's, and stays.
RUN_DIR_FILES: dict[str, tuple[str, ...]] = {
    PROFILER_DIR: ("*.pt.trace.json", "*.pt.trace.json.gz"),
    SNAPSHOT_DIR: ("*.pickle",),
    "tb_scalars": ("events.out.tfevents.*",),
}
# kineto's unfinished trace, kvtrace's gzipped trace before its rename, an atomic write's temporary file
RUN_DIR_LEFTOVERS = ("*.pt.trace.json.tmp", "kvtrace-writing.*", ".kvtrace-*.tmp")

# A run group: one run directory per rank of a torch.distributed job, `<group>/rank-<r>/`. The marker
# file is written by rank 0 and informative only: a folder with rank-<r>/manifest.json children is a
# group whether or not rank 0 lived to write it.
RANK_DIR_PREFIX = "rank-"
GROUP_MARKER = "group.json"
GROUP_FORMAT = "kvtrace-run-group"


# `kvtrace export`'s runs table: every export writes a part of it (`analyzers.export_parts`).
EXPORT_RUNS_PARTS = "runs/part-*.parquet"


def holds_export(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is an export directory (Parquet tables): a run recorded there would mix its files with
    the tables, and the folder would be read as neither (the recorder asks without pyarrow)."""
    try:
        return any(Path(path).glob(EXPORT_RUNS_PARTS))
    except OSError:
        return False


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """A folder holding a manifest (one that is not a readable file is refused when read, not skipped)."""
    return os.path.lexists(Path(path) / MANIFEST)


def rank_dirs(path: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(rank, directory) of every `rank-<r>` child holding a manifest, in rank order."""
    root = Path(path)
    found: list[tuple[int, Path]] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return []
    for child in children:
        suffix = child.name[len(RANK_DIR_PREFIX) :]
        is_rank = child.name.startswith(RANK_DIR_PREFIX) and suffix.isascii() and suffix.isdigit()
        if is_rank and is_run_dir(child):  # a manifest that cannot be read is named when read, not skipped
            found.append((int(suffix), child))
    return sorted(found)


def is_run_group(path: str | os.PathLike[str]) -> bool:
    """A folder that is not itself a run and holds at least one rank run directory."""
    root = Path(path)
    return root.is_dir() and not is_run_dir(root) and bool(rank_dirs(root))


def searched_for_runs(folder: str | os.PathLike[str], parent_is_run: bool) -> bool:
    """Whether a search for runs looks in `folder`, met in a folder that is (`parent_is_run`) or is not a
    run. In a run, only the runs inside it (a vLLM engine's `worker-<rank>/`), never the run's own folders.
    Anywhere else, every folder but a hidden one (.git, .cache), at any depth and whatever its name: a
    folder named `profiler/` or `snapshots/` that is no run's may hold runs (TensorBoard's tab skipped those
    names at every depth, and lost them)."""
    path = Path(folder)
    if parent_is_run:
        return path.name not in RUN_DIRS and is_run_dir(path)
    return not path.name.startswith(".")
