"""Record a Python script as it is, under `kvtrace.record()`, with no change to its code."""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from kvtrace.commands.base import Command
from kvtrace.commands.demo import refuse_a_sweep, refuse_occupied
from kvtrace.errors import KvtraceError


class RunCommand(Command):
    """Record a Python script as it is: kvtrace run [-o RUN] script.py [ARGS...] (or -m MODULE).

    Runs the script (or module, with -m) under kvtrace.record(), as `memray run` or `nsys profile` take a
    program, with no change to its code. The run's model is the first one whose Hugging Face generate()
    the script calls (record(model="auto")): its weights, steps and geometry from there; every transformers
    cache is logged from the start. A vllm.LLM is found alike at its first generate() or chat() and its
    pool followed (in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0; a multiprocess engine is the plugin's,
    KVTRACE_DIR). Your own model's caches
    (cache_k/cache_v buffers, kvtrace.track) need record(model=...) in your code. On CUDA, kvtrace
    initializes the current device before the script so that its memory is sampled from the start.
    The script's own output and exit status are its own; kvtrace's lines go to stderr.
    Exit status: the script's (its sys.exit code; 1 when it raised, after its traceback; 130 on Ctrl-C;
    143 when it is stopped by SIGTERM, its run written); 2 for a bad flag, a script that is not there, or an
    output folder that holds a run (--overwrite replaces it).
    """

    name = "run"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--out", help="run directory (default: runs/<script name>)")
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
        parser.add_argument(
            "--gpu-memory", help="mark where the run would run out on a device this size, e.g. 24GiB"
        )
        parser.add_argument("target", metavar="TARGET", help="the script (or, with -m, the module) to run")
        parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")

    def run(self, args: argparse.Namespace) -> int:
        target = args.target
        if not args.module:
            script = Path(target)
            if not script.is_file():
                what = "a folder, not a script" if script.is_dir() else "no such file"
                raise KvtraceError(f"{target}: {what}")
        name = target.rsplit(".", 1)[-1] if args.module else Path(target).stem
        out = Path(args.out) if args.out is not None else Path("runs") / name
        refuse_a_sweep(out)
        refuse_occupied(out, args.overwrite)
        import torch

        import kvtrace

        if torch.cuda.is_available():
            torch.cuda.init()  # a model-less recording samples the device CUDA has initialized
        options: dict[str, Any] = {"overwrite": args.overwrite, "profiler": not args.no_profiler}
        if args.with_stack:
            options["with_stack"] = True
        if args.gpu_memory is not None:
            options["gpu_memory"] = args.gpu_memory
        status = 0
        raised: BaseException | None = None
        argv, path0 = list(sys.argv), list(sys.path)
        stdout = sys.stdout
        sys.stdout = sys.__stdout__ or stdout  # the script's own, not the CLI's guarded one
        try:
            sys.argv = [target, *args.args]
            if not args.module:  # as `python script.py`: its folder first on the import path
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            try:
                with kvtrace.record(out, model="auto", **options) as recording:
                    try:
                        if args.module:
                            runpy.run_module(target, run_name="__main__", alter_sys=True)
                        else:
                            runpy.run_path(target, run_name="__main__")
                    except SystemExit as exc:  # the script's exit ends the block as it ends the script
                        status = _exit_status(exc.code)
            except KvtraceError:
                raise
            except KeyboardInterrupt:
                status, raised = 130, None
            except BaseException as exc:  # the script's own error: its run is written, its traceback shown
                status, raised = 1, exc
        finally:
            sys.argv[:], sys.path[:] = argv, path0
            with contextlib.suppress(Exception):  # the script's output, before kvtrace's lines
                sys.stdout.flush()
            sys.stdout = stdout
        if raised is not None:
            _print_script_traceback(raised, target)
        model, llm = recording.model, recording.vllm_llm
        if model is not None:
            found = f"model {type(model).__name__}"
        elif llm is not None:
            found = f"vLLM engine of {type(llm).__name__}"
        else:
            found = (
                "no transformers or vLLM generate() call: recorded without a model, transformers caches only"
            )
        if model is None and llm is None and "vllm" in sys.modules:  # a multiprocess engine: the plugin's
            found += f"; for a vLLM engine in its own process, run KVTRACE_DIR={out} python {target}"
        print(
            f"kvtrace run: recorded {out} ({found}); next: kvtrace report {out}, kvtrace diagnose {out}",
            file=sys.stderr,
        )
        return status


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
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__, file=sys.stderr)


def _not_the_scripts(tb: TracebackType, target: str) -> bool:
    """A frame of kvtrace's CLI or of runpy, above the script's first."""
    filename = tb.tb_frame.f_code.co_filename
    return (
        filename.endswith(("runpy.py", os.path.join("kvtrace", "commands", "run.py")))
        or "<frozen runpy>" in filename
    )
