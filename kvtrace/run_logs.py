"""The recording's logs reaching their files: the KV events, memory samples and an engine's step and request
logs, flushed by the writer thread (`RunWriter`) or at the block's end, and the first write that failed,
which makes the run incomplete.

`Recording` inherits `RunLogs`; `_sample` runs at the end of every step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvtrace.json_writes import JsonlAppender

if TYPE_CHECKING:
    from kvtrace.kv_tracker import KvTracker
    from kvtrace.memory_samples import MemorySampler
    from kvtrace.step_ranges import StepRanges


class RunLogs:
    """Writes a recording's logs (a mixin of `Recording`, which sets these)."""

    tracker: KvTracker
    _clock: Callable[[], int]
    _ranges: StepRanges | None
    _events: JsonlAppender | None
    _samples: JsonlAppender | None
    _engine_logs: tuple[JsonlAppender, ...]
    _sampler: MemorySampler | None
    _flush_lock: threading.Lock
    _write_error: str | None
    _trace_error: str | None
    _trace_unwritten: bool
    event_count: int
    events_lost: int

    if TYPE_CHECKING:  # `RunManifest`'s, which `Recording` inherits too

        def _write_calls_begun(self) -> None: ...

    def _on_evict(self, layer: int, kv: str) -> None:
        if self._ranges is not None and self._ranges.active:
            name = f"kvtrace/evict L{layer} {kv}"
            self._ranges.push(name)  # a range per eviction, as Nsight users expect
            self._ranges.pop()

    def _flush(self) -> None:
        """Write what the tracker, the sampler and an engine hold, in one write per file; on the writer
        thread or this one. After a failed write (a full disk) nothing more is written: the lines are
        dropped and counted, and the block ends with a `RecordingError` naming the file."""
        with self._flush_lock:
            events, samples = self._events, self._samples
            if events is not None:
                # The tracker keeps its events as ready JSON lines; they reach the file in one write.
                lines = self.tracker.take_lines()
                if self._write_error is not None:
                    self.events_lost += len(lines)
                elif lines or events.buffered():
                    events.extend(lines)
                    count = events.buffered()
                    try:
                        events.flush()
                    except OSError as exc:
                        self._write_failed(events, exc)
                        # Lines a partial write put in the file whole are there; a cut one is lost.
                        self.event_count += events.lines_before_error
                        self.events_lost += count - events.lines_before_error
                    else:
                        self.event_count += count
            for log in (samples, *self._engine_logs) if samples is not None else self._engine_logs:
                if self._write_error is not None:
                    log.discard()
                    continue
                try:
                    log.flush()
                except OSError as exc:
                    self._write_failed(log, exc)
            self._write_calls_begun()

    def _add_engine_logs(self, *logs: JsonlAppender) -> None:
        """An engine's step and request logs, from here flushed with the others (on the writer thread every
        0.1 s): a step that hangs before the process is killed must not take the steps before it along.
        Only `_flush` flushes them, under its lock: two flushes of one appender at once could write its
        lines twice."""
        with self._flush_lock:
            self._engine_logs = (*self._engine_logs, *logs)

    def _remove_engine_logs(self, *logs: JsonlAppender) -> None:
        """Before the engine closes them: what is appended to a closed log is dropped, not written."""
        with self._flush_lock:
            self._engine_logs = tuple(log for log in self._engine_logs if log not in logs)

    def _write_failed(self, appender: JsonlAppender, exc: OSError) -> None:
        if self._write_error is None:
            self._write_error = f"{appender.path}: cannot write ({exc.strerror or exc})"
        appender.discard()

    def _sample(self, label: str, **extra: Any) -> None:
        samples, sampler = self._samples, self._sampler
        if samples is None or samples._fh.closed or sampler is None:
            return
        t_ns = self._clock()
        record = sampler.sample(label in ("start", "end"), t_ns / 1e9)
        # Set one by one, in this order (the line's keys): no keyword dict made per step
        record["t_ns"] = t_ns
        record["step"] = self.tracker.step
        record["phase"] = label
        if extra:
            record.update(extra)
        samples.append_owned(record)

    def _sample_host(self) -> None:
        """On the writer thread: the host's figures (and NVML's), as a sample of phase `host`."""
        sampler, samples = self._sampler, self._samples
        if sampler is None or samples is None:
            return
        t_ns = self._clock()
        record = sampler.sample_host(now=t_ns / 1e9)
        record.update(t_ns=t_ns, step=self.tracker.step, phase="host")
        samples.append_owned(record)

    def _clock_s(self) -> float:
        return self._clock() / 1e9

    def _trace_failed(self, message: str) -> None:
        # Not `_write_error`: the logs go on (their lines are whole without the trace), but a log that
        # fails after this is not the first file that could not be written, which the error names.
        self._trace_unwritten = True
        if self._write_error is None and self._trace_error is None:
            self._trace_error = message
