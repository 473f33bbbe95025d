"""Writing a run's files: a JSON document whole (a temporary file renamed over it, or, on a full disk, in
place within the room reserved for it) and a JSON-lines log appended (buffered, or a batch all or none).
Stdlib only, as the format is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import IO, Any


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json_atomic(path: Path, payload: dict[str, Any], reserve: int = 0) -> None:
    """Write via a temporary file and rename, so a reader never sees half a manifest; padded with
    trailing spaces to `reserve` bytes, room for `write_json_in_place` to use later."""
    write_bytes_atomic(path, _json_bytes(payload), reserve)


def write_bytes_atomic(path: Path, data: bytes, reserve: int = 0) -> None:
    """`data` at `path` via a temporary file and a rename (padded with spaces to `reserve` bytes)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data + b" " * max(reserve - len(data), 0))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a 0-byte leftover of a full disk
        raise


def write_json_in_place(path: Path, payload: dict[str, Any]) -> None:
    """Overwrite `path` within its present size, padding with spaces: for a full disk, where no new file
    can be written but the blocks of a file written with a `reserve` can. Not atomic (a crash midway
    leaves a corrupt file): the fallback of `write_json_atomic`, never the first choice."""
    data = _json_bytes(payload)
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        if len(data) > size:
            raise OSError(errno.ENOSPC, f"{len(data)} bytes do not fit the {size} reserved", str(path))
        fh.write(data + b" " * (size - len(data)))


# One encoder for every line: json.dumps with options builds a new JSONEncoder on each call.
_encode_compact = json.JSONEncoder(separators=(",", ":")).encode


def append_lines_whole(path: Path, records: list[dict[str, Any]]) -> None:
    """Append `records` as JSON lines in one unbuffered write, all or none: a failed write (a full disk, a
    file size limit) may take part of it and cut a line, so the file is cut back to its size before and
    the error raised. A log that goes on after a failure (the weights' table stops at the last change
    written whole) then holds whole lines only, which its finished run's readers require."""
    data = memoryview(("\n".join(_encode_compact(record) for record in records) + "\n").encode())
    with open(path, "ab", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            while data:  # a raw write may be short
                data = data[fh.write(data) or 0 :]
        except BaseException:  # a Ctrl-C mid-write too: never a cut line
            with contextlib.suppress(OSError):
                os.ftruncate(fh.fileno(), size)
            raise


class JsonlAppender:
    """Append-only JSON-lines file. Lines are buffered and written by `flush()` (the recorder's writer
    thread calls it every 0.1 s, and the recorder at the end) in one unbuffered write, so a killed process
    loses at most what was not flushed yet and never leaves a partial line mid-file. One thread appends
    while another flushes: `flush` takes the buffer by its prefix, so an append meanwhile is kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._pending: list[str | dict[str, Any]] = []
        # Of the lines a `flush()` that raised had taken, those that reached the file whole before the error:
        # a full disk may take part of a write (tmpfs: the pages it still had), cutting a line.
        self.lines_before_error = 0
        # Lines that reached the file whole: the count the final manifest gives readers to check the file by
        self.lines = 0

    def append(self, record: dict[str, Any]) -> None:
        self._pending.append(_encode_compact(record))

    def append_owned(self, record: dict[str, Any]) -> None:
        """A record made for this call and never changed after it (scalars only): encoded at `flush()`
        with the others, in one warm loop, instead of one cold encoder call per step."""
        self._pending.append(record)

    def extend(self, lines: list[str]) -> None:
        """Lines already serialised (one JSON object each, no newline): the recorder's KV events."""
        self._pending.extend(lines)

    def flush(self) -> None:
        pending = self._pending
        if pending:
            count = len(pending)
            taken = pending[:count]
            del pending[:count]
            lines = [p if isinstance(p, str) else _encode_compact(p) for p in taken]
            lines.append("")
            encoded = "\n".join(lines).encode()
            data = memoryview(encoded)
            try:
                while data:  # a raw write may be short
                    written = self._fh.write(data) or 0
                    data = data[written:]
            except OSError:
                self.lines_before_error = encoded.count(b"\n", 0, len(encoded) - len(data))
                self.lines += self.lines_before_error
                raise
            self.lines += count

    def buffered(self) -> int:
        return len(self._pending)

    def discard(self) -> None:
        """Drop what is buffered (after a write error: nothing more reaches the file)."""
        del self._pending[:]

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self.flush()
            finally:
                self._fh.close()
