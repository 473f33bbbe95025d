"""`kvtrace report --json` on each real snapshot, in one process, against `pickle.load` of the same file:
this checkout and an older one (`--before`, e.g. a `git worktree add /tmp/base <commit>`) taking turns.

Start-up (the interpreter, the imports) is measured by `analyzer_speed.py --every-real`; this measures
what is left once the modules are loaded: the safe unpickler's load, the replay, the stack rules and the
summary. Each child process imports one checkout's `kvtrace.cli`, reports every snapshot once (the first
call pays the lazy imports), then `--reps` times `main(["report", "--json", F])` alternating with a plain
`pickle.load(open(F, "rb"))`. Children of the two checkouts alternate for `--rounds` rounds, the order
flipped each round; a cell is the median over all its rounds' repetitions (`pickle.load` pooled from both).
Each is timed twice: by the thread's CPU time, which other processes on a shared machine hardly move, and
by the wall clock.

Both checkouts' `kvtrace` and `analyzers` are byte-compiled afresh first: a stale `.pyc` makes a child
compile the module from source on import, which is not what an installed user runs.

    python benchmarks/snapshot_inprocess.py --before /tmp/base

No timing is asserted: this prints a table, it is not a test.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# The child: reports each snapshot once, then times the report and pickle.load in turns.
CHILD = """
import contextlib, io, json, pickle, sys, time
from kvtrace.cli import main

paths, reps = json.loads(sys.argv[1]), int(sys.argv[2])

def report(path):
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", "--json", path]) == 0

def load(path):
    with open(path, "rb") as stream:
        pickle.load(stream)

result = {}
for path in paths:
    report(path)
    load(path)
    times = {"report": [], "pickle": [], "report_cpu": [], "pickle_cpu": []}
    for _ in range(reps):
        for what, run in (("report", report), ("pickle", load)):
            start, start_cpu = time.perf_counter(), time.thread_time()
            run(path)
            times[what + "_cpu"].append(time.thread_time() - start_cpu)
            times[what].append(time.perf_counter() - start)
    result[path] = times
print(json.dumps(result))
"""


def fresh_bytecode(tree: Path) -> None:
    """Byte-compile a checkout's packages afresh, so that no child compiles a module from source."""
    for package in ("kvtrace", "analyzers"):
        compileall.compile_dir(str(tree / package), quiet=1, force=True)


def run_child(tree: Path, paths: list[Path], reps: int) -> dict[str, dict[str, list[float]]]:
    """One child's timings: {path: {"report": [s, ...], "pickle": [s, ...], "report_cpu": ..., ...}}."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([str(p) for p in paths]), str(reps)],
        cwd="/",  # not a checkout: `kvtrace` comes from PYTHONPATH alone
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, dict[str, list[float]]] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="the older checkout to compare with")
    parser.add_argument(
        "--after", type=Path, default=Path(__file__).resolve().parents[1], help="this checkout (default)"
    )
    parser.add_argument(
        "--snapshots",
        type=Path,
        default=Path("/work/shared/real_traces/snapshots"),
        help="a folder of *.pickle (default: the real snapshots beside the project)",
    )
    parser.add_argument("--reps", type=int, default=7, help="timed reports per child and snapshot (7)")
    parser.add_argument("--rounds", type=int, default=3, help="children per checkout, taking turns (3)")
    args = parser.parse_args(argv)
    paths = sorted(args.snapshots.glob("*.pickle"))
    if not paths:
        parser.error(f"no *.pickle in {args.snapshots}")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for tree in trees.values():
        fresh_bytecode(tree)
    samples: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
        for label in order:
            for path, times in run_child(trees[label], paths, args.reps).items():
                for clock in ("", "_cpu"):
                    samples.setdefault((label + clock, path), []).extend(times["report" + clock])
                    samples.setdefault(("pickle" + clock, path), []).extend(times["pickle" + clock])
    print(f"{args.rounds} rounds x {args.reps} reps per checkout, medians; before = {trees['before']}")
    for clock, title in (("_cpu", "CPU time of the thread (`time.thread_time`)"), ("", "wall time")):
        print(f"\n{title}\n")
        print_table(paths, {key: value for key, value in samples.items() if key[0].endswith(clock)}, clock)
    return 0


def print_table(paths: list[Path], samples: dict[tuple[str, str], list[float]], clock: str) -> None:
    """One Markdown table: each snapshot's medians and their ratios."""

    def ms(label: str, path: Path) -> float:
        return statistics.median(samples[(label + clock, str(path))]) * 1e3

    print(
        "| snapshot | size | `pickle.load` | before | after | before / pickle | after / pickle "
        "| after / before |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        base, old, new = ms("pickle", path), ms("before", path), ms("after", path)
        name = path.name.removesuffix(".pickle").removesuffix("_snapshot")
        print(
            f"| {name} | {path.stat().st_size / 1000:.0f} kB | {base:.2f} ms | {old:.2f} ms | {new:.2f} ms "
            f"| {old / base:.2f}x | {new / base:.2f}x | {new / old:.2f}x |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
