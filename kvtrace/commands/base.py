"""Base class of CLI subcommands: each is a small class whose help is its docstring."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvtrace.errors import KvtraceError, shell_arg

__all__ = [
    "MAKES_FOLDERS",
    "AsTyped",
    "Command",
    "add_gpu_memory",
    "gpu_memory_flag",
    "long_dtype",
    "require_input",
    "shell_arg",
    "short_dtype",
]


# Said under every output option: each command makes the folders its output path lacks, as `mkdir -p`
# does (`-o new/dir/x.html` writes there), where compilers and curl refuse such a path; said, not a surprise
MAKES_FOLDERS = "missing folders on the path are made, as mkdir -p makes them"


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
    # Command lines shown under "examples:" in its --help, as git's and pip's helps show theirs; a test
    # parses each, so a renamed flag cannot leave a stale one behind.
    examples: tuple[str, ...] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's flags."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def require_input(path: Path) -> None:
    """The one-line error for an input that is not there: nothing, a link to nothing, or a loop of links."""
    if not path.exists():
        from analyzers.readers.sources import missing  # here, not at import: `kvtrace --help` stays light

        raise KvtraceError(missing(path))


# plan names dtypes as the memory planners do (bf16), demo and sweep as torch does (bfloat16): each takes the
# other's spelling too, so that one `--dtype` works on every command
_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_LONG_DTYPES = {short: long for long, short in _SHORT_DTYPES.items()}


def short_dtype(text: str) -> str:
    """A `--dtype` value in plan's words: bfloat16 -> bf16 (argparse `type`, before its `choices`)."""
    return _SHORT_DTYPES.get(text, text)


def long_dtype(text: str) -> str:
    """A `--dtype` value in torch's words, demo's and sweep's: bf16 -> bfloat16."""
    return _LONG_DTYPES.get(text, text)


class AsTyped(argparse.Action):
    """Keeps a flag's value and which of its names was typed (`args.<dest>_flag`), so that an error about
    the value names the flag the user wrote, not an alias of it."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option)


def add_gpu_memory(parser: argparse.ArgumentParser, help: str, dest: str = "gpu_memory") -> None:
    """`--gpu-memory SIZE`, a device's memory on every command, and `--budget`, the same flag by the name
    diagnose and sweep first gave it: a user who learnt one command's name gets it on all of them (`plan
    --budget 24GiB` was "unrecognized arguments"). Help shows `--gpu-memory` alone."""
    parser.add_argument("--gpu-memory", dest=dest, action=AsTyped, metavar="SIZE", help=help)
    parser.add_argument("--budget", dest=dest, action=AsTyped, metavar="SIZE", help=argparse.SUPPRESS)


def gpu_memory_flag(args: argparse.Namespace, dest: str = "gpu_memory") -> str:
    """The name the user typed for the flag `add_gpu_memory` added, for a message about its value."""
    return getattr(args, f"{dest}_flag", None) or "--gpu-memory"
