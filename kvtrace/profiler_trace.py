"""Writes torch.profiler's trace into the run's `profiler/` folder, and says when it could not.

torch's `tensorboard_trace_handler` names the file the same way, but on a full disk kineto only logs
"Failed to write to log file!", leaves a cut `<trace>.tmp` and returns as if the trace were written: the
run would go on to blame the next file that fails (the KV log, the manifest), with the disk still full of
the cut trace. Here the missing trace is named, and the cut file emptied and removed, its room given back to
the rest (kineto still holds the file it failed to write open: removing it alone frees nothing). torch
takes the trace's name as UTF-8 only, so a run folder whose name is not (`os.fsdecode(b"run\\xff")`) has its
trace written under a UTF-8 name and renamed into place.

The profiler a recording runs is made here too (`make_profiler`), and started and stopped inside
`kineto_quiet`, which keeps kineto's own lines off the user's terminal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtrace.errors import os_reason

try:
    import resource
except ImportError:  # Windows: no file size limit to name
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from kvtrace.options import RecordOptions

_NEARLY_FULL_BYTES = 1 << 20  # less free than this when a trace went unwritten: the disk filled


def trace_handler(folder: Path, use_gzip: bool, failed: Callable[[str], None]) -> Callable[[Any], None]:
    """An `on_trace_ready` for `torch.profiler.profile`; `failed("<file>: cannot write (<why>)")` when
    the trace did not reach its file."""

    def write(prof: Any) -> None:
        name = f"{socket.gethostname()}_{os.getpid()}.{time.time_ns()}.pt.trace.json"
        path = folder / (name + ".gz" if use_gzip else name)
        written = path  # where torch writes it: `path`, or a name beside it (`_utf8_detour`)
        why: str | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _utf8_detour(path) as (written, torch_path):
                prof.export_chrome_trace(torch_path)
                if written != path and written.is_file() and written.stat().st_size > 0:
                    os.replace(written, path)
                    written = path
        except OSError as exc:  # gzip's own write, the folder, the detour's link
            why = os_reason(exc)
        except Exception as exc:  # torch refused to write it: the trace is lost, the block did not raise
            said = str(exc).splitlines()
            why = f"{type(exc).__name__}: {said[0]}" if said else type(exc).__name__
        except BaseException:  # Ctrl-C while it was written: a cut trace would read as a damaged one
            _remove_cut(written)
            raise
        if why is None and not (written.is_file() and written.stat().st_size > 0):
            why = _why_unwritten(written)
        if why is not None:
            _remove_cut(written)
            failed(f"{path}: cannot write ({why})")

    return write


def _utf8_text(path: str) -> bool:
    """Whether torch's C++ can take `path`: pybind11 encodes a str as strict UTF-8, which a name that is not
    UTF-8 on disk (read by Python as lone surrogates, `os.fsdecode(b"run\\xff")`) fails with a TypeError."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def _utf8_detour(path: Path) -> Iterator[tuple[Path, str]]:
    """Yields (where the trace lands, the name to give torch). For a gzipped trace, a name beside `path`
    that no reader takes, renamed into place once whole. For a path that is not UTF-8 text: a UTF-8
    name in the same folder, reached through a symbolic link to that folder in a temporary folder of its
    own, so that the trace is written on the run's own disk and then renamed into place with Python's os
    calls, which take any name the file system does."""
    gzipped = path.name.endswith(".gz")  # torch gzips by the name's end
    suffix = ".json.gz" if gzipped else ".json"
    # Not a `*.pt.trace.json` name: left behind by a killed process, no reader takes it for a trace.
    written = path.with_name(f"kvtrace-writing.{os.getpid()}.{time.time_ns()}{suffix}")
    if _utf8_text(str(path)):
        # torch gzips straight into the name it is given (seconds on a long run, the block's slowest end):
        # a process killed then would leave a cut `.pt.trace.json.gz` that every reader refuses, the whole
        # run with it. Kineto writes a plain trace under `.tmp` and renames it itself.
        yield (written, str(written)) if gzipped else (path, str(path))
        return
    import tempfile

    links = tempfile.mkdtemp(prefix="kvtrace-trace-")
    link = os.path.join(links, "profiler")
    try:
        if not _utf8_text(link):  # TMPDIR's own name is not UTF-8 either
            said = f"torch.profiler takes UTF-8 names only; the temporary folder {links!r} is not one"
            raise OSError(errno.EILSEQ, said)
        os.symlink(os.path.abspath(path.parent), link)
        yield written, os.path.join(link, written.name)
    finally:
        with contextlib.suppress(OSError):  # the link and its folder, never the folder it leads to
            os.unlink(link)
        with contextlib.suppress(OSError):
            os.rmdir(links)


def _why_unwritten(path: Path) -> str:
    """Why kineto left `path` unwritten, which it does not say: a full disk, or a file size limit
    (RLIMIT_FSIZE) that its temporary file reached."""
    if shutil.disk_usage(path.parent).free < _NEARLY_FULL_BYTES:
        return "No space left on device"
    tmp = path.with_name(path.name + ".tmp")
    if resource is not None and tmp.is_file():
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and tmp.stat().st_size >= limit:
            return "File too large"
    return "torch.profiler did not write it"


def _remove_cut(path: Path) -> None:
    """Remove the cut trace and kineto's temporary file, emptied first: kineto still holds the one it failed
    to write open, so unlinking alone would give none of its room back to the logs written next."""
    for cut in (path, path.with_name(path.name + ".tmp")):
        with contextlib.suppress(OSError):
            os.truncate(cut, 0)
        cut.unlink(missing_ok=True)


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
def kineto_quiet(trace_unwritten: Callable[[], bool] = lambda: False) -> Any:
    """Keep libkineto's `USDT: ... profiler_start/stop` lines off the user's terminal, and its
    `ERROR:... Failed to write to log file!` when `trace_unwritten()` says, as the block ends, that kvtrace's
    own error names the trace it could not write (README: every error is one line).

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
            said = trace_unwritten()
            kept = [line for line in captured.read().splitlines(True) if not _kinetos(line, said)]
            if kept:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(b"".join(kept).decode(errors="replace"))
                    sys.stderr.flush()


def _kinetos(line: bytes, trace_unwritten: bool) -> bool:
    """kineto's line at profiler start or stop; or, where kvtrace's own error names the trace
    (`trace_unwritten`), its line on the trace it could not write (`ERROR:... output_json.cpp:977] ...`)."""
    if line.startswith(b"USDT:"):
        return True
    failed = line.startswith(b"ERROR:") and line.rstrip().endswith(b"] Failed to write to log file!")
    return trace_unwritten and failed
