"""Record a Python script as it is, under `kvtrace.record()`, with no change to its code."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import runpy
import signal
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from kvtrace.commands.base import MAKES_FOLDERS, Command, add_gpu_memory, gpu_memory_flag, shell_arg
from kvtrace.commands.demo import refuse_not_a_run_folder, refuse_occupied
from kvtrace.commands.output import say
from kvtrace.errors import KvtraceError, UsageError
from kvtrace.term_signal import Terminated

_VLLM_MP = "VLLM_ENABLE_V1_MULTIPROCESSING"


class RunCommand(Command):
    """Record a Python script as it is: kvtrace run [-o RUN] script.py [ARGS...] (or -m MODULE).

    Runs the script (or module, with -m) under kvtrace.record(), as `memray run` or `nsys profile` take a
    program, with no change to its code. The run's model is the first one whose Hugging Face generate()
    the script calls (record(model="auto")): its weights, steps and geometry from there; every transformers
    cache is logged from the start. A vllm.LLM is found alike at its first generate() or chat() and its
    pool followed: kvtrace run sets VLLM_ENABLE_V1_MULTIPROCESSING=0, unless it is set already, so that
    vLLM's engine core runs in the script's process where kvtrace sees it (its memory is the same; an
    engine in its own process, or `vllm serve`, is the plugin's to record: KVTRACE_DIR). Your own model's
    caches (cache_k/cache_v buffers, kvtrace.track) need record(model=...) in your code. On CUDA, kvtrace
    initializes the current device before the script so that its memory is sampled from the start.
    The script runs as `python script.py` (or `python -m`) runs it: its sys.argv, __file__, sys.path[0],
    output and exit status are its own; kvtrace's lines go to stderr.
    Exit status: the script's (its sys.exit code; 1 when it raised, after its traceback; on Ctrl-C, after
    its traceback, killed by SIGINT as Python is: 130 in a shell; killed by SIGTERM when it is stopped by
    one, 143 in a shell; its run written and named either way); 2 for a bad flag, a script or module that is
    not there, an output folder that holds a run (--overwrite replaces it; it refuses, before the script
    runs, a run whose profiler/ is a symbolic link) or an export's tables, or one that is a named pipe or a
    device (/dev/null included).
    """

    name = "run"
    examples = (
        "kvtrace run -o runs/gen generate.py --max-new-tokens 64",
        "kvtrace run --no-profiler -m my_package.serve",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-o",
            "--out",
            "--output",
            metavar="DIR",
            help=f"run directory (default: runs/<script name>; {MAKES_FOLDERS})",
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="replace the run directory if it holds a run"
        )
        parser.add_argument("-m", dest="module", action="store_true", help="TARGET is a module, as python -m")
        parser.add_argument(
            "--no-profiler", action="store_true", help="no torch.profiler trace: the KV log alone (lightest)"
        )
        parser.add_argument(
            "--with-stack",
            action="store_true",
            help="record Python stacks of allocations (diagnose names them)",
        )
        add_gpu_memory(
            parser,
            "mark where the run would run out on a device this size, e.g. 24GiB, or a GPU's name (L4); "
            "--budget is another name for it",
        )
        # One positional for the script and its arguments, argparse's PARSER kind (as a subcommand takes the
        # rest of the line): a TARGET then a REMAINDER lost the script's own `--` (`script.py -- x` gave it
        # ["script.py", "x"]), which TARGET's pattern took and argparse strips; PARSER keeps every token.
        parser.add_argument(
            "command_line",
            nargs=argparse.PARSER,
            metavar="TARGET",
            help="the script (or, with -m, the module) to run, then the script's own arguments",
        )

    def run(self, args: argparse.Namespace) -> int:
        from analyzers.planning.size_text import parse_device_memory

        # the flag first, before the script is looked for: "24" without its unit is refused, not 24 bytes
        typed = args.gpu_memory
        gpu_memory = parse_device_memory(typed, gpu_memory_flag(args)) if typed is not None else None
        target, script_args = _target_and_args(args.command_line)
        # sys.path[0] as Python sets it: the working folder for -m, the script's own (links resolved) for a
        # script; never the folder of the `kvtrace` command, which the installed script puts there
        if args.module:
            path0 = os.getcwd()
            _refuse_a_missing_module(target, path0)
        else:
            script = Path(target)
            if not script.is_file():
                what = "a folder, not a script" if script.is_dir() else "no such file"
                raise KvtraceError(f"{target}: {what}")
            path0 = os.path.dirname(os.path.realpath(target))
        name = target.rsplit(".", 1)[-1] if args.module else Path(target).stem
        out = Path(args.out) if args.out is not None else Path("runs") / name
        refuse_not_a_run_folder(out)
        refuse_occupied(out, args.overwrite)
        # Registered before torch's exit handlers and the script's, so that it runs after them
        sigint_at_exit = _SigintAtExit()
        import torch

        import kvtrace

        vllm_inproc = _vllm_engine_in_process()
        if torch.cuda.is_available():
            torch.cuda.init()  # a model-less recording samples the device CUDA has initialized
        options: dict[str, Any] = {"overwrite": args.overwrite, "profiler": not args.no_profiler}
        if args.with_stack:
            options["with_stack"] = True
        if gpu_memory is not None:
            options["gpu_memory"] = gpu_memory
        status = 0
        started = False  # whether the script ran: a recording that failed to start recorded nothing
        raised: BaseException | None = None
        argv, path = list(sys.argv), list(sys.path)
        stdout = sys.stdout
        sys.stdout = sys.__stdout__ or stdout  # the script's own, not the CLI's guarded one
        try:
            sys.argv = [target, *script_args]
            sys.path[:] = _script_path(path0, path)
            try:
                recording = kvtrace.record(out, model="auto", **options)
                # Not before the line saying where the run is: a SLURM log's only pointer to it
                recording.dies_of_sigterm = False
                with recording:
                    started = True
                    try:
                        if args.module:
                            runpy.run_module(target, run_name="__main__", alter_sys=True)
                        else:
                            _run_script(target)
                    except SystemExit as exc:  # the script's exit ends the block as it ends the script
                        status = _exit_status(exc.code)
            except KvtraceError:
                raise
            except BaseException as exc:
                if not started:  # kvtrace's start failed: the script never ran, no run is there to name
                    raise
                if isinstance(exc, KeyboardInterrupt):  # its traceback, as Python prints it; it dies of
                    status, raised = 130, exc  # SIGINT at exit
                    sigint_at_exit.armed = True
                elif isinstance(exc, Terminated):  # no traceback, as Python's default prints none; it dies
                    status = 143  # of SIGTERM below
                else:  # the script's own error: its run is written, its traceback shown
                    status, raised = 1, exc
        finally:
            sys.argv[:], sys.path[:] = argv, path
            if vllm_inproc:
                os.environ.pop(_VLLM_MP, None)
            with contextlib.suppress(Exception):  # the script's output, before kvtrace's lines
                sys.stdout.flush()
            sys.stdout = stdout
        if raised is not None:
            _print_script_traceback(raised, target)
        found = _what_was_found(
            recording, args.no_profiler, vllm_inproc, out, [target, *script_args], args.module
        )
        if recording.sigterm_received:
            found += "; the script was stopped by SIGTERM"
        # Under torchrun each rank records into out/rank-<r>: its line names its own run, and the group's
        # commands (it said "recorded out" on every rank)
        recorded = str(out)
        if recording.path != out:
            recorded = f"{recording.path}, this rank's run of the group {out}"
        say(  # one write: the ranks of a torchrun group share one stderr
            f"kvtrace run: recorded {recorded} ({found}); "
            f"next: kvtrace report {shell_arg(out)}, kvtrace diagnose {shell_arg(out)}"
        )
        recording.die_if_sigterm()  # as it would have without kvtrace: exit status 143, nothing more run
        return status


def _target_and_args(command_line: list[str]) -> tuple[str, list[str]]:
    """The script (or module) and its own arguments. A `--` before the script ends kvtrace's options
    (`kvtrace run -- script.py`) and is dropped, whether argparse left it in PARSER's tokens (3.11) or not;
    every later token, a `--` included, is the script's, as `python script.py -- x` gives it."""
    if command_line[:1] == ["--"]:
        command_line = command_line[1:]
    if not command_line:
        raise UsageError("no script after --: give the script (or, with -m, the module) to run")
    return command_line[0], command_line[1:]


