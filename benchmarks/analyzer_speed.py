"""How fast, and in how much memory, `kvtrace report` reads big inputs, against the tools users know.

Inputs, side by side in one run:

  * the largest Chrome trace in `--real-traces DIR`/chrome (by size on disk); with `--every-real`,
    every real Chrome trace and snapshot (inputs read in under a second: start-up is most of it),
  * the largest CUDA allocator snapshot pickle in `--real-traces DIR`/snapshots, and a big snapshot
    made from it by repeating its trace `--snapshot-copies` times (default 100),
  * a trace recorded by torch.profiler itself (`--torch-events`, default 1M `[memory]` events among aten
    ops and ProfilerStep ranges; written by a child process that imports torch),
  * synthetic Kineto-layout Chrome traces of `--events` `[memory]` instant events (default 200k, 1M and
    10M; CUDA, Device Type 1, with Addr / Bytes / Total Allocated / Total Reserved, addresses reused the
    way the caching allocator reuses blocks, a ProfilerStep range every 10,000 events), written once by a
    streaming writer into a temporary directory, to show how memory grows with the input.

kvtrace's own modules are byte-compiled first (`compileall`), as a wheel install leaves them: a checkout
run with PYTHONDONTWRITEBYTECODE=1 (as this machine's shells are) would otherwise compile ~30 modules from
source in every child, ~60 ms that no installed user pays.

Tools, each in a fresh interpreter (wall time includes start-up and imports, as a user sees it; peak RSS
is the child's own VmHWM, written by a small wrapper as it exits, so runs do not mask each other and the
benchmark's own memory does not leak into the figure):

  * `python -m kvtrace.cli report PATH --json -q`
  * a bare `json.load` of the same file (gzip detected by magic bytes); `pickle.load` for snapshots
  * HTA: `hta.trace_analysis.TraceAnalysis(trace_dir=...)` on a directory holding only that trace
    (Chrome traces only; `pip install holistictraceanalysis psutil` if missing: HTA imports psutil
    without declaring it)
  * `python -m torch.cuda._memory_viz trace_plot SNAPSHOT -o out.html` (snapshots only)
  * `kvtrace report PATH -q -o out.html` on the synthetic traces, for the HTML size

A child whose RSS passes `--mem-limit-gb` (default 8) or whose run passes `--timeout` is killed and its
cell reads "n/a" with the reason. Goals (issue 11): report at most 0.5x a bare json.load, at most 1.5x
pickle.load on snapshots, peak RSS at most 200 MiB and flat from 200k to 10M events; HTML under 10 MB
plus plotly's ~4.7 MB of JavaScript.

Expected runtime on 2 shared cores: 7 to 12 minutes with the defaults (3.7 GB of JSON on /tmp for 10M
events; the json.load and HTA rows stop at the memory limit within a minute; HTA takes 1.5-3 minutes on
the 1M torch.profiler trace). `--events 2000,20000 --torch-events 4000 --snapshot-copies 3` is a smoke run.

    python benchmarks/analyzer_speed.py --mem-limit-gb 6 --timeout 600

`--real-traces DIR` (default /work/shared/real_traces, outside the repository) is a folder of traces
that others recorded: `chrome/*.json[.gz]` and `snapshots/*.pickle`. Point it at your own; without that
folder the real rows are left out and the synthetic and torch.profiler ones still run.

`--reindented` runs only the fallback-path table instead: each real Chrome trace (a JSON object with
`traceEvents`) in `--real-traces DIR`/chrome and each sample run's trace, as recorded, re-indented
(`json.dumps(indent=4)`, as other tools rewrite a trace), compact (`separators=(",", ":")`) and one-line
(plain `json.dumps(trace)`: ", " and ": " but no new line), the copies
in a scratch folder with the original's compression; `json.load` and `kvtrace report --json` on each, rounds
alternated over files, forms and tools, medians of `--reps`; beside them the trace reader alone in a fresh
process, reading the text whole (msgspec finds the events, as `report` does where the text fits) and
streamed (`JsonStream`, as for a text too big to hold). The original keeps Kineto's layout, which the byte
scan reads whatever the reader asked for; the other forms go through the fallback path. A second table
gives the readers' own CPU time in one process (no start-up), `json.load`, whole and streamed alternated.

`--commands` runs only the everyday commands' table instead: on copies of three sample runs (no exports in
them), each in a fresh interpreter, rounds alternated, medians of `--reps`: `report RUN` (its KV counters and
TensorBoard scalars written into the run), the same again (the run unchanged: nothing written), `report RUN
--no-export`, `diagnose RUN`, `plan --from-run RUN`, and a plan from a preset. What a user waits for at each
command, start-up included.

No timing is asserted: this prints a table, it is not a test.
"""

from __future__ import annotations

import argparse
import compileall
import gzip
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
REAL_TRACES = Path("/work/shared/real_traces")
PLOTLY_JS_BYTES = 4.7e6
HTML_GOAL_BYTES = 10e6

_JSON_LOAD = """
import gzip, json, sys
path = sys.argv[1]
with open(path, "rb") as fh:
    compressed = fh.read(2) == b"\\x1f\\x8b"
with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
    trace = json.load(fh)
print(len(trace.get("traceEvents", ())) if isinstance(trace, dict) else len(trace))
"""

