"""Copies of a recorded run whose trace's clock base is set late, as a loaded host's Kineto sets it, and the
lags that say which leads put a storage's allocation past the join's tolerance. Read with plain json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# The join's tolerance (analyzers.attribution.JOIN_TOLERANCE_US): a trace's allocation up to this long after
# the KV log's sighting of its storage is still the storage's
TOLERANCE_US = 2000


def own_lags_us(run: Path) -> list[float]:
    """µs from each KV storage's own allocation (the latest of its address and size before its sighting) to
    its sighting in the KV log, the trace's clock as its base sets it."""
    (trace,) = (run / "profiler").glob("*.pt.trace.json")
    data = json.loads(trace.read_text())
    base_us = data["baseTimeNanoseconds"] / 1000
    made: dict[tuple[int, int], list[float]] = {}
    for event in data["traceEvents"]:
        args = event.get("args", {})
        if event.get("name") == "[memory]" and args.get("Bytes", 0) > 0:
            made.setdefault((args["Addr"], args["Bytes"]), []).append(event["ts"] + base_us)
    seen: dict[tuple[int, int], float] = {}
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("storage_bytes"):
            seen.setdefault((event["addr"], event["storage_bytes"]), event["t_ns"] / 1000)
    return [min(sighting - t for t in made[key] if t <= sighting) for key, sighting in seen.items()]


def late_copy(run: Path, copy: Path, lead_us: int) -> Path:
    """A copy of `run` whose trace's clock runs `lead_us` ahead of the KV log's (its base set that late)."""
    shutil.copytree(run, copy)
    (trace,) = (copy / "profiler").glob("*.pt.trace.json")
    data = json.loads(trace.read_text())
    data["baseTimeNanoseconds"] += lead_us * 1000
    trace.write_text(json.dumps(data))
    return copy


def without_step_starts(run: Path) -> Path:
    """`run` with its samples' `started_ns` taken out, as a run recorded before them reads: the analyzers
    then set its trace's clock from the KV log's storages, not from kvtrace's step ranges."""
    samples = run / "memory_samples.jsonl"
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "started_ns"}) + "\n"
                               for line in lines))  # fmt: skip
    return run
