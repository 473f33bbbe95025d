"""What replacing or removing a run takes away, looked at whole before anything goes.

A run folder is the user's folder too: notes beside the run, a file of their own in `profiler/`, a
`profiler/` that is a link to a larger disk. Replacing a run (`overwrite=True`, `--overwrite`) or removing
one (a run group replaced, a sweep's old points) takes only the files the run owns: the names the format
gives its files, and in the folders a run owns (profiler/, snapshots/, tb_scalars/) the files of kvtrace's
own kinds (`run_layout.RUN_DIR_FILES`, and what its writers leave when killed) and those the manifest's
`files` lists there. Any other file stays, and so does its folder.

Everything is looked at first: a link where a run's folder goes (its files lie in another folder, which a
removal would empty), a folder where a run's file goes, a folder that cannot be listed or written refuses
the whole removal in one line naming the path, with nothing removed. A removal cut short half-way left the
old run's logs gone and the new one not started (a traceback, and a run neither old nor new).
Stdlib only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NoReturn

from kvtrace import format as fmt
from kvtrace.errors import KvtraceError, RecordingError, os_reason
from kvtrace.json_reads import read_json_file

__all__ = ["RunRemoval", "check_run_removal"]


@dataclass(frozen=True)
class RunRemoval:
    """The files of the run in `folder` that go (its manifest last, so that a removal cut short still reads
    as a run, which `overwrite` replaces) and the folders of its own then removed where left empty."""

    folder: Path
    files: tuple[Path, ...]
    folders: tuple[Path, ...]  # deepest first

    def remove(self, best_effort: bool = False) -> None:
        """Remove them. A failure (the folder changed since it was looked at) is one line, status 1; with
        `best_effort` (a failed start taking back what it wrote) the others go all the same."""
        for path in self.files:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                if not best_effort:
                    raise RecordingError(f"{path}: cannot remove ({os_reason(exc)})", exit_code=1) from None
        for folder in self.folders:
            with contextlib.suppress(OSError):  # not empty: it holds the user's files, and stays
                folder.rmdir()


def check_run_removal(folder: Path, with_manifest: bool = True) -> RunRemoval:
    """What removing the run in `folder` takes (`with_manifest`: its manifest too; a run replaced in place
    keeps it, to be written over), or a RecordingError naming the path that makes the removal unsafe or
    impossible. Nothing is removed here."""
    names = (*fmt.RUN_FILES, fmt.MANIFEST) if with_manifest else fmt.RUN_FILES
    files: list[Path] = []
    for name in names:
        path = folder / name
        info = _lstat(path)
        if info is not None and stat.S_ISDIR(info.st_mode):
            _refuse(path, "a folder where the run has a file of that name (not the run's to remove)")
        if info is not None:
            files.append(path)  # a link among them is removed itself, never what it points to
    listed = _listed_in_folders(folder)
    folders: list[Path] = []
    for name in fmt.RUN_DIRS:
        own_folder = folder / name
        info = _lstat(own_folder)
        if info is None:
            continue
        if stat.S_ISLNK(info.st_mode):
            _refuse(
                own_folder,
                f"a symbolic link where the run's {name}/ folder goes (kvtrace removes nothing through one)",
                "remove the link, or record into another folder",
            )
        if not stat.S_ISDIR(info.st_mode):
            _refuse(own_folder, f"not a folder, where the run's {name}/ folder goes (not the run's)")
        found, emptied = _own_files(own_folder, name, listed.get(name, []))
        files.extend(found)
        folders.extend([*emptied, own_folder])
    files = _manifest_last(files, folder / fmt.MANIFEST)
    for parent in sorted({path.parent for path in files}):
        if not os.access(parent, os.W_OK | os.X_OK):
            _refuse(parent, "cannot remove the run's files in it (permission denied)")
    return RunRemoval(folder, tuple(files), tuple(folders))


def _manifest_last(files: list[Path], manifest: Path) -> list[Path]:
    return [path for path in files if path != manifest] + [path for path in files if path == manifest]


def _refuse(path: Path, problem: str, fix: str = "") -> NoReturn:
    raise RecordingError(f"{path}: {problem}: nothing was removed" + (f"; {fix}" if fix else ""))


def _lstat(path: Path) -> os.stat_result | None:
    """The entry itself (a link not followed); None where there is none."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _refuse(path, f"cannot be looked at ({os_reason(exc)})")


def _own_files(own_folder: Path, name: str, listed: list[PurePosixPath]) -> tuple[list[Path], list[Path]]:
    """In the run's folder `own_folder` (`name`/): its files of kvtrace's kinds, and those the manifest
    lists (`listed`, below it, reached through real folders only); and the folders below it holding a
    listed file, deepest first, removed if the removal empties them."""
    patterns = (*fmt.RUN_DIR_FILES.get(name, ()), *fmt.RUN_DIR_LEFTOVERS)
    try:
        with os.scandir(own_folder) as entries:
            found = [
                own_folder / entry.name
                for entry in entries
                if not entry.is_dir(follow_symlinks=False)
                and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)
            ]
    except OSError as exc:
        _refuse(own_folder, f"cannot be listed ({os_reason(exc)})")
    below: set[Path] = set()
    for relative in listed:
        path, real = own_folder, True
        for part in relative.parts[:-1]:  # every folder on the way a real one: no link leads out of the run
            path = path / part
            info = _lstat(path)
            real = info is not None and stat.S_ISDIR(info.st_mode)
            if not real:
                break
            below.add(path)
        target = own_folder.joinpath(*relative.parts)
        info = _lstat(target) if real else None
        if info is not None and not stat.S_ISDIR(info.st_mode) and target not in found:
            found.append(target)
    return found, sorted(below, key=lambda p: len(p.parts), reverse=True)


def _listed_in_folders(folder: Path) -> dict[str, list[PurePosixPath]]:
    """The manifest's `files` entries inside the run's own folders, by folder, each relative to it. Only
    plain relative names below one of those folders count: anything else (written by hand, damaged, an
    unreadable manifest) names nothing the removal takes."""
    try:
        manifest = read_json_file(folder / fmt.MANIFEST, "corrupt manifest")
    except KvtraceError:
        return {}
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    listed: dict[str, list[PurePosixPath]] = {}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, str) or "\0" in entry or "\\" in entry:
            continue
        relative = PurePosixPath(entry)
        parts = relative.parts
        if relative.is_absolute() or len(parts) < 2 or parts[0] not in fmt.RUN_DIRS:
            continue
        if any(part in ("..", ".") for part in parts):
            continue
        listed.setdefault(parts[0], []).append(PurePosixPath(*parts[1:]))
    return listed