# The trace reader alone, whole-text (msgspec) or streamed, as `report` runs it on a trace in another layout.
_READ_TRACE = """
import sys
from analyzers.readers.chrome_trace import read_chrome_trace
source = read_chrome_trace(sys.argv[1], in_memory=sys.argv[2] == "whole")
print(source.meta["reader"], sum(len(d.delta_bytes) for d in source.devices))
"""

_PICKLE_LOAD = """
import pickle, sys
with open(sys.argv[1], "rb") as fh:
    snapshot = pickle.load(fh)
print(len(snapshot.get("segments", ())))
"""

# Every child runs under this wrapper, which writes the process's own VmHWM when it ends: `ru_maxrss` from
# wait4 would include the benchmark's own RSS, which a forked child inherits until it execs.
_PEAK_WRAPPER = """
import os, runpy, sys
def _write_peak():
    with open("/proc/self/status", encoding="ascii") as fh:
        peak_kb = next((line.split()[1] for line in fh if line.startswith("VmHWM:")), "0")
    with open(os.environ["KVTRACE_BENCH_PEAK_FILE"], "w", encoding="ascii") as out:
        out.write(peak_kb)
mode, target, *rest = sys.argv[1:]
try:
    if mode == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<benchmark>", "exec"), {"__name__": "__main__"})
finally:
    _write_peak()
"""

# A trace recorded by torch.profiler itself (CPU, profile_memory): each iteration allocates and frees two
# tensors (4 memory events) inside aten::empty / aten::relu ops, 1,000 iterations per ProfilerStep range.
_TORCH_TRACE = """
import sys, torch
from torch.profiler import profile, ProfilerActivity, record_function
events, out = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
iterations, step = events // 4, 0
with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    while iterations > 0:
        with record_function(f"ProfilerStep#{step}"):
            for _ in range(min(1000, iterations)):
                x = torch.empty(256)
                y = x.relu()
                del x, y
        iterations -= 1000
        step += 1
prof.export_chrome_trace(out)
"""

_HTA_LOAD = """
import sys
from hta.trace_analysis import TraceAnalysis
analysis = TraceAnalysis(trace_dir=sys.argv[1])
print(sum(len(df) for df in analysis.t.get_all_traces().values()))
"""


