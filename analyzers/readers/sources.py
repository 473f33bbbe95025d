"""Open whatever file a user hands us, tell what it is, and say in one line what is wrong with a bad one.

Third-party inputs arrive plain or gzip-compressed, sometimes hundreds of MB, sometimes truncated by a
full disk or a killed job. Everything byte-level lives here so each reader sees one decompressed,
buffered stream: gzip is detected by its magic bytes (not the file name), progress is reported in bytes of
the file on disk (what a progress bar can total), and decompression errors become `KvtraceError`s that
name the file. Readers are imported lazily by `open_source` because they import this module.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from analyzers.readers.unescaped_names import repair_event
from kvtrace.errors import (
    KvtraceError,
    link_problem,
    os_reason,
    refuse_special_file,
    refuse_unnamed_path,
    too_long_integer,
)

if TYPE_CHECKING:
    from analyzers.model import MemorySource

__all__ = ["JsonStream", "ProgressFn", "describe_read_error", "missing", "open_input", "open_source", "sniff"]

ProgressFn = Callable[[int, int], None]
"""progress(bytes_done, bytes_total), both counted in bytes of the file as stored on disk."""

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
_BUFFER_BYTES = 256 << 10  # small enough to stay in the CPU's cache between the inflater and the reader
_PROGRESS_STEP = 4 << 20  # report at most every 4 MiB read: a callback per read would dominate
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_CHUNK_BYTES = 1 << 20
_LOOKAHEAD = 64  # chars that must follow a decoded value, so a number cut by a chunk edge is not misread
_MAX_VALUE_CHARS = 256 << 20  # one JSON value; a hostile one costs ~5x this in memory before it is refused
_KINETO_OPEN = "{\n    "
_KINETO_SEP = "\n  },\n  {"
_KINETO_CLOSE = "\n  }"
_KINETO_NEXT = "\n  {"


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


def _whole_events(text: str, start: int, end: int, count: int) -> bool:
    """Whether text[start:end], found by layout, really is `count` whole Kineto-style events: one
    closing brace at event indentation each, joined by separators only, braces and brackets balanced.
    Braces inside strings or a lost comma make it fail safe (the events are then decoded)."""
    return (
        text.count(_KINETO_CLOSE, start, end) == count
        and text.count(_KINETO_NEXT, start, end) == count - 1
        and text.count("{", start, end) == text.count("}", start, end)
        and text.count("[", start, end) == text.count("]", start, end)
    )


def missing(path: str | os.PathLike[str]) -> str:
    """Why `path`, which does not exist as far as `Path.exists` says, cannot be opened: nothing there, a
    link to nothing, or a loop of links (both of which `exists` also calls missing)."""
    return f"{path}: {link_problem(path) or 'no such file or directory'}"


def describe_read_error(exc: BaseException) -> str:
    """What a low-level decompression/read failure means for the user."""
    if isinstance(exc, EOFError):
        return "truncated: the data ends early (an interrupted copy or a killed writer?)"
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
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
        inner: IO[bytes] = gzip.GzipFile(fileobj=disk, mode="rb") if magic == GZIP_MAGIC else disk  # type: ignore[assignment]
        raw = _ProgressRaw(inner, disk, total, progress)
        raw.report_start()
        try:
            yield io.BufferedReader(raw, buffer_size=_BUFFER_BYTES)
        except (EOFError, OSError, zlib.error) as exc:
            raise KvtraceError(f"{name}: {describe_read_error(exc)}") from exc
        raw.report_done()
    finally:
        disk.close()


class JsonStream:
    """One JSON value at a time from a byte stream, holding only a window of the text.

    Chrome traces reach gigabytes; `json.load` would hold every event as a dict. This walks arrays
    element by element with `json.JSONDecoder.raw_decode` (C speed) over a sliding window, so memory
    stays flat however long the array is. A value cut by the window's edge is retried after reading more;
    a decode error anywhere else is corruption and is reported at once, without reading the rest.
    """

    def __init__(self, binary: IO[bytes], path: str) -> None:
        self._binary = binary
        self._path = path
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.unescaped_names: Counter[str] = Counter()  # names read with their quotes escaped, per name

    def error(self, what: str) -> KvtraceError:
        return KvtraceError(f"{self._path}: {what}")

    def _fill(self) -> None:
        # Read at least as much as is pending, so one huge value costs O(n log n), not O(n^2).
        want = max(_CHUNK_BYTES, len(self.buf) - self.pos)
        data = self._binary.read(want)
        try:
            text = self._utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise self.error(f"not UTF-8 text ({exc.reason})") from None
        self.eof = not data
        self.buf = self.buf[self.pos :] + text
        self.pos = 0

    def peek(self) -> str:
        """The next non-whitespace character without consuming it; "" at the end of the input."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self._fill()

    def expect(self, allowed: str, where: str) -> str:
        char = self.peek()
        if not char:
            raise self.error(f"truncated: the JSON ends inside {where}")
        if char not in allowed:
            raise self.error(f"corrupt JSON: {char!r} at {where}, expected one of {allowed!r}")
        self.pos += 1
        return char

    def value(self, where: str) -> Any:
        self.peek()
        while True:
            try:
                obj, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # Near the window's end the value may just continue in the next chunk; at the end of
                # the input, only an error at the very end (or an open string) means truncation.
                edge = len(self.buf.rstrip()) if self.eof else len(self.buf) - _LOOKAHEAD
                cut = exc.pos >= edge or exc.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    what = "truncated: the JSON ends" if self.eof and cut else f"corrupt JSON ({exc.msg})"
                    raise self.error(f"{what} inside {where}") from None
                if len(self.buf) - self.pos > _MAX_VALUE_CHARS:
                    raise self.error(f"corrupt JSON: one value in {where} exceeds 256 MiB") from None
                self._fill()
                continue
            except ValueError:  # not a JSONDecodeError: CPython's limit on the digits of an int
                raise self.error(f"corrupt JSON: {too_long_integer()} inside {where}") from None
            except RecursionError:  # the C decoder's depth limit (~1,000 levels): of this file, not the run
                raise self.error(f"JSON nested too deeply to read inside {where}") from None
            if end > len(self.buf) - _LOOKAHEAD and not self.eof:
                self._fill()
                continue
            self.pos = end
            return obj

    def each_element(
        self,
        where: str,
        on_element: Callable[[Any], None],
        needles: tuple[str, ...] | None = None,
        read_run: Callable[[str, int, int], int] | None = None,
    ) -> int:
        """Call `on_element` with each element of the array that starts here; return how many were
        skipped undecoded.

        With `needles`, runs of elements laid out the way Kineto writes events ("{\\n    " ... "\\n  }"
        separated by ",\\n  ") that contain no needle and whose braces and brackets balance are skipped
        undecoded, often a whole window at once: most events of a big trace are kernels and ops we do
        not keep. Raw newlines cannot occur inside JSON strings, so that separator is always structure.
        The price: damage inside an event we skip (garbage between its fields) goes unnoticed; a lost
        separator, unbalanced braces, truncation and gzip CRC errors are still reported.

        With `read_run` too, a Kineto-layout element holding a needle is first offered to
        `read_run(buf, pos, limit)`, which may take it and the elements after it without decoding (it must
        take only whole elements that are each followed by a separator before `limit`) and returns where
        the next element starts, or `pos` to leave the element to the JSON decoder.
        """
        self.expect("[", where)
        if self.peek() == "]":
            self.pos += 1
            return 0
        skipped = 0
        scan = self._decoder.scan_once  # type: ignore[attr-defined]
        whitespace = _WHITESPACE.match
        while True:
            buf, pos = self.buf, self.pos
            limit = len(buf) - _LOOKAHEAD
            needle_at = -1  # nearest needle at or after pos (len(buf): none in this window)
            next_needle = [-1] * len(needles or ())
            bulk_from = pos  # after a failed bulk skip, skip one element at a time up to here
            while True:  # fast path: whole elements well inside the window
                pos = whitespace(buf, pos).end()  # type: ignore[union-attr]
                if pos >= limit:
                    break
                if needles is not None and buf.startswith(_KINETO_OPEN, pos):
                    if needle_at < pos:  # each needle's next position is cached: one pass per window
                        for index, needle in enumerate(needles):
                            if next_needle[index] < pos:
                                found = buf.find(needle, pos)
                                next_needle[index] = found if found >= 0 else len(buf)
                        needle_at = min(next_needle)
                    stop = min(needle_at, limit)
                    last_sep = buf.rfind(_KINETO_SEP, pos, stop)
                    if last_sep > pos and pos >= bulk_from:
                        run = buf.count(_KINETO_SEP, pos, last_sep + len(_KINETO_SEP))
                        if _whole_events(buf, pos, last_sep + 4, run):
                            skipped += run
                            pos = last_sep + 5  # past "}," of the last skipped element
                            continue
                    if last_sep > pos:
                        bulk_from = last_sep
                        first_sep = buf.find(_KINETO_SEP, pos, stop)
                        if _whole_events(buf, pos, first_sep + 4, 1):
                            skipped += 1
                            pos = first_sep + 5
                            continue
                    if read_run is not None and needle_at < limit:
                        after_run = read_run(buf, pos, limit)
                        if after_run > pos:
                            pos = after_run
                            continue
                try:
                    obj, end = scan(buf, pos)
                except (StopIteration, ValueError, RecursionError):  # JSONDecodeError, too many digits
                    break  # let the slow path decide: cut by the window's edge, corrupt, or too deep
                after = whitespace(buf, end).end()  # type: ignore[union-attr]
                if after >= limit:
                    break
                on_element(obj)
                if buf[after] == "]":
                    self.pos = after + 1
                    return skipped
                if buf[after] != ",":
                    self.pos = after
                    raise self.error(f"corrupt JSON: {buf[after]!r} in {where}, expected ',' or ']'")
                pos = after + 1
            self.pos = pos
            # Slow path for the element at the window's edge: decode it with refills.
            on_element(self._element(where))
            if self.expect(",]", where) == "]":
                return skipped

    def _element(self, where: str) -> Any:
        """The array element here; one that does not decode is read with its name's quotes escaped if it is
        a whole Kineto-layout event whose name torch wrote unescaped (`unescaped_names`), else reported."""
        try:
            return self.value(where)
        except KvtraceError:
            if not self.buf.startswith(_KINETO_OPEN, self.pos):
                raise
            close = self.buf.find(_KINETO_CLOSE, self.pos)
            while close < 0 and not self.eof and len(self.buf) - self.pos <= _MAX_VALUE_CHARS:
                self._fill()
                close = self.buf.find(_KINETO_CLOSE, self.pos)
            end = close + len(_KINETO_CLOSE)
            repaired = repair_event(self.buf[self.pos : end]) if close >= 0 else None
            if repaired is None:
                raise
            self.unescaped_names.update(repaired[1])
            self.pos = end
            return repaired[0]

    def end(self) -> None:
        if self.peek():
            raise self.error("corrupt JSON: extra data after the top-level value")


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
        except (EOFError, zlib.error, gzip.BadGzipFile):
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
    raise KvtraceError(
        f"{name}: not a CUDA snapshot pickle, Chrome trace or memory timeline (starts with {head[:8]!r})"
    )


