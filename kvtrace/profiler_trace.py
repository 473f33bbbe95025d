"""Writes torch.profiler's trace into the run's `profiler/` folder, and says when it could not.

torch's `tensorboard_trace_handler` names the file the same way, but on a full disk kineto only logs
"Failed to write to log file!", leaves a cut `<trace>.tmp` and returns as if the trace were written: the
run would go on to blame the next file that fails (the KV log, the manifest), with the disk still full of
the cut trace. Here the missing trace is named, and the cut file removed, its room given back to the rest.

The profiler a recording runs is made here too (`make_profiler`), and started and stopped inside
`kineto_quiet`, which keeps kineto's own lines off the user's terminal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtrace.errors import os_reason

if TYPE_CHECKING:
    from kvtrace.options import RecordOptions

_NEARLY_FULL_BYTES = 1 << 20  # less free than this when a trace went unwritten: the disk filled


def trace_handler(folder: Path, use_gzip: bool, failed: Callable[[str], None]) -> Callable[[Any], None]:
    """An `on_trace_ready` for `torch.profiler.profile`; `failed("<file>: cannot write (<why>)")` when
    the trace did not reach its file."""

    def write(prof: Any) -> None:
        name = f"{socket.gethostname()}_{os.getpid()}.{time.time_ns()}.pt.trace.json"
        path = folder / (name + ".gz" if use_gzip else name)
        why: str | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
        except OSError as exc:  # gzip's own write, the folder
            why = os_reason(exc)
        except BaseException:  # Ctrl-C while it was written: a cut trace would read as a damaged one
            for cut in (path, path.with_name(path.name + ".tmp")):
                cut.unlink(missing_ok=True)
            raise
        if why is None and not (path.is_file() and path.stat().st_size > 0):
            nearly_full = shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
            why = "No space left on device" if nearly_full else "torch.profiler did not write it"
        if why is not None:
            for cut in (path, path.with_name(path.name + ".tmp")):
                cut.unlink(missing_ok=True)
            failed(f"{path}: cannot write ({why})")

    return write


def make_profiler(trace_dir: Path, options: RecordOptions, failed: Callable[[str], None]) -> Any:
    """The recording's `torch.profiler.profile`, its trace written into `trace_dir` (`failed` as in
    `trace_handler`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return profile(
        activities=activities,
        profile_memory=options.profile_memory,
        record_shapes=options.record_shapes,
        with_stack=options.with_stack,
        on_trace_ready=trace_handler(trace_dir, options.gzip_trace, failed),
    )


@contextlib.contextmanager
def kineto_quiet() -> Any:
    """Keep libkineto's `USDT: ... profiler_start/stop` lines off the user's terminal.

    They are written by C++ straight to file descriptor 2 at profiler start and stop (KINETO_LOG_LEVEL
    does not silence them on torch 2.13), so fd 2 goes to a temporary file for that moment and every
    other line is passed on to stderr unchanged.
    """
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (embedded interpreters): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(True) if not line.startswith(b"USDT:")]
            if kept:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(b"".join(kept).decode(errors="replace"))
                    sys.stderr.flush()
