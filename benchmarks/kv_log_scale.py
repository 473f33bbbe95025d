"""How the analyzer commands scale with a long KV log: time and peak RSS of each, printed as a table.

Records light-mode runs (`kvtrace.record(..., profiler=False)`) of a tiny Llama 3 shape with 32 layers
(hidden 64, the shape of an 8B's layer count) for each number of new tokens, or reads runs already recorded
(`--runs`), then times `report --no-export`, `report -o page.html`, `diagnose`, `plan --from-run`,
`compare RUN RUN` and `export` in a fresh interpreter each, reading that child's own peak RSS (`os.wait4`).
A long run's log is 2 x 32 lines a token (128,000 lines, 33 MB for 1,000 tokens): a command whose seconds or
MiB grow faster than the tokens has work that is not linear in the log. Recording is the slow part (on 2
busy cores with OMP_NUM_THREADS=1: ~20 s for 1,000 tokens, ~6 min for 4,000, ~19 min for 8,000, attention
and the cache's torch.cat growing with the context); pass `--runs` to time runs kept from a previous call.

    OMP_NUM_THREADS=1 python benchmarks/kv_log_scale.py --tokens 1000,4000 --keep runs/scale
    python benchmarks/kv_log_scale.py --runs runs/scale/light-1000,runs/scale/light-4000
    PYTHONPATH=../other-tree python benchmarks/kv_log_scale.py --runs ...   # that tree's commands
    python benchmarks/kv_log_scale.py --runs runs/scale/light-1000 --read 5  # the log's read, two ways

`--read N`: the KV log's read alone (`read_run`'s `_read_jsonl`, the cycle collector paused as there), in
one process, line by line (`json.loads` and the checks in Python) and in blocks (msgspec,
`kvtrace.kv_line_blocks`) taking turns N times: seconds, µs a line, the ratio, and the peak traced memory
of each (`tracemalloc`, a run apart, since it slows the code it watches).

No figure is asserted: this prints a table, it is not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 32


def _record(out: Path, new_tokens: int) -> None:
    """A light-mode run of `new_tokens` greedy tokens on one row of a 16-token prompt, in a child process."""
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from kvtrace.llama import build_model\n"
        "from tests.tiny import record_generate, tiny_size\n"
        f"model = build_model(tiny_size({LAYERS}), dtype=torch.float32)\n"
        "model.config.max_position_embeddings = 16 + int(sys.argv[2])\n"
        "record_generate(model, Path(sys.argv[1]), batch=1, prompt=16, new_tokens=int(sys.argv[2]),\n"
        "                profiler=False, overwrite=True)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run([sys.executable, "-c", code, str(out), str(new_tokens)], check=True, env=env, cwd=ROOT)


def _measure(argv: list[str], cwd: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit status) of one child process, run in `cwd`: `python -m` puts its
    working folder first on sys.path, so a child started in a checkout would run that checkout's code,
    whatever PYTHONPATH names (as when comparing two trees)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code and child.stderr is not None:
        sys.stderr.write(child.stderr.read().decode())
    return wall, usage.ru_maxrss / 1024, code


def _commands(run: Path, scratch: Path) -> list[tuple[str, list[str]]]:
    page, exported = scratch / "page.html", scratch / "export"
    return [
        ("report --no-export", ["report", str(run), "--no-export", "-q"]),
        ("report -o page.html", ["report", str(run), "--no-export", "-q", "-o", str(page)]),
        ("diagnose", ["diagnose", str(run), "-q"]),
        ("plan --from-run", ["plan", "--from-run", str(run)]),
        ("compare RUN RUN", ["compare", str(run), str(run), "-q"]),
        ("export", ["export", str(run), "-o", str(exported), "-q"]),
    ]


def read_table(runs: list[Path], rounds: int) -> list[str]:
    """The KV log of each run read line by line and in blocks, taking turns `rounds` times, medians."""
    import statistics
    import tracemalloc

    sys.path.insert(0, str(ROOT))
    from kvtrace.collector import collector_paused
    from kvtrace.run_checks import _KvEventLines
    from kvtrace.run_reader import _read_jsonl

    def read(log: Path, blocks: bool) -> int:
        lines = _KvEventLines()
        with collector_paused():
            events, _ = _read_jsonl(log, lines, None, lines.block if blocks else None)
        return len(events)

    rows = [
        "run | KV lines | by line s | in blocks s | by line µs/line | in blocks µs/line | ratio | "
        "by line peak MiB | in blocks peak MiB",
        "--- | " * 8 + "---",
    ]
    for run in runs:
        log = run / "kv_events.jsonl"
        times: dict[bool, list[float]] = {False: [], True: []}
        count = 0
        for i in range(rounds):
            for blocks in (False, True) if i % 2 == 0 else (True, False):
                started = time.perf_counter()
                count = read(log, blocks)
                times[blocks].append(time.perf_counter() - started)
        peaks = {}
        for blocks in (False, True):
            tracemalloc.start()
            read(log, blocks)
            peaks[blocks] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        slow, fast = statistics.median(times[False]), statistics.median(times[True])
        rows.append(
            f"{run.name} | {count:,} | {slow:.2f} | {fast:.2f} | {slow / count * 1e6:.1f} | "
            f"{fast / count * 1e6:.1f} | {fast / slow:.2f}x | {peaks[False]:.0f} | {peaks[True]:.0f}"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", default="1000,4000", help="new tokens of each run to record (comma-separated)"
    )
    parser.add_argument(
        "--runs", default="", help="runs already recorded, instead of --tokens (comma-separated)"
    )
    parser.add_argument(
        "--keep", default="", help="record into this folder and keep the runs (default: a temp one)"
    )
    parser.add_argument(
        "--only", default="", help="time only the commands whose name starts with one of these"
    )
    parser.add_argument(
        "--read",
        type=int,
        default=0,
        metavar="N",
        help="time the KV log's read alone, line by line and in blocks, N rounds (with --runs)",
    )
    args = parser.parse_args()
    if args.read:
        print("\n".join(read_table([Path(run) for run in args.runs.split(",") if run], args.read)))
        return 0
    kvtrace = [sys.executable, "-m", "kvtrace.cli"]
    wanted = [name for name in args.only.split(",") if name]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtrace-kv-log-scale-") as tmp:
        if args.runs:
            runs = [Path(run) for run in args.runs.split(",") if run]
        else:
            folder = Path(args.keep) if args.keep else Path(tmp)
            runs = []
            for tokens in (int(n) for n in args.tokens.split(",") if n):
                run = folder / f"light-{tokens}"
                started = time.perf_counter()
                _record(run, tokens)
                print(f"  recorded {run} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
                runs.append(run)
        for run in runs:
            log = run / "kv_events.jsonl"
            with open(log, "rb") as fh:
                lines = sum(1 for _ in fh)
            size = log.stat().st_size / 1e6
            for name, argv in _commands(run, Path(tmp)):
                if wanted and not any(name.startswith(w) for w in wanted):
                    continue
                wall, rss, status = _measure([*kvtrace, *argv], Path(tmp))
                extra = ""
                if name.startswith("report -o") and status == 0:
                    extra = f" (page {(Path(tmp) / 'page.html').stat().st_size / 1e6:.1f} MB)"
                if name == "export":
                    subprocess.run(["rm", "-rf", str(Path(tmp) / "export")], check=False)
                rows.append((run.name, lines, size, name + extra, wall, rss, status))
                print(f"  done: {run.name} {name}", file=sys.stderr)
    header = ("run", "KV lines", "KV log MB", "command", "s", "peak RSS MiB", "µs per line")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for run_name, lines, size, name, wall, rss, status in rows:
        flag = "" if status == 0 else f" (exit {status})"
        per_line = wall / lines * 1e6 if lines else 0.0
        print(f"{run_name} | {lines:,} | {size:.0f} | {name} | {wall:.1f} | {rss:.0f} | {per_line:.0f}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
