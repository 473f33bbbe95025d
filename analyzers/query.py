"""SQL over the export tables with embedded DuckDB: one view per table, nothing loaded up front.

`connect(export_dir)` makes a view per table over its parts (`read_parquet(..., union_by_name=true)`, so
parts written by different kvtrace versions line up by column name). DuckDB reads only the columns and
row groups a query needs, so a query over thousands of runs stays within a laptop's memory.
"""

from __future__ import annotations

import datetime
import decimal
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from analyzers.export_parts import check_schema_version, is_export_dir, table_files
from analyzers.tables import SCHEMAS, TABLE_NAMES
from kvtrace.errors import KvtraceError

if TYPE_CHECKING:
    import duckdb

    from analyzers.load import Tables


@dataclass
class QueryResult:
    columns: list[str]  # as DuckDB names them: a join's `k.seq, m.seq` are both `seq`
    rows: list[tuple[Any, ...]]

    @property
    def names(self) -> list[str]:
        """The columns' names told apart, one per column, as DuckDB's own exports (`COPY ... TO`, `.df()`)
        name them: a second `seq` is `seq_1`, a third `seq_2`. Names that are unique stay as they are."""
        return unique_names(self.columns)

    def plain_rows(self) -> list[list[Any]]:
        """Rows as JSON-ready values, column by column (HUGEINT sums as int, DECIMAL as int or float, times
        as ISO text)."""
        return [[_plain(v) for v in row] for row in self.rows]

    def records(self) -> list[dict[str, Any]]:
        """Rows as JSON-ready objects keyed by `names`: a key per column, none lost to another of its name."""
        names = self.names
        return [dict(zip(names, row, strict=True)) for row in self.plain_rows()]


