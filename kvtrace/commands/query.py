"""`kvtrace query`: SQL over exported tables with embedded DuckDB."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from kvtrace.commands.base import Command, require_input
from kvtrace.commands.output import strict_json
from kvtrace.errors import KvtraceError

_MAX_WIDTH = 60
"""Characters a table cell shows by default: a run's manifest_json (1,600+) would push every other column
off the screen. `--max-width 0` shows every value whole."""


def _cell(value: Any, max_width: int) -> tuple[str, bool]:
    """The cell's text, and whether it was cut (its last character is then "…", within `max_width`)."""
    if value is None:
        return "", False
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    if not max_width or len(text) <= max_width:
        return text, False
    return text[: max_width - 1] + "…", True


def format_table(columns: list[str], rows: list[list[Any]], max_width: int = _MAX_WIDTH) -> str:
    """Aligned columns, numbers to the right; cells longer than `max_width` characters (0: no limit) cut
    with "…", and the last line says how many were cut and how to see them whole: two run_ids alike in
    their first 59 characters must not pass for one."""
    cut = 0
    cells: list[list[str]] = []
    for row in rows:
        shown = [_cell(value, max_width) for value in row]
        cut += sum(was_cut for _, was_cut in shown)
        cells.append([text for text, _ in shown])
    numeric = [
        all(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows if r[i] is not None)
        for i in range(len(columns))
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    count = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    if cut:
        values = f"{cut:,} value{'s' if cut != 1 else ''}"
        count += f"; {values} cut at {max_width} characters: --max-width 0, --json or --csv show them whole"
    out.append(f"({count})")
    return "\n".join(out)


def _width(text: str) -> int:
    """--max-width's value: characters per cell, 0 for no limit (2 is the least that shows a character)."""
    try:
        width = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if width < 0 or width == 1:
        raise argparse.ArgumentTypeError(f"{width}: give 0 (no limit) or at least 2 characters")
    return width


class QueryCommand(Command):
    """Run SQL (DuckDB) over tables written by `kvtrace export`; print a table, JSON or CSV.

    DIR is an export directory; each table (runs, devices, kv_events, memory_events, samples,
    engine_steps, engine_requests) is a view over its Parquet parts. DIR may also be any input
    `kvtrace export` reads (run directories, groups, traces, snapshots): it is then exported in memory
    for this one query. Columns are documented in docs/format.md ("Parquet export").
    Columns of the same name (a join's k.seq, m.seq) are told apart as DuckDB's own exports name them:
    seq, seq_1 (then seq_2, ...), in the table, the CSV header and the JSON keys alike.
    Exit status: 0; 1 when standard output cannot be written (a full disk); 2 for a bad DIR or a failing
    query (one line naming the problem). A folder's
    unreadable inputs are skipped with a warning, as `kvtrace export` does: the rows of the rest are
    printed, and the status is 2. When none can be read, the one input's problem (or each input's, and
    then the folder's) is the error.
    """

    name = "query"
    examples = (
        'kvtrace query tables/ "SELECT run_id, sum(delta_bytes) FROM memory_events GROUP BY ALL"',
        'kvtrace query runs/demo-dynamic "SELECT event, count(*) FROM kv_events GROUP BY ALL" --csv',
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("dir", metavar="DIR", help="export directory (or any input to export on the fly)")
        parser.add_argument(
            "sql", metavar="SQL", help="one SQL query (SELECT, WITH, DESCRIBE, ...; nothing that writes)"
        )
        group = parser.add_mutually_exclusive_group()
        group.add_argument(
            "--json",
            action="store_true",
            help="print a JSON list of row objects (a repeated column name gets _1, _2, as DuckDB names it)",
        )
        group.add_argument("--csv", action="store_true", help="print CSV with a header row")
        parser.add_argument(
            "--max-width",
            type=_width,
            default=_MAX_WIDTH,
            metavar="N",
            help=f"the table's cells: at most N characters, longer ones cut with … and counted in the last "
            f"line (default {_MAX_WIDTH}; 0 shows every value whole; --json and --csv never cut)",
        )

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.export_parts import is_export_dir
        from analyzers.query import connect, connect_tables, run_query

        path = Path(args.dir)
        skipped: list[str] = []
        require_input(path)
        if is_export_dir(path):
            con = connect(path)
        else:
            # A folder of sources is read as `kvtrace export` reads it: an unreadable input (an interrupted
            # run, a truncated trace) is skipped with a warning, and the query runs over the rest. A file
            # named on its own is read strictly: its one-line error is the answer.
            from analyzers.load import load_tables

            # The first warning waits for a second input: when a folder's one input is unreadable, its
            # problem is the error itself, one line, not "skipped" followed by "could not read".
            def show(problem: str) -> None:
                print(f"kvtrace query: warning: skipped {problem}", file=sys.stderr)

            def warn(problem: str) -> None:
                skipped.append(problem)
                if len(skipped) == 2:
                    show(skipped[0])
                if len(skipped) >= 2:
                    show(problem)

            try:
                tables = load_tables(path, strict=not path.is_dir(), on_skip=warn)
            except BaseException:
                if len(skipped) == 1:
                    show(skipped[0])
                raise
            if len(skipped) == 1 and tables.runs.num_rows == 0:
                raise KvtraceError(skipped[0])
            if len(skipped) == 1:
                show(skipped[0])
            if skipped and tables.runs.num_rows == 0:
                raise KvtraceError(f"{path}: could not read any of its {len(skipped)} inputs")
            con = connect_tables(tables)
        try:
            result = run_query(con, args.sql)
        finally:
            con.close()
        # Columns of the same name (a join's `k.seq, m.seq`) each keep their value, under DuckDB's own
        # names for them (`seq`, `seq_1`) in all three formats: a JSON object holds one key per name.
        if args.json:
            # Strict JSON, written once it is whole: NaN and infinities become null, DuckDB's other types
            # (UUID, dates, intervals, decimals) their text.
            text = json.dumps(strict_json(result.records()), indent=2, default=str, allow_nan=False)
            sys.stdout.write(text + "\n")
        elif args.csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(result.names)
            for row in result.plain_rows():
                writer.writerow([json.dumps(v) if isinstance(v, list | dict) else v for v in row])
        else:
            print(format_table(result.names, result.plain_rows(), args.max_width))
        return 2 if skipped else 0
