"""The `kvtrace` command: one parser, one small class per subcommand, errors as one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvtrace.commands.base import Command
from kvtrace.commands.lazy_numpy import numpy_at_first_use
from kvtrace.errors import KvtraceError

# (name, module, class): imported when the parser is built, so each module keeps torch/plotly imports
# inside `run`. A command line naming one command imports only that one (start-up counts on small inputs).
_COMMANDS = (
    ("demo", "kvtrace.commands.demo", "DemoCommand"),
    ("report", "kvtrace.commands.report", "ReportCommand"),
    ("plan", "kvtrace.commands.plan", "PlanCommand"),
    ("diagnose", "kvtrace.commands.diagnose", "DiagnoseCommand"),
    ("compare", "kvtrace.commands.compare", "CompareCommand"),
    ("sweep", "kvtrace.commands.sweep", "SweepCommand"),
    ("export", "kvtrace.commands.export", "ExportCommand"),
    ("query", "kvtrace.commands.query", "QueryCommand"),
)


def _commands(only: str | None = None) -> list[Command]:
    found: list[Command] = []
    for name, module_name, class_name in _COMMANDS:
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a command not built yet
            raise
        found.append(getattr(module, class_name)())
    return found


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv` naming a command first, only that command's subparser (the others'
    modules stay unimported). `kvtrace --help` and unknown commands get every command."""
    from kvtrace import __version__

    first = next(iter(argv), None) if argv is not None else None
    only = first if first in {name for name, _, _ in _COMMANDS} else None

    parser = argparse.ArgumentParser(
        prog="kvtrace",
        description="Where an LLM's GPU memory goes during inference, and how much of it is the KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"kvtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _commands(only):
        doc = (type(command).__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else ""
        child = sub.add_parser(
            command.name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        command.add_arguments(child)
        child.set_defaults(_command=command, _parser=child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    command: Command | None = getattr(args, "_command", None)
    if unknown:  # said with the usage of the command they were given to, not kvtrace's own
        (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if command is None:
        parser.print_help()
        return 2
    try:
        if command.defers_numpy:
            with numpy_at_first_use():
                return command.run(args)
        return command.run(args)
    except KvtraceError as exc:
        print(f"kvtrace {command.name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"kvtrace {command.name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
