"""Writes torch.profiler's trace into the run's `profiler/` folder, and says when it could not.

torch's `tensorboard_trace_handler` names the file the same way, but on a full disk kineto only logs
"Failed to write to log file!", leaves a cut `<trace>.tmp` and returns as if the trace were written: the
run would go on to blame the next file that fails (the KV log, the manifest), with the disk still full of
the cut trace. Here the missing trace is named, and the cut file removed, its room given back to the rest.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtrace.errors import os_reason

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
        if why is None and not (path.is_file() and path.stat().st_size > 0):
            nearly_full = shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
            why = "No space left on device" if nearly_full else "torch.profiler did not write it"
        if why is not None:
            for cut in (path, path.with_name(path.name + ".tmp")):
                cut.unlink(missing_ok=True)
            failed(f"{path}: cannot write ({why})")

    return write
