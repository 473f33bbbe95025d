"""Which sources an export reads (`find_inputs`: run directories, traces and snapshots under the paths
given), each as the user named it, and the one line for an input that cannot be read.

Why apart from `analyzers.tables` (the tables' schemas and rows): finding inputs walks folders and names
files; it never reads a source's content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from analyzers.readers.folders import LEFT_OUT_WHY, FolderSearch, Found, unreadable
from analyzers.readers.sources import missing
from kvtrace.errors import KvtraceError, lies_inside, os_reason, same_path, shell_arg, unnamed_path
from kvtrace.run_layout import is_run_dir, is_run_group


@dataclass(frozen=True)
class Input:
    """One source to export: `path` resolved, `run_id` the path as the user named it (unique per export)."""

    path: Path
    run_id: str


def named_as_given(inp: Input, message: str) -> str:
    """A reader's one-line error about `inp` with the path as the user named it (the reader was given the
    resolved path): warnings about a folder's inputs then read `runs/x/...`, not `/home/.../runs/x/...`,
    as `kvtrace report` names them."""
    resolved = str(inp.path)
    # the input itself (`path: ...`) or a file of a run directory (`path/kv_events.jsonl: ...`)
    inside = message.startswith(resolved) and message[len(resolved) : len(resolved) + 1] in (":", os.sep)
    return inp.run_id + message[len(resolved) :] if inside else message


# What reading one input may raise: its readers' own one-line refusal, or an error on an input nobody
# foresaw (a crafted trace, JSON nested deeper than the C decoder goes). That input is skipped with
# `read_problem`'s line, and the others are read: the fleet goes on.
READ_ERRORS: tuple[type[Exception], ...] = (
    KvtraceError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    RecursionError,
    pa.ArrowException,
)


def read_problem(inp: Input, exc: Exception) -> str:
    """The one line for an input `source_tables` could not read (one of `READ_ERRORS`), naming it as the
    user did: a warning that names no file helps nobody."""
    if isinstance(exc, KvtraceError):
        return named_as_given(inp, str(exc))
    if isinstance(exc, RecursionError):  # its own text names no file and no reason a user can act on
        return f"{inp.run_id}: unreadable (nested too deeply)"
    if isinstance(exc, OSError) and exc.filename:  # as report says it, not "PermissionError: [Errno 13] ..."
        return named_as_given(inp, f"{exc.filename}: cannot read ({os_reason(exc)})")
    return f"{inp.run_id}: unreadable ({type(exc).__name__}: {exc})"


def _display(path: Path) -> str:
    return parquet_text(Path(os.path.normpath(path)).as_posix())


def parquet_text(text: str) -> str:
    """`text` as a Parquet string can hold it (UTF-8 only): a file name that is not UTF-8 (Linux allows any
    bytes; Python holds each byte it cannot decode as a lone surrogate) has those written `\\udcff`, as
    kvtrace's messages print them. Other text is returned as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def find_inputs(
    paths: list[str | os.PathLike[str]], left_out: list[tuple[str, str]] | None = None
) -> tuple[list[Input], list[tuple[str, str]]]:
    """Every source under `paths`, and (path, one-line problem) for each path that is missing or cannot be
    read, and each folder below them that cannot be listed (its inputs unknown; the others are found).
    `left_out` gets (path, why) for each file in a folder that was not read although its name says it may
    be an input (`rank0.json.gz`: readable when named).

    A run directory is one input (plus any run directories inside it); a run group or any other folder is
    searched recursively for run directories, `*.pt.trace.json[.gz]` and `*.pickle`
    (analyzers.readers.folders: links followed, each real folder searched once); a file named explicitly is
    read whatever its name. The same file reached twice is exported once. An export directory named among
    them is a problem, not a folder of no sources: its tables are read on their own.
    """
    from analyzers.export_parts import is_export_dir

    found: list[Input] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()
    passed_over: list[Path] = []
    for given in paths:
        unnamed = unnamed_path(given)  # before pathlib reads "" as the current folder
        if unnamed is not None:
            problems.append((os.fsdecode(os.fspath(given)), unnamed))
            continue
        root = Path(given)
        try:
            is_folder = stat.S_ISDIR(os.stat(root).st_mode)
        except OSError as exc:  # missing, or in a folder that cannot be searched (not "no such file")
            problems.append((str(root), unreadable(root, exc) or missing(root)))
            continue
        if is_export_dir(root):
            problems.append((str(root), export_dir_given(root)))
            continue
        search = FolderSearch(root) if is_folder else None
        for item in search if search is not None else [Found(root)]:
            if item.problem is not None:
                problems.append((str(item.path), item.problem))
                continue
            resolved = item.path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                found.append(Input(resolved, _display(item.path)))
        passed_over += search.left_out if search is not None else []
    if left_out is not None:  # each file once; one passed over in a folder but named too is read
        unread: dict[Path, Path] = {}
        for path in passed_over:
            unread.setdefault(path.resolve(), path)
        left_out.extend((_display(path), LEFT_OUT_WHY) for real, path in unread.items() if real not in seen)
    return found, problems


def export_dir_given(root: Path) -> str:
    """The one line for an export directory among other inputs (or as an input to export)."""
    return (
        f"{root}: an export directory (Parquet tables), not a run, trace or snapshot: load or query it on "
        f"its own (kvtrace.load_tables('{root}'), `kvtrace query {shell_arg(root)} SQL`), "
        "not with other inputs"
    )


def refuse_an_input_as_out(paths: list[str | os.PathLike[str]], out_dir: Path) -> None:
    """Refuse, before anything is read or written, an export folder that is one of the inputs, or lies
    inside an input that is a run or run group, or is itself a run, run group or sweep's folder: its tables
    would be written into the recording (whose folder then reads as an export directory, not a run: it can
    no longer be exported), or into a sweep's runs/ beside its point runs."""
    for given in paths:
        if unnamed_path(given) is not None:  # named by find_inputs, as a missing input
            continue
        if same_path(out_dir, given):
            said = f"is an input ({os.fspath(given)})"
            raise KvtraceError(f"{out_dir}: {said}; give the tables a folder of their own as -o DIR")
        kind = "run" if is_run_dir(given) else "run group" if is_run_group(given) else None
        if kind is not None and lies_inside(out_dir, given):
            said = f"inside the {kind} {os.fspath(given)}, an input"
            raise KvtraceError(f"{out_dir}: {said}; give the tables a folder of their own as -o DIR")
    kind = (
        "a kvtrace run" if is_run_dir(out_dir) else "a kvtrace run group" if is_run_group(out_dir) else None
    )
    if kind is None and (out_dir / "sweep.json").exists():
        kind = "a sweep's folder (sweep.json, runs/)"
    if kind is not None:
        raise KvtraceError(
            f"{out_dir}: {kind}, not an export directory; give the tables a folder of their own"
        )


def refuse_out_inside_a_run(inputs: list[Input], out_dir: Path) -> None:
    """Refuse an export folder inside a run directory found among the inputs (`export runs -o runs/a/x`),
    as inside one named: the tables would be written into the recording."""
    for inp in inputs:
        if inp.path.is_dir() and lies_inside(out_dir, inp.path):
            said = f"inside the run {inp.run_id}, an input"
            raise KvtraceError(f"{out_dir}: {said}; give the tables a folder of their own as -o DIR")
