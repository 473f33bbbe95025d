"""Open whatever file a user hands us, tell what it is, and say in one line what is wrong with a bad one.

Third-party inputs arrive plain or gzip-compressed, sometimes hundreds of MB, sometimes truncated by a
full disk or a killed job. Everything byte-level lives here so each reader sees one decompressed,
buffered stream: gzip is detected by its magic bytes (not the file name), progress is reported in bytes of
the file on disk (what a progress bar can total), and decompression errors become `KvtraceError`s that
name the file. Readers are imported lazily by `open_source` because they import this module.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from kvtrace.errors import KvtraceError

if TYPE_CHECKING:
    from analyzers.model import MemorySource

__all__ = ["ProgressFn", "open_input", "open_source", "sniff"]

ProgressFn = Callable[[int, int], None]
"""progress(bytes_done, bytes_total), both counted in bytes of the file as stored on disk."""

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
_BUFFER_BYTES = 1 << 20
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
            if count == 0 or done - self._last_reported >= _PROGRESS_STEP:
                self._last_reported = done
                self._progress(done if count else self._total, self._total)
        return int(count or 0)


def _describe_read_error(exc: BaseException) -> str:
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
    return f"cannot read ({exc})"


@contextmanager
def open_input(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> Iterator[io.BufferedReader]:
    """A buffered binary stream of the file's content, gunzipped if it starts with the gzip magic.

    Read errors raised inside the `with` body (gzip truncation or corruption, I/O errors) are re-raised as
    `KvtraceError(f"{path}: ...")`; `KvtraceError`s pass through untouched.
    """
    name = str(path)
    try:
        disk = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise KvtraceError(f"{name}: {_describe_read_error(exc)}") from exc
    try:
        total = os.fstat(disk.fileno()).st_size
        magic = disk.read(2)
        disk.seek(0)
        inner: IO[bytes] = gzip.GzipFile(fileobj=disk, mode="rb") if magic == GZIP_MAGIC else disk
        stream = io.BufferedReader(_ProgressRaw(inner, disk, total, progress), buffer_size=_BUFFER_BYTES)
        try:
            yield stream
        except (EOFError, OSError, zlib.error) as exc:
            raise KvtraceError(f"{name}: {_describe_read_error(exc)}") from exc
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


def open_source(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    """Read any supported input into a `MemorySource`, choosing the reader by content."""
    kind = sniff(path)
    if kind == "directory":
        raise NotImplementedError("run directories: see analyzers/run_dir.py")
    if kind == "snapshot":
        from analyzers.snapshot import read_snapshot

        return read_snapshot(path, progress=progress)
    from analyzers.chrome_trace import read_chrome_trace, read_memory_timeline

    if kind == "memory_timeline":
        return read_memory_timeline(path, progress=progress)
    return read_chrome_trace(path, progress=progress)
