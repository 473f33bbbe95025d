"""The notebook API: `load_tables(path)` gives the export tables of any path as pyarrow (or pandas) tables.

    from kvtrace import load_tables
    tables = load_tables("runs/")                 # an export DIR, run dirs, groups, traces, snapshots
    tables.kv_events.to_pandas()                  # pyarrow.Table -> pandas.DataFrame
    tables.sql("SELECT run_id, count(*) FROM memory_events GROUP BY ALL").to_pandas()

An export directory is read back from its Parquet parts; anything else is exported on the fly, in
memory (use `kvtrace export` + `kvtrace query` for more runs than fit in memory).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from analyzers.export_groups import GroupIds
from analyzers.export_inputs import READ_ERRORS, find_inputs, named_as_given, read_problem
from analyzers.export_parts import check_schema_version, is_export_dir, table_files
from analyzers.tables import SCHEMAS, TABLE_NAMES, source_tables
from kvtrace.errors import KvtraceError, refuse_unnamed_path

if TYPE_CHECKING:
    import pandas


@dataclass
class Tables:
    """The seven export tables (docs/format.md, "Parquet export"), each a `pyarrow.Table`."""

    runs: pa.Table
    devices: pa.Table
    kv_events: pa.Table
    memory_events: pa.Table
    samples: pa.Table
    engine_steps: pa.Table
    engine_requests: pa.Table

    def __getitem__(self, name: str) -> pa.Table:
        if name not in TABLE_NAMES:
            raise KeyError(f"no table {name!r}; tables: {', '.join(TABLE_NAMES)}")
        table: pa.Table = getattr(self, name)
        return table

    def __iter__(self) -> Iterator[str]:
        return iter(TABLE_NAMES)

    def to_pandas(self) -> dict[str, pandas.DataFrame]:
        """Every table as a pandas DataFrame (pandas is optional: install it to use this)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise KvtraceError("to_pandas needs pandas: pip install pandas") from None
        return {name: self[name].to_pandas() for name in TABLE_NAMES}

    def sql(self, query: str) -> pa.Table:
        """Run DuckDB SQL over these tables (one view each, as `kvtrace query`); a pyarrow.Table."""
        from analyzers.query import connect_tables

        con = connect_tables(self)
        try:
            import duckdb

            try:
                relation = con.sql(query)
                return relation.to_arrow_table() if relation is not None else pa.table({})
            except duckdb.Error as exc:
                raise KvtraceError(f"query failed: {str(exc).strip().splitlines()[0]}") from None
        finally:
            con.close()

    def __repr__(self) -> str:
        """Each table's rows on one line. The dataclass' own repr printed every column of all seven tables,
        hundreds of lines for one run, wherever a script or a terminal's REPL shows `tables`."""
        rows = ", ".join(f"{name} {self[name].num_rows:,}" for name in TABLE_NAMES)
        return f"Tables(rows: {rows})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{name}</code></td><td style='text-align:right'>{self[name].num_rows:,}</td></tr>"
            for name in TABLE_NAMES
        )
        return f"<table><tr><th>table</th><th>rows</th></tr>{rows}</table>"


def _read_export(export_dir: str | os.PathLike[str]) -> dict[str, pa.Table]:
    tables: dict[str, pa.Table] = {}
    for name in TABLE_NAMES:
        files = table_files(export_dir, name)
        check_schema_version(files)
        parts = [pq.read_table(f) for f in files]
        # Parts of older exports may lack later columns: promote fills them with nulls, and a column no part
        # has yet (every part older than it) is added, null.
        table = pa.concat_tables(parts, promote_options="default") if parts else SCHEMAS[name].empty_table()
        for field in SCHEMAS[name]:
            if field.name not in table.column_names:
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        tables[name] = table
    return tables


def _flattened(
    paths: tuple[str | os.PathLike[str] | list[Any] | tuple[Any, ...], ...],
) -> tuple[str | os.PathLike[str], ...]:
    """Each list or tuple among `paths` replaced by its paths: a list handed whole reached `os.fspath` deep
    in the reader ("TypeError: expected str, bytes or os.PathLike object, not list")."""
    flat: list[str | os.PathLike[str]] = []
    for path in paths:
        flat.extend(path if isinstance(path, (list, tuple)) else (path,))
    return tuple(flat)


def load_tables(
    *paths: str | os.PathLike[str] | list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
    strict: bool = True,
    on_skip: Callable[[str], None] | None = None,
) -> Tables:
    """The export tables of `paths`: one export directory, or any sources (run directories, run groups,
    traces, snapshots, folders searched recursively), exported in memory. An export directory is read
    alone: beside other paths it is an input that cannot be read. A list or tuple of paths counts as its
    paths (`load_tables(glob.glob("runs/*"))`, as duckdb's `read_parquet([...])` takes one).

    With `strict` (the default) an unreadable source raises `KvtraceError`; otherwise it is left out and
    `on_skip` gets its one-line problem (as `kvtrace export` warns and goes on).
    """
    paths = _flattened(paths)
    if not paths:
        raise KvtraceError("load_tables: give at least one path")
    for path in paths:  # first: "" would read the current folder as an export directory
        refuse_unnamed_path(path)
    if len(paths) == 1 and is_export_dir(paths[0]):
        return Tables(**_read_export(paths[0]))
    inputs, problems = find_inputs(list(paths))
    if problems and strict:
        raise KvtraceError(problems[0][1])
    for _, problem in problems:
        if on_skip is not None:
            on_skip(problem)
    if not inputs and not problems:  # as `kvtrace export` says: a mistyped folder is not an empty result
        where = ", ".join(str(p) for p in paths)
        raise KvtraceError(f"{where}: no run directories, traces or snapshots found (nor an export)")
    collected: dict[str, list[pa.Table]] = {name: [] for name in TABLE_NAMES}
    groups = GroupIds()  # two groups of one name, or two jobs' traces in one folder, told apart
    for inp in inputs:
        try:
            produced = source_tables(inp, groups=groups)
        except READ_ERRORS as exc:
            if strict:
                if not isinstance(exc, KvtraceError):
                    raise
                raise KvtraceError(named_as_given(inp, str(exc)), exit_code=exc.exit_code) from None
            if on_skip is not None:
                on_skip(read_problem(inp, exc))
            continue
        for name, table in produced.items():
            collected[name].append(table)
    merged: dict[str, Any] = {
        name: pa.concat_tables(parts) if parts else SCHEMAS[name].empty_table()
        for name, parts in collected.items()
    }
    return Tables(**merged)