def _vllm_engine_in_process() -> bool:
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 for the script, where vLLM is installed and the user has not set it:
    vLLM's engine core (scheduler, block pool) then runs in this process, where the recording follows it;
    by default it runs in a process of its own, which this process's recording cannot see (the run said
    "no generate() call" of a script that made one). The model's memory, and the pool's size, do not
    change. True when set here."""
    from kvtrace.integrations.model_discovery import importable

    if _VLLM_MP in os.environ or not importable("vllm"):
        return False
    os.environ[_VLLM_MP] = "0"
    return True


def _what_was_found(
    recording: Any, no_profiler: bool, vllm_inproc: bool, out: Path, command_line: list[str], module: bool
) -> str:
    """The final line's account of what the run followed, and for a vLLM engine it could not follow, how to
    record it: the command to paste, the script's own arguments with it (`command_line`)."""
    model, llm = recording.model, recording.vllm_llm
    if model is not None:
        return f"model {type(model).__name__}"
    if llm is not None:
        where = f", in this process ({_VLLM_MP}=0, set by kvtrace run)" if vllm_inproc else ""
        return f"vLLM engine of {type(llm).__name__}{where}"
    command = " ".join(["python", *(["-m"] if module else []), *(shell_arg(arg) for arg in command_line)])
    engine_dir = shell_arg(f"{out}-engine")
    if recording.engine_not_followed is not None:
        why = "" if vllm_inproc else f" ({_VLLM_MP}={os.environ.get(_VLLM_MP)})"
        unset = "" if vllm_inproc else f"unset {_VLLM_MP}, or "
        return (
            f"a vLLM {recording.engine_not_followed} whose engine ran in its own process{why}: its pool is "
            f"not in this run; {unset}record the engine with the kvtrace plugin: KVTRACE_DIR={engine_dir} "
            f"{command}"
        )
    found = "no transformers or vLLM generate() call: recorded without a model, transformers caches only"
    if not no_profiler:
        found += ", no profiler trace (it starts at the first generate())"
    if "vllm" in sys.modules:  # AsyncLLM, `vllm serve`: an engine core in its own process, the plugin's
        found += f"; for a vLLM engine in its own process, run KVTRACE_DIR={engine_dir} {command}"
    return found


