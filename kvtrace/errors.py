"""The one exception type that the CLI turns into a one-line message and an exit status."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class KvtraceError(Exception):
    """A problem the user can fix (bad input file, impossible option): printed as one line.

    `exit_code` follows the usual CLI convention: 2 for bad input or usage, 1 for a failed run.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def file_in_the_way(path: Path, folder: bool = False) -> Path | None:
    """The file that stops `path` from being written: a parent of it that is a file (or, for a `folder`
    output, the path itself), else None."""
    candidates = [path, *path.parents] if folder else list(path.parents)
    return next((p for p in candidates if p.exists() and not p.is_dir()), None)


def cannot_write(path: Path, exc: OSError | None, verb: str = "write", folder: bool = False) -> KvtraceError:
    """The one-line error, exit status 1, for an output that cannot be written. When a file stands in the
    way, the OS says "File exists" or "Not a directory", which reads as if the output were there already:
    name the file instead."""
    blocker = file_in_the_way(path, folder)
    if blocker is None:
        why = (exc.strerror or str(exc)) if exc is not None else "unknown cause"
    elif blocker == path:
        why = "it is a file"
    else:
        why = f"a parent of the path is a file: {blocker}"
    return KvtraceError(f"{path}: cannot {verb} ({why})", exit_code=1)


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def refuse_special_file(path: str | os.PathLike[str]) -> None:
    """Refuse, before opening it, an input that is neither a regular file nor a folder: opening a named pipe
    waits for a writer (forever, when none comes) and a device reads without end. A missing path passes:
    its reader says so."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    for is_kind, kind in _SPECIAL_KINDS:
        if is_kind(mode):
            raise KvtraceError(f"{path}: {kind}, not a regular file; kvtrace reads files")
