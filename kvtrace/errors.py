"""The one exception type that the CLI turns into a one-line message and an exit status."""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from pathlib import Path

_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)
# C0 and C1 control characters and DEL: a newline splits a one-line message, ESC starts a terminal escape
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class KvtraceError(Exception):
    """A problem the user can fix (bad input file, impossible option): printed as one line.

    `exit_code` follows the usual CLI convention: 2 for bad input or usage, 1 for a failed run.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(KvtraceError):
    """A command line short of what the command needs (one run to `compare`, no model to `plan`), found after
    argparse: said as argparse's own such errors are, "(see kvtrace CMD --help)" after it."""


class MissingPart(KvtraceError):
    """An optional part this command needs is not installed (vLLM, kvpress, a quantized cache's backend):
    status 1, as for the extras `missing_dependency` names; the input and flags were right (not 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


class RecordingError(KvtraceError):
    """What `kvtrace.record()` raises: a bad option or run folder (before anything is written), misuse
    (nested record(), track() outside record()), or a run that could not be written (a full disk: raised
    when the block ends). Here, away from torch, so that `kvtrace.RecordingError` costs no import."""


# Which extra of kvtrace's brings each optional module (pyproject.toml): the laptop install has only the
# analyzers' numpy, plotly and tqdm.
_EXTRA_OF = {
    "torch": "record",
    "transformers": "record",
    "nvtx": "record",
    "pyarrow": "export",
    "duckdb": "export",
    "tensorboard": "tensorboard",
    "llama_models": "demo",
    "tiktoken": "demo",
    "numpy": "",
    "plotly": "",
    "tqdm": "",
}


# The torch the README installs before kvtrace's extras (its CPU wheel): a GPU machine takes its CUDA build.
_TORCH_FIRST = "torch==2.13.0 (the CPU wheel; on a GPU, your CUDA build of torch)"


def missing_dependency(exc: ImportError, command: str = "") -> str | None:
    """What to install for a module kvtrace needs and did not find ("needs pyarrow, which is not installed
    here: pip install 'kvtrace[export]'"); None for any other import error, which is a bug. `demo` needs
    its whole extra (the recorder, the tokenizer, the scalars)."""
    name = (exc.name or "").partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or name not in _EXTRA_OF:
        return None
    extra = _EXTRA_OF[name]
    if command == "demo" and extra:
        extra = "demo"
    what = f"kvtrace[{extra}]" if extra else "kvtrace"
    if name == "torch":
        # The extra alone would take the newest torch from PyPI, a CUDA build with gigabytes of CUDA
        # libraries, where the machine may have no GPU: torch first, as the README's install line does.
        return (
            f"needs torch, which is not installed here: pip install {_TORCH_FIRST}, then pip install '{what}'"
        )
    return f"needs {name}, which is not installed here: pip install '{what}'"


def short_error(text: str, limit: int = 150) -> str:
    """An error's text cut to `limit` characters, marked "..." where cut: a failed request's exception (a
    traceback's last line can run to kilobytes) quoted inside a sentence of a warning or a diagnosis."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def printable(text: str) -> str:
    """`text` with its control characters escaped as Python writes them ("a\\nb", "x\\x1b[31m"), all else as
    it is: a file name holding a newline or a terminal escape would split a one-line error or note in two,
    or recolour the user's terminal. Plain names print exactly as given."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


def shell_arg(path: str | os.PathLike[str]) -> str:
    """A path inside a command line printed for the user to paste: quoted where a shell would split or
    expand it (a space, a quote, `$`), as it is otherwise."""
    import shlex  # here: only a few messages print one, and start-up counts

    return shlex.quote(os.fspath(path))


def shown_integer(value: int, digits: int = 24) -> str:
    """An integer for a message: as written up to `digits` digits, else its first digits and its length
    ("100000… (401 digits)"). A damaged file's 10**400 printed whole is hundreds of digits of noise."""
    if abs(value).bit_length() > 10_000:  # past what str() writes (sys.get_int_max_str_digits)
        return f"{'-' if value < 0 else ''}2**{abs(value).bit_length() - 1:,} or more"
    text = str(value)
    sign, magnitude = ("-", text[1:]) if value < 0 else ("", text)
    if len(magnitude) <= digits:
        return text
    return f"{sign}{magnitude[:6]}… ({len(magnitude):,} digits)"


def shown_float(value: float) -> str:
    """What a float found where an integer belongs is, for a message. Python's json reads NaN, Infinity and
    a number past float's range (1e309) as non-finite floats: "a number with a fraction" said of those was
    wrong, and hid the damage."""
    if value != value:  # NaN is the one float unequal to itself
        return "not a number (NaN)"
    if value in (float("inf"), float("-inf")):
        return "infinite" if value > 0 else "infinite (negative)"
    return "a number with a fraction"


def too_long_integer() -> str:
    """What `json.loads` means by a plain ValueError (not a JSONDecodeError): CPython refuses to read an
    integer of more digits than `sys.get_int_max_str_digits()` (4300), a guard against quadratic parsing.
    No recorder writes one: the file is damaged or made up."""
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def os_errno(exc: OSError) -> int | None:
    """The errno, also of a C library's error that carries it only in its text ("[errno 28] ...")."""
    if exc.errno is not None:
        return exc.errno
    found = _ERRNO_IN_TEXT.search(str(exc))
    return int(found.group(1)) if found else None


def os_reason(exc: OSError) -> str:
    """What the OS said, without a library's wrapping: pyarrow's "Error writing bytes to file. Detail:
    [errno 28] No space left on device" is "No space left on device"."""
    said = exc.strerror or str(exc)
    code = os_errno(exc)
    if code is not None and (not exc.strerror or _ERRNO_IN_TEXT.search(said)):
        return os.strerror(code)
    return said


def unnamed_path(path: str | os.PathLike[str]) -> str | None:
    """The one line for a path that can name no file, else None. pathlib reads "" as ".", so an unset
    variable would record into, or read, whatever folder the process runs in; a NUL byte makes every OS
    call raise a bare ValueError ("embedded null byte") that names nothing."""
    text = os.fsdecode(os.fspath(path))
    if not text:
        return "an empty path ('') names no file or folder"
    if "\x00" in text:
        return f"{text!r}: a path cannot hold a NUL byte"
    return None


def refuse_unnamed_path(path: str | os.PathLike[str]) -> None:
    """Raise the one-line `KvtraceError` of `unnamed_path`, if any."""
    said = unnamed_path(path)
    if said is not None:
        raise KvtraceError(said)


def link_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a symbolic link at `path` leads to no file ("a loop of symbolic links", "a symbolic link to
    nothing (target)"), else None: `Path.exists` calls both missing, which reads as if nothing were there."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links"
        if exc.errno == errno.ENOENT:
            return f"a symbolic link to nothing ({os.readlink(path)})"
        return f"cannot read ({os_reason(exc)})"
    return None


def file_in_the_way(path: Path, folder: bool = False) -> Path | None:
    """The file that stops `path` from being written: a parent of it that is a file (or, for a `folder`
    output, the path itself), else None."""
    candidates = [path, *path.parents] if folder else list(path.parents)
    return next((p for p in candidates if p.exists() and not p.is_dir()), None)


def blocked_status(path: Path, folder: bool = False) -> int:
    """The exit status for an output that a file stands in the way of (`file_in_the_way`): 2 where it is a
    named pipe, a device or a socket, or a link to one (the path names no file or folder at all: a wrong
    argument, refused before any work, as a bad flag is), 1 where it is a regular file (an output that
    cannot be written, as when the folder is made)."""
    blocker = file_in_the_way(path, folder)
    return 2 if blocker is not None and special_output(blocker) is not None else 1


def folder_blocked(path: Path, folder_name: str) -> str | None:
    """The one line for a folder output (`folder_name`: "the run folder") that a file stands in the way of,
    itself or in place of a parent; else None. Asked before any work: the OS's "File exists" or "Not a
    directory" only comes when the folder is made, after the model is built and run."""
    blocker = file_in_the_way(path, folder=True)
    if blocker is None:
        return None
    kind = special_output(blocker) or "a file"
    why = (
        f"{kind} of that name is there, not a folder"
        if blocker == path
        else f"a parent of the path is {kind}: {blocker}"
    )
    return f"{path}: cannot create {folder_name} ({why})"


def same_path(output: str | os.PathLike[str], given: str | os.PathLike[str]) -> bool:
    """Whether an output path names the input `given`: as written, once links are followed (realpath), or
    as the same file (a hard link). The readers know an input by its content, not its name, so a trace
    named `t.html` passes every check on an HTML output's name; written over, the input is gone."""
    if os.path.abspath(output) == os.path.abspath(given):
        return True
    if os.path.realpath(output) == os.path.realpath(given):
        return True
    try:
        return os.path.samefile(output, given)
    except (OSError, ValueError):  # either is missing: not one file
        return False


def lies_inside(output: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether an output path lies inside `folder` (or is it), links followed on both sides."""
    inner, outer = Path(os.path.realpath(output)), Path(os.path.realpath(folder))
    return inner == outer or outer in inner.parents


def cannot_write(path: Path, exc: OSError | None, verb: str = "write", folder: bool = False) -> KvtraceError:
    """The one-line error for an output that cannot be written: exit status 1, or 2 where a named pipe or a
    device stands in the way (`blocked_status`). When a file stands in the way, the OS says "File exists"
    or "Not a directory", which reads as if the output were there already: name the file instead, and what
    it is when not a regular file (a named pipe, /dev/full)."""
    blocker = file_in_the_way(path, folder)
    kind = special_output(blocker) if blocker is not None else None
    if blocker is None:
        why = os_reason(exc) if exc is not None else "unknown cause"
    elif blocker == path:
        why = "it is a file" if kind is None else f"{kind}, not a folder"
    else:
        why = f"a parent of the path is {kind or 'a file'}: {blocker}"
    return KvtraceError(f"{path}: cannot {verb} ({why})", exit_code=1 if kind is None else 2)


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _special_kind(mode: int) -> str | None:
    return next((kind for is_kind, kind in _SPECIAL_KINDS if is_kind(mode)), None)


def refuse_special_file(path: str | os.PathLike[str]) -> None:
    """Refuse, before opening it, an input that is neither a regular file nor a folder: opening a named pipe
    waits for a writer (forever, when none comes) and a device reads without end. A missing path passes:
    its reader says so."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    kind = _special_kind(mode)
    if kind is not None:
        raise KvtraceError(f"{path}: {kind}, not a regular file; kvtrace reads files")


def special_output(path: str | os.PathLike[str]) -> str | None:
    """What stands at an output path when it is a named pipe, a device or a socket ("a named pipe"), or a
    symbolic link to one ("a symbolic link to a character device": /dev/stdout); else None. An output is
    written by rename over its path: that would put a regular file where /dev/null was (run as root), and
    a reader waiting on a pipe would never get the page."""
    try:
        own = os.lstat(path)
    except OSError:
        return None
    kind = _special_kind(own.st_mode)
    if kind is not None or not stat.S_ISLNK(own.st_mode):
        return kind
    try:
        target = os.stat(path)
    except OSError:  # a link to nothing: the rename replaces the link
        return None
    kind = _special_kind(target.st_mode)
    return None if kind is None else f"a symbolic link to {kind}"
