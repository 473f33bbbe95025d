"""The `kvtrace` command: one parser, one small class per subcommand, errors as one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvtrace.commands.base import Command
from kvtrace.errors import KvtraceError

# (module, class): imported at start-up, so each module keeps torch/plotly imports inside `run`.
_COMMANDS = (
    ("kvtrace.commands.demo", "DemoCommand"),
    ("kvtrace.commands.report", "ReportCommand"),
    ("kvtrace.commands.plan", "PlanCommand"),
    ("kvtrace.commands.diagnose", "DiagnoseCommand"),
    ("kvtrace.commands.compare", "CompareCommand"),
    ("kvtrace.commands.sweep", "SweepCommand"),
    ("kvtrace.commands.export", "ExportCommand"),
    ("kvtrace.commands.query", "QueryCommand"),
)


def _commands() -> list[Command]:
    found: list[Command] = []
    for module_name, class_name in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a command not built yet
            raise
        found.append(getattr(module, class_name)())
    return found


def build_parser() -> argparse.ArgumentParser:
    from kvtrace import __version__

    parser = argparse.ArgumentParser(
        prog="kvtrace",
        description="Where an LLM's GPU memory goes during inference, and how much of it is the KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"kvtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _commands():
        doc = (type(command).__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else ""
        child = sub.add_parser(
            command.name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        command.add_arguments(child)
        child.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "_command", None)
    if command is None:
        parser.print_help()
        return 2
    try:
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