# -- measuring one child ---------------------------------------------------------------------------
@dataclass
class Measurement:
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    failure: str | None = None
    """Why there is no figure: killed at the memory limit, timed out, exit status and last stderr line."""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measure(argv: list[str], cwd: Path, timeout_s: float, mem_limit_bytes: int) -> Measurement:
    """Run `python -m MODULE ...` or `python -c CODE ...` (as `argv`, without the interpreter) in a fresh
    process; its wall time and own peak RSS (VmHWM), or why there are none."""
    with tempfile.TemporaryFile() as stderr, tempfile.NamedTemporaryFile("r", suffix=".peak") as peak_file:
        env = dict(os.environ, KVTRACE_BENCH_PEAK_FILE=peak_file.name)
        command = [sys.executable, "-c", _PEAK_WRAPPER, *argv]
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        killed_for: str | None = None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            elapsed = time.perf_counter() - started
            rss = _rss_bytes(child.pid)
            if killed_for is None and rss > mem_limit_bytes:
                killed_for = f"RSS > {mem_limit_bytes / 1e9:.0f} GB limit at {elapsed:.0f} s"
            elif killed_for is None and elapsed > timeout_s:
                killed_for = f"timeout > {timeout_s:.0f} s"
            if killed_for is not None:
                child.send_signal(signal.SIGKILL)
            # The end is seen at the next poll: poll often while a run is short, where 50 ms would be a
            # third of the figure, and rarely once it is long (the RSS read costs the child a little).
            time.sleep(0.002 if elapsed < 1 else 0.01 if elapsed < 10 else 0.05)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        del usage  # ru_maxrss counts the parent's pages the child held before exec
        peak_text = peak_file.read().strip()
        peak = int(peak_text) * 1024 if peak_text else None
        if killed_for is not None:
            return Measurement(failure=killed_for)
        if child.returncode != 0:
            stderr.seek(0)
            lines = [ln for ln in stderr.read().decode(errors="replace").splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else ""
            return Measurement(failure=f"exit {child.returncode}: {last[:90]}")
        return Measurement(wall_s=wall, peak_rss_bytes=peak)


# -- the synthetic trace ---------------------------------------------------------------------------
_HEADER = """{
  "schemaVersion": 1,
  "deviceProperties": [
    {
      "id": 0, "name": "NVIDIA H100 80GB HBM3", "totalGlobalMem": 85029158912,
      "computeMajor": 9, "computeMinor": 0,
      "maxThreadsPerBlock": 1024, "maxThreadsPerMultiprocessor": 2048,
      "regsPerBlock": 65536, "warpSize": 32,
      "sharedMemPerBlock": 49152, "numSms": 132
    }
  ],
  "record_shapes": 0,
  "profile_memory": 1,
  "displayTimeUnit": "ms",
  "baseTimeNanoseconds": 1790857026000000000,
  "traceEvents": [
  {
    "ph": "M", "name": "process_name", "ts": 5120758897447.385, "pid": 4242, "tid": 0,
    "args": {
      "name": "python"
    }
  }"""
# Kineto's own layout of a memory event (one field a line, args on one line), so readers that special-case
# it see what a real trace gives them.
_MEMORY_EVENT = """,
  {
    "ph": "i",
    \n    "cat": "cpu_instant_event",
    "s": "t",
    "name": "[memory]",
    "pid": 4242,
    "tid": 4242,
    "ts": %.3f
    ,
    "args": {
      "Total Reserved": %d, "Total Allocated": %d, "Bytes": %d, "Device Id": 0, "Device Type": 1, \
"Addr": %d, "finished": false, "Ev Idx": %d
    }
  }"""
_STEP_EVENT = """,
  {
    "ph": "X",
    "cat": "user_annotation",
    "name": "ProfilerStep#%d",
    "pid": 4242,
    "tid": 4242,
    "ts": %.3f,
    "dur": %.3f
    ,
    "args": {
      "External id": %d, "Record function id": 0, "Ev Idx": %d
    }
  }"""
_FOOTER = """
  ],
  "traceName": "synthetic.pt.trace.json"
}
"""
_ACTIVATION_SIZES = (512, 4096, 65536, 262144, 1048576, 2097152, 8388608, 33554432)
_KV_BLOCK_BYTES = 2 * 8 * 128 * 2 * 16  # k and v, 8 KV heads, head_dim 128, bf16, 16 tokens
_STEP_EVERY = 10_000
_REQUEST_EVERY = 500_000  # a request ends: its KV blocks are freed
_MAX_LIVE_ACTIVATIONS = 64


def write_synthetic_trace(path: Path, events: int, use_gzip: bool, seed: int = 0) -> None:
    """Stream `events` CUDA `[memory]` events into a Kineto-layout trace, in chunks."""
    rng = random.Random(seed)
    base = 0x7F2A00000000
    bump = base  # next never-used address, as the caching allocator grows its segments
    free_blocks: dict[int, list[int]] = {}  # size -> addresses freed and reusable
    activations: deque[tuple[int, int]] = deque()
    kv_blocks: list[int] = []
    allocated = reserved = 0
    ts = 5120758898825.642
    step = 0
    step_started = ts
    draining = False
    step_every = min(_STEP_EVERY, max(1, events // 10))  # at least ten steps: HTA needs ranges with "dur"
    chunk: list[str] = [_HEADER]
    opener: Callable[..., IO[str]] = gzip.open if use_gzip else open  # type: ignore[assignment]
    kwargs = {"compresslevel": 1} if use_gzip else {}
    with opener(path, "wt", encoding="utf-8", **kwargs) as out:
        for index in range(events):
            ts += 0.5 + rng.random() * 3.0
            if index and index % _REQUEST_EVERY == 0:
                draining = True  # a request ends: its KV blocks go, one event each
            if draining and kv_blocks:
                addr, size = kv_blocks.pop(), _KV_BLOCK_BYTES
                free_blocks.setdefault(size, []).append(addr)
                delta = -size
            elif index % 97 == 0:  # a new KV block for the growing cache
                draining = False
                size = _KV_BLOCK_BYTES
                addr, bump = _take(free_blocks, size, bump)
                kv_blocks.append(addr)
                delta = size
            elif activations and (len(activations) >= _MAX_LIVE_ACTIVATIONS or rng.random() < 0.5):
                addr, size = activations.popleft()
                free_blocks.setdefault(size, []).append(addr)
                delta = -size
            else:
                size = rng.choice(_ACTIVATION_SIZES)
                addr, bump = _take(free_blocks, size, bump)
                activations.append((addr, size))
                delta = size
            allocated += delta
            reserved = max(reserved, -(-(bump - base) // (2 << 20)) * (2 << 20))
            chunk.append(_MEMORY_EVENT % (ts, reserved, allocated, delta, addr, index))
            if (index + 1) % step_every == 0:
                chunk.append(_STEP_EVENT % (step, step_started, ts - step_started, step + 1, events + step))
                step += 1
                step_started = ts
                out.write("".join(chunk))
                chunk.clear()
        chunk.append(_FOOTER)
        out.write("".join(chunk))


def write_big_snapshot(original: Path, path: Path, copies: int) -> None:
    """A snapshot as a long run would dump it: the real one's trace entries repeated `copies` times, each
    copy shifted in time and address space so its allocs and frees pair up within the copy. The frees of
    blocks allocated before the real trace are in the first copy only (a block is freed once: repeated, they
    would claim more memory live before the trace than the segments hold, which kvtrace refuses). Each entry
    gets its own list of frames, whose frame dicts are shared, as in torch's own dumps. Plain data only, read
    here with a loader that refuses every global, like kvtrace's."""
    import pickle

    class _DataOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> type:
            raise pickle.UnpicklingError(f"{module}.{name}")

    with open(original, "rb") as fh:
        data = _DataOnly(fh).load()
    traces = data.get("device_traces") or [[]]
    trace = traces[0]
    allocated: set[object] = set()
    before_trace = set()  # indices of the entries that free a block the trace never allocated
    for index, entry in enumerate(trace):
        action, addr = entry.get("action"), entry.get("addr")
        if action == "alloc":
            allocated.add(addr)
        elif action in ("free_requested", "free_completed", "free") and addr not in allocated:
            before_trace.add(index)
        if action in ("free_completed", "free"):
            allocated.discard(addr)
    span = 1 << 40
    repeated = []
    for copy in range(copies):
        for index, entry in enumerate(trace):
            if copy and index in before_trace:
                continue
            moved = dict(entry)
            if isinstance(moved.get("addr"), int):
                moved["addr"] += copy * span
            if isinstance(moved.get("time_us"), int):
                moved["time_us"] += copy * 10_000_000
            if isinstance(moved.get("frames"), list):
                moved["frames"] = list(moved["frames"])
            repeated.append(moved)
    data["device_traces"] = [repeated, *traces[1:]]
    with open(path, "wb") as out:
        pickle.dump(data, out, protocol=pickle.HIGHEST_PROTOCOL)


def _take(free_blocks: dict[int, list[int]], size: int, bump: int) -> tuple[int, int]:
    """(address, new bump pointer): a freed block of the same size if there is one, else fresh memory."""
    reusable = free_blocks.get(size)
    if reusable:
        return reusable.pop(), bump
    return bump, bump + size


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Input:
    label: str
    path: Path
    kind: str  # "chrome" or "snapshot"
    memory_events: int | None = None


@dataclass
class Row:
    input: Input
    tool: str
    result: Measurement


def _largest(folder: Path, suffixes: tuple[str, ...]) -> Path | None:
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes)]
    return max(files, key=lambda p: p.stat().st_size) if files else None


def _hta_available() -> str | None:
    """None when HTA imports, else why not."""
    probe = subprocess.run(
        [sys.executable, "-c", "from hta.trace_analysis import TraceAnalysis"],
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1][:80] if lines else "import failed"


def _fmt_mb(value: float | None) -> str:
    """Binary units, as the goals are stated (MiB)."""
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size / 1e3:,.1f} kB"


def run_tools(
    item: Input, scratch: Path, args: argparse.Namespace, hta_missing: str | None, html: bool
) -> list[Row]:
    limit = int(args.mem_limit_gb * 1e9)
    tools: list[tuple[str, list[str] | str]] = [
        ("kvtrace report --json", ["-m", "kvtrace.cli", "report", str(item.path), "--json", "-q"])
    ]
    if item.kind == "chrome":
        tools.append(("json.load", ["-c", _JSON_LOAD, str(item.path)]))
        if args.skip_hta:
            tools.append(("HTA TraceAnalysis", "n/a (--skip-hta)"))
        elif hta_missing:
            tools.append(("HTA TraceAnalysis", f"n/a (HTA not importable: {hta_missing})"))
        else:
            trace_dir = Path(tempfile.mkdtemp(prefix="hta_", dir=scratch))
            os.symlink(item.path, trace_dir / item.path.name)
            tools.append(("HTA TraceAnalysis", ["-c", _HTA_LOAD, str(trace_dir)]))
        tools.append(("memory_viz trace_plot", "n/a (reads allocator snapshots, not Chrome traces)"))
    else:
        tools.append(("pickle.load", ["-c", _PICKLE_LOAD, str(item.path)]))
        tools.append(("HTA TraceAnalysis", "n/a (reads Chrome traces, not allocator snapshots)"))
        viz_out = scratch / f"memory_viz_{item.path.stem}.html"
        tools.append(
            (
                "memory_viz trace_plot",
                ["-m", "torch.cuda._memory_viz", "trace_plot", str(item.path), "-o", str(viz_out)],
            )
        )
    html_out = scratch / f"report_{item.label.replace(' ', '_').replace('/', '_')}.html"
    if html:
        tools.append(
            (
                "kvtrace report -o HTML",
                ["-m", "kvtrace.cli", "report", str(item.path), "-q", "-o", str(html_out)],
            )
        )
    rows: list[Row] = []
    for tool, command in tools:
        if isinstance(command, str):
            rows.append(Row(item, tool, Measurement(failure=command.removeprefix("n/a (").rstrip(")"))))
            continue
        runs = [measure(command, REPO, args.timeout, limit) for _ in range(args.reps)]
        good = [r for r in runs if r.ok]
        if len(good) < len(runs):
            result = next(r for r in runs if not r.ok)
        else:
            result = Measurement(
                wall_s=statistics.median(r.wall_s for r in good if r.wall_s is not None),
                peak_rss_bytes=max(r.peak_rss_bytes or 0 for r in good),
            )
        if tool.startswith("kvtrace report -o") and result.ok:
            result.extra["html_bytes"] = html_out.stat().st_size
        rows.append(Row(item, tool, result))
        cell = f"{result.wall_s:.2f} s" if result.ok else f"n/a ({result.failure})"
        print(f"  {item.label:<28} {tool:<24} {cell}", flush=True)
    return rows


def _find(rows: list[Row], item: Input, tool: str) -> Measurement | None:
    for row in rows:
        if row.input is item and row.tool.startswith(tool):
            return row.result
    return None


def print_tables(rows: list[Row], inputs: list[Input], startup: Measurement) -> None:
    print(
        f"\nfresh interpreter doing nothing: {_fmt_s(startup.wall_s)} s, "
        f"{_fmt_mb(startup.peak_rss_bytes)} MiB"
    )
    header = (
        f"{'input':<30} {'on disk':>10} {'[memory] ev':>12}  {'tool':<24} {'wall s':>8} {'peak RSS MiB':>12}"
    )
    print("\n" + header)
    print("-" * len(header))
    for item in inputs:
        events = "-" if item.memory_events is None else f"{item.memory_events:,}"
        first = True
        for row in (r for r in rows if r.input is item):
            lead = f"{item.label:<30} {_size(item.path):>10} {events:>12}" if first else " " * 54
            first = False
            result = row.result
            if result.ok:
                cells = f"{_fmt_s(result.wall_s):>8} {_fmt_mb(result.peak_rss_bytes):>12}"
                if "html_bytes" in result.extra:
                    cells += f"  HTML {result.extra['html_bytes'] / 1e6:.1f} MB"
            else:
                cells = f"{'n/a':>8} {'n/a':>12}  {result.failure}"
            print(f"{lead}  {row.tool:<24} {cells}")

    print("\nratios against the goals (n/a where a figure is missing)")
    print(
        f"{'input':<30} {'report/json.load':>17} {'HTA/report':>11} {'report/HTA RSS':>15} "
        f"{'report/memory_viz':>18}"
    )
    for item in inputs:
        report = _find(rows, item, "kvtrace report --json")
        baseline = _find(rows, item, "json.load") or _find(rows, item, "pickle.load")
        hta = _find(rows, item, "HTA")
        viz = _find(rows, item, "memory_viz")
        print(
            f"{item.label:<30} {_ratio(report, baseline, 'wall_s'):>17} {_ratio(hta, report, 'wall_s'):>11} "
            f"{_ratio(report, hta, 'peak_rss_bytes'):>15} {_ratio(report, viz, 'wall_s'):>18}"
        )
    print(
        "goals (issue 11): report/json.load <= 0.5x; report/pickle.load <= 1.5x for snapshots; "
        "peak RSS <= 200 MiB and flat from 200k to 10M events"
    )

    synthetic = [i for i in inputs if i.label.startswith("synthetic")]
    if len(synthetic) >= 2:
        ordered = sorted(synthetic, key=lambda i: i.memory_events or 0)
        small, big = ordered[0], ordered[-1]
        print(f"\ngrowth from {small.label} to {big.label} (goal: flat peak RSS; HTML < 10 MB + plotly JS)")
        for tool in ("kvtrace report --json", "json.load", "HTA", "kvtrace report -o"):
            a, b = _find(rows, small, tool), _find(rows, big, tool)
            absolute = ""
            if a is not None and b is not None and a.ok and b.ok:
                absolute = f" ({_fmt_mb(a.peak_rss_bytes)} -> {_fmt_mb(b.peak_rss_bytes)} MiB)"
            wall, rss = _ratio(b, a, "wall_s"), _ratio(b, a, "peak_rss_bytes")
            print(f"  {tool:<24} wall x{wall:<6} peak RSS x{rss:<6}{absolute}")
        for item in (small, big):
            html = _find(rows, item, "kvtrace report -o")
            if html is not None and html.ok:
                size = html.extra["html_bytes"]
                verdict = "meets" if size - PLOTLY_JS_BYTES < HTML_GOAL_BYTES else "MISSES"
                print(
                    f"  HTML of {item.label}: {size / 1e6:.1f} MB "
                    f"(~{max(size - PLOTLY_JS_BYTES, 0) / 1e6:.1f} MB without plotly JS; {verdict} goal)"
                )


def _ratio(top: Measurement | None, bottom: Measurement | None, attr: str) -> str:
    if top is None or bottom is None or not top.ok or not bottom.ok:
        return "n/a"
    numerator, denominator = getattr(top, attr), getattr(bottom, attr)
    if not numerator or not denominator:
        return "n/a"
    return f"{numerator / denominator:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events",
        default="200000,1000000,10000000",
        help="memory events of the synthetic traces, comma-separated (default 200k, 1M and 10M)",
    )
    parser.add_argument(
        "--torch-events",
        type=int,
        default=1_000_000,
        help="memory events of a trace recorded by torch.profiler itself (default 1M; 0: none)",
    )
    parser.add_argument(
        "--snapshot-copies",
        type=int,
        default=100,
        help="a big snapshot: the largest real one's trace repeated this many times (default 100; 0: none)",
    )
    parser.add_argument("--gzip", action="store_true", help="write the synthetic trace as .json.gz")
    parser.add_argument(
        "--reps", type=int, default=1, help="runs per tool and input; median wall (default 1)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed (600)")
    parser.add_argument("--mem-limit-gb", type=float, default=8, help="RSS at which a run is killed (8)")
    parser.add_argument("--skip-hta", action="store_true", help="leave HTA out")
    parser.add_argument(
        "--real-traces",
        type=Path,
        default=REAL_TRACES,
        metavar="DIR",
        help=f"folder with chrome/ and snapshots/ of real traces (default {REAL_TRACES})",
    )
    parser.add_argument("--keep", type=Path, help="write the synthetic traces here and keep them")
    parser.add_argument(
        "--every-real",
        action="store_true",
        help="every real Chrome trace and snapshot, not only the largest of each (small inputs: start-up)",
    )
    parser.add_argument(
        "--reindented",
        action="store_true",
        help="only the fallback path: each real and sample trace as recorded, re-indented, compact, one-line",
    )
    parser.add_argument(
        "--commands",
        action="store_true",
        help="only the everyday commands (report, a second report, diagnose, plan) on three sample runs",
    )
    args = parser.parse_args(argv)
    counts = sorted(int(part) for part in str(args.events).split(",") if part.strip())
    if not counts or counts[0] < 10 or args.reps < 1:
        parser.error("--events must be at least 10 and --reps at least 1")
    if args.reindented or args.commands:
        for package in ("kvtrace", "analyzers"):
            compileall.compile_dir(REPO / package, quiet=1)
        return run_commands(args) if args.commands else run_reindented(args)

    started = time.perf_counter()
    for package in ("kvtrace", "analyzers"):
        compileall.compile_dir(REPO / package, quiet=1)
    scratch = Path(tempfile.mkdtemp(prefix="kvtrace_analyzer_speed_"))
    try:
        inputs: list[Input] = []
        if not args.real_traces.is_dir():
            print(f"no real traces: {args.real_traces} is not a folder (--real-traces DIR)", flush=True)
        chrome = _largest(args.real_traces / "chrome", (".json", ".json.gz"))
        snapshot = _largest(args.real_traces / "snapshots", (".pickle", ".pkl"))
        if args.every_real:
            for path in sorted((args.real_traces / "chrome").glob("*.json*")):
                if path != chrome:
                    events = _count_memory_events(path)
                    inputs.append(Input(f"chrome: {path.name}"[:30], path, "chrome", events))
            for path in sorted((args.real_traces / "snapshots").glob("*.pickle")):
                if path != snapshot:
                    inputs.append(Input(f"snapshot: {path.name}"[:30], path, "snapshot"))
        if chrome is not None:
            inputs.append(
                Input(f"chrome: {chrome.name}"[:30], chrome, "chrome", _count_memory_events(chrome))
            )
        if snapshot is not None:
            inputs.append(Input(f"snapshot: {snapshot.name}"[:30], snapshot, "snapshot"))
            if args.snapshot_copies:
                big = scratch / f"snapshot_x{args.snapshot_copies}.pickle"
                write_big_snapshot(snapshot, big, args.snapshot_copies)
                print(f"wrote {big.name}: {_size(big)}", flush=True)
                inputs.append(Input(f"snapshot x{args.snapshot_copies} (synthetic)", big, "snapshot"))
        if args.torch_events:
            recorded = scratch / f"torch_profiler_{args.torch_events}.pt.trace.json"
            generated = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", _TORCH_TRACE, str(args.torch_events), str(recorded)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            took = time.perf_counter() - generated
            print(f"wrote {recorded.name} with torch.profiler: {_size(recorded)} in {took:.0f} s", flush=True)
            inputs.append(
                Input(f"torch.profiler {args.torch_events:,} ev", recorded, "chrome", args.torch_events)
            )
        synthetic_dir = args.keep or scratch
        synthetic_dir.mkdir(parents=True, exist_ok=True)
        suffix = ".pt.trace.json.gz" if args.gzip else ".pt.trace.json"
        for count in counts:
            path = synthetic_dir / f"synthetic_{count}{suffix}"
            generated = time.perf_counter()
            write_synthetic_trace(path, count, args.gzip)
            print(f"wrote {path.name}: {_size(path)} in {time.perf_counter() - generated:.0f} s", flush=True)
            inputs.append(Input(f"synthetic {count:,} events", path, "chrome", count))

        hta_missing = None if args.skip_hta else _hta_available()
        startup = measure(["-c", "pass"], REPO, 60, 1 << 40)
        rows: list[Row] = []
        for item in inputs:
            html = item.label.startswith("synthetic") and item.memory_events in (counts[0], counts[-1])
            rows += run_tools(item, scratch, args, hta_missing, html=html)
        print_tables(rows, inputs, startup)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\ntotal runtime {time.perf_counter() - started:.0f} s")
    return 0


# -- the fallback path: re-indented and compact copies -----------------------------------------------
_FORMS = ("original", "re-indented", "compact", "one-line")


def _open_trace(path: Path) -> tuple[object, bool]:
    """The parsed trace and whether the file is gzip (by magic bytes)."""
    import json

    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if compressed else open(path, "rb") as fh:
        return json.load(fh), compressed


def _rewrite(trace: object, path: Path, form: str, compressed: bool) -> None:
    """`trace` written as another tool would: json.dumps with indent=4, with no whitespace at all (compact),
    or as Python's plain json.dump(obj) writes it (one line, ", " and ": ": a script that loads a trace,
    filters it and dumps it back)."""
    import json

    if form == "re-indented":
        text = json.dumps(trace, indent=4)
    elif form == "compact":
        text = json.dumps(trace, separators=(",", ":"))
    else:
        text = json.dumps(trace)
    data = text.encode("utf-8")
    if compressed:
        with gzip.open(path, "wb", compresslevel=6) as out:
            out.write(data)
    else:
        path.write_bytes(data)


def _reindented_inputs(real_traces: Path) -> list[Path]:
    chrome = sorted((real_traces / "chrome").glob("*.json*")) if (real_traces / "chrome").is_dir() else []
    samples = sorted((REPO / "sample_traces").glob("**/profiler/*.pt.trace.json*"))
    return [*chrome, *samples]


def _text_size(path: Path) -> str:
    """Size of the JSON text in `path`, uncompressed."""
    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if compressed else open(path, "rb") as fh:
        return f"{len(fh.read()) / 1e6:.1f} MB"


def _same_report(forms: dict[str, Path]) -> str:
    """Whether `kvtrace report --json` says the same of every form (each file's own path masked)."""
    outputs = {}
    for form, path in forms.items():
        done = subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", "report", str(path), "--json", "-q"],
            cwd=REPO,
            capture_output=True,
        )
        outputs[form] = (done.returncode, done.stdout.replace(str(path).encode(), b"<trace>"))
    first = outputs["original"]
    differ = [form for form, out in outputs.items() if out != first]
    return "byte-identical" if not differ else f"DIFFERS in {', '.join(differ)} (exit {first[0]} original)"


