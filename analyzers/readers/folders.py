"""The inputs a folder holds, found by one rule for every command.

`kvtrace export` (and `load_tables`, `kvtrace query` on a folder) reads every input below a folder;
`kvtrace report` and `diagnose`, handed a folder that is no run, name the shallowest one. Both search the
same way: hidden names are skipped; a run directory is an input (with the run directories inside it: a vLLM
engine's workers), never a folder searched for more; a regular file named `*.pt.trace.json[.gz]` or
`*.pickle` is an input (a named pipe would make the read wait forever). A folder holding the recorder's logs
but no manifest (a partial copy of a run) is a problem, not searched: its trace alone would pass for the run.

Symbolic links are followed (a `data -> /mnt/runs` link is how a user adds a folder), but each real folder,
known by its device and inode, is entered once: two `current -> .` links used to make the walk 2^40 paths
long. A folder that cannot be listed is not an error of the whole search: it is found as a problem of its
own, named by its path, and the search goes on.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from analyzers.readers.sources import describe_read_error, run_without_manifest
from kvtrace.format import (
    KV_EVENTS,
    MEMORY_SAMPLES,
    RUN_DIRS,
    WEIGHTS,
    is_run_dir,
    is_run_group,
    searched_for_runs,
)
from kvtrace.run_layout import GROUP_MARKER

__all__ = ["FolderSearch", "Found", "unreadable"]

_SEARCHED_SUFFIXES = (".pt.trace.json", ".pt.trace.json.gz", ".pickle")
# Names of files that may be a trace, snapshot or memory timeline under another name (HTA's `rank0.json.gz`,
# torch's `export_memory_timeline` output): not read from a folder (a config.json would pass for a trace),
# but named as left out, since `kvtrace report` and a named `kvtrace export` read them.
_MAYBE_INPUT_SUFFIXES = (".json", ".gz", ".pkl", ".raw")
LEFT_OUT_WHY = (
    "left out: in a folder only run directories, *.pt.trace.json[.gz] and *.pickle are read; name the file "
    "to export it"
)
# `kvtrace sweep --out OUT` writes OUT/sweep.json, a table of the runs it records in OUT/runs/
_SWEEP_TABLE = "sweep.json"
# The recorder's logs: a folder holding one but no manifest is a damaged run, found as a problem.
_RUN_LOGS = frozenset({KV_EVENTS, MEMORY_SAMPLES, WEIGHTS})
# What stat says of a name that is no input and no problem: a link to nothing, a loop of links.
_NOTHING_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


def unreadable(path: Path, exc: OSError) -> str | None:
    """The one line for a path that stat or listing refused, or None when nothing is there to read (a link
    to nothing or a loop of links, which the caller names as missing or passes over)."""
    if exc.errno in _NOTHING_THERE:
        return None
    return f"{path}: {describe_read_error(exc)}"


@dataclass(frozen=True)
class Found:
    """An input below the folder searched (`problem` None), or a folder below it that cannot be listed (or an
    entry that cannot be looked at), with the one line that says why."""

    path: Path  # the folder searched joined with the names below it, links as they were named
    problem: str | None = None


class FolderSearch:
    """Iterate the inputs below `folder` (itself included, when it is a run directory) as `Found`s.

    Depth-first in name order by default, as `kvtrace export` lists its inputs; `shallowest_first` searches
    level by level, so the first input found is the nearest. `max_folders` bounds the folders listed below
    `folder` (a mistaken `kvtrace report ~` answers in a moment); after the iteration `folders` is how many
    real folders below it were listed, each once, and `complete` whether every one was (False only when
    stopped at the bound). `left_out` lists the files passed over whose names say they may be inputs
    (`rank0.json.gz`, `memory_timeline.raw.gz`), so that a caller can say so.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        shallowest_first: bool = False,
        max_folders: int | None = None,
    ) -> None:
        self.root = Path(folder)
        self.shallowest_first = shallowest_first
        self.max_folders = max_folders
        self.folders = 0
        self.complete = True
        self.left_out: list[Path] = []

    def __iter__(self) -> Iterator[Found]:
        visited: set[tuple[int, int]] = set()
        # (path, inside a run): an entry still to look at; a folder's entries are added in name order
        pending: deque[tuple[Path, bool]] = deque()
        take = pending.popleft if self.shallowest_first else pending.pop
        try:
            root_stat = os.stat(self.root)
        except OSError as exc:
            yield Found(self.root, unreadable(self.root, exc) or f"{self.root}: no such file or directory")
            return
        visited.add((root_stat.st_dev, root_stat.st_ino))
        in_run = is_run_dir(self.root)
        if in_run:
            yield Found(self.root)
        refused = self._list(self.root, in_run, pending)
        if refused is not None:
            yield refused
        while pending:
            path, in_run = take()
            if in_run and path.name in RUN_DIRS:  # its trace and snapshots are read as part of the run
                continue
            try:
                entry = os.stat(path)
            except OSError as exc:
                problem = unreadable(path, exc)  # in a folder that can be listed but not searched
                if problem is not None:
                    yield Found(path, problem)
                continue
            if not stat.S_ISDIR(entry.st_mode):
                if not in_run and stat.S_ISREG(entry.st_mode):
                    if path.name.endswith(_SEARCHED_SUFFIXES):
                        yield Found(path)
                    elif _maybe_an_input(path):
                        self.left_out.append(path)
                continue
            if not searched_for_runs(path, in_run):  # a run's other folders hold its own files
                continue
            is_run = is_run_dir(path)
            real = (entry.st_dev, entry.st_ino)
            if real in visited:  # reached again through a link: searched already
                continue
            if self.max_folders is not None and self.folders >= self.max_folders:
                self.complete = False
                return
            visited.add(real)
            self.folders += 1
            if is_run:
                yield Found(path)
            refused = self._list(path, is_run, pending)
            if refused is not None:
                yield refused

    def _list(self, folder: Path, in_run: bool, pending: deque[tuple[Path, bool]]) -> Found | None:
        """Add `folder`'s entries to `pending` (a run's: only candidates for the runs inside it), or say why
        it cannot be listed."""
        try:
            with os.scandir(folder) as listing:
                names = sorted(entry.name for entry in listing)
        except OSError as exc:
            return Found(folder, unreadable(folder, exc) or f"{folder}: gone while it was searched")
        if not in_run and not _RUN_LOGS.isdisjoint(names):
            # a run whose manifest is gone: its trace alone is not the run (its KV log would go unread)
            partial = run_without_manifest(folder)
            if partial is not None:
                return Found(folder, partial)
        # hidden names (.git, .cache) hold no inputs; in a run, only runs are looked for, whatever their names
        names = [name for name in names if in_run or not name.startswith(".")]
        entries = [(folder / name, in_run) for name in names]
        pending.extend(entries if self.shallowest_first else reversed(entries))
        return None


def _maybe_an_input(path: Path) -> bool:
    """Whether a file a folder search passes over may be a trace, snapshot or timeline (not a run group's
    own group.json, nor `kvtrace sweep`'s table of its points, whose runs are read: the note said "name
    the file to export it" of a sweep.json that no reader takes)."""
    if path.name == GROUP_MARKER and is_run_group(path.parent):
        return False
    if path.name == _SWEEP_TABLE and (path.parent / "runs").is_dir():
        return False
    return path.name.endswith(_MAYBE_INPUT_SUFFIXES)