_TRACE_SUFFIXES = (".pt.trace.json", ".pt.trace.json.gz")


def runs_in(folder: Path) -> list[Path]:
    """The kvtrace run directories directly inside `folder`, sorted by name."""
    from kvtrace.format import is_run_dir

    return sorted(p for p in folder.iterdir() if p.is_dir() and is_run_dir(p))


def profiler_traces_in(folder: Path) -> list[Path]:
    """torch.profiler traces (`*.pt.trace.json[.gz]`) directly inside `folder`, sorted by name: Kineto
    names them <worker>.<ns since the epoch>, so of one worker's the last is the newest, as
    `Run.profiler_traces` assumes. Traces of several workers (host_pid by default, or worker0, rank-34)
    sort by worker, not by time."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_TRACE_SUFFIXES))


def classify_path(path: str | os.PathLike[str]) -> str:
    """What a user handed us, one branch per kind, so a new kind is one more line.

    "run" (a kvtrace run directory), "runs_folder" (a folder holding runs), "profiler_folder" (a folder
    of torch.profiler traces), or a file kind of `sniff`. Anything else raises a one-line `KvtraceError`.
    """
    refuse_unnamed_path(path)  # before pathlib reads "" as the current folder
    folder = Path(path)
    if not folder.is_dir():
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
    folders all the way down; a report reads one input), or nothing of ours."""
    from kvtrace.format import MANIFEST

    partial = run_without_manifest(folder)
    if partial is not None:
        return KvtraceError(partial)
    below, searched_all = _first_input_below(folder)
    if below is not None:
        return KvtraceError(
            f"{folder}: a folder that is not a kvtrace run (no {MANIFEST}) and holds no runs or "
            f"torch.profiler traces directly, but it holds {below}: pass that (`kvtrace export {folder} -o "
            "DIR` reads every input in it)"
        )
    where = (
        "in it or below it" if searched_all else f"in it or the first {_SEARCHED_FOLDERS:,} folders below it"
    )
    return KvtraceError(
        f"{folder}: a folder that is not a kvtrace run (no {MANIFEST}) and holds no runs, torch.profiler "
        f"traces (*.pt.trace.json[.gz]) or snapshots (*.pickle) {where}; pass a run, a trace or a snapshot"
    )


_SEARCHED_FOLDERS = 10_000  # a mistaken `kvtrace report ~` answers in a moment, not after a whole walk


def _first_input_below(folder: Path) -> tuple[Path | None, bool]:
    """The shallowest run, trace or snapshot below `folder`, found as `kvtrace export` finds its inputs (one
    search: analyzers.readers.folders), and whether every folder below was searched (at most
    `_SEARCHED_FOLDERS` real folders; one reached again through a link is not searched twice). Folders that
    cannot be listed are passed over: this names an input to pass, it reads none."""
    from analyzers.readers.folders import FolderSearch

    search = FolderSearch(folder, shallowest_first=True, max_folders=_SEARCHED_FOLDERS)
    first = next((item.path for item in search if item.problem is None), None)
    return first, first is not None or search.complete


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
