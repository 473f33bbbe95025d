"""A GPU's caching allocator counts `Total Allocated` from the process's start, not from the profiler's: in
a kvtrace run recorded on CUDA, the weights loaded before `record()` are in the trace's level already, as
they are not in a CPU trace's. The run below is a real CPU recording rewritten as CUDA writes the same
memory (device type 1, totals that count the weights): its figures must be the CPU run's, not the weights
twice. CUDA's way of counting is torch's `reportMemoryUsageToProfiler(..., stats.allocated_bytes
[AGGREGATE].current, ...)`; the CPU allocator's total counts only what was allocated while profiling.

The same call reports `block->size`, the block the allocator handed out, not the bytes asked for:
`malloc` rounds every request up to a multiple of 512 B (`round_size`, `kMinBlockSize`), and a block of
the small pool (up to 1 MiB) is always split down to that (`should_split`: `remaining >= kMinBlockSize`),
so a KV storage of fewer bytes than a multiple of 512 has a bigger block in the trace than in the KV log
(`untyped_storage().nbytes()`, the request). All in c10/cuda/CUDACachingAllocator.cpp."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from analyzers.attribution import JOIN_TOLERANCE_US
from analyzers.units import a_or_an
from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _block(nbytes: int) -> int:
    """The caching allocator's block for a request of `nbytes` from its small pool: `round_size`."""
    return max(512, -(-nbytes // 512) * 512)


def _as_cuda(run: Path, blocks: bool = False, kv_held: int = 0) -> int:
    """Rewrite a CPU run's files as the same run on cuda:0 would read; the weights' bytes. `blocks`: every
    `[memory]` event's Bytes the block CUDA hands out for it (`_block`), as a real CUDA trace has them.
    `kv_held`: the bytes of KV the process held when the profiler started (a reference model's buffers),
    which CUDA's totals count as they do the weights."""
    size = _block if blocks else (lambda nbytes: nbytes)
    weights = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    held = sum(size(w["storage_bytes"]) for w in weights if "event" not in w)  # the start's (no change lines)
    (run / "weights.jsonl").write_text("".join(json.dumps({**w, "device": "cuda:0"}) + "\n" for w in weights))
    events = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    (run / "kv_events.jsonl").write_text(
        "".join(json.dumps({**e, "device": "cuda:0"} if "device" in e else e) + "\n" for e in events)
    )
    (trace_path,) = (run / "profiler").glob("*.json*")
    zipped = trace_path.name.endswith(".gz")
    raw = trace_path.read_bytes()
    trace = json.loads(gzip.decompress(raw) if zipped else raw)
    memory = [e for e in trace["traceEvents"] if e.get("name") == "[memory]"]
    # CUDA's total: what the process holds, the weights (and KV) loaded before the profiler included
    total = held + kv_held
    for event in sorted(memory, key=lambda e: (e["ts"], e["args"]["Ev Idx"])):
        args = event["args"]
        nbytes = size(abs(args["Bytes"])) * (1 if args["Bytes"] > 0 else -1)
        total += nbytes
        args.update({"Bytes": nbytes, "Device Type": 1, "Device Id": 0, "Total Allocated": total})
    written = json.dumps(trace).encode()
    trace_path.write_bytes(gzip.compress(written) if zipped else written)
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


def test_a_cuda_run_without_its_weights_table_counts_them_as_other_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run as CUDA writes it, its weights table then lost (a partial copy)
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "static_b2", run)
    weights = _as_cuda(run)
    whole = _device(run, capsys)
    (run / "weights.jsonl").unlink()
    # WHEN it is reported and diagnosed
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    # THEN the peak keeps the weights (the allocator's totals count them), as other: nothing names them ...
    (device,) = report["devices"]
    assert device["peak_allocated_bytes"] == whole["peak_allocated_bytes"]
    categories = device["categories_at_peak"]
    assert categories["weights"] == 0
    assert categories["other"] == whole["categories_at_peak"]["other"] + weights  # type: ignore[index]
    # ... and the note says so, not that the figures leave them out; diagnose gives no lower bound
    (note,) = [n for n in report["notes"] if "weights.jsonl is listed in the manifest but missing" in n]
    assert note.endswith(
        "the weights are in the memory figures (the GPU allocator's totals count them from "
        "the process's start) but counted as other: nothing names their blocks"
    )
    assert note in diagnosis["notes"]
    assert diagnosis["peak_leaves_out"] is None


def test_a_cuda_trace_counts_the_kv_caches_blocks_as_kv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a recorded run whose K and V take 256 B a token (2 rows x 2 KV heads x 16 x fp32): its
    # storages of an odd token count are no multiple of 512 B; and the same run as CUDA writes it
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    weights = _as_cuda(run, blocks=True)
    # WHEN both are reported
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    on_cuda = json.loads(capsys.readouterr().out)
    # THEN at the peak (the last step's cat: 35 tokens held) the KV is the 4 layers' K and V storages, on
    # the CPU of 35 x 256 B each and on CUDA in blocks of that rounded up to 512 B: every byte of a block
    # holding a KV storage is KV's
    layers, rows, kv_heads, head_dim, fp32, tokens = 4, 2, 2, 16, 4, 35
    storage = rows * kv_heads * head_dim * fp32 * tokens
    assert storage == 8960 and _block(storage) == 9216
    assert on_cpu["categories_at_peak"]["kv"] == layers * 2 * storage
    assert on_cuda["categories_at_peak"]["kv"] == layers * 2 * _block(storage)
    assert on_cuda["peak_time"] == on_cpu["peak_time"]
    # ... the weights are their blocks too, and the rest is other: the categories add up to the peak
    at_peak = on_cuda["categories_at_peak"]
    assert at_peak["weights"] == weights
    assert sum(at_peak.values()) == on_cuda["peak_allocated_bytes"]
    # ... and the KV section, the KV log's figures (the tensors' bytes), is the CPU run's
    assert on_cuda["kv"] == on_cpu["kv"]


def test_a_cuda_trace_without_its_clock_base_is_put_back_by_the_kv_caches_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a static cache's run whose every KV storage is no multiple of 512 B (35 tokens x 256 B), as CUDA
    # writes it, and a copy whose trace lost its clock base (another tool's edit)
    reference, edited = tmp_path / "reference", tmp_path / "edited"
    shutil.copytree(SAMPLES / "static_b2", reference)
    _as_cuda(reference, blocks=True)
    shutil.copytree(reference, edited)
    (trace_path,) = (edited / "profiler").glob("*.json.gz")
    trace = json.loads(gzip.decompress(trace_path.read_bytes()))
    del trace["baseTimeNanoseconds"]
    trace_path.write_bytes(gzip.compress(json.dumps(trace).encode()))
    # WHEN both are reported
    assert main(["report", str(reference), "--json", "--no-export", "-q"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["report", str(edited), "--json", "--no-export", "-q"]) == 0
    got = json.loads(capsys.readouterr().out)
    # THEN the KV storages' blocks put the trace back on the run's clock, within the join's tolerance, with
    # the KV at the peak the 4 layers' K and V blocks in both, and a note says where the clock came from
    assert abs(got["peak_time"] - want["peak_time"]) <= JOIN_TOLERANCE_US
    assert want["categories_at_peak"]["kv"] == 4 * 2 * _block(8960)
    assert got["categories_at_peak"] == want["categories_at_peak"]
    (note,) = got["notes"]
    assert note.startswith("the profiler trace's baseTimeNanoseconds is missing: its events were put on")


def _format_size(nbytes: int) -> str:
    """c10's `format_size`, as PyTorch's OOM message writes a size."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    for limit, unit, scale in ((1 << 20, "KiB", 1 << 10), (1 << 30, "MiB", 1 << 20)):
        if nbytes <= limit:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / (1 << 30):.2f} GiB"


def _segment(request: int) -> int:
    """`get_allocation_size(round_size(request))`: the segment the CUDA caching allocator tries to reserve."""
    size = _block(request)
    if size <= 1 << 20:  # kSmallSize -> kSmallBuffer
        return 2 << 20
    if size < 10 << 20:  # kMinLargeAlloc -> kLargeBuffer
        return 20 << 20
    return -(-size // (2 << 20)) * (2 << 20)  # kRoundLarge


# PyTorch's message, CUDACachingAllocator.cpp's malloc: since torch 2.1, and before it
OOM_MESSAGES = {
    "torch 2.1 on": (
        "CUDA out of memory. Tried to allocate {segment}. GPU 0 has a total capacity of 139.72 GiB of which "
        "{free} is free. Including non-PyTorch memory, this process has 139.71 GiB memory in use. Of the "
        "allocated memory 138.90 GiB is allocated by PyTorch, and 12.00 MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
        "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    ),
    "torch 2.0": (
        "CUDA out of memory. Tried to allocate {segment} (GPU 0; 79.35 GiB total capacity; 78.10 GiB already "
        "allocated; {free} free; 78.50 GiB reserved in total by PyTorch) If reserved memory is >> allocated "
        "memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory "
        "Management and PYTORCH_CUDA_ALLOC_CONF"
    ),
}


@pytest.mark.parametrize("version", list(OOM_MESSAGES))
@pytest.mark.parametrize(("request_bytes", "at_most"), [(3 << 20, "20.00 MiB"), (8 << 10, "1.00 MiB")])
def test_a_cuda_oom_message_names_the_segment_not_the_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str, request_bytes: int, at_most: str
) -> None:
    # GIVEN a CUDA run that ended in an OOM without a snapshot (snapshots=False): a request of 3 MiB (or
    # 8 KiB) failed with 1 MiB free ("1024.00 KiB"), and PyTorch's message names the segment it tried to
    # reserve for it
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    _as_cuda(run, blocks=True)
    segment, free = _segment(request_bytes), 1 << 20
    message = OOM_MESSAGES[version].format(segment=_format_size(segment), free=_format_size(free))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["device"] = {"type": "cuda", "index": 0, "name": "NVIDIA H200", "total_memory_bytes": 150 << 30}
    manifest["ended"] = {
        **manifest["ended"],
        "status": "exception",
        "type": "OutOfMemoryError",
        "message": message,
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    # WHEN it is diagnosed and reported
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    assert main(["diagnose", str(run)]) == 0
    text = capsys.readouterr().out
    assert main(["report", str(run), "--no-export"]) == 0
    report = capsys.readouterr().out
    # THEN the 20 MiB (2 MiB) figure is the segment, the request is at most it (at most 1 MiB for a 2 MiB
    # segment), and the shortfall is the segment less the free memory the message states
    assert segment == (20 << 20 if request_bytes == 3 << 20 else 2 << 20)
    assert diagnosis["requested_bytes"] is None
    assert diagnosis["segment_bytes"] == segment
    assert diagnosis["free_bytes"] == free
    assert diagnosis["shortfall_bytes"] == segment - free
    assert f"request that failed                      at most {at_most}\n" in text
    assert (
        f"OOM on cuda:0: requested at most {at_most} ({a_or_an(_format_size(segment))} segment), "
        "free 1.00 MiB" in report
    )
