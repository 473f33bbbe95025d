"""Open whatever file a user hands us, tell what it is, and say in one line what is wrong with a bad one.

Third-party inputs arrive plain or gzip-compressed, sometimes hundreds of MB, sometimes truncated by a
full disk or a killed job. Everything byte-level lives here so each reader sees one decompressed,
buffered stream: gzip is detected by its magic bytes (not the file name), progress is reported in bytes of
the file on disk (what a progress bar can total), and decompression errors become `KvtraceError`s that
name the file. Readers are imported lazily by `open_source` because they import this module. Walking a
JSON text one value at a time is `analyzers.readers.json_stream`'s.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from kvtrace.errors import (
    KvtraceError,
    link_problem,
    os_reason,
    refuse_special_file,
    refuse_unnamed_path,
    shell_arg,
)

if TYPE_CHECKING:
    from analyzers.model import MemorySource

__all__ = ["ProgressFn", "describe_read_error", "missing", "next_stage", "open_input", "open_source", "sniff"]

ProgressFn = Callable[[int, int], None]
"""progress(bytes_done, bytes_total), both counted in bytes of the file as stored on disk."""

STAGE_STEP = 1 << 16  # a later stage's progress call at most every 65,536 items (events, storages)


def next_stage(progress: ProgressFn | None, label: str, unit: str) -> ProgressFn | None:
    """The callback of a later stage of one input's reading (a long KV log's replay, then its join), whose
    `progress(done, total)` counts that stage's own items: the bar that drew the reading goes on in that
    stage, relabelled and from 0 (`kvtrace.commands.progress`), rather than sit at 100% while a third of
    the command runs; `unit`: what it counts. None where `progress` has no stages (a plain callback, or no
    bar)."""
    stage = getattr(progress, "stage", None)
    return stage(label, unit) if callable(stage) else None


GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
PARQUET_MAGIC = b"PAR1"
_BUFFER_BYTES = 256 << 10  # small enough to stay in the CPU's cache between the inflater and the reader
_PROGRESS_STEP = 4 << 20  # report at most every 4 MiB read: a callback per read would dominate


class _ProgressRaw(io.RawIOBase):
    """Raw stream over `inner` that reports how far into the on-disk file reading has got.

    Wrapped in an `io.BufferedReader`, so consumers (the C unpickler, the JSON walker) make C-level calls
    and this Python code runs once per 1 MiB buffer fill, not once per opcode.
    """

    def __init__(self, inner: IO[bytes], disk: IO[bytes], total: int, progress: ProgressFn | None) -> None:
        super().__init__()
        self._inner = inner
        self._disk = disk
        self._total = total
        self._progress = progress
        self._last_reported = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        if self._progress is not None:
            done = self._disk.tell()
            if done - self._last_reported >= _PROGRESS_STEP:
                self._last_reported = done
                self._progress(done, self._total)
        return int(count or 0)

    def report_start(self) -> None:
        if self._progress is not None:
            self._progress(0, self._total)

    def report_done(self) -> None:
        if self._progress is not None:
            self._progress(self._total, self._total)


def missing(path: str | os.PathLike[str]) -> str:
    """Why `path`, which does not exist as far as `Path.exists` says, cannot be opened: nothing there, a
    link to nothing, or a loop of links (both of which `exists` also calls missing)."""
    return f"{path}: {link_problem(path) or 'no such file or directory'}"


def _gzip_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt gzip stream raises. An `except` evaluates it only when something was
    raised: gzip is imported to read a gzipped input, not for every input."""
    import gzip

    return (EOFError, zlib.error, gzip.BadGzipFile)


def describe_read_error(exc: BaseException) -> str:
    """What a low-level decompression/read failure means for the user."""
    if isinstance(exc, EOFError):
        return "truncated: the data ends early (an interrupted copy or a killed writer?)"
    if isinstance(exc, _gzip_errors()[1:]):
        return f"corrupt gzip data ({exc})"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError):  # what the OS said, without "[Errno 5]"
        return f"cannot read ({os_reason(exc)})"
    return f"cannot read ({exc})"