def unique_names(columns: list[str]) -> list[str]:
    """`columns` with each repeated name suffixed `_1`, `_2`, ... (skipping a suffix another column already
    has), by DuckDB's own rule, so that every column keeps its value under a name of its own."""
    seen: dict[str, int] = {}
    names: list[str] = []
    for name in columns:
        if name not in seen:
            seen[name] = 1
            names.append(name)
            continue
        renamed = f"{name}_{seen[name]}"
        while renamed in seen:
            seen[name] += 1
            renamed = f"{name}_{seen[name]}"
        seen[renamed] = 1
        names.append(renamed)
    return names


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime.date | datetime.time | datetime.timedelta):
        return str(value) if isinstance(value, datetime.timedelta) else value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def connect(export_dir: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per export table."""
    import duckdb

    root = Path(export_dir)
    if not is_export_dir(root):
        raise KvtraceError(f"{root}: not a kvtrace export (no runs/part-*.parquet); run `kvtrace export`")
    con = duckdb.connect()
    views: dict[str, list[Path]] = {}
    for table in TABLE_NAMES:
        files = table_files(root, table)
        if not files:
            continue  # an export from before this table existed
        check_schema_version(files)
        # Absolute, as `allowed_paths` holds them: DuckDB 1.2 to 1.4 match a relative name against that
        # list as written and refuse every part of `kvtrace query tables/`; a view also must not read
        # another folder's files after a chdir.
        views[table] = [f.resolve() for f in files]
    _sandbox(con, [f for files in views.values() for f in files])
    for table, files in views.items():
        listing = "[" + ", ".join(_quote(f) for f in files) + "]"
        added = _columns_no_part_has(table, files)
        con.execute(
            f"CREATE VIEW {table} AS SELECT *{added} FROM read_parquet({listing}, union_by_name = true)"
        )
    return con


# DuckDB's names of the export's column types (analyzers.tables)
_DUCKDB_TYPES = {
    "string": "VARCHAR", "int64": "BIGINT", "int32": "INTEGER", "int16": "SMALLINT", "double": "DOUBLE",
    "bool": "BOOLEAN", "list<item: int64>": "BIGINT[]", "list<item: string>": "VARCHAR[]",
}  # fmt: skip


def _columns_no_part_has(table: str, files: list[Path]) -> str:
    """`, NULL AS column` for each column of the table's schema that none of its parts has (all written
    before the column was added): a query naming it reads null, as `union_by_name` has it beside newer
    parts."""
    present = {name for f in files for name in pq.read_schema(f).names}
    return "".join(
        f", CAST(NULL AS {_DUCKDB_TYPES[str(field.type)]}) AS {field.name}"
        for field in SCHEMAS[table]
        if field.name not in present and str(field.type) in _DUCKDB_TYPES
    )


def _sandbox(con: duckdb.DuckDBPyConnection, readable: list[Path]) -> None:
    """No file but the export's own parts, no extension fetched or loaded, and no way back: a query is
    someone's text, and a reporting command should never read `/etc/passwd` or write anywhere for it.
    `readable` is absolute: the views must name each part as this list does."""
    if readable:
        con.execute("SET allowed_paths = [" + ", ".join(_quote(f) for f in readable) + "]")
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
        con.execute(f"SET {setting} = false")
    con.execute("SET lock_configuration = true")


def connect_tables(tables: Tables) -> duckdb.DuckDBPyConnection:
    """The same views over tables held in memory (pyarrow), for notebooks and on-the-fly queries."""
    import duckdb

    con = duckdb.connect()
    for name in TABLE_NAMES:
        con.register(name, tables[name])
    _sandbox(con, [])
    return con


# What `query` runs: statements that only read (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW and SUMMARIZE
# are all SELECT to DuckDB's parser). COPY ... TO, ATTACH, INSTALL, SET and the like would write files,
# fetch extensions or change the session: a reporting command should never do that by surprise.
_READ_ONLY = ("SELECT", "EXPLAIN")


_EXPLAIN = re.compile(r"\s*EXPLAIN\s*(\([^)]*\)\s*)?(ANALY[SZ]E\b)?", re.IGNORECASE)


def _statement_kind(statement: Any) -> str:
    """The statement's type; for EXPLAIN, the type of what it explains, since `EXPLAIN ANALYZE` runs it."""
    import duckdb

    kind = str(statement.type.name)
    if kind != "EXPLAIN":
        return kind
    text = re.sub(r"/\*.*?\*/|--[^\n]*", " ", str(statement.query), flags=re.DOTALL)
    match = _EXPLAIN.match(text)
    inner = text[match.end() :] if match else ""
    try:
        explained = duckdb.extract_statements(inner)
    except duckdb.Error:
        return "EXPLAIN of an unreadable statement:"  # refused
    return str(explained[0].type.name) if len(explained) == 1 else "EXPLAIN of several statements:"


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> QueryResult:
    """Run one read-only SQL statement; a DuckDB error (syntax, unknown column), more than one statement or
    one that would write is one line, exit status 2."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
        if not statements:  # empty, blank, only comments or semicolons
            raise KvtraceError(f"query failed: no SQL statement in {sql!r}")
        if len(statements) > 1:
            raise KvtraceError(f"query failed: {len(statements)} SQL statements; give one query at a time")
        kind = _statement_kind(statements[0])
        if kind not in _READ_ONLY:
            if kind == "LOAD":  # DuckDB types INSTALL as LOAD: the statement is named as the user wrote it
                text = re.sub(r"/\*.*?\*/|--[^\n]*", " ", sql, flags=re.DOTALL)
                word = re.search(r"\b(INSTALL|LOAD)\b", text, flags=re.IGNORECASE)
                kind = word.group(1).upper() if word else kind
            raise KvtraceError(
                f"query failed: {kind} statements are refused; `kvtrace query` only reads "
                "(SELECT, WITH, FROM, DESCRIBE, SUMMARIZE, EXPLAIN)"
            )
        relation = con.execute(sql)
        columns = [d[0] for d in relation.description] if relation.description else []
        rows = relation.fetchall() if columns else []  # DuckDB 2 results have no fetchone()
    except duckdb.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvtraceError(f"query failed: {first_line}") from None
    return QueryResult(columns, rows)
