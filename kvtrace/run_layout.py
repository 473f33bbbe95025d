"""Which folders are kvtrace runs: a run directory (a folder holding manifest.json) and a run group (one
run directory per rank of a torch.distributed job, `<group>/rank-<r>/`).

Part of the on-disk format (`kvtrace.format` re-exports every name here), kept apart because a command
asks it of every input before reading a byte: a snapshot's or a trace's report then loads none of the
format's event records (issue 11: start-up is most of a small snapshot's report). Stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"

# A run group: one run directory per rank of a torch.distributed job, `<group>/rank-<r>/`. The marker
# file is written by rank 0 and informative only: a folder with rank-<r>/manifest.json children is a
# group whether or not rank 0 lived to write it.
RANK_DIR_PREFIX = "rank-"
GROUP_MARKER = "group.json"
GROUP_FORMAT = "kvtrace-run-group"


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
