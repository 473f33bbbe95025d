"""How long `kvtrace demo` takes with its defaults (issue 10 item 8: "well under a minute on 2 cores").

Runs the demo command in fresh processes, profiler on (the default) and off, `--reps` times each, and
prints the median wall and CPU (user + system) seconds of the whole command: model build, tokenizer,
recording, report and HTML. CPU seconds are steadier than wall time on a shared machine. No timing is
asserted anywhere: this prints a table.

    python benchmarks/demo_time.py            # ~1 min on 2 idle cores
    python benchmarks/demo_time.py --reps 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(extra: list[str], out: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "demo", "--out", str(out), "--overwrite", *extra],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    modes = {"defaults (profiler on)": [], "--no-profiler": ["--no-profiler"]}
    print(f"{'kvtrace demo':<24} {'wall s':>8} {'CPU s':>8}   (median of {args.reps})")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in modes.items():
            runs = [_one(extra, Path(tmp) / "demo") for _ in range(args.reps)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            print(f"{name:<24} {wall:>8.1f} {cpu:>8.1f}")


if __name__ == "__main__":
    main()
