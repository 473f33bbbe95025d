"""`kvtrace compare`: runs side by side, with their KV timelines on a shared step axis."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvtrace.commands.base import MAKES_FOLDERS, Command, require_input, shell_arg
from kvtrace.commands.output import (
    check_html_target,
    print_result,
    said_unreadable,
    said_written,
    write_html,
)
from kvtrace.commands.progress import reading
from kvtrace.errors import KvtraceError, UsageError
from kvtrace.run_layout import is_run_group


class CompareCommand(Command):
    """Compare runs side by side: peak, KV peak, churn, reserved but unallocated, tokens/s, evicted tokens.

    Each RUN is a kvtrace run directory (or any input `kvtrace report` reads; step-axis timelines and
    tokens/s need a run directory, tokens/s one whose forwards updated a KV cache: a note says why where
    none did, as with use_cache=False). tokens/s = the tokens the KV log shows the model generated (1 per
    prefill, then what each step appended per row, net of crops: right for speculative decoding) / the wall
    time from the recorder's start sample (the profiler running) to its last step's end, recorder overhead
    included, the profiler's start-up and trace writing not; per row, and over every batch row (under beam
    search the rows are beams: the table says so). Run groups compare by their totals (KV summed over the
    ranks, the rows saying "all ranks"; the device rows, peak allocated among them, the highest rank's, "one
    rank"; tokens/s: rank 0's under tensor parallelism, the ranks' sum under data parallelism), and rank by
    rank when all RUNs are groups of the same world size; a vLLM run's KV sums its tensor- and
    pipeline-parallel workers' pools, its device rows the first worker's. An engine run (vLLM,
    transformers' continuous batching) adds its pool's rows (requests, blocks, preemptions, output tokens),
    its tokens/s the requests' output tokens over the time from its first request to its last step (the
    per-row figures: "-"). Exit status: 0 on success;
    1 when the HTML or standard output cannot be written; 2 for unreadable input or bad flags, a run
    group's rank included (the others are compared, and its error follows on stderr), or an -o that is a
    named pipe or a device (/dev/null included), refused before any work.
    """

    name = "compare"
    examples = (
        "kvtrace compare runs/demo-dynamic runs/demo-static",
        "kvtrace compare runs/a runs/b runs/c -o compare.html",
    )
    defers_numpy = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "runs",
            nargs="+",
            metavar="RUN",
            help="two or more runs: run directories, run groups, traces or snapshots (what report reads)",
        )
        parser.add_argument(
            "-o",
            "--output",
            metavar="FILE",
            help=f"write a self-contained HTML page (e.g. compare.html; {MAKES_FOLDERS})",
        )
        parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.compare import compare, comparison_to_json
        from analyzers.render.compare import comparison_to_html, comparison_to_text
        from analyzers.report import build_report

        check_html_target(args.output, args.runs)
        if len(args.runs) < 2:
            held = _runs_inside(Path(args.runs[0])) if args.runs else []
            if len(held) >= 2:  # a folder of runs: say how to name them
                names = " ".join(shell_arg(p) for p in held[:3]) + (" ..." if len(held) > 3 else "")
                example = f"kvtrace compare {names}"
                raise KvtraceError(f"{args.runs[0]} holds {len(held)} runs: name them, e.g. {example}")
            raise UsageError("give at least two runs to compare")
        paths = [Path(p) for p in args.runs]
        for path in paths:
            require_input(path)
        labels = _labels(paths)

        def read(path: Path) -> Any:
            """One input, with its own bar when it is big: a run group's report, else the run's."""
            with reading(f"reading {path.name}", args.quiet) as update:
                if is_run_group(path):
                    from analyzers.group import build_group_report

                    return build_group_report(path, progress=update)
                return build_report(path, progress=update)

        unreadable: list[str] = []
        if any(is_run_group(p) for p in paths):
            inputs = [read(p) for p in paths]
            unreadable = [line for item in inputs for line in getattr(item, "unreadable", ())]
            comparison = self._with_groups(inputs, labels)
        else:
            comparison = compare([read(p) for p in paths], labels)
        # The page first, said after the result (`said_written`)
        page = write_html(args.output, comparison_to_html(comparison), quiet=True) if args.output else None
        print_result(
            args.json, lambda: comparison_to_json(comparison), lambda: comparison_to_text(comparison)
        )
        if page is not None and not args.json:
            said_written(page)
        return said_unreadable("compare", unreadable)

    @staticmethod
    def _with_groups(inputs: list[Any], labels: list[str]) -> Any:
        """Run groups compare by their totals (KV summed over ranks, the peak rank's device); when every input
        is a group of the same world size, rank by rank too (`<label>/rank-<r>` columns)."""
        from analyzers.compare import Comparison, run_figures
        from analyzers.group import GroupReport, group_figures, rank_figures

        rows = [
            group_figures(item, label)
            if isinstance(item, GroupReport)
            else run_figures(item[0], item[1], label)
            for item, label in zip(inputs, labels, strict=True)
        ]
        groups = [item for item in inputs if isinstance(item, GroupReport)]
        sizes = {(g.world_size, tuple(r.rank for r in g.ranks)) for g in groups}
        if len(groups) == len(inputs) and len(sizes) == 1:
            per_group = [rank_figures(g, label) for g, label in zip(groups, labels, strict=True)]
            rows += [row for ranks in zip(*per_group, strict=True) for row in ranks]
        return Comparison(tuple(rows))


def _labels(paths: list[Path]) -> list[str]:
    """Each input's column: its folder's name, the paths where names repeat, and `#2`, `#3` after a path
    given again (`RUN ./RUN`), so that no two columns, nor two of the JSON's `label`s, are the same."""
    labels = [p.name or str(p) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def _runs_inside(folder: Path) -> list[Path]:
    """The run directories directly inside a folder that is not itself a run (or nothing)."""
    from analyzers.readers.sources import runs_in
    from kvtrace.format import is_run_dir

    if not folder.is_dir() or is_run_dir(folder):
        return []
    return runs_in(folder)