class _SigintAtExit:
    """Ends the process as Python ends one whose Ctrl-C went unhandled (bpo-1054041): its exit handlers run
    (and its threads are waited for), then it dies of SIGINT, so that a shell running `kvtrace run` in a loop
    stops there as it stops for `python script.py`; an exit status of 130 tells the shell that the script
    handled its Ctrl-C, and the loop went on."""

    def __init__(self) -> None:
        self.armed = False
        atexit.register(self._die)

    def _die(self) -> None:
        if not self.armed:
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # delivered before the call returns


def _run_script(target: str) -> None:
    """The script as `python script.py` runs it: `__main__` in sys.modules (what pickle and multiprocessing
    look up), `__file__` and its traceback's file absolute, sys.argv[0] as typed. runpy.run_path gave one
    path to both: as typed, a script's `__file__` was relative (its folder lost after an os.chdir)."""
    import builtins
    import importlib.machinery
    import io
    import types

    path = os.path.abspath(target)
    with io.open_code(path) as source:
        code = compile(source.read(), path, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__dict__.update(
        __file__=path,
        __cached__=None,
        __loader__=importlib.machinery.SourceFileLoader("__main__", path),
        __builtins__=builtins,
    )
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _script_path(path0: str, path: list[str]) -> list[str]:
    """The import path the script gets: `path0` first, in place of the CLI's own first entry (the folder of
    the `kvtrace` command, or the working folder for `python -m kvtrace.cli`), which goes last, so that
    kvtrace's own later imports still find it where it was found (a source checkout)."""
    rest = [entry for entry in path[1:] if entry != path0]
    cli = path[:1] if path and path[0] not in (path0, *rest) else []
    return [path0, *rest, *cli]


def _refuse_a_missing_module(target: str, path0: str) -> None:
    """`-m MODULE` that is not on the import path the script will get (its top package, a submodule, or a
    package's `__main__`): one line, exit 2, before a run is made (runpy's error came from inside the
    recording, which left an empty run behind). Found, not imported: the packages' own code runs inside the
    recording, as under `python -m`."""
    import importlib.util

    top = target.split(".", 1)[0]
    saved = list(sys.path)
    sys.path.insert(0, path0)
    try:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise KvtraceError(f"{target}: no module named {top!r} (from {path0})")
        missing = _missing_submodule(target, spec)
    finally:
        sys.path[:] = saved
    if missing is not None:
        raise KvtraceError(f"{target}: {missing}")


def _missing_submodule(target: str, spec: Any) -> str | None:
    """What `python -m target` would find missing below its top package (`spec`), looked for in each
    package's folders as import looks there, without running any package's `__init__`; None where all is
    there, or where only running one could tell (an `__init__` that extends its own `__path__`, a finder's
    error: runpy says)."""
    name = target.split(".", 1)[0]
    for part in [*target.split(".")[1:], "__main__"]:  # a package runs as its __main__
        child = f"{name}.{part}"
        loaded = sys.modules.get(name)
        folders: Any = (
            getattr(loaded, "__path__", None) if loaded is not None else spec.submodule_search_locations
        )
        if child in sys.modules:  # loaded already (os.path, which no folder holds): there
            found = sys.modules[child].__spec__
            if found is None:
                return None
        elif folders is None:  # a module: `__main__` is itself, anything else is not there
            return None if part == "__main__" else f"{name!r} is a module, not a package"
        elif loaded is None and _extends_its_path(spec):
            return None
        else:
            try:
                found = _find_spec_in(child, folders)
            except Exception:  # a finder that failed: runpy will say
                return None
        if found is None and part == "__main__":
            return f"no module named {child!r}; {name!r} is a package and cannot be directly executed"
        if found is None:
            return f"no module named {child!r} (in {', '.join(map(str, folders))})"
        name, spec = child, found
    return None


def _find_spec_in(name: str, folders: Any) -> Any:
    """The spec of submodule `name` in its package's `folders`, as import finds it (every finder asked)."""
    for finder in sys.meta_path:
        spec = finder.find_spec(name, folders, None)
        if spec is not None:
            return spec
    return None


def _extends_its_path(spec: Any) -> bool:
    """Whether a regular package's `__init__` sets its `__path__` (pkgutil.extend_path, pkg_resources'
    namespaces): its submodules may lie in folders that only running it lists."""
    origin = getattr(spec, "origin", None)
    if not isinstance(origin, str) or not origin.endswith(".py"):
        return False
    try:
        with open(origin, encoding="utf-8", errors="replace") as source:
            return "__path__" in source.read()
    except OSError:
        return False


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives a Python process: None 0, an int itself, anything else printed, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_script_traceback(exc: BaseException, target: str) -> None:
    """The script's traceback as Python prints it, from its own frames (kvtrace's and runpy's left out)."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and _not_the_scripts(tb, target):
        tb = tb.tb_next
    if tb is None:  # no frame of the script's (runpy found no `-m pkg.missing`): one line, as Python's
        print("".join(traceback.format_exception_only(type(exc), exc)).rstrip(), file=sys.stderr)
        return
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def _not_the_scripts(tb: TracebackType, target: str) -> bool:
    """A frame of kvtrace's CLI or of runpy, above the script's first."""
    filename = tb.tb_frame.f_code.co_filename
    return (
        filename.endswith(("runpy.py", os.path.join("kvtrace", "commands", "run.py")))
        or "<frozen runpy>" in filename
    )
