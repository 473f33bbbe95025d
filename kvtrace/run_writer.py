"""The recorder's writer thread: every `FLUSH_INTERVAL_S` it has the recording turn its captured KV updates
into lines and write them, with the memory samples, off the model's thread.

Why a thread (issue 11): formatting a step's events and writing them cost several µs per layer update
when done between model steps, on the thread that launches the model's work. Here they run while that
thread is inside torch ops that release the GIL (a CUDA sync, a CPU matmul, a kernel launch), so on a GPU
they mostly cost nothing. The recording's own `flush` is thread-safe (see `KvTracker` and
`JsonlAppender`); this module only paces it and stops it.

A failing flush (a full disk) is the recording's to report: it keeps the error and stops writing, and
this thread keeps running so that the lines made meanwhile are taken and dropped, not held in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

FLUSH_INTERVAL_S = 0.1  # a killed process loses at most this much of its log


class RunWriter:
    """Calls `flush` every `interval_s` on a daemon thread until `stop()`."""

    def __init__(self, flush: Callable[[], None], interval_s: float | None = None) -> None:
        self._flush = flush
        self._interval_s = FLUSH_INTERVAL_S if interval_s is None else interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # an unexpected failure of `flush`, reported at the end

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvtrace-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self._flush()
            except BaseException as exc:  # a bug, not a write error (the flush keeps those)
                self.error = exc
                return

    def stop(self) -> None:
        """Stop after the flush in progress, if any; safe to call twice or before `start()`."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
