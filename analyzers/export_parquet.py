"""`kvtrace export`: stream any number of sources into Parquet tables, one source in memory at a time.

A later export into the same DIR adds the next part and skips sources already in it (same resolved path)
and unchanged since (analyzers.export_state); one that changed since is exported again, its rows' parts
replaced. The directory's layout, and how a part is committed whole or not at all, are
`analyzers.export_parts`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analyzers.export_groups import GroupIds
from analyzers.export_inputs import (
    READ_ERRORS,
    Input,
    find_inputs,
    parquet_text,
    read_problem,
    refuse_an_input_as_out,
    refuse_out_inside_a_run,
)
from analyzers.export_parts import (
    _PART,
    ROW_GROUP_ROWS,
    _abandon,
    _commit,
    _next_part,
    _pending_mark,
    _remove_uncommitted,
    _TableWriter,
    check_schema_version,
    table_files,
)
from analyzers.export_state import Taken, changed_since, recording_now, still_recording, taken_sources
from analyzers.readers.sources import ProgressFn
from analyzers.tables import SCHEMA_VERSION, SCHEMAS, TABLE_NAMES, source_tables
from kvtrace.errors import KvtraceError, cannot_write, file_in_the_way
from kvtrace.run_lock import RunLock

InputProgress = Callable[[Input], None]
"""Called after each input, read or skipped (a progress bar's tick)."""


@dataclass
class ExportSummary:
    out_dir: str
    part: int | None  # None when nothing was exported: no part was added
    inputs: int = 0
    exported: int = 0
    already_exported: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLE_NAMES, 0))
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what is wrong)
    reexported: list[tuple[str, int]] = field(default_factory=list)  # (run_id, part replaced)
    recording: list[tuple[str, int]] = field(default_factory=list)  # (run_id, pid): partial in the tables
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, why): in a folder, not read

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "out_dir": self.out_dir,
            "part": self.part,
            "inputs": self.inputs,
            "exported": self.exported,
            "already_exported": self.already_exported,
            "skipped": [{"path": path, "error": error} for path, error in self.problems],
            "reexported": [{"run_id": run_id, "replaced_part": part} for run_id, part in self.reexported],
            "recording": [{"run_id": run_id, "pid": pid} for run_id, pid in self.recording],
            "left_out": [{"path": path, "why": why} for path, why in self.left_out],
            "rows": self.rows,
        }