@contextmanager
def open_input(
    path: str | os.PathLike[str], progress: ProgressFn | None = None
) -> Iterator[io.BufferedReader]:
    """A buffered binary stream of the file's content, gunzipped if it starts with the gzip magic.

    Read errors raised inside the `with` body (gzip truncation or corruption, I/O errors) are re-raised as
    `KvtraceError(f"{path}: ...")`; `KvtraceError`s pass through untouched.
    """
    name = str(path)
    refuse_unnamed_path(path)
    refuse_special_file(path)
    try:
        disk = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise KvtraceError(f"{name}: {describe_read_error(exc)}") from exc
    try:
        try:
            total = os.fstat(disk.fileno()).st_size
            magic = disk.read(2)
            disk.seek(0)
        except OSError as exc:  # the first read fails as later ones would (EIO: /proc/self/mem, a bad disk)
            raise KvtraceError(f"{name}: {describe_read_error(exc)}") from exc
        inner: IO[bytes] = disk
        if magic == GZIP_MAGIC:
            import gzip  # here: most inputs are plain, and gzip's import is ~0.5 ms of a small one's report

            inner = gzip.GzipFile(fileobj=disk, mode="rb")  # type: ignore[assignment]
        raw = _ProgressRaw(inner, disk, total, progress)
        raw.report_start()
        try:
            yield io.BufferedReader(raw, buffer_size=_BUFFER_BYTES)
        except (EOFError, OSError, zlib.error) as exc:
            raise KvtraceError(f"{name}: {describe_read_error(exc)}") from exc
        raw.report_done()
    finally:
        disk.close()


def _head(path: str | os.PathLike[str], size: int = 1 << 16) -> bytes:
    """The first `size` bytes of the (decompressed) content; a truncated gzip gives what it has."""
    with open_input(path) as stream:
        chunks: list[bytes] = []
        got = 0
        try:
            while got < size:
                chunk = stream.read1(size - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except _gzip_errors():
            if not chunks:
                raise
        return b"".join(chunks)


def sniff(path: str | os.PathLike[str]) -> str:
    """The kind of input: "directory", "snapshot", "chrome_trace" or "memory_timeline".

    Decided by content, never by extension: `.pickle` files are sometimes gzipped and Chrome traces are
    named `.json`, `.pt.trace.json`, `.json.gz` or nothing at all.
    """
    name = str(path)
    if Path(path).is_dir():
        return "directory"
    head = _head(path)
    if not head:
        raise KvtraceError(f"{name}: empty file")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "snapshot"
    if head[:3] == b"(dp" or head[:3] == b"}q\x00" or head[:2] == b"}(":  # a dict in pickle protocol 0 or 1
        return "snapshot"
    if head.startswith(ZIP_MAGIC):
        raise KvtraceError(f"{name}: a zip archive (torch.save checkpoint?), not a snapshot or trace")
    if head.startswith(PARQUET_MAGIC):
        raise KvtraceError(f"{name}: {_parquet_said(Path(path))}")
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        raise KvtraceError(f"{name}: only whitespace, no JSON or pickle data")
    if text[:1] == b"{":
        return "chrome_trace"
    if text[:1] == b"[":
        rest = text[1:].lstrip()
        # A list of lists is export_memory_timeline output; a list of objects is the Chrome
        # "JSON array" trace form; an empty list reads as a trace with no events.
        return "memory_timeline" if rest[:1] == b"[" else "chrome_trace"
    # A `.gz` that is not gzip (renamed, or decompressed in place by a tool that kept the name) says so
    compressed = not name.endswith(".gz") or _raw_magic(path) == GZIP_MAGIC
    plain = "" if compressed else "named .gz but not gzip-compressed; "
    what = "not a CUDA snapshot pickle, Chrome trace or memory timeline"
    raise KvtraceError(f"{name}: {plain}{what} (starts with {head[:8]!r})")


def _export_holding(path: Path) -> Path | None:
    """The kvtrace export `path` lies in, as one of its tables (`runs/`) or a table's part file, else None."""
    from kvtrace.format import holds_export

    return next((up for up in (path.parent, path.parent.parent) if holds_export(up)), None)


def _parquet_said(path: Path) -> str:
    """What a Parquet file given as an input is, and how its rows are read: with SQL."""
    root = _export_holding(path)
    if root is None:
        return (
            'a Parquet file, not a run, trace or snapshot; `kvtrace query DIR "SQL"` reads a kvtrace '
            "export's tables"
        )
    return (
        f"a Parquet part of the kvtrace export {root}, not a run, trace or snapshot: read it with "
        f'`kvtrace query {shell_arg(root)} "SQL"`'
    )


def _raw_magic(path: str | os.PathLike[str]) -> bytes:
    """The file's first two bytes on disk (gzip's magic where it is compressed)."""
    with open(path, "rb") as disk:
        return disk.read(2)


_TRACE_SUFFIXES = (".pt.trace.json", ".pt.trace.json.gz")


def runs_in(folder: Path) -> list[Path]:
    """The kvtrace runs directly inside `folder`, sorted by name: run directories and run groups (a folder
    of `rank-<r>` runs, which `kvtrace report` and `compare` read as one input)."""
    from kvtrace.format import is_run_dir, is_run_group

    return sorted(p for p in folder.iterdir() if p.is_dir() and (is_run_dir(p) or is_run_group(p)))


def profiler_traces_in(folder: Path) -> list[Path]:
    """torch.profiler traces (`*.pt.trace.json[.gz]`) directly inside `folder`, sorted by name: Kineto
    names them <worker>.<ns since the epoch>, so of one worker's the last is the newest, as
    `Run.profiler_traces` assumes. Traces of several workers (host_pid by default, or worker0, rank-34)
    sort by worker, not by time."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_TRACE_SUFFIXES))


def snapshots_in(folder: Path) -> list[Path]:
    """Snapshot pickles (`*.pickle`, not hidden) directly inside `folder`, sorted by name: the files besides
    its traces that `kvtrace export` reads from it (analyzers.readers.folders), which a report does not."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith(".pickle") and p.name[:1] != "."
    )


