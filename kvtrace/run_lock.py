"""An exclusive lock on a run folder while a recording writes it, or on an export folder while an export
adds its part.

Two recordings into one folder at once (two processes with `overwrite=True`) would each delete the
other's files and write their own beside them: a run that silently mixes two processes. The lock is
`flock` on `.kvtrace.lock` inside the folder, taken without waiting: the second recording is refused at
its start, naming the holder's pid. The kernel drops the lock when its holder dies, so a killed recording
blocks nothing. Exports into one folder wait for each other instead (`acquire(wait=True)`): both would
take the same part number and remove each other's unfinished files. Where `fcntl` is missing (Windows)
there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path
from typing import IO

from kvtrace.errors import RecordingError
from kvtrace.format import LOCK_FILE

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


_PROBE_RETRIES = 20
_PID_CHARS = 32  # a recording writes its pid alone; more is not a pid


def holder(folder: Path) -> str | None:
    """Whether a recording holds `folder` now: its pid ("" before it is written), or None (none does, or
    it cannot be told). A reader probes with a shared lock, at once released; a recording starting in that
    instant retries (`acquire`)."""
    if fcntl is None:
        return None
    try:
        # Without waiting: a named pipe in the lock's place (a damaged or made-up run) would block the open
        # until a writer came, and a report of an interrupted run never ended.
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a pipe, device or folder: no recording's lock
        os.close(fd)
        return None
    with open(fd, encoding="utf-8", errors="replace") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = fh.read(_PID_CHARS).strip()
            return pid if pid.isdigit() else ""
        except OSError:
            return None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


class RunFolderBusy(Exception):
    """Another recording holds the folder; `pid` is the holder's when it has written it yet."""

    def __init__(self, pid: str | None) -> None:
        super().__init__(pid)
        self.pid = pid


class RunLock:
    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fh: IO[str] | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lock or raise RunFolderBusy (with `wait`: block until the holder releases it); OSError
        when the lock file cannot be made."""
        if fcntl is None or self._fh is not None:
            return
        tries = 0
        while True:
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while held
            try:
                fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                pid = fh.read().strip()
                fh.close()
                tries += 1
                if tries < _PROBE_RETRIES:  # a reader's `holder()` probe holds it for microseconds
                    time.sleep(0.01)
                    continue
                raise RunFolderBusy(pid if pid.isdigit() else None) from None
            # The holder before us may have unlinked the file between our open and our lock: a lock on
            # a file no longer at the path guards nothing, so take the one that is there now.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        """Remove the file, then unlock (in this order, see `acquire`); safe to call twice."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        fh.close()  # the lock goes with the last descriptor of it

    def forget(self) -> None:
        """In a forked child: the parent's lock is the parent's to release (an unlock here would drop it
        for both: they share the open file)."""
        self._fh = None


def lock_for_recording(folder: Path) -> RunLock:
    """`folder`'s lock, taken for a recording (or a removal of its run): a folder another recording is
    writing, or one that cannot take the lock file, is refused in one line, exit status 1."""
    lock = RunLock(folder)
    try:
        lock.acquire()
    except RunFolderBusy as busy:
        who = f"pid {busy.pid}" if busy.pid else "pid unknown"
        message = f"{folder}: another recording is writing this folder ({who})"
        raise RecordingError(message, exit_code=1) from None
    except OSError as exc:
        message = f"{folder / LOCK_FILE}: cannot write ({exc.strerror or exc})"
        raise RecordingError(message, exit_code=1) from None
    return lock
