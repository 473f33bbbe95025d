"""Writing an output whole or not at all, and never through a link that someone else put there.

Every file the CLI writes (an `-o` page, the exports `report` puts into a run, a sweep's summary) is first
written to a temporary name in its own folder, then renamed over its path. A full disk, a killed process or
a Ctrl-C then leaves the old file as it was (and no 0-byte new one), and a reader never sees half a page.
The rename replaces whatever is at the path itself: a symbolic link there is replaced as a link, the file
it points to is left alone. Stdlib only, so the torch-free analyzers use it too.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["not_our_file", "replace_atomically"]


def _mode_for(target: Path) -> int:
    """The permission bits the new file gets: those of the regular file it replaces, else what a plain
    `open(..., "w")` would give (the temporary file is created 0600)."""
    try:
        info = os.lstat(target)
    except OSError:
        info = None
    if info is not None and stat.S_ISREG(info.st_mode):
        return stat.S_IMODE(info.st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def replace_atomically(target: Path) -> Iterator[BinaryIO]:
    """A binary file to write `target`'s new content into; when the `with` body ends without an exception
    it replaces `target` in one rename, otherwise it is removed and `target` is untouched."""
    # Hidden, and not named like the target: folder scans skip dot files, and TensorBoard reads any file
    # whose name holds "tfevents".
    fd, tmp_name = tempfile.mkstemp(prefix=".kvtrace-", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def not_our_file(path: Path, folder: bool = False) -> str | None:
    """Why kvtrace must not write at `path` inside a run (a symbolic link, or not a regular file, or for a
    `folder` not a real directory), else None. A run may come from anyone (a download, a colleague's
    archive): a link in it could aim kvtrace's own exports at any file the user can write."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if folder and not stat.S_ISDIR(info.st_mode):
        return "not a folder"
    if not folder and not stat.S_ISREG(info.st_mode):
        return "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
    return None