def classify_path(path: str | os.PathLike[str]) -> str:
    """What a user handed us, one branch per kind, so a new kind is one more line.

    "run" (a kvtrace run directory), "runs_folder" (a folder holding runs), "profiler_folder" (a folder
    of torch.profiler traces), or a file kind of `sniff`. Anything else raises a one-line `KvtraceError`.
    """
    refuse_unnamed_path(path)  # before pathlib reads "" as the current folder
    folder = Path(path)
    if not folder.is_dir():
        _refuse_a_runs_own_file(folder)
        return sniff(path)
    from kvtrace.format import is_run_dir

    if is_run_dir(folder):
        return "run"
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise KvtraceError(f"{folder}: {describe_read_error(exc)}") from None
    if not entries:
        raise KvtraceError(f"{folder}: empty folder, not a kvtrace run, trace or snapshot")
    if runs_in(folder):
        return "runs_folder"
    if profiler_traces_in(folder):
        return "profiler_folder"
    raise _no_input_in(folder)


def _refuse_a_runs_own_file(path: Path) -> None:
    """A run's own log or manifest handed over instead of its folder (`report runs/x/kv_events.jsonl`): it
    is no trace or snapshot of its own, and "corrupt JSON" would say nothing of what to pass. Its profiler
    trace and snapshots, which read on their own, are not among them."""
    if not path.name.endswith((".json", ".jsonl")) or path.name.endswith(".trace.json"):
        return  # a snapshot or a trace: nothing more imported to read one (the snapshot report's start-up)
    from kvtrace.format import (
        ENGINE_FILES,
        KV_EVENTS,
        MANIFEST,
        MEMORY_SAMPLES,
        MODEL_CONFIG,
        WEIGHTS,
        is_run_dir,
    )

    if path.name in (
        MANIFEST,
        KV_EVENTS,
        WEIGHTS,
        MEMORY_SAMPLES,
        MODEL_CONFIG,
        *ENGINE_FILES,
    ) and is_run_dir(path.parent):
        raise KvtraceError(
            f"{path}: a file of the kvtrace run {path.parent}, not a trace or snapshot: pass the run's folder"
        )


def run_without_manifest(folder: Path) -> str | None:
    """The one line for a folder holding a log the recorder writes (the KV log first) but no manifest (a
    partial copy), else None. Every command refuses it: its trace alone would be read as the whole run,
    without the KV events and samples the folder holds, and nothing would say so."""
    from kvtrace.format import KV_EVENTS, MANIFEST, MEMORY_SAMPLES, PROFILER_DIR, WEIGHTS, is_run_dir

    log = next((name for name in (KV_EVENTS, MEMORY_SAMPLES, WEIGHTS) if (folder / name).is_file()), None)
    if log is None or is_run_dir(folder):
        return None
    profiler = folder / PROFILER_DIR
    try:
        traces = profiler_traces_in(profiler) if profiler.is_dir() else []
    except OSError as exc:  # the missing manifest stays the news; the folder it could not search is said too
        trace = (
            f"; its {PROFILER_DIR}/ folder, which may hold a trace that reads on its own, cannot be "
            f"searched ({profiler}: {describe_read_error(exc)})"
        )
    else:
        trace = f"; its profiler trace reads on its own: pass {traces[-1]}" if traces else ""
    return (
        f"{folder}: not a kvtrace run: no {MANIFEST}, which its {log} cannot be read without (a partial "
        f"copy?){trace}"
    )