def run_reindented(args: argparse.Namespace) -> int:
    """The fallback path (streamed JSON) against json.load, beside the byte scan on the same events."""
    limit = int(args.mem_limit_gb * 1e9)
    scratch = Path(tempfile.mkdtemp(prefix="kvtrace_reindented_"))
    try:
        files: list[tuple[str, dict[str, Path]]] = []
        sizes: dict[tuple[str, str], str] = {}  # the JSON text's size, uncompressed
        for path in _reindented_inputs(args.real_traces):
            trace, compressed = _open_trace(path)
            if not (isinstance(trace, dict) and isinstance(trace.get("traceEvents"), list)):
                print(f"skipped {path.name}: not a Chrome trace (no traceEvents)", flush=True)
                continue
            # A sample run by its folder (its trace's name is a pid and a clock), a real trace by its name.
            in_samples = path.is_relative_to(REPO / "sample_traces")
            label = str(path.parent.parent.relative_to(REPO)) if in_samples else path.name
            forms = {"original": path}
            sizes[(label, "original")] = _text_size(path)
            for form in _FORMS[1:]:
                folder = scratch / f"{len(files)}_{form}"
                folder.mkdir()
                forms[form] = folder / path.name
                _rewrite(trace, forms[form], form, compressed)
                sizes[(label, form)] = _text_size(forms[form])
            del trace
            files.append((label, forms))
        tools = {
            "json.load": lambda p: ["-c", _JSON_LOAD, str(p)],
            "report": lambda p: ["-m", "kvtrace.cli", "report", str(p), "--json", "-q"],
            "read whole": lambda p: ["-c", _READ_TRACE, str(p), "whole"],
            "read streamed": lambda p: ["-c", _READ_TRACE, str(p), "streamed"],
        }
        runs: dict[tuple[str, str, str], list[Measurement]] = {}
        for rep in range(args.reps):
            for label, forms in files:
                order = list(forms) if rep % 2 == 0 else list(reversed(forms))
                for form in order:
                    tool_order = list(tools) if rep % 2 == 0 else list(reversed(tools))
                    for tool in tool_order:
                        result = measure(tools[tool](forms[form]), REPO, args.timeout, limit)
                        runs.setdefault((label, form, tool), []).append(result)
            print(f"round {rep + 1} of {args.reps} done", flush=True)
        same = {label: _same_report(forms) for label, forms in files}
        header = (
            f"{'file':<44} {'form':<11} {'on disk':>9} {'JSON':>9} {'json.load s':>11} {'report s':>9} "
            f"{'ratio':>6} {'load MiB':>9} {'report MiB':>10} {'whole s':>8} {'ratio':>6} {'MiB':>6} "
            f"{'streamed s':>10} {'ratio':>6} {'MiB':>6}"
        )
        print("\n" + header)
        print("-" * len(header))
        for label, forms in files:
            for form, path in forms.items():
                load = _median_of(runs[(label, form, "json.load")])
                report = _median_of(runs[(label, form, "report")])
                print(
                    f"{label[-44:]:<44} {form:<11} {_size(path):>9} {sizes[(label, form)]:>9} "
                    f"{_fmt_s(load.wall_s):>11} "
                    f"{_fmt_s(report.wall_s) if report.ok else 'n/a':>9} {_ratio(report, load, 'wall_s'):>6} "
                    f"{_fmt_mb(load.peak_rss_bytes):>9} {_fmt_mb(report.peak_rss_bytes):>10}"
                    + "".join(
                        f" {_fmt_s(read.wall_s) if read.ok else 'n/a':>{width}}"
                        f" {_ratio(read, load, 'wall_s'):>6} {_fmt_mb(read.peak_rss_bytes):>6}"
                        for read, width in (
                            (_median_of(runs[(label, form, "read whole")]), 8),
                            (_median_of(runs[(label, form, "read streamed")]), 10),
                        )
                    )
                    + ("" if report.ok else f"  {report.failure}")
                )
        for label, verdict in same.items():
            print(f"report --json of the {len(_FORMS)} forms of {label}: {verdict}")
        print("goal (issue 11): report/json.load <= 0.5x; wall includes each fresh interpreter's start-up")
        _in_process_table(files, args.reps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


_COMMAND_RUNS = ("dynamic_b2", "h200/dynamic_b24", "vllm_preempt")
_PRESET_PLAN = [
    "plan", "--preset", "llama-3-8b", "--batch", "1,8", "--context", "8192", "--gpu-memory", "80GiB",
]  # fmt: skip


def run_commands(args: argparse.Namespace) -> int:
    """Everyday commands on sample runs, each in a fresh interpreter: what a user waits for."""
    limit = int(args.mem_limit_gb * 1e9)
    scratch = Path(tempfile.mkdtemp(prefix="kvtrace_commands_"))
    exports = shutil.ignore_patterns("kv_counters*", "tb_scalars", "timeline.html")
    try:
        runs: dict[tuple[str, str], list[Measurement]] = {}
        for rep in range(args.reps):
            names = _COMMAND_RUNS if rep % 2 == 0 else tuple(reversed(_COMMAND_RUNS))
            for name in names:
                run = scratch / f"{rep}_{name.replace('/', '_')}"
                shutil.copytree(REPO / "sample_traces" / name, run, ignore=exports)
                for label, argv in (
                    ("report RUN (exports written)", ["report", str(run), "-q"]),
                    ("report RUN again (unchanged)", ["report", str(run), "-q"]),
                    ("report RUN --no-export", ["report", str(run), "-q", "--no-export"]),
                    ("diagnose RUN", ["diagnose", str(run), "-q"]),
                    ("plan --from-run RUN", ["plan", "--from-run", str(run)]),
                ):
                    result = measure(["-m", "kvtrace.cli", *argv], REPO, args.timeout, limit)
                    runs.setdefault((name, label), []).append(result)
            preset = measure(["-m", "kvtrace.cli", *_PRESET_PLAN], REPO, args.timeout, limit)
            runs.setdefault(("-", " ".join(_PRESET_PLAN[:3])), []).append(preset)
            print(f"round {rep + 1} of {args.reps} done", flush=True)
        header = f"{'run':<18} {'command':<30} {'wall s':>7} {'peak MiB':>9}"
        print("\n" + header)
        print("-" * len(header))
        for (name, label), results in runs.items():
            median = _median_of(results)
            print(
                f"{name:<18} {label:<30} {_fmt_s(median.wall_s) if median.ok else 'n/a':>7} "
                f"{_fmt_mb(median.peak_rss_bytes):>9}" + ("" if median.ok else f"  {median.failure}")
            )
        print("each in a fresh interpreter, start-up included")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _in_process_table(files: list[tuple[str, dict[str, Path]]], reps: int) -> None:
    """The readers' own CPU time, without any start-up: in this process, warmed once, medians of `reps`
    rounds that alternate `json.load`, the whole-text reader and the streamed one on each rewritten form."""
    import json

    from analyzers.readers.chrome_trace import read_chrome_trace

    def load(path: Path) -> None:
        with open(path, "rb") as fh:
            compressed = fh.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if compressed else open(path, "rb") as fh:
            json.load(fh)

    tools: dict[str, Callable[[Path], object]] = {
        "json.load": load,
        "whole": lambda path: read_chrome_trace(path, in_memory=True),
        "streamed": lambda path: read_chrome_trace(path, in_memory=False),
    }
    times: dict[tuple[str, str, str], list[float]] = {}
    rows = [
        (label, form, path) for label, forms in files for form, path in forms.items() if form != "original"
    ]
    for _, _, path in rows:  # imports and first-touch costs out of the figures
        for tool in tools.values():
            tool(path)
    for rep in range(reps):
        for label, form, path in rows:
            for name in tools if rep % 2 == 0 else reversed(tools):
                started = time.process_time()
                tools[name](path)
                times.setdefault((label, form, name), []).append(time.process_time() - started)
    header = (
        f"{'file':<44} {'form':<11} {'json.load s':>11} {'whole s':>8} {'ratio':>6} {'streamed s':>10} "
        f"{'ratio':>6}"
    )
    print("\nCPU seconds in one process (no start-up), medians of", reps)
    print(header)
    print("-" * len(header))
    for label, form, _ in rows:
        base, whole, streamed = (statistics.median(times[(label, form, name)]) for name in tools)
        print(
            f"{label[-44:]:<44} {form:<11} {base:>11.3f} {whole:>8.3f} {whole / base:>6.2f} "
            f"{streamed:>10.3f} {streamed / base:>6.2f}"
        )


def _median_of(runs: list[Measurement]) -> Measurement:
    """Median wall and highest peak RSS of the runs, or the first failure."""
    failed = next((r for r in runs if not r.ok), None)
    if failed is not None:
        return failed
    return Measurement(
        wall_s=statistics.median(r.wall_s for r in runs if r.wall_s is not None),
        peak_rss_bytes=max(r.peak_rss_bytes or 0 for r in runs),
    )


def _count_memory_events(path: Path) -> int | None:
    """Counted from the raw text (each Kineto event names itself once); None for files too big to scan."""
    if path.stat().st_size > 200e6:
        return None
    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if compressed else open(path, "rb") as fh:
        return fh.read().count(b'"[memory]"')


if __name__ == "__main__":
    raise SystemExit(main())
