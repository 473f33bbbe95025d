"""The recorder's writer thread: every `FLUSH_INTERVAL_S` it has the recording turn its captured KV updates
into lines and write them, with the memory samples; every `HOST_INTERVAL_S` it has it read the host's
figures (RSS, CPU %, NVML). All of it off the model's thread.

Why a thread (issue 11): formatting a step's events, writing them and reading the host's figures (a
system call or a driver ioctl each, 5-60 µs between model steps) cost several µs per layer update when
done between model steps, on the thread that launches the model's work. Here they run while that thread
is inside torch ops that release the GIL (a CUDA sync, a CPU matmul). Not for nothing: every wake and
every call here that releases the GIL passes it back and forth with the model's thread, so the thread wakes
once per `FLUSH_INTERVAL_S` and does both there (`HOST_INTERVAL_S` is no shorter). The recording's `flush`
and `sample_host` are thread-safe (see `KvTracker` and `JsonlAppender`); this module only paces them and
stops them.

A failing flush (a full disk) is the recording's to report: it keeps the error and stops writing, and this
thread keeps running so that the lines made meanwhile are taken and dropped, not held in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvtrace.memory_samples import HOST_INTERVAL_S

FLUSH_INTERVAL_S = 0.1  # a killed process loses at most this much of its log


class RunWriter:
    """Calls `flush` every `FLUSH_INTERVAL_S` and `sample` (when given) every `HOST_INTERVAL_S`, on a daemon
    thread, until `stop()`."""

    def __init__(self, flush: Callable[[], None], sample: Callable[[], None] | None = None) -> None:
        self._flush = flush
        self._sample = sample
        self._flush_s = FLUSH_INTERVAL_S
        self._tick_s = min(self._flush_s, HOST_INTERVAL_S) if sample is not None else self._flush_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # an unexpected failure, reported at the end

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvtrace-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        clock = time.monotonic
        last_flush = last_sample = clock()
        while not self._stopping.wait(self._tick_s):
            now = clock()
            if self._sample is not None and now - last_sample >= HOST_INTERVAL_S:
                last_sample = now
                try:
                    self._sample()
                except BaseException as exc:  # a bug: the samples stop, the log goes on
                    self.error, self._sample = exc, None
            if now - last_flush >= self._flush_s:
                last_flush = now
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
