"""Does `kvtrace export` stay in bounded memory as the number of runs grows? Peak RSS and time, printed.

Makes N copies of one sample run (hard links, so the disk cost is one run) in a temporary folder, then
runs `kvtrace export FOLDER -o OUT -q` in a fresh interpreter and reads that child's own peak RSS
(`os.wait4`'s ru_maxrss, so runs do not mask each other), then a `kvtrace query` over the result.
Two kinds of run:

  * small: the sample's KV log, samples and weights only (memory events come from the KV log);
  * traced: the whole sample run, with its torch.profiler trace (~9,000 `[memory]` events each).

Bounded memory: up to ROW_GROUP_ROWS (131,072) rows per table are buffered before a row group is
written, so RSS rises until the first flush (~960 small runs, for kv_events) and is flat beyond it;
time grows linearly.
Expected runtime on 2 busy cores: ~2.5 minutes with the defaults.

    python benchmarks/export_scale.py
    python benchmarks/export_scale.py --small 100,1000,10000 --traced 20,500

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

SAMPLE = Path(__file__).resolve().parents[1] / "sample_traces" / "static_b2"
SMALL_FILES = ("manifest.json", "kv_events.jsonl", "memory_samples.jsonl", "weights.jsonl")


def _make_runs(folder: Path, count: int, traced: bool) -> None:
    files = [p for p in SAMPLE.rglob("*") if p.is_file()] if traced else [SAMPLE / n for n in SMALL_FILES]
    for i in range(count):
        run = folder / f"batch-{i // 100:03d}" / f"run-{i:05d}"
        for file in files:
            target = run / file.relative_to(SAMPLE)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(file, target)


def _measure(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit status) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.stderr.write(child.stderr.read().decode() if child.stderr else "")
    return wall, usage.ru_maxrss / 1024, child.returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", default="100,1000,3000", help="numbers of small runs (comma-separated)")
    parser.add_argument("--traced", default="20,200", help="numbers of traced runs (comma-separated)")
    args = parser.parse_args()
    cases = [("small", int(n), False) for n in args.small.split(",") if n] + [
        ("traced", int(n), True) for n in args.traced.split(",") if n
    ]
    kvtrace = [sys.executable, "-m", "kvtrace.cli"]
    rows = []
    for kind, count, traced in cases:
        with tempfile.TemporaryDirectory(prefix="kvtrace-export-scale-") as tmp:
            runs, out = Path(tmp) / "runs", Path(tmp) / "out"
            _make_runs(runs, count, traced)
            wall, rss, status = _measure([*kvtrace, "export", str(runs), "-o", str(out), "-q"])
            size = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 2**20 if status == 0 else 0.0
            sql = "SELECT run_id, max(tokens) FROM kv_events GROUP BY run_id"
            q_wall, q_rss, q_status = _measure([*kvtrace, "query", str(out), sql, "--csv"])
            rows.append((kind, count, wall, rss, size, q_wall, q_rss, status or q_status))
            print(f"  done: {kind} x {count}", file=sys.stderr)
    header = ("runs", "N", "export s", "export peak RSS MiB", "Parquet MiB", "query s", "query peak RSS MiB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for kind, count, wall, rss, size, q_wall, q_rss, status in rows:
        flag = "" if status == 0 else f" (exit {status})"
        print(f"{kind} | {count:,} | {wall:.1f} | {rss:.0f} | {size:.1f} | {q_wall:.1f} | {q_rss:.0f}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
