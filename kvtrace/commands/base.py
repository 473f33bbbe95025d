"""Base class of CLI subcommands: each is a small class whose help is its docstring."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvtrace.errors import KvtraceError


class Command:
    """A subcommand. Subclasses set `name`, write a docstring (its first line is the short help),
    add their flags in `add_arguments` and do the work in `run`, returning the exit status.

    Raise `kvtrace.errors.KvtraceError` for anything the user can fix: the CLI prints it as one line.
    Heavy imports (torch, plotly) belong inside `run`, so that `kvtrace --help` stays instant.
    """

    name: str = ""
    # True for commands that only read and render (no torch, no pyarrow): the CLI then imports numpy at
    # first use (`kvtrace.commands.lazy_numpy`), so small inputs do not pay its import.
    defers_numpy: bool = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's flags."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def require_input(path: Path) -> None:
    """The one-line error for an input that is not there: nothing, a link to nothing, or a loop of links."""
    if not path.exists():
        from analyzers.readers.sources import missing  # here, not at import: `kvtrace --help` stays light

        raise KvtraceError(missing(path))