def _exported(out_dir: Path) -> tuple[dict[str, list[Taken]], set[str], GroupIds]:
    """The sources already in the export (by resolved path), its run_ids and its groups."""
    files = table_files(out_dir, "runs")
    check_schema_version(files)
    done, taken = taken_sources(files, {f.name: int(m.group(1)) for f in files if (m := _PART.match(f.name))})
    return done, taken, GroupIds.of_export(files)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows of an earlier part in the current schema: a column its kvtrace did not write yet is null."""
    names = set(table.column_names)
    columns = [table.column(f.name) if f.name in names else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)


def _carry_over(root: Path, writers: dict[str, _TableWriter], parts: set[int], dropped: set[str]) -> None:
    """Copy the rows of the parts a re-export replaces into its part, but those of the sources it exported
    again (`dropped` run_ids), one batch at a time."""
    names = {f"part-{number:05d}.parquet" for number in parts}
    left_out = pa.array(sorted(dropped), pa.string())
    for name, writer in writers.items():
        for file in table_files(root, name):
            if file.name not in names:
                continue
            for batch in pq.ParquetFile(file).iter_batches(batch_size=ROW_GROUP_ROWS):
                rows = pa.Table.from_batches([batch])
                kept = rows.filter(pc.invert(pc.is_in(rows.column("run_id"), value_set=left_out)))
                if kept.num_rows:
                    writer.add(_conform(kept, writer.schema))


def _unique(inp: Input, taken: set[str]) -> Input:
    """Another source exported earlier under the same name (another working directory): `name#2`."""
    if inp.run_id not in taken:
        return inp
    n = 2
    while f"{inp.run_id}#{n}" in taken:
        n += 1
    return dataclasses.replace(inp, run_id=f"{inp.run_id}#{n}")


UNREADABLE_TRACE = "kv_log (its profiler trace cannot be read"  # `read_run_source`'s events_from


def _tell(
    summary: ExportSummary,
    inp: Input,
    earlier: list[Taken],
    changed: str | None,
    runs: pa.Table,
    note: Callable[[str], None] | None,
    groups: GroupIds,
) -> None:
    """Note a source exported again (it changed since), a run exported while it is being recorded, and a
    rank folder that its group's report leaves out (exported with no group_id)."""
    row = runs.to_pylist()[0]
    in_no_group = row.get("source_kind") == "run" and row.get("group_id") is None
    left_out = groups.left_out(Path(inp.path)) if in_no_group else None
    if left_out is not None and note is not None:
        note(
            f"note: {inp.run_id}: exported with no group_id: `kvtrace report` leaves it out of its run "
            f"group's figures, as {left_out}"
        )
    if earlier:
        summary.reexported.extend((inp.run_id, t.part) for t in earlier)
        if note is not None:
            note(f"note: {inp.run_id}: {changed}: exported again, its rows there replaced")
    unread = row.get("memory_events_from")
    if isinstance(unread, str) and unread.startswith(UNREADABLE_TRACE) and note is not None:
        note(
            f"warning: {inp.run_id}: {unread[len('kv_log (') : -1]}: its memory events are its KV log's over "
            "the weights, its peaks without activations (runs.memory_events_from says so)"
        )
    if row.get("recording_pid") is not None:
        summary.recording.append((inp.run_id, row["recording_pid"]))
        if note is not None:
            note(still_recording(inp.run_id, row["recording_pid"], row.get("kv_events")))


