"""A GPU's caching allocator counts `Total Allocated` from the process's start, not from the profiler's: in
a kvtrace run recorded on CUDA, the weights loaded before `record()` are in the trace's level already, as
they are not in a CPU trace's. The run below is a real CPU recording rewritten as CUDA writes the same
memory (device type 1, totals that count the weights): its figures must be the CPU run's, not the weights
twice. CUDA's way of counting is torch's `reportMemoryUsageToProfiler(..., stats.allocated_bytes
[AGGREGATE].current, ...)`; the CPU allocator's total counts only what was allocated while profiling."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _as_cuda(run: Path) -> int:
    """Rewrite a CPU run's files as the same run on cuda:0 would read; the weights' bytes."""
    weights = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    held = sum(w["storage_bytes"] for w in weights)
    (run / "weights.jsonl").write_text("".join(json.dumps({**w, "device": "cuda:0"}) + "\n" for w in weights))
    events = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    (run / "kv_events.jsonl").write_text(
        "".join(json.dumps({**e, "device": "cuda:0"} if "device" in e else e) + "\n" for e in events)
    )
    (trace_path,) = (run / "profiler").glob("*.json.gz")
    trace = json.loads(gzip.decompress(trace_path.read_bytes()))
    memory = [e for e in trace["traceEvents"] if e.get("name") == "[memory]"]
    total = held  # CUDA's total: what the process holds, the weights loaded before the profiler included
    for event in sorted(memory, key=lambda e: (e["ts"], e["args"]["Ev Idx"])):
        args = event["args"]
        total += args["Bytes"]
        args.update({"Device Type": 1, "Device Id": 0, "Total Allocated": total})
    trace_path.write_bytes(gzip.compress(json.dumps(trace).encode()))
    return held


def _device(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    (device,) = json.loads(capsys.readouterr().out)["devices"]
    return device


def test_a_cuda_trace_counts_the_weights_loaded_before_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a recorded run, and the same run as a CUDA trace writes it
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "static_b2", run)
    on_cpu = _device(run, capsys)
    weights = _as_cuda(run)
    # WHEN both are reported
    on_cuda = _device(run, capsys)
    # THEN the figures are the same on either device: the weights once, as weights, the KV as KV
    assert on_cuda["device"] == "cuda:0"
    for field in ("peak_allocated_bytes", "final_allocated_bytes", "categories_at_peak"):
        assert on_cuda[field] == on_cpu[field], field
    assert on_cuda["categories_at_peak"]["weights"] == weights  # type: ignore[index]
