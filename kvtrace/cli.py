"""The `kvtrace` command: one parser, one small class per subcommand, errors as one line."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from kvtrace.commands.base import Command
from kvtrace.commands.lazy_numpy import numpy_at_first_use
from kvtrace.commands.output import GuardedStdout, StdoutError, UnfailingStderr, discard_unwritten, say
from kvtrace.errors import KvtraceError, UsageError, missing_dependency, os_errno, os_reason, printable

# (name, module, class): imported when the parser is built, so each module keeps torch/plotly imports
# inside `run`. A command line naming one command imports only that one (start-up counts on small inputs).
_COMMANDS = (
    ("demo", "kvtrace.commands.demo", "DemoCommand"),
    ("run", "kvtrace.commands.run", "RunCommand"),
    ("report", "kvtrace.commands.report", "ReportCommand"),
    ("plan", "kvtrace.commands.plan", "PlanCommand"),
    ("diagnose", "kvtrace.commands.diagnose", "DiagnoseCommand"),
    ("compare", "kvtrace.commands.compare", "CompareCommand"),
    ("sweep", "kvtrace.commands.sweep", "SweepCommand"),
    ("export", "kvtrace.commands.export", "ExportCommand"),
    ("query", "kvtrace.commands.query", "QueryCommand"),
)


# Shown under `kvtrace --help`, as git's and pip's helps show where to start and what the status means
_EXAMPLES = (
    "kvtrace demo --size tiny -o runs/tiny",
    "kvtrace run -o runs/gen generate.py",
    "kvtrace report runs/gen",
    "kvtrace diagnose runs/gen --gpu-memory 24GiB",
    "kvtrace plan --preset llama-3.1-8b --batch 8 --context 32768 --gpu-memory L4",
)
_EXIT_STATUS = (
    "exit status: 0 success; 1 a failed run or an output that cannot be written (and `plan` when the plan\n"
    "does not fit); 2 bad input or flags, or an output path that is a named pipe or a device (/dev/null\n"
    "included), refused before any work; 70 an internal error; 130 interrupted (Ctrl-C). `kvtrace run`\n"
    "exits with its script's status. Each command's --help says its own."
)


def _examples_text(examples: Sequence[str]) -> str:
    """The "examples:" block of a help, one command line an indented line."""
    return "examples:\n" + "".join(f"  {example}\n" for example in examples)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr, as every other error is: argparse's own `error`
    prints the whole usage block first (17 lines for `plan`), which buries the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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

    parser = _Parser(
        prog="kvtrace",
        description="Where an LLM's GPU memory goes during inference, and how much of it is the KV cache.",
        epilog=f"{_examples_text(_EXAMPLES)}\n{_EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # -V as well, as python, pip, ruff and pytest spell it
    parser.add_argument("-V", "--version", action="version", version=f"kvtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _commands(only):
        doc = (type(command).__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else ""
        child = sub.add_parser(
            command.name,
            help=summary,
            description=doc,
            epilog=_examples_text(command.examples) if command.examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(child)
        child.set_defaults(_command=command, _parser=child)
    return parser


class _CtrlC:
    """Whether a Ctrl-C came while a command ran. A library may catch the KeyboardInterrupt and raise its
    own error in its place: numpy, cut short while it loads its C extension, raises an ImportError of 20
    lines of advice, which was said as an internal error (exit 70) instead of an interrupt (130). And a
    Ctrl-C whose handler runs inside a weakref callback or a `__del__` (importlib frees its module locks
    through one) raises where Python can only print it: "Exception ignored in: ..." and a traceback, and
    the command ran on as if no Ctrl-C had come. That one is dropped unprinted, and seen."""

    def __init__(self) -> None:
        self.seen = False
        self._installed = False
        self._unraisablehook: Callable[[Any], object] | None = None

    def _handle(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            self.seen = True
        elif self._unraisablehook is not None:
            self._unraisablehook(unraisable)

    def install(self) -> None:
        """Only over Python's own handler: a SIGINT ignored (nohup) or taken by an embedding host stays so;
        and only on the main thread, where Python runs signal handlers (`main()` called from another thread
        leaves the interrupt as it is)."""
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # "signal only works in main thread of the main interpreter"
            return
        self._installed = True
        self._unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def restore(self) -> None:
        if self._installed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._unraisablehook is not None and sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._unraisablehook
        self._unraisablehook = None
        self._installed = False


_ctrl_c = _CtrlC()


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    stdout = sys.stdout
    sys.stdout = GuardedStdout(stdout)  # type: ignore[assignment]
    # A closed standard error (`2>&-`: cron, daemons) leaves Python no sys.stderr: print(file=None) then
    # wrote kvtrace's warnings and errors into stdout (a --json reader's), and `isatty()` on it failed
    closed_stderr = sys.stderr is None
    if closed_stderr:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    stderr = sys.stderr
    if next(iter(argv), None) != "run":  # a script kvtrace runs keeps its standard error (and SIGINT) as is
        sys.stderr = UnfailingStderr(stderr)  # type: ignore[assignment]
        _ctrl_c.seen = False
        _ctrl_c.install()
    try:
        return _main(argv, stdout)
    except StdoutError as exc:  # --help or --version printed into a full disk or a closed stdout
        discard_unwritten(stdout)
        named = next(iter(argv), None)
        prog = f"kvtrace {named}" if named in {name for name, _, _ in _COMMANDS} else "kvtrace"
        say(f"{prog}: error: {exc}")
        return exc.exit_code
    except BrokenPipeError:  # `kvtrace --version | true`: the reader has gone, as for a command's output
        discard_unwritten(stdout)
        return 0
    except (
        KeyboardInterrupt
    ):  # Ctrl-C while the parser is built (its commands imported), before a command runs
        named = next(iter(argv), None)
        prog = f"kvtrace {named}" if named in {name for name, _, _ in _COMMANDS} else "kvtrace"
        say(f"{prog}: interrupted")
        return 130
    finally:
        _ctrl_c.restore()
        if isinstance(sys.stdout, GuardedStdout):
            sys.stdout = stdout
        sys.stderr = stderr
        if closed_stderr:
            stderr.close()
            sys.stderr = None  # type: ignore[assignment]


def _main(argv: Sequence[str], stdout: TextIO | None) -> int:
    parser = build_parser(argv)
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit:  # --help, --version: what they printed fails here, not unsaid at the exit
        sys.stdout.flush()
        raise
    command: Command | None = getattr(args, "_command", None)
    if unknown:  # said with the usage of the command they were given to, not kvtrace's own
        (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if command is None:
        parser.print_help()
        sys.stdout.flush()
        return 2
    empty = _empty_path(args)
    if empty is not None:  # pathlib reads "" as ".": an unset shell variable would read or write the cwd
        say(f"kvtrace {command.name}: error: {empty}: an empty path ('') names no file or folder")
        return 2
    if getattr(args, "output", None) == "-" or getattr(args, "out", None) == "-":
        # `-o -` is standard output to users of other tools; taken as a path, it wrote a file named "-"
        say(
            f"kvtrace {command.name}: error: -o -: kvtrace writes this output to a path, not to standard "
            "output; name a file or folder (./- for one named '-')"
        )
        return 2
    try:
        if _ctrl_c.seen:  # a Ctrl-C that a weakref callback swallowed as the parser was built
            raise KeyboardInterrupt
        if command.defers_numpy:
            with numpy_at_first_use():
                status = command.run(args)
        else:
            status = command.run(args)
        sys.stdout.flush()  # what is still buffered fails here, named, not at the interpreter's exit
        if _ctrl_c.seen:  # one swallowed while the command ran: what it did is not all it was asked
            raise KeyboardInterrupt
        return status
    except KvtraceError as exc:
        if isinstance(exc, StdoutError):
            discard_unwritten(stdout)
        see = f" (see kvtrace {command.name} --help)" if isinstance(exc, UsageError) else ""
        say(f"kvtrace {command.name}: error: {printable(str(exc))}{see}")
        return exc.exit_code
    except KeyboardInterrupt:
        say(f"kvtrace {command.name}: interrupted")
        return 130
    except BrokenPipeError:
        discard_unwritten(stdout)  # else written again at exit: "Exception ignored", exit status 120
        return 0
    except OSError as exc:  # a path the readers did not expect to fail (permissions, a folder, a full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        say(f"kvtrace {command.name}: error: {printable(where + os_reason(exc))}")
        return 1 if _output_failed(exc) else 2
    except (RecursionError, MemoryError) as exc:
        said = "an input is nested too deeply" if isinstance(exc, RecursionError) else "out of memory"
        say(f"kvtrace {command.name}: error: {said} ({printable(_inputs(args))})")
        return 2 if isinstance(exc, RecursionError) else 1
    except Exception as exc:
        if _ctrl_c.seen:  # a library's own error in place of the KeyboardInterrupt it caught
            say(f"kvtrace {command.name}: interrupted")
            return 130
        if isinstance(exc, RuntimeError) and _CPU_ALLOCATOR_REFUSED in str(exc):  # torch's MemoryError on CPU
            say(f"kvtrace {command.name}: error: out of memory ({printable(_inputs(args))})")
            return 1
        needs = missing_dependency(exc, command.name) if isinstance(exc, ImportError) else None
        if needs is not None:  # an optional part not installed (the laptop install has no torch)
            say(f"kvtrace {command.name}: error: {needs}")
            return 1
        # A bug, or input damaged in a way no reader checks: one line, the traceback on request.
        if os.environ.get("KVTRACE_DEBUG"):
            raise
        say(
            f"kvtrace {command.name}: internal error on "
            f"{printable(f'{_inputs(args)}: {type(exc).__name__}: {exc}')} "
            "(KVTRACE_DEBUG=1 shows the traceback; please report it)"
        )
        return 70  # EX_SOFTWARE


# What torch's CPU allocator says (as a plain RuntimeError) when the host cannot give it what a tensor needs
_CPU_ALLOCATOR_REFUSED = "DefaultCPUAllocator: can't allocate memory"


# A write that failed for want of room or a writable disk: the output, not the input, is at fault.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _output_failed(exc: OSError) -> bool:
    return os_errno(exc) in _OUTPUT_ERRNOS


# Arguments that name files or folders, by their argparse dest, as the message names them
_PATH_ARGS = {
    "path": "PATH",
    "paths": "PATH",
    "runs": "RUN",
    "dir": "DIR",
    "output": "--output",
    "out": "--out",
    "from_run": "--from-run",
    "config": "--config",
}


def _empty_path(args: argparse.Namespace) -> str | None:
    """The argument given as an empty path, if any."""
    for dest, said in _PATH_ARGS.items():
        value = getattr(args, dest, None)
        if value == "" or (isinstance(value, list) and "" in value):
            return said
    return None


def _inputs(args: argparse.Namespace) -> str:
    """The paths a command was given, for a message that must name them: those that exist, and its output
    (which a failed command may not have made, or removed again: a sweep's folder)."""
    found: list[str] = []
    for name, value in vars(args).items():
        if name.startswith("_"):
            continue
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str | os.PathLike) or not str(item).strip():
                continue
            if os.path.lexists(item) or name in ("out", "output"):
                found.append(str(item))
    return ", ".join(found) or "its arguments"


if __name__ == "__main__":
    sys.exit(main())
