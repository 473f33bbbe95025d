"""Puts KV occupancy where users already look: a Chrome-trace counter track (Perfetto, TensorBoard's trace
view) and TensorBoard scalars, both written inside the run directory by `kvtrace report`."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from analyzers.kv_log import KvLogAnalysis
from kvtrace.safe_write import replace_atomically

COUNTERS_FILE = "kv_counters.trace.json.gz"
SCALARS_DIR = "tb_scalars"


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
    return int(digits) if digits.isdigit() else 0


def write_counters(run_dir: Path, kv: KvLogAnalysis, trace_path: str | None, pid: int) -> Path:
    """Chrome-trace counter events ("ph": "C"): total KV bytes and per-layer bytes after every KV event."""
    base_ns = _base_ns(trace_path)
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": "kvtrace KV cache"}},
    ]
    layer_live: dict[int, int] = {}
    for t_ns, total in zip(kv.series_t_ns, kv.series_bytes, strict=True):
        ts = (t_ns - base_ns) / 1000.0
        events.append({"name": "KV cache bytes", "ph": "C", "ts": ts, "pid": pid, "args": {"kv": total}})
    steps = sorted(kv.step_live)
    for step in steps:
        layer_live = kv.step_live[step]
        ts = (kv.step_start_ns.get(step, 0) - base_ns) / 1000.0
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
    # Whole or not at all: a full disk leaves the previous counters, not a cut gzip stream.
    with (
        replace_atomically(target) as raw,
        gzip.GzipFile(filename=target.name, mode="wb", fileobj=raw) as packed,
        io.TextIOWrapper(packed, encoding="utf-8") as fh,
    ):
        json.dump(payload, fh)
    return target


def write_scalars(run_dir: Path, kv: KvLogAnalysis) -> Path:
    """TensorBoard scalars `kv/total_bytes` and `kv/layer_N_bytes`, one point per generation step."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder = run_dir / SCALARS_DIR
    # Written in a staging folder beside it and moved in once whole, so a full disk leaves the previous
    # scalars as they were; the staging name starts with "." as folder scans skip those.
    staging = Path(tempfile.mkdtemp(prefix=f".{SCALARS_DIR}.", dir=run_dir))
    try:
        writer = EventFileWriter(str(staging))
        try:
            for step in sorted(kv.step_live):
                live = kv.step_live[step]
                values = [Summary.Value(tag="kv/total_bytes", simple_value=float(sum(live.values())))]
                values += [
                    Summary.Value(tag=f"kv/layer_{layer}_bytes", simple_value=float(v))
                    for layer, v in sorted(live.items())
                ]
                wall = kv.step_start_ns.get(step, 0) / 1e9
                writer.add_event(Event(wall_time=wall, step=step, summary=Summary(value=values)))
        finally:
            writer.close()
        folder.mkdir(exist_ok=True)
        # The folder is ours: a new report replaces the scalars rather than adding a second copy of each step.
        old = list(folder.glob("events.out.tfevents.*"))
        moved = set()
        for new in staging.iterdir():
            os.replace(new, folder / new.name)
            moved.add(new.name)
        for stale in old:
            if stale.name not in moved:
                stale.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
