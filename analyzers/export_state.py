"""What an export holds of each source, and whether the source has changed since it was taken.

`kvtrace export` skips a source already in its folder; a run read while it was being recorded holds only
what had been written then, so "already there" cannot mean "by path" alone. Each runs row keeps the state
of the files it was read from (`source_bytes`, `source_mtime_ns`: their total size and latest change, as
make or rsync compare) and the pid recording it (`recording_pid`). A later export stats the source again
(a few `stat` calls, no reading): the same state is skipped, the fast path; another is exported again and
replaces the earlier rows (analyzers.export_parquet). Rows from a kvtrace that kept no state are taken as
unchanged, except a run they took as `running` whose manifest now says it ended.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from kvtrace.errors import KvtraceError
from kvtrace.format import (
    ENGINE_FILES,
    KV_EVENTS,
    MANIFEST,
    MEMORY_SAMPLES,
    PROFILER_DIR,
    SNAPSHOT_DIR,
    WEIGHTS,
)
from kvtrace.json_reads import read_json_file
from kvtrace.run_lock import holder

# What the recorder writes in a run directory, which the export reads. Not `kvtrace report`'s own files
# (kv_counters, tb_scalars, timeline.html) nor the lock: a report after an export changes nothing.
_RUN_FILES = (MANIFEST, KV_EVENTS, WEIGHTS, MEMORY_SAMPLES, *ENGINE_FILES)
_RUN_FOLDERS = (PROFILER_DIR, SNAPSHOT_DIR)
_TAKEN_COLUMNS = ("path", "run_id", "ended_status", "recording_pid", "source_bytes", "source_mtime_ns")


@dataclass(frozen=True)
class SourceState:
    """A source's files as a read found them: total bytes and latest modification (ns)."""

    bytes: int
    mtime_ns: int


def source_state(path: Path) -> SourceState | None:
    """The state of the files an export reads of `path` (a run directory's recorded files, or the one
    file of a trace or snapshot); None when it cannot be told (the source is gone or unreadable)."""
    try:
        if not stat.S_ISDIR(path.stat().st_mode):
            files = [path]
        else:
            files = [path / name for name in _RUN_FILES]
            for folder in (path / name for name in _RUN_FOLDERS):
                if folder.is_dir():
                    files += sorted(folder.iterdir())
        size = latest = 0
        for file in files:
            try:
                info = file.stat()
            except FileNotFoundError:  # an optional file (engine logs, weights of a vLLM run)
                continue
            if stat.S_ISREG(info.st_mode):
                size += info.st_size
                latest = max(latest, info.st_mtime_ns)
    except OSError:
        return None
    return SourceState(size, latest)


@dataclass(frozen=True)
class Taken:
    """A source as a committed part of the export holds it."""

    run_id: str
    part: int
    ended_status: str | None
    recording_pid: int | None
    state: SourceState | None  # None: exported by a kvtrace that kept no state


def taken_sources(files: list[Path], part_of: dict[str, int]) -> tuple[dict[str, list[Taken]], set[str]]:
    """The sources in the runs parts `files` (by the resolved path their `path` column holds), and every
    run_id in them. `part_of`: each file's part number."""
    taken: dict[str, list[Taken]] = {}
    run_ids: set[str] = set()
    for file in files:
        names = set(pq.read_schema(file).names)
        rows = pq.read_table(file, columns=[c for c in _TAKEN_COLUMNS if c in names]).to_pylist()
        for row in rows:
            if row.get("run_id"):
                run_ids.add(row["run_id"])
            if not row.get("path"):
                continue
            size, mtime = row.get("source_bytes"), row.get("source_mtime_ns")
            state = SourceState(size, mtime) if size is not None and mtime is not None else None
            found = Taken(
                row["run_id"], part_of[file.name], row.get("ended_status"), row.get("recording_pid"), state
            )
            taken.setdefault(row["path"], []).append(found)
    return taken, run_ids


def _has_ended(run: Path) -> bool:
    """Whether a run directory's manifest says its recording ended (in any way)."""
    try:  # a pipe or device in the manifest's place is refused, not read without end
        ended = read_json_file(run / MANIFEST, "corrupt manifest").get("ended")
    except (KvtraceError, AttributeError):
        return False
    return isinstance(ended, dict) and ended.get("status") not in (None, "running")


def changed_since(path: Path, taken: Taken) -> str | None:
    """Why the source at `path` is to be exported again (None: unchanged since `taken`), in words."""
    if taken.state is not None:
        if source_state(path) == taken.state:
            return None
    elif not (taken.ended_status == "running" and _has_ended(path)):
        return None  # a kvtrace that kept no state: only a run seen `running` that ended since is known
    if taken.recording_pid is not None:
        return (
            f"it changed since part {taken.part} took it while {_pid(taken.recording_pid)} was recording it"
        )
    if taken.ended_status == "running":
        return f"it changed since part {taken.part} took it before its recording ended"
    return f"it changed since part {taken.part} took it"


def recording_now(path: Path) -> int | None:
    """The pid recording the run directory `path` now (0: one that has not written its pid yet); None when
    none is, or `path` is no run directory."""
    pid = holder(path) if path.is_dir() else None
    if pid is None:
        return None
    return int(pid) if pid.isdigit() else 0


def _pid(pid: int) -> str:
    return f"pid {pid}" if pid else "a process (pid not yet written)"


def still_recording(run_id: str, pid: int, kv_events: int | None) -> str:
    """The warning on a run exported (or left in the export) while a recording still writes it."""
    so_far = f" ({kv_events:,} KV events so far)" if kv_events is not None else ""
    return (
        f"warning: {run_id} is still being recorded by {_pid(pid)}: its tables hold what it had written"
        f"{so_far}; export again once it ends to replace them"
    )
