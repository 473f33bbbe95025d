"""Which of the files a run's manifest lists are there, and what the figures lack without each: notes for
`readers.run_dir`. Entries that cannot be files of the run (written by hand or damaged) are never looked
up."""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from kvtrace.format import (
    ENGINE_REQUESTS,
    KV_EVENTS,
    MANIFEST,
    MEMORY_SAMPLES,
    PROFILER_DIR,
    SNAPSHOT_DIR,
    Run,
)
from kvtrace.format import WEIGHTS as WEIGHTS_FILE
from kvtrace.run_reader import unknown_kinds_text

# What the figures lack when a file the recorder wrote is gone (a partial copy, a clean-up).
_LACKING = {
    WEIGHTS_FILE: "the weights are not in the memory figures (peak and final leave them out)",
    MEMORY_SAMPLES: "no process or device memory samples (RSS, reserved bytes, wall time)",
    KV_EVENTS: "no KV events: the KV figures are empty",
    ENGINE_REQUESTS: (
        "the requests, the KV tokens preemptions dropped and the demand remedies are priced on are unknown, "
        "and no preemption remedy is priced"
    ),
}
# The same on a GPU whose trace counts from the process's start: the weights are in the figures, unnamed.
_WEIGHTS_UNNAMED = (
    "the weights are in the memory figures (the GPU allocator's totals count them from the process's start) "
    "but counted as other: nothing names their blocks"
)


def missing_files_notes(run: Run) -> list[str]:
    """One note per file the manifest lists that is not there: the figures are read without it (the peak
    of a run without its profiler trace or weights table drops, with nothing else saying why). One more on
    the entries that cannot be files of the run, naming manifest.json: the run is read all the same."""
    notes = []
    listed, unusable = _listed_files(run)
    for name in listed:
        try:
            kind = os.stat(run.path / name).st_mode
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # there, perhaps, but cannot be looked at
                unusable.append((name, f"cannot be looked at: {exc.strerror or exc}"))
                continue
        else:
            if not stat.S_ISREG(kind):
                what = "a folder" if stat.S_ISDIR(kind) else "not a regular file"
                notes.append(f"{run.path / name} is listed in the manifest as a file but is {what}")
            continue
        if name.startswith(PROFILER_DIR + "/"):
            lacking = "the profiler's allocator events: memory figures are the KV log's and the weights' only"
        elif name.startswith(SNAPSHOT_DIR + "/"):
            lacking = "the allocator snapshot: an OOM's request and segments come from PyTorch's message only"
        else:
            lacking = _LACKING.get(name, "the figures are read without it")
        notes.append(f"{run.path / name} is listed in the manifest but missing: {lacking}")
    for name, damage in run.damaged_files.items():
        lacking = _LACKING.get(name, "the figures are read without it")
        notes.append(f"{run.path / name}: {damage}, so it is read as missing: {lacking}")
    if unusable:
        shown = "; ".join(f"{_entry_text(entry)}: {why}" for entry, why in unusable[:_UNUSABLE_SHOWN])
        more = len(unusable) - _UNUSABLE_SHOWN
        noun = "entry that cannot be a file" if len(unusable) == 1 else "entries that cannot be files"
        notes.append(
            f"{run.path / MANIFEST}: `files` holds {len(unusable):,} {noun} of the run, ignored: {shown}"
            f"{f'; and {more:,} more' if more > 0 else ''}"
        )
    return notes


def kv_log_notes(run: Run) -> list[str]:
    """The notes on the KV log's lines `read_run` set aside or read otherwise than written (as a trace's
    skipped events are noted): without them the figures would leave those lines out, or take a size that no
    storage can have, with nothing saying so."""
    notes = []
    path = run.path / KV_EVENTS
    if run.unknown_kv_events:
        skipped = sum(run.unknown_kv_events.values())
        total = len(run.kv_events) + skipped
        notes.append(
            f"{path}: skipped {skipped:,} of {total:,} lines whose event is not one this kvtrace knows "
            f"({unknown_kinds_text(run.unknown_kv_events)}): the KV figures leave them out (a newer "
            "kvtrace's log, or damage)"
        )
    if run.short_kv_storages:
        count = run.short_kv_storages
        lines = "1 line gives" if count == 1 else f"{count:,} lines give"
        notes.append(
            f"{path}: {lines} a storage_bytes smaller than the tensor it describes (view_offset + shape x "
            "dtype size), which no storage can be (damage): read at that size, the least the storage holds"
        )
    if run.unknown_kv_dtypes:
        count = sum(run.unknown_kv_dtypes.values())
        lines = "1 line gives" if count == 1 else f"{count:,} lines give"
        notes.append(
            f"{path}: {lines} a dtype that torch has not ({unknown_kinds_text(run.unknown_kv_dtypes)}), "
            "which no recorder writes (damage): read as logged, their storage_bytes and logical_bytes as "
            "written, with no element size to check them by"
        )
    if run.repeated_kv_seqs:
        count = run.repeated_kv_seqs
        lines = "1 line repeats" if count == 1 else f"{count:,} lines repeat"
        notes.append(
            f"{path}: {lines} the seq of a line above, where each line's is one more than the last's "
            "(damage, or two logs joined): read in the file's order"
        )
    return notes