def _no_input_in(folder: Path) -> KvtraceError:
    """The one line for a folder that is no run and holds no runs or traces directly: a run whose manifest
    is gone (its profiler trace still reads on its own), or what lies deeper (`kvtrace export` searches
    folders all the way down; a report reads one input), or nothing of ours. An export directory is ours
    too: its tables are read by SQL, which is the way to name, not "holds no runs"."""
    from kvtrace.format import MANIFEST, holds_export

    if holds_export(folder):
        return KvtraceError(
            f"{folder}: a kvtrace export (Parquet tables), not a run, trace or snapshot: read it with "
            f'`kvtrace query {shell_arg(folder)} "SQL"`'
        )
    if holds_export(folder.parent):  # one of its tables (`runs/`)
        return KvtraceError(
            f"{folder}: a table of the kvtrace export {folder.parent} (Parquet), not a run, trace or "
            f'snapshot: read it with `kvtrace query {shell_arg(folder.parent)} "SQL"`'
        )
    partial = run_without_manifest(folder)
    if partial is not None:
        return KvtraceError(partial)
    below, searched_all, partial_below = _first_input_below(folder)
    if below is None and partial_below is not None:  # a partial copy of a run group: it holds no input
        return KvtraceError(partial_below)
    if below is not None:
        return KvtraceError(
            f"{folder}: a folder that is not a kvtrace run (no {MANIFEST}) and holds no runs or "
            f"torch.profiler traces directly, but it holds {below}: pass that "
            f"(`kvtrace export {shell_arg(folder)} -o DIR` reads every input in it)"
        )
    where = (
        "in it or below it" if searched_all else f"in it or the first {_SEARCHED_FOLDERS:,} folders below it"
    )
    return KvtraceError(
        f"{folder}: a folder that is not a kvtrace run (no {MANIFEST}) and holds no runs, torch.profiler "
        f"traces (*.pt.trace.json[.gz]) or snapshots (*.pickle) {where}; pass a run, a trace or a snapshot"
    )


_SEARCHED_FOLDERS = 10_000  # a mistaken `kvtrace report ~` answers in a moment, not after a whole walk


def _first_input_below(folder: Path) -> tuple[Path | None, bool, str | None]:
    """The shallowest run, trace or snapshot below `folder`, found as `kvtrace export` finds its inputs (one
    search: analyzers.readers.folders), whether every folder below was searched (at most `_SEARCHED_FOLDERS`
    real folders; one reached again through a link is not searched twice), and the line for the first run
    below whose manifest is gone (a run group copied without its ranks' manifests): where no input is found,
    that is the news, not "holds no runs", and its profiler trace is what reads. Folders that cannot be
    listed are passed over: this names an input to pass, it reads none."""
    from analyzers.readers.folders import FolderSearch

    search = FolderSearch(folder, shallowest_first=True, max_folders=_SEARCHED_FOLDERS)
    partial: str | None = None
    for item in search:
        if item.problem is None:
            return item.path, True, None
        if partial is None and run_without_manifest(item.path) is not None:
            partial = item.problem
    return None, search.complete, partial


def open_source(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    """Read any supported input into a `MemorySource`, choosing the reader by content."""
    kind = sniff(path)
    if kind == "directory":
        raise KvtraceError(f"{path}: a folder: use analyzers.report.load_source for folders")
    if kind == "snapshot":
        from analyzers.readers.snapshot import read_snapshot

        return read_snapshot(path, progress=progress)
    from analyzers.readers.chrome_trace import read_chrome_trace, read_memory_timeline

    if kind == "memory_timeline":
        return read_memory_timeline(path, progress=progress)
    source = read_chrome_trace(path, progress=progress)
    if source.meta.get("python_stacks") and source.devices:
        # Taken with_stack=True: each allocation gets the Python stack it ran under, so that attribution
        # finds the cache's update frames (KV) and the modules' weights, as it does for kvtrace's runs.
        from analyzers.readers.trace_stacks import attach_python_stacks

        source.meta["allocations_with_stack"] = attach_python_stacks(source, path)
    return source