def export(
    paths: list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    on_input: InputProgress | None = None,
    on_inputs_found: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    progress: ProgressFn | None = None,
    note: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Write every source under `paths` into `out_dir` as one new part per table.

    A source that cannot be read is skipped, passed to `warn` and listed in `problems` (the caller decides
    the exit status); the others are exported. `progress(bytes_done, bytes_total)` follows the reading of
    each input file (for a bar on one big trace). `note` gets a line for each run still being recorded
    (its rows are partial) and each source exported again because it changed since an earlier part took
    it. Raises KvtraceError only when `out_dir` itself is unusable.
    """
    root = Path(out_dir)
    refuse_an_input_as_out(paths, root)  # before a trace named as -o is said to be "a file" in the way
    if root.exists() and not root.is_dir():
        raise cannot_write(root, None, folder=True)  # 1 for a file there, 2 for a pipe or a device
    try:
        str(root.absolute()).encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 (Python holds its bytes as lone surrogates)
        raise KvtraceError(
            f"{root}: the export folder's path is not UTF-8, which Parquet's writer and DuckDB's reader "
            "cannot open: choose a folder whose path is UTF-8"
        ) from None
    left_out: list[tuple[str, str]] = []
    inputs, problems = find_inputs(paths, left_out)
    refuse_out_inside_a_run(inputs, root)
    for path, why in left_out:
        if note is not None:
            note(f"note: {path}: {why}")
    if not inputs:
        where = ", ".join(str(p) for p in paths)
        raise KvtraceError(
            problems[0][1] if problems else f"{where}: no run directories, traces or snapshots found"
        )
    # Another export into this folder would take the same part number and remove this one's unfinished
    # files as leftovers: exports into one folder take turns.
    lock = RunLock(root)
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire(wait=True)
    except OSError as exc:
        raise cannot_write(root, exc, folder=True) from None
    try:
        summary = _export_locked(
            root, inputs, problems, overwrite, on_input, on_inputs_found, warn, progress, note
        )
        summary.left_out = left_out
        return summary
    finally:
        lock.release()
        if created:  # nothing committed (a full disk, no readable input): no empty folder is left either
            with contextlib.suppress(OSError):
                root.rmdir()


def _export_locked(
    root: Path,
    inputs: list[Input],
    problems: list[tuple[str, str]],
    overwrite: bool,
    on_input: InputProgress | None,
    on_inputs_found: Callable[[int], None] | None,
    warn: Callable[[str], None] | None,
    progress: ProgressFn | None,
    note: Callable[[str], None] | None,
) -> ExportSummary:
    try:
        _remove_uncommitted(root, overwrite)
    except OSError as exc:
        raise cannot_write(root, exc, folder=True) from None
    # An overwrite exports every source again, beside the parts it replaces (numbered after them), which
    # stay whole until it is committed (`_commit`).
    done, taken, groups = ({}, set(), GroupIds()) if overwrite else _exported(root)
    replaced: set[int] = set()  # parts holding a source exported again: replaced by this one
    dropped: set[str] = set()  # their run_ids, whose rows there are not carried over
    part = _next_part(root)
    summary = ExportSummary(out_dir=str(root), part=part)
    summary.inputs = len(inputs) + len(problems)  # a missing path was given too: "1 of 2 inputs"
    summary.problems.extend(problems)
    for _, missing in problems:
        if warn is not None:
            warn(missing)
    if on_inputs_found is not None:
        on_inputs_found(len(inputs))
    writers: dict[str, _TableWriter] = {}
    name = "runs"
    try:
        pending = _pending_mark(root, part)  # before any file of the part: whose they are, if it is killed
        pending.parent.mkdir(exist_ok=True)
        pending.touch()
        for name, schema in SCHEMAS.items():
            writers[name] = _TableWriter(root / name, part, schema)
    except OSError as exc:
        _abandon(writers, root, part)
        with contextlib.suppress(OSError):  # the folder made for the writer that failed, if empty
            (root / name).rmdir()
        if file_in_the_way(root, folder=True) is not None:  # named as such, not as a table's folder
            raise cannot_write(root, exc, folder=True) from None
        raise cannot_write(root / name / f"part-{part:05d}.parquet", exc) from None
    try:
        for inp in inputs:
            problem: str | None = None
            earlier = done.get(parquet_text(str(inp.path)), [])  # as its `path` column holds it
            changed = next((why for t in earlier if (why := changed_since(inp.path, t)) is not None), None)
            if earlier and changed is None:
                summary.already_exported += 1
                pid = recording_now(inp.path) if earlier[0].ended_status == "running" else None
                if pid is not None:
                    summary.recording.append((earlier[0].run_id, pid))
                    if note is not None:
                        note(still_recording(earlier[0].run_id, pid, None))
            else:
                # exported again under its run_id; else a new source, its name made unique if taken
                inp = dataclasses.replace(inp, run_id=earlier[0].run_id) if earlier else _unique(inp, taken)
                try:
                    tables = source_tables(inp, progress=progress, groups=groups)
                except READ_ERRORS as exc:
                    problem = read_problem(inp, exc)
                if problem is not None:
                    summary.problems.append((inp.run_id, problem))
                    if warn is not None:
                        warn(problem)
                else:
                    for name, table in tables.items():
                        writers[name].add(table)
                        summary.rows[name] += table.num_rows
                    summary.exported += 1
                    _tell(summary, inp, earlier, changed, tables["runs"], note, groups)
                    replaced.update(t.part for t in earlier)
                    dropped.update(t.run_id for t in earlier)
            if on_input is not None:
                on_input(inp)
        if replaced:
            _carry_over(root, writers, replaced, dropped)
    except BaseException:
        _abandon(writers, root, part)
        raise
    if summary.exported:
        _commit(writers, root, overwrite=overwrite, replaced=replaced)
    else:  # every source already there, or unreadable: no empty part is added (nor one replaced)
        _abandon(writers, root, part)
    if not summary.exported:
        summary.part = None
    return summary
