"""SIGTERM while a recording runs: a scheduler's time limit (SLURM, Kubernetes), `docker stop`, `timeout`,
torchrun stopping its workers. Python's default dies at once, running no `finally`: the run's manifest
stays "running", its last steps and profiler trace are lost, and the analyzers can only guess why it died.

Where SIGTERM still has that default when the block starts (nobody's handler would be displaced) and the
block runs in the main thread (the only one Python runs handlers in), kvtrace ends the block as a Ctrl-C
would, writes the run's end, and then lets the process die of SIGTERM, as it would have: the exit status a
scheduler sees is the same. A SIGTERM while the block's end is being written waits for it to be written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from types import FrameType

__all__ = ["TermSignal", "Terminated"]


class Terminated(BaseException):
    """Raised in the block by SIGTERM. A BaseException, as KeyboardInterrupt is, so that the user's
    `except Exception` does not swallow it and go on running a process that was told to stop."""


class TermSignal:
    """kvtrace's SIGTERM handler for one recording's block: `install` at its start, `finishing` as its end
    begins, `restore` and `die_if_received` once the run's end is written."""

    def __init__(self) -> None:
        self.received_ns: int | None = None  # unix ns of the first SIGTERM, None while none came
        self._finishing = False
        self._installed = False

    def install(self) -> bool:
        """Take SIGTERM over for the block; False (nothing changed) off the main thread, or where a handler
        is already set (the user's, a server's, or ignored): that handler keeps it."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received_ns is None
        if first:
            self.received_ns = time.time_ns()
        if first and not self._finishing:
            raise Terminated("SIGTERM: the process was told to stop")

    def finishing(self) -> None:
        """From here a SIGTERM is noted, not raised: raised into the writing of the run's end, it loses it."""
        self._finishing = True

    def restore(self) -> None:
        """SIGTERM's default again, if the handler is still kvtrace's (the block may have set its own)."""
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handle:
            with contextlib.suppress(ValueError):  # off the main thread: a forked child's other threads
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._installed = False

    def die_if_received(self) -> None:
        """Die of SIGTERM, as the process would have without kvtrace, once the run's end is written."""
        if self.received_ns is None:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # To this thread: delivered before the call returns (os.kill may pick another thread to deliver to)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
