"""Summarize a run directory, Chrome trace or CUDA snapshot; write the HTML timeline or JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtrace.commands.base import MAKES_FOLDERS, Command, require_input
from kvtrace.commands.output import (
    check_html_target,
    print_result,
    said_unreadable,
    said_written,
    write_html,
)
from kvtrace.commands.progress import reading
from kvtrace.errors import KvtraceError, cannot_write, printable
from kvtrace.run_layout import is_run_group

if TYPE_CHECKING:
    from analyzers.summary import Report


class ReportCommand(Command):
    """Summarize a run directory, Chrome trace or CUDA snapshot; write the HTML timeline or JSON.

    PATH is a kvtrace run directory, a torch.profiler Chrome trace (.json, .json.gz) or a CUDA allocator
    snapshot pickle (torch.cuda.memory._dump_snapshot). Pickles are read without running any code. A run
    group (one run per rank of a torch.distributed job) shows its ranks side by side, KV summed over ranks.
    On a run directory (each rank's, for a group) it also writes two files into the run itself, for Perfetto
    and TensorBoard: kv_counters.trace.json.gz (KV bytes as Chrome-trace counters) and tb_scalars/ (KV bytes
    per step as TensorBoard scalars), where those there differ (a second report of a run writes nothing).
    --no-export leaves the run as it is. A run may come from anyone: where one of those two is a symbolic
    link (or not a file, not a folder) it is left alone, with a warning.
    -o naming the input (by any path, a link to it) is refused: a trace is read by its content, whatever its
    name. -o writes the page whole to a temporary file, then renames it over the path: a symbolic link at the
    path is replaced by the page, the file it pointed to is left alone; a named pipe or a device there (or
    a link to one, as /dev/stdout is) is refused.
    A run's files that cannot be written (a read-only run, a full disk) get a warning line each, and the
    report is printed all the same.
    Exit status: 0 on success, also when the files written into a run could not be; 1 when the -o HTML or
    standard output cannot be written; 2 for unreadable input or bad flags, a run group's rank included
    (the others are reported, and its error follows on stderr), or an -o that is a named pipe or a device
    (/dev/null included), refused before any work.
    """

    name = "report"
    examples = (
        "kvtrace report runs/demo-dynamic",
        "kvtrace report runs/demo-dynamic -o timeline.html",
        "kvtrace report trace.pt.trace.json.gz --json | jq .devices",
    )
    defers_numpy = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "path", metavar="PATH", help="run directory, run group, Chrome trace or snapshot pickle"
        )
        parser.add_argument(
            "-o",
            "--output",
            metavar="FILE",
            help=f"write a self-contained HTML timeline to this file ({MAKES_FOLDERS})",
        )
        parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        parser.add_argument(
            "--no-export",
            action="store_true",
            help="do not write kv_counters.trace.json.gz and tb_scalars/ into the run directory",
        )

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.render.json import report_to_json
        from analyzers.report import build_report

        check_html_target(args.output, [args.path])
        path = Path(args.path)
        require_input(path)
        if is_run_group(path):
            return self._run_group(path, args)
        with reading(f"reading {path.name}", args.quiet) as update:
            # Without -o no chart is drawn: a small snapshot is then read without numpy (start-up counts)
            source, report = build_report(
                path, progress=update, keep_events=False, timelines=bool(args.output)
            )
        self.last_report = report  # for `kvtrace demo`, which reports its own run
        if source.kind == "run" and not getattr(args, "no_export", False):
            self._export(path, source)
        page = None  # written before the result is printed (`said_written`)
        if args.output:
            from analyzers.render.html import report_to_html

            out = Path(args.output)
            # A vLLM run's page says what `kvtrace diagnose` says of it, a budget it crossed included
            sections = _engine_section(source, report)
            crossed = report.budget is not None and report.budget["crossed"]
            if sections is None:
                sections = []
                if report.oom is not None or crossed:  # a budget crossing is explained as an OOM would be
                    try:
                        from analyzers.render.diagnosis import diagnosis_html_for
                    except ImportError:
                        diagnosis_html_for = None  # type: ignore[assignment]
                    if diagnosis_html_for is not None:
                        sections.append(diagnosis_html_for(source, report))
            page = write_html(out, report_to_html(source, report, sections), quiet=True)
        print_result(args.json, lambda: report_to_json(report), lambda: _text(report))
        if page is not None and not args.json:
            said_written(page)
        return 0

    @staticmethod
    def _run_group(path: Path, args: argparse.Namespace) -> int:
        """A run group (one run directory per rank): the ranks side by side, KV summed over ranks."""
        from analyzers.group import build_group_report
        from analyzers.render.group import group_report_to_html, group_report_to_json, group_report_to_text

        with reading(f"reading {path.name}", args.quiet) as update:
            group = build_group_report(path, progress=update)
        if not getattr(args, "no_export", False):
            for rank in group.ranks:  # each rank's KV counters and scalars, as for a single run
                ReportCommand._export(Path(rank.path), rank.source)
        # The page first, said after the result (`said_written`)
        page = None
        if args.output:
            html = group_report_to_html(group, _group_sections(group))
            page = write_html(Path(args.output), html, quiet=True)
        print_result(args.json, lambda: group_report_to_json(group), lambda: group_report_to_text(group))
        if page is not None and not args.json:
            said_written(page)
        return said_unreadable("report", group.unreadable)

    @staticmethod
    def _export(path: Path, source: object) -> None:
        from analyzers.attribution import KV_FREES
        from analyzers.export import COUNTERS_FILE, SCALARS_DIR, step_start_ns, write_counters, write_scalars

        meta = source.meta  # type: ignore[attr-defined]
        if meta.get("recording_pid") is not None:  # still being written: its figures are not final
            print(
                f"kvtrace report: note: {printable(str(path))} is still being recorded: KV counters and "
                "scalars not written into it (report it again when it ends)",
                file=sys.stderr,
            )
            return
        # The exports are a by-product: a read-only or full run still gets its report (exit status 0), and
        # each file that could not be written gets one line.
        try:
            pid = int(meta["manifest"].get("pid", 0))
            starts = step_start_ns(source)  # type: ignore[arg-type]
            shift = meta.get("trace_clock_shift_us", 0)
            frees = meta.get(KV_FREES)  # the allocator's frees of the KV storages: where the total drops
            write_counters(path, meta["kv"], meta.get("trace"), pid, shift, starts, frees)
        except KvtraceError as exc:  # a link or a folder where the file goes
            _not_exported(exc)
        except OSError as exc:
            _not_exported(cannot_write(path / COUNTERS_FILE, exc))
        try:
            write_scalars(path, meta["kv"], step_start_ns(source))  # type: ignore[arg-type]
        except KvtraceError as exc:
            _not_exported(exc)
        except OSError as exc:
            _not_exported(cannot_write(path / SCALARS_DIR, exc, folder=True))


def _text(report: Report) -> str:
    """The terminal summary; its renderer is imported only here, as `--json` needs none of its helpers."""
    from analyzers.render.text import report_to_text

    return report_to_text(report)


def _not_exported(problem: KvtraceError) -> None:
    print(
        f"kvtrace report: warning: {problem}; the report is complete (--no-export skips this)",
        file=sys.stderr,
    )


def _group_sections(group: Any) -> list[str]:
    """A run group page's diagnosis: the rank `kvtrace diagnose` explains (the one that ran out, else the
    first that failed, else the peak), where it ran out or crossed its recorded budget, as a single run's
    page adds it."""
    focus = group.rank(group.focus_rank)
    budget = focus.report.budget
    if focus.report.oom is None and not (budget is not None and budget["crossed"]):
        return []
    try:
        from analyzers.render.diagnosis import diagnosis_html_for
    except ImportError:  # as for a single run: the page stands without its diagnosis
        return []
    return [diagnosis_html_for(focus.source, focus.report)]


def _engine_section(source: Any, report: Report) -> list[str] | None:
    """The page's diagnosis of an engine run, what `kvtrace diagnose` says of it and what the TensorBoard tab
    shows (analyzers.planning.engine_run_diagnosis chooses it for all three). None where the run is not
    explained as an engine's (its budget crossing, or OOM, is explained as the Hugging Face diagnosis does);
    [] where there is nothing to explain."""
    from analyzers.planning.engine_run_diagnosis import engine_run_diagnosis
    from analyzers.render.engine_run_diagnosis import engine_run_diagnosis_to_html

    diagnosis = engine_run_diagnosis(source, report)
    return None if diagnosis is None else engine_run_diagnosis_to_html(diagnosis)