def manifest_notes(run: Run) -> list[str]:
    """A note on an `ended.status` no recorder writes: the run is read as one that ended (its logs' line
    counts checked, no recording in progress), which is all such a status can say."""
    ended = run.manifest.get("ended")
    status = ended.get("status") if isinstance(ended, dict) else None
    if not isinstance(status, str) or status in ENDED_STATUSES:
        return []
    return [
        f"{run.path / MANIFEST}: ended.status is {_entry_text(status)}, not one kvtrace writes "
        f"({', '.join(sorted(ENDED_STATUSES))}): read as a run that ended, how is unknown"
    ]


# What `ended.status` says (docs/format.md): another value was written by hand, or is damage
ENDED_STATUSES = frozenset({"running", "ok", "exception", "interrupted"})


_UNUSABLE_SHOWN = 3  # the `files` entries named in the note (a list of thousands is one note, not thousands)
_ENTRY_SHOWN = 60  # characters of an entry shown


def _listed_files(run: Run) -> tuple[list[str], list[tuple[Any, str]]]:
    """The manifest's `files` entries that name a file of the run (relative paths inside it), and the others
    with why each cannot: not a string, absolute, outside the run, a name no file can have. The recorder
    lists plain relative names; anything else was written by hand or damaged, and is never looked at."""
    listed: list[str] = []
    unusable: list[tuple[Any, str]] = []
    for entry in run.manifest.get("files") or []:
        why = _not_a_file_name(entry)
        if why is None:
            listed.append(entry)
        else:
            unusable.append((entry, why))
    return listed, unusable


def _not_a_file_name(entry: Any) -> str | None:
    """Why a `files` entry cannot name a file of the run; None when it can."""
    if not isinstance(entry, str):
        return f"{_json_kind(entry)}, not a file name"
    try:
        encoded = os.fsencode(entry)
    except UnicodeEncodeError:  # a lone surrogate JSON allows ("\ud800"): no name on disk is that
        return "not a file name"
    if not entry or b"\0" in encoded:
        return "not a file name"
    if os.path.isabs(entry):
        return "an absolute path"
    normal = os.path.normpath(entry)
    if normal == os.curdir:
        return "the run's folder itself"
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return "outside the run"
    if len(encoded) >= _PATH_MAX or any(len(part) > _NAME_MAX for part in encoded.split(b"/")):
        return "a name too long for a file"
    return None


# Linux's limits on a name and a path (bytes); a longer one is no file, and looking it up fails (ENAMETOOLONG)
_NAME_MAX = 255
_PATH_MAX = 4096


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else "a value"


def _entry_text(entry: Any) -> str:
    """A `files` entry as the note shows it: a string quoted, a long one cut; else what kind of value."""
    if not isinstance(entry, str):
        return _json_kind(entry) if isinstance(entry, list | dict) else json.dumps(entry)
    try:
        text = json.dumps(entry, ensure_ascii=False).encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escaped, as printing it would fail
        text = json.dumps(entry)
    if len(entry) <= _ENTRY_SHOWN:
        return text
    return f'{text[: _ENTRY_SHOWN + 1]}…" ({len(entry):,} characters)'


def lists_profiler_file(run: Run) -> bool:
    return any(name.startswith(PROFILER_DIR + "/") for name in _listed_files(run)[0])


def weights_counted_notes(notes: list[str]) -> list[str]:
    """`notes` with the missing weights table's note said as it holds on a GPU whose trace counts from the
    process's start: the weights are in the figures, as other."""
    lacking = _LACKING[WEIGHTS_FILE]
    return [note.replace(lacking, _WEIGHTS_UNNAMED) if note.endswith(lacking) else note for note in notes]
