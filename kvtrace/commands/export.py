"""`kvtrace export`: runs, groups, traces and snapshots as Parquet tables for DuckDB, Spark or pandas."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvtrace.commands.base import MAKES_FOLDERS, Command
from kvtrace.commands.output import print_after_writing, print_result
from kvtrace.errors import printable


class ExportCommand(Command):
    """Write runs, run groups, Chrome traces and snapshots as Parquet tables (schema: docs/format.md).

    Each PATH is a run directory, a run group, a Chrome trace, a snapshot pickle, or a folder searched
    recursively (run directories, *.pt.trace.json[.gz], *.pickle; a file it passes over whose name may be
    an input's, such as rank0.json.gz, is named in a note: name it to export it). Tables: runs, devices,
    kv_events, memory_events, samples, engine_steps, engine_requests; each is a folder DIR/<table>/ of parts
    (part-NNNNN.parquet, one per export), which Spark, DuckDB and pyarrow read as one table. Exporting
    into an existing DIR adds a part and skips sources already in it and unchanged since; a source that
    changed (a run exported while it was being recorded, which has ended since) is exported again and
    replaces its earlier rows, with a note. A run still being recorded is exported as it stands, with a
    warning naming the recording's pid. --overwrite replaces its parts once the new one is complete (a
    failed or interrupted overwrite keeps them). One source is read at a time, so memory stays bounded by
    the largest input, whatever their number.
    An unreadable input (or an export directory named as one, or a run folder whose manifest.json is gone)
    is skipped with a one-line warning naming it; the others are exported.
    Exit status: 0 on success; 1 when DIR cannot be written, or standard output (the tables are then
    written all the same, and the line says so); 2 when any input was unreadable or missing (the rest are
    still written), for bad flags, or when DIR's table folders hold a Parquet file that is not kvtrace's or
    a part whose runs part is missing or a part file that is empty or not Parquet (a damaged export;
    --overwrite replaces it), or when DIR is an input, lies inside an input run, or is a run, run group or
    sweep's folder, or is a named pipe or a device (/dev/null included): nothing is written or removed.
    """

    name = "export"
    examples = (
        "kvtrace export runs/ -o tables/",
        "kvtrace export runs/demo-dynamic nightly/*.pickle -o tables/ --json",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "paths", nargs="+", metavar="PATH", help="runs, run groups, traces, snapshots, folders"
        )
        parser.add_argument(
            "-o", "--output", required=True, metavar="DIR", help=f"export directory ({MAKES_FOLDERS})"
        )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the tables already in DIR instead of adding (they are kept until the new part is "
            "complete)",
        )
        parser.add_argument("--json", action="store_true", help="print a summary of rows written as JSON")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.export_parquet import export

        state: dict[str, Any] = {}
        show_bar = not args.quiet and sys.stderr.isatty()

        def found(count: int) -> None:
            if show_bar and count > 1:
                from tqdm import tqdm

                state["bar"] = tqdm(total=count, unit="input", desc="exporting", file=sys.stderr)
            elif count == 1:  # one input: a bar in bytes, as `kvtrace report` shows for big files
                from kvtrace.commands.progress import progress_bar

                state["bytes"], state["close_bytes"] = progress_bar("reading", args.quiet)

        def read_progress(done: int, total: int) -> None:
            if state.get("bytes") is not None:
                state["bytes"](done, total)

        def warn(problem: str, prefix: str = "warning: skipped ") -> None:
            bar = state.get("bar")
            message = f"kvtrace export: {prefix}{printable(problem)}"
            if bar is not None:
                bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)

        def step(_inp: Any) -> None:
            if state.get("bar") is not None:
                state["bar"].update(1)

        try:
            summary = export(
                args.paths,
                args.output,
                overwrite=args.overwrite,
                on_input=step,
                on_inputs_found=found,
                warn=warn,
                progress=read_progress,
                note=lambda line: warn(line, prefix=""),
            )
        finally:
            if state.get("bar") is not None:
                state["bar"].close()
            if state.get("close_bytes") is not None:
                state["close_bytes"]()

        def text() -> str:
            rows = ", ".join(f"{name} {count:,}" for name, count in summary.rows.items() if count)
            if summary.part is None:
                line = f"nothing new exported to {summary.out_dir}: no part added"
                if args.overwrite:
                    line += ", its earlier parts are kept"
            else:
                line = (
                    f"exported {summary.exported} of {summary.inputs} inputs to {summary.out_dir} "
                    f"(part {summary.part}): {rows or 'no rows'}"
                )
            if summary.reexported:
                again = len({run_id for run_id, _ in summary.reexported})
                line += (
                    f"\n{again} exported again: changed since an earlier part took it (see the notes above)"
                )
            if summary.already_exported:
                line += f"\n{summary.already_exported} already in {summary.out_dir}: not exported again"
            if summary.problems:
                line += f"\n{len(summary.problems)} skipped (see the warnings above)"
            if summary.left_out:
                line += (
                    f"\n{len(summary.left_out)} left out: files in a folder not read (see the notes above)"
                )
            return line

        if summary.part is None:
            written = f"nothing new was exported to {summary.out_dir}"
        else:
            written = f"the export is written all the same ({summary.out_dir}, part {summary.part})"
        print_after_writing(lambda: print_result(args.json, summary.to_json, text), written)
        return 2 if summary.problems else 0
