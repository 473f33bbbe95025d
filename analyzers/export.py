"""Puts KV occupancy where users already look: a Chrome-trace counter track (Perfetto, TensorBoard's trace
view) and TensorBoard scalars, both written inside the run directory by `kvtrace report`."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from analyzers.budget import step_starts
from analyzers.kv_line import kv_line
from analyzers.kv_log_figures import KvLogAnalysis
from analyzers.model import MemorySource
from analyzers.tb_events import file_version_event, record, record_size, scalars_event
from kvtrace.errors import KvtraceError
from kvtrace.safe_write import not_our_file, replace_atomically

COUNTERS_FILE = "kv_counters.trace.json.gz"
SCALARS_DIR = "tb_scalars"


def _refuse_foreign(path: Path, folder: bool = False) -> None:
    """Refuse to write at a path of the run that is not kvtrace's own kind of file: a run may come from
    anyone, and a link there would aim the export at (or, for tb_scalars, delete) a file elsewhere."""
    why = not_our_file(path, folder)
    if why is not None:
        raise KvtraceError(f"{path}: {why}: not written, kvtrace never writes a run's exports through a link")


def _base_ns(trace_path: str | None) -> int:
    """The profiler trace's `baseTimeNanoseconds`, so both files share one time origin when merged."""
    if not trace_path:
        return 0
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        head = fh.read(1 << 16)
    marker = head.rfind('"baseTimeNanoseconds"')
    if marker < 0:
        return 0
    digits = head[marker:].split(":", 1)[1].lstrip().split(",", 1)[0].split("}", 1)[0].strip()
    base_ns = int(digits) if digits.isdigit() and len(digits) < 20 else 0
    return base_ns if base_ns < 2**63 else 0  # as the trace reader: Kineto's base is an int64


def step_start_ns(source: MemorySource) -> dict[int, int]:
    """step -> when it began (the run's clock, ns) for the per-step exports, as `diagnose` counts steps
    (`analyzers.budget.step_starts`): a module cache's first KV line of a step comes at its forward's end."""
    return {step: round(start_us * 1000) for start_us, step, _ in step_starts(source)}


def _records_after_the_first(path: Path, size: int) -> bytes | None:
    """The bytes of an event file after its first record (the file version, stamped with the time it was
    written), where the file is a regular one of at most `size` bytes more than that record; else None."""
    try:
        if not_our_file(path) is not None:
            return None
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            first = record_size(head)
            if first > 1024:  # a file-version record is some 40 bytes
                return None
            fh.seek(first)
            rest = fh.read(size + 1)
    except OSError:
        return None
    return rest if len(rest) <= size else None


def _step_ns(kv: KvLogAnalysis, starts: dict[int, int] | None, step: int) -> int:
    """When `step` began: from `starts` (`step_start_ns`), else the KV log's first line of it."""
    began = starts.get(step) if starts is not None else None
    return began if began is not None else kv.step_start_ns.get(step, 0)


def write_counters(
    run_dir: Path,
    kv: KvLogAnalysis,
    trace_path: str | None,
    pid: int,
    clock_shift_us: int = 0,
    starts: dict[int, int] | None = None,
    frees_us: np.ndarray | None = None,
) -> Path:
    """Chrome-trace counter events ("ph": "C"): total KV bytes and per-layer bytes after every KV event,
    the latter at each step's start (`starts`, from `step_start_ns`). The total is the page's KV line
    (`analyzers.kv_line`): with `frees_us` (`source.meta[attribution.KV_FREES]`), a `freed` line the log
    wrote when the recorder noticed it drops where the trace's allocator freed the storage.

    `clock_shift_us`: what the report added to the trace's times to put them on the run's clock (its base
    missing or wrong: analyzers.readers.trace_clock); taken off here so that the counters line up with the
    trace's own events when both are opened together."""
    base_ns = _base_ns(trace_path)
    origin_ns = base_ns + clock_shift_us * 1000  # the run-clock time of the trace's ts 0
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": "kvtrace KV cache"}},
    ]
    layer_live: dict[int, int] = {}
    line_ns, line_bytes = kv_line(kv, frees_us)
    for t_ns, total in zip(line_ns.tolist(), line_bytes.tolist(), strict=True):
        ts = (t_ns - origin_ns) / 1000.0
        events.append({"name": "KV cache bytes", "ph": "C", "ts": ts, "pid": pid, "args": {"kv": total}})
    steps = sorted(kv.step_live)
    for step in steps:
        layer_live = kv.step_live[step]
        ts = (_step_ns(kv, starts, step) - origin_ns) / 1000.0
        events.append(
            {
                "name": "KV bytes per layer",
                "ph": "C",
                "ts": ts,
                "pid": pid,
                "args": {f"L{layer}": value for layer, value in sorted(layer_live.items())},
            }
        )
    payload: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if base_ns:
        payload["baseTimeNanoseconds"] = base_ns
    target = run_dir / COUNTERS_FILE
    _refuse_foreign(target)
    text = json.dumps(payload)
    if _gzipped_text(target, len(text)) == text:
        return target  # as a report of the same run wrote them: the run is left as it is
    # Whole or not at all: a full disk leaves the previous counters, not a cut gzip stream.
    with (
        replace_atomically(target) as raw,
        gzip.GzipFile(filename=target.name, mode="wb", fileobj=raw) as packed,
        io.TextIOWrapper(packed, encoding="utf-8") as fh,
    ):
        fh.write(text)
    return target


def _gzipped_text(path: Path, chars: int) -> str | None:
    """The text of the gzipped file at `path` if it holds at most `chars` characters and reads whole, else
    None: what a report compares its exports with, so that a second report of an unchanged run writes
    nothing (a run in git or under rsync stays as it is; TensorBoard reloads nothing)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            text = fh.read(chars + 1)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error):  # none there, or not ours whole
        return None
    return text if len(text) <= chars else None


def write_scalars(run_dir: Path, kv: KvLogAnalysis, starts: dict[int, int] | None = None) -> Path:
    """TensorBoard scalars `kv/total_bytes` and `kv/layer_N_bytes`, one point per generation step, its wall
    time the step's start (`starts`, from `step_start_ns`)."""
    folder = run_dir / SCALARS_DIR
    _refuse_foreign(folder, folder=True)
    created = not folder.is_dir()
    folder.mkdir(exist_ok=True)
    steps = []
    for step in sorted(kv.step_live):
        live = kv.step_live[step]
        values = [("kv/total_bytes", float(sum(live.values())))]
        values += [(f"kv/layer_{layer}_bytes", float(v)) for layer, v in sorted(live.items())]
        steps.append(record(scalars_event(_step_ns(kv, starts, step) / 1e9, step, values)))
    body = b"".join(steps)
    # TensorBoard's own file naming. Written here, not by its EventFileWriter: that one writes from a thread
    # whose failure (a full disk) close() does not raise, which would leave a cut file as if it were whole.
    target = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
    # The folder is ours: a new report replaces the scalars rather than adding a second copy of each step.
    found = list(folder.glob("events.out.tfevents.*"))
    if len(found) == 1 and _records_after_the_first(found[0], len(body)) == body:
        return folder  # as a report of the same run wrote them (only the first record's time differs)
    old = [p for p in found if p != target]
    try:
        with replace_atomically(target) as fh:
            fh.write(record(file_version_event(time.time())))
            fh.write(body)
    except BaseException:
        if created:  # a failed first export leaves the run as it was
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for stale in old:
        stale.unlink(missing_ok=True)
    return folder
