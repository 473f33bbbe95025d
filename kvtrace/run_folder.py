"""The run folder a recording writes: made, cleared of an earlier run it replaces (`kvtrace.run_removal`),
refused where it holds what is not a run's; and the files a finished run lists in its manifest."""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path

from kvtrace import format as fmt
from kvtrace.errors import RecordingError, blocked_status, folder_blocked
from kvtrace.run_removal import check_run_removal


def make_run_folder(path: Path) -> bool:
    """Create `path` (and its parents); whether it was there already. A failure (a file of that name, a
    read-only or missing parent, a full disk) refuses the recording in one line."""
    existed = path.is_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        said = folder_blocked(path, "the run folder")
        if said is None:
            said = f"{path}: cannot create the run folder ({exc.strerror or exc})"
        raise RecordingError(said, exit_code=blocked_status(path, folder=True)) from None
    return existed


def clear_run_folder(path: Path, existed: bool, overwrite: bool) -> None:
    """Make the locked folder `path` ready for a new run: an earlier run's files removed (with
    `overwrite`; refused without), or refused where a folder that is not a run holds names a run writes,
    or an export's tables. Called under the run's lock: another recording may be replacing the folder
    right now."""
    replacing = (path / fmt.MANIFEST).exists()
    if replacing and not overwrite:
        raise RecordingError(f"{path}: already holds a kvtrace run (pass overwrite=True to replace it)")
    if not replacing:
        if existed:
            # Not a run: whatever is here is the user's. A run would write over these names, so refuse.
            clashes = [name for name in (*fmt.RUN_FILES, *fmt.RUN_DIRS) if os.path.lexists(path / name)]
            if clashes:
                raise RecordingError(
                    f"{path}: not a kvtrace run, but it holds {', '.join(clashes)}, which a run writes: "
                    "record into a new or empty folder"
                )
            if fmt.holds_export(path):
                raise RecordingError(
                    f"{path}: an export directory (Parquet tables), not a run's folder: record into a new "
                    "or empty folder"
                )
        return
    # Replacing a run: its old files go, so that no reader mixes two recordings (an old trace in profiler/
    # would otherwise sit beside the new one). Only the files the run owns, all looked at before any goes;
    # the manifest stays, to be written over.
    check_run_removal(path, with_manifest=False).remove()


def recorded_files(folder: Path) -> list[str]:
    """The files of the run in `folder`, as the manifest's `files` lists them: the names the recording
    writes, and in its own folders (profiler/, snapshots/) the files of the kinds it writes there. Anything
    else in the folder is the user's (notes, another tool's output, a file kept in profiler/ when the run
    was replaced): listed, it would be read as a file of the run, its deletion noted as one the figures
    lack, and the next overwrite would remove it."""
    names = [name for name in (fmt.MANIFEST, *fmt.RECORDED_FILES) if (folder / name).is_file()]
    for sub in fmt.RECORDED_DIRS:
        patterns = fmt.RUN_DIR_FILES[sub]
        try:
            with os.scandir(folder / sub) as entries:
                names.extend(
                    f"{sub}/{entry.name}"
                    for entry in entries
                    if entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)
                )
        except OSError:  # none written (no profiler, no CUDA)
            continue
    return sorted(names)


@contextlib.contextmanager
def written_at_start(path: Path) -> Iterator[None]:
    """A file the start writes: a failure (a full disk) refuses the recording in one line naming the file and
    the problem, not an OSError's traceback; `Recording._unmake` then removes what the start wrote."""
    try:
        yield
    except OSError as exc:
        raise RecordingError(f"{path}: cannot write ({exc.strerror or exc})", exit_code=1) from None
