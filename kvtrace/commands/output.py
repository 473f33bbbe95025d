"""How every subcommand prints its result and writes its HTML, so that all behave alike."""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvtrace.errors import (
    KvtraceError,
    cannot_write,
    file_in_the_way,
    os_reason,
    same_path,
    shell_arg,
    special_output,
)


def strict_json(value: Any) -> Any:
    """`value` with every float JSON cannot hold (NaN, ±inf: Python writes them, strict parsers refuse
    them) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    return value


def print_result(as_json: bool, payload: Callable[[], Any], text: Callable[[], str]) -> None:
    """JSON on stdout for scripts (`--json`, strict: no NaN), else the human text. Both are built only
    when needed, and written once whole."""
    if as_json:
        sys.stdout.write(json.dumps(strict_json(payload()), indent=2, allow_nan=False) + "\n")
    else:
        print(text())


def said_unreadable(command: str, problems: list[str]) -> int:
    """Each input part that could not be read (a run group's rank, `GroupReport.unreadable`), one line on
    stderr after the result that the rest gave; the exit status: 2 where there is one, as `kvtrace export`
    exits for an input it skipped, else 0. A note in the result alone let a script take the figures of
    one rank of two for the group's."""
    if not problems:
        return 0
    sys.stdout.flush()  # the result first, then what it lacks
    for problem in problems:
        print(f"kvtrace {command}: error: {problem}", file=sys.stderr)
    return 2


# How Python holds a file name's bytes that are not UTF-8 (surrogateescape): text no byte order mark
# encoding (utf-8-sig, utf-16, utf-32) takes unless its errors handler says how
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class StdoutError(KvtraceError):
    """Standard output could not be written: exit status 1. A command that wrote its files before printing
    (`export`, `sweep`) adds what it wrote, so the failure does not read as if nothing were."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


class GuardedStdout:
    """Standard output for the length of a command: a write or flush that fails (a full disk under
    `> file`, /dev/full), or a write to a closed one (`>&-`: Python then has no sys.stdout), is the one-line
    error "standard output: cannot write (...)", exit status 1. The OS's bare "No space left on device"
    named no file, and read as if an input were at fault. A closed pipe (`| head`) passes through: the CLI
    ends quietly on it.

    An unbuffered standard output (PYTHONUNBUFFERED, `python -u`: common in containers) is written here,
    byte count checked: its text layer drops what a short write (the last room on a disk, a file size
    limit) left over, and raises nothing, so a `--json` cut at the first 1024 bytes exited 0."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._encoder: codecs.IncrementalEncoder | None = None

    def write(self, text: str) -> int:
        if self._stream is None:
            raise StdoutError("standard output: cannot write (it is closed)")
        try:
            if self._unbuffered() is None:
                if not text.isascii() and _LONE_SURROGATE.search(text) is not None:
                    # A file name that is not UTF-8, tried here: the text layer's failed write would use up
                    # the byte order mark it owes the output's start, and write none after
                    encoding = getattr(self._stream, "encoding", None) or "utf-8"
                    text.encode(encoding, getattr(self._stream, "errors", None) or "strict")
                return self._stream.write(text)
            errors = getattr(self._stream, "errors", None) or "strict"
            self._write_bytes(self._encode(text.replace("\n", os.linesep), errors))
            return len(text)
        except UnicodeEncodeError:
            return self._write_file_names(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _stdout_failed(exc) from None

    def _encode(self, text: str, errors: str) -> bytes:
        """`text` in the stream's encoding, by one encoder for the whole output, as the text layer encodes:
        an encoding that begins with a byte order mark (utf-8-sig, utf-16) writes it once, at the start of
        the output (none after the start of a file, `>>`), not before every `print()`'s newline. A failed
        encode leaves the encoder as it was (the caller writes the text again, escaped)."""
        encoder = self._encoder
        if encoder is None:
            encoding = getattr(self._stream, "encoding", None) or "utf-8"
            encoder = self._encoder = codecs.getincrementalencoder(encoding)()
            with contextlib.suppress(OSError, ValueError, AttributeError):
                buffer = self._stream.buffer
                if buffer.seekable() and buffer.tell() != 0:
                    encoder.setstate(0)  # as io.TextIOWrapper: no byte order mark past a file's start
        state = encoder.getstate()
        encoder.errors = errors
        try:
            return encoder.encode(text)
        except UnicodeEncodeError:
            encoder.setstate(state)
            raise

    def _unbuffered(self) -> io.RawIOBase | None:
        """The stream's binary layer when it is the file itself, with no buffer between (which would
        write a short write's rest, or raise)."""
        buffer = getattr(self._stream, "buffer", None)
        return buffer if isinstance(buffer, io.RawIOBase) else None

    def _write_bytes(self, data: bytes) -> None:
        """`data` on the stream's binary layer, whole: a raw file takes what it has room for and says how
        much, so the rest is written again, where the OS then says why it cannot (ENOSPC, EFBIG)."""
        buffer = self._stream.buffer
        self._stream.flush()  # what the text layer holds goes first
        rest = memoryview(data)
        while rest:
            written = buffer.write(rest)
            if written is None:  # a non-blocking standard output that is full: the rest would be lost
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            if written <= 0:  # no room and no error: writing again would loop forever
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            rest = rest[written:]

    def _write_file_names(self, text: str) -> int:
        """Text holding a file name that is not UTF-8, on a standard output that refuses such text (a UTF-8
        locale other than C.UTF-8): written as the name's own bytes, as `ls` writes it; a character the
        encoding lacks, escaped."""
        encoding = getattr(self._stream, "encoding", None) or "utf-8"
        buffer = getattr(self._stream, "buffer", None)
        if buffer is None:
            return int(self._stream.write(text.encode(encoding, "backslashreplace").decode(encoding)))
        # Unbuffered, the output's one encoder (its byte order mark once). Buffered, the text layer writes the
        # mark: these bytes follow it, without one of their own, in its byte order
        encode = self._encode if self._unbuffered() is not None else self._past_start(encoding)
        lines = text.replace("\n", os.linesep)
        try:
            data = encode(lines, "surrogateescape")
        except UnicodeEncodeError:
            data = encode(lines, "backslashreplace")
        try:
            self._write_bytes(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _stdout_failed(exc) from None
        return len(text)

    def _past_start(self, encoding: str) -> Callable[[str, str], bytes]:
        """Encoding as a buffered text layer does past the start of its output: it wrote any byte order mark
        (`str.encode` would write another mid-output), and wrote it first (the empty write makes it, when
        nothing was written yet), in the byte order it chose (utf-16 without a mark, on a pipe: native)."""
        self._stream.write("")

        def encode(text: str, errors: str) -> bytes:
            encoder = codecs.getincrementalencoder(encoding)(errors)
            encoder.setstate(0)  # as io.TextIOWrapper past a file's start: no mark, native byte order
            return encoder.encode(text)

        return encode

    def flush(self) -> None:
        if self._stream is None:  # nothing was written: nothing is lost
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _stdout_failed(exc) from None

    def isatty(self) -> bool:
        return self._stream is not None and bool(self._stream.isatty())

    def __getattr__(self, name: str) -> Any:  # encoding, fileno...: the stream's own
        return getattr(self._stream, name)


def say(line: str) -> None:
    """`line` on standard error in one write, its newline with it. `print` writes the newline apart, and
    unbuffered (PYTHONUNBUFFERED=1, as CI and containers set it), two torchrun ranks sharing one stderr ran
    their last lines together: "...rank-1, ...kvtrace run: recorded ...rank-0" and a bare newline."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class UnfailingStderr:
    """Standard error for the length of a command: a write or flush that fails (a log on a full disk,
    `2>/dev/full`, the reader of `2>&1 | head` gone) is dropped, as the interpreter drops its own at exit.
    A failed warning raised, and ended the command: a report whose JSON was whole exited 1 with none printed,
    and a missing input's error, meant as status 2, became 1 (or 0, a pipe's reader gone)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except (OSError, ValueError):  # ValueError: the file was closed under it
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the stream's own
        return getattr(self._stream, name)


def discard_unwritten(stream: Any) -> None:
    """After standard output failed: point its file at /dev/null, so that what its buffer still holds is
    dropped there. The interpreter writes it again at exit, fails again, and then exits 120 with an
    "Exception ignored ... OSError" after the one line (the fix Python's docs give for a closed pipe)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # closed, or not a file (a test's captured output)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _stdout_failed(exc: OSError) -> StdoutError:
    return StdoutError(f"standard output: cannot write ({os_reason(exc)})")


def print_after_writing(print_it: Callable[[], None], written: str) -> None:
    """Print a command's summary of files it has already written: when standard output fails, the one line
    says that `written` is there all the same (a user reading "cannot write" would think it was not)."""
    try:
        print_it()
        sys.stdout.flush()  # what is buffered fails here, where the line can still say what was written
    except StdoutError as exc:
        raise StdoutError(f"{exc}; {written}") from None


# -o paths named for what the command prints on stdout, not for the page -o writes: the way to that file
_NOT_A_PAGE = {
    ".json": ("JSON, which --json prints", "--json "),
    ".txt": ("text, which the command prints", ""),
}


def check_html_target(target: str | None, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse an `-o` that cannot take an HTML page before any work is done: an empty path, one of the
    command's `inputs` (a trace named `t.html` is read by its content: `report t.html -o t.html` replaced it
    with its own page), a folder, a named pipe or a device (or a link to one), an existing file that is not
    HTML (`-o run/manifest.json` would destroy the run being reported), or a path below a file."""
    if target is None:
        return
    out = Path(target)
    if not str(target).strip():
        raise KvtraceError("-o/--output: empty path")
    if out.is_dir():  # an input folder too (a run): the fix is a file in it
        raise KvtraceError(f"{out}: is a folder; give a file path such as {out / 'report.html'}")
    for given in inputs:
        if str(given).strip() and same_path(out, given):
            raise KvtraceError(
                f"{out}: is an input ({given}), which the page would replace; give another -o path"
            )
    kind = special_output(out)
    if kind is not None:
        raise KvtraceError(f"{out}: {kind}, not a regular file; the HTML page is written to a file only")
    if out.is_file() and out.suffix.lower() not in (".html", ".htm"):
        raise KvtraceError(f"{out}: exists and is not an HTML file; give a new path or a .html one")
    if out.suffix.lower() in _NOT_A_PAGE:  # `-o figures.json` wrote a 5 MB HTML page that jq could not read
        what, redirect = _NOT_A_PAGE[out.suffix.lower()]
        raise KvtraceError(
            f"{out}: -o writes an HTML page, not {what} on stdout (`{redirect}> {shell_arg(out)}`); "
            "or give -o a .html path"
        )
    if file_in_the_way(out) is not None:
        raise cannot_write(out, None)


def write_html(target: str | Path, html: str, quiet: bool = False) -> Path:
    """Write an HTML report (to a target `check_html_target` passed before the work); a failure is one
    line and exit status 1, never a traceback, and leaves a report already at `target` whole. A symbolic
    link at `target` is replaced by the page, not followed: the file it points to is left alone."""
    out = Path(target)
    write_replacing(out, page_bytes(html))
    if not quiet:
        said_written(out)
    return out


def said_written(out: Path) -> None:
    """The line that names a page written. A command writes its page before it prints its result and says
    so after: a reader that closes stdout early (`| head`) must not cost the page the user asked for."""
    print(f"wrote {out} ({_binary_size(out.stat().st_size)})")


def check_regular_target(out: Path) -> None:
    """Refuse (one line, exit status 2: the path names no file at all, a wrong argument) an output file
    path where a named pipe or a device stands, or a link to one: `write_replacing` would put a regular
    file in its place."""
    kind = special_output(out)
    if kind is not None:
        raise KvtraceError(f"{out}: cannot write ({kind}, not a regular file)")


def page_bytes(text: str) -> bytes:
    """A page's text as UTF-8. A file name that is not UTF-8 (Linux allows any bytes; Python holds each
    byte it cannot decode as a lone surrogate) is written `run\\udcff`, as kvtrace's messages print it:
    the page stays valid UTF-8, and the name told apart."""
    return text.encode("utf-8", "backslashreplace")


def write_replacing(out: Path, content: bytes) -> None:
    """Write a whole output file (creating its folder) by temporary file and rename, so a full disk or
    an interrupt leaves the old file, or none, never a cut one; a failure is one line and exit status 1.
    A named pipe or a device at `out` (or a link to one) is refused, never replaced by a regular file."""
    # imported here: tempfile and shutil are 3-4 ms of a command that prints only (start-up counts)
    from kvtrace.safe_write import replace_atomically

    check_regular_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with replace_atomically(out) as fh:
            fh.write(content)
    except OSError as exc:
        raise cannot_write(out, exc) from None


def _binary_size(nbytes: int) -> str:
    """Binary units with two decimals, as every figure kvtrace prints (analyzers.units.human_bytes; the
    recorder side may not import the analyzers)."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"
