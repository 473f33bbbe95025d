"""Chrome-trace and memory-timeline readers on small hand-made files, one format quirk per test."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzers.readers.chrome_trace import read_chrome_trace, read_memory_timeline
from analyzers.readers.sources import open_source, sniff
from analyzers.report import load_source
from analyzers.summary import summarize
from kvtrace.errors import KvtraceError


def mem(ts: Any, nbytes: int, dev_type: int = 1, dev_id: int = 0, **extra: Any) -> dict[str, Any]:
    args = {"Device Type": dev_type, "Device Id": dev_id, "Bytes": nbytes, **extra}
    return {"ph": "i", "s": "t", "name": "[memory]", "pid": 1, "tid": 1, "ts": ts, "args": args}


def op(name: str, ts: Any, dur: Any, cat: str = "cpu_op") -> dict[str, Any]:
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur, "args": {}}


def kineto_text(top: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """The layout Kineto writes: one event per "{\\n    ...\\n  }" block, top-level fields around."""
    blocks = ",\n".join("  {\n    " + json.dumps(e)[1:-1] + "\n  }" for e in events)
    head = "".join(f'  "{k}": {json.dumps(v)},\n' for k, v in top.items())
    return "{\n" + head + '  "traceEvents": [\n' + blocks + "\n  ]\n}\n"


def write(tmp_path: Path, name: str, text: str, compress: bool = False) -> Path:
    path = tmp_path / name
    data = text.encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def device(source: Any, name: str) -> Any:
    return next(d for d in source.devices if d.device == name)


def test_integer_epoch_microseconds_with_addresses_and_totals(tmp_path: Path) -> None:
    events = [
        mem(1_700_000_000_000_100, 512, Addr=4096, **{"Total Allocated": 1536, "Total Reserved": 2 << 20}),
        mem(1_700_000_000_000_200, -512, Addr=4096, **{"Total Allocated": 1024, "Total Reserved": 2 << 20}),
    ]
    path = write(tmp_path, "t.json", json.dumps({"traceEvents": events}))

    source = read_chrome_trace(path)

    assert source.kind == "chrome_trace"
    (cuda,) = source.devices
    assert cuda.device == "cuda:0"
    assert cuda.ts_us.dtype == np.int64
    assert cuda.ts_us.tolist() == [1_700_000_000_000_100, 1_700_000_000_000_200]
    assert cuda.addr.tolist() == [4096, 4096]
    assert cuda.delta_bytes.tolist() == [512, -512]
    assert cuda.total_allocated is not None and cuda.total_allocated.tolist() == [1536, 1024]
    assert cuda.total_reserved is not None and cuda.total_reserved.tolist() == [2 << 20, 2 << 20]
    assert cuda.baseline_bytes == 1536 - 512  # held before the first event
    assert (cuda.alloc_events, cuda.free_events) == (1, 1)


def test_float_microseconds_stay_float(tmp_path: Path) -> None:
    path = write(tmp_path, "t.json", json.dumps({"traceEvents": [mem(10.25, 64), mem(11.5, -64)]}))
    (cuda,) = read_chrome_trace(path).devices
    assert cuda.ts_us.dtype == np.float64
    assert cuda.ts_us.tolist() == [10.25, 11.5]


def test_relative_timestamps_get_base_time_even_when_it_comes_last(tmp_path: Path) -> None:
    # GIVEN newer Kineto output: ts relative to baseTimeNanoseconds, which is written after traceEvents
    text = json.dumps({"traceEvents": [mem(1000.5, 8), op("ProfilerStep#3", 900.0, 300.0)]})
    text = text[:-1] + ', "baseTimeNanoseconds": 1735632360000000000}'
    path = write(tmp_path, "t.json.gz", text, compress=True)

    source = read_chrome_trace(path)

    base_us = 1735632360000000000 / 1000
    (cuda,) = source.devices
    assert cuda.ts_us.tolist() == [base_us + 1000.5]
    (step,) = source.markers
    assert (step.kind, step.label, step.ts_us, step.end_us) == (
        "step",
        "ProfilerStep#3",
        base_us + 900,
        base_us + 1200,
    )
    assert source.meta["baseTimeNanoseconds"] == 1735632360000000000


def test_integral_relative_timestamps_stay_exact_int64(tmp_path: Path) -> None:
    text = json.dumps({"baseTimeNanoseconds": 1_719_853_884_000_000_000, "traceEvents": [mem(7, 1)]})
    (cuda,) = read_chrome_trace(write(tmp_path, "t.json", text)).devices
    assert cuda.ts_us.dtype == np.int64
    assert cuda.ts_us.tolist() == [1_719_853_884_000_000 + 7]


def test_several_devices_are_split_and_sorted_stably(tmp_path: Path) -> None:
    events = [
        mem(30, 300, dev_id=1),
        mem(10, 100, dev_type=0, dev_id=-1),
        mem(20, 200, dev_id=0),
        mem(5, 50, dev_id=1),
        mem(20, -200, dev_id=0),  # same ts as the alloc: file order must be kept
        mem(1, 7, dev_type=6, dev_id=2),  # HIP reads as cuda
    ]
    text = json.dumps({"traceEvents": events, "deviceProperties": [{"id": 1, "totalGlobalMem": 80 << 30}]})

    source = read_chrome_trace(write(tmp_path, "t.json", text))

    assert [d.device for d in source.devices] == ["cpu", "cuda:0", "cuda:1", "cuda:2"]
    assert device(source, "cpu").delta_bytes.tolist() == [100]
    assert device(source, "cuda:0").delta_bytes.tolist() == [200, -200]
    assert device(source, "cuda:1").ts_us.tolist() == [5, 30]
    assert device(source, "cuda:1").capacity_bytes == 80 << 30
    assert device(source, "cuda:0").capacity_bytes is None


def test_old_traces_without_addr_or_totals(tmp_path: Path) -> None:
    # GIVEN the 2021 form: Bytes only, and a free of memory allocated before profiling began
    events = [mem(1, -64), mem(2, 128), mem(3, -128)]
    (cuda,) = read_chrome_trace(write(tmp_path, "t.json", json.dumps({"traceEvents": events}))).devices
    assert cuda.addr.tolist() == [-1, -1, -1]
    assert cuda.total_allocated is None and cuda.total_reserved is None
    assert cuda.baseline_bytes == 64  # the least that must have been allocated before


def test_step_markers_and_kvtrace_ranges(tmp_path: Path) -> None:
    events = [
        op("ProfilerStep#1", 100, 50, cat="user_annotation"),
        op("ProfilerStep#1", 110, 30, cat="gpu_user_annotation"),  # GPU copy: skipped
        {"ph": "B", "name": "kvtrace/prefill", "pid": 1, "tid": 2, "ts": 120},
        {"ph": "B", "name": "aten::mm", "pid": 1, "tid": 2, "ts": 121},
        {"ph": "E", "pid": 1, "tid": 2, "ts": 122},
        {"ph": "E", "pid": 1, "tid": 2, "ts": 140},
        op("kvtrace/decode", 150, 10),
        op("aten::add", 151, 1),
    ]
    source = read_chrome_trace(write(tmp_path, "t.json", json.dumps({"traceEvents": events})))
    got = [(m.label, m.ts_us, m.end_us) for m in source.markers]
    assert got == [("ProfilerStep#1", 100, 150), ("kvtrace/prefill", 120, 140), ("kvtrace/decode", 150, 160)]
    assert source.devices == []


def test_trace_without_memory_events_is_valid(tmp_path: Path) -> None:
    text = kineto_text({"schemaVersion": 1, "distributedInfo": {"rank": 3}}, [op("aten::mm", 1, 2)] * 5)
    source = read_chrome_trace(write(tmp_path, "t.json", text))
    assert source.devices == []
    assert source.meta["schemaVersion"] == 1 and source.meta["distributedInfo"] == {"rank": 3}
    assert source.meta["trace_events"] == 5


def test_json_array_form_and_empty_trace(tmp_path: Path) -> None:
    (cuda,) = read_chrome_trace(write(tmp_path, "a.json", json.dumps([mem(1, 4), mem(2, -4)]))).devices
    assert cuda.delta_bytes.tolist() == [4, -4]
    assert read_chrome_trace(write(tmp_path, "e.json", '{"traceEvents": []}')).devices == []


def test_big_kineto_layout_trace_matches_plain_json_load(tmp_path: Path) -> None:
    # GIVEN a trace larger than the reader's window, in Kineto's layout, with memory events scattered
    # among ops whose names hold braces, brackets and the separator-like text a skip must not trust
    rng = random.Random(7)
    events: list[dict[str, Any]] = []
    for i in range(30_000):
        if rng.random() < 0.1:
            events.append(mem(i, rng.choice([1, -1]) * rng.randrange(1, 1 << 20), dev_id=rng.randrange(2)))
        else:
            name = rng.choice(["aten::mm", "void k<{lambda()#1}>", "odd }{ name", "x [ y", "q \\n  },\\n  {"])
            events.append(op(name, i, 1))
    events.insert(12_345, op("ProfilerStep#9", 12_345, 10))
    path = write(tmp_path, "big.json.gz", kineto_text({"schemaVersion": 1}, events), compress=True)

    source = read_chrome_trace(path)

    raw = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    for dev_id in (0, 1):
        expected = [
            e["args"]["Bytes"] for e in raw if e["name"] == "[memory]" and e["args"]["Device Id"] == dev_id
        ]
        assert device(source, f"cuda:{dev_id}").delta_bytes.tolist() == expected
    assert [m.label for m in source.markers] == ["ProfilerStep#9"]
    assert source.meta["trace_events"] == len(raw)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"traceEvents": [{"ph": "i", "name": "[memory]", "ts": 1, "args": {"By', "truncated"),
        ('{"traceEvents": [{"ph": "i"} {"ph": "X"}]}', "corrupt"),
        ('{"traceEvents": [1, 2,]}', "corrupt"),
        ("", "empty"),
        ("   \n", "whitespace"),
        ("<html></html>", "not a CUDA snapshot pickle, Chrome trace or memory timeline"),
    ],
)
def test_bad_json_gives_one_line_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(KvtraceError, match=needle) as caught:
        open_source(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


def test_a_gz_that_is_not_gzip_says_so(tmp_path: Path) -> None:
    # GIVEN a trace name ending in .gz whose bytes are not gzip's (renamed, or decompressed in place)
    path = write(tmp_path, "trace.json.gz", "not gzip")
    with pytest.raises(KvtraceError) as caught:
        open_source(path)
    # THEN the one line says what is wrong with the file, not only what it is not
    assert str(caught.value) == (
        f"{path}: named .gz but not gzip-compressed; not a CUDA snapshot pickle, Chrome trace or memory "
        "timeline (starts with b'not gzip')"
    )
    # AND a gzipped file of the same bytes says only what it is not
    zipped = write(tmp_path, "other.json.gz", "not gzip", compress=True)
    with pytest.raises(KvtraceError, match=r"other\.json\.gz: not a CUDA snapshot pickle"):
        open_source(zipped)


def test_memory_timeline_raw_form(tmp_path: Path) -> None:
    # [ts_ns, action, bytes, category]: 1 pre-existing, 2 create, 3 version bump (pairs), 4 destroy
    rows = [[-1, 1, 1000, 0], [5000, 2, 64, 7], [6000, 3, -64, 7], [6000, 3, 64, 4], [7500, 4, -64, 4]]
    path = write(tmp_path, "memory_timeline.raw.gz", json.dumps(rows), compress=True)

    assert sniff(path) == "memory_timeline"
    source = open_source(path)

    assert source.kind == "memory_timeline"
    (dev,) = source.devices
    assert dev.baseline_bytes == 1000
    assert dev.delta_bytes.tolist() == [64, -64]
    assert dev.ts_us.tolist() == [5.0, 7.5]
    assert source.meta["version_bumps"] == 1


def test_memory_timeline_coalesced_form(tmp_path: Path) -> None:
    times = [1000, 2000, 3000]
    sizes = [[10, 0, 5], [10, 20, 5], [10, 0, 0]]
    (dev,) = read_memory_timeline(
        write(tmp_path, "tl.json", json.dumps([times, sizes])), device="cuda:1"
    ).devices
    assert dev.device == "cuda:1"
    assert dev.baseline_bytes == 15
    assert dev.delta_bytes.tolist() == [20, -25]
    assert dev.ts_us.tolist() == [2000, 3000]  # µs already: torch divides its ns by 1000 for this form


def _weights_at_peak(rows: list[list[int]]) -> tuple[int, int]:
    """Replays raw rows by hand: (peak bytes, PARAMETER bytes at the first moment of the peak)."""
    level = sum(r[2] for r in rows if r[1] == 1)
    weights = sum(r[2] for r in rows if r[1] == 1 and r[3] == 0)
    peak, at_peak = level, weights
    for _ts, _action, nbytes, category in (r for r in rows if r[1] != 1):
        level += nbytes
        weights += nbytes if category == 0 else 0
        if level > peak:
            peak, at_peak = level, weights
    return peak, at_peak


def test_memory_timeline_parameters_are_weights(tmp_path: Path) -> None:
    # GIVEN parameters before and during the profile, and a version bump that turns an activation (4) into
    # a parameter (0): torch's categories, as export_memory_timeline_raw writes them
    rows = [
        [-1, 1, 1000, 0],
        [-1, 1, 300, 7],
        [5000, 2, 64, 4],
        [6000, 2, 128, 0],
        [6500, 3, -32, 6],
        [6500, 3, 32, 6],
        [7000, 3, -64, 4],
        [7000, 3, 64, 0],
        [7500, 2, 16, 3],
        [8000, 4, -128, 0],
    ]
    path = write(tmp_path, "memory_timeline.raw.json.gz", json.dumps(rows), compress=True)
    peak, weights = _weights_at_peak(rows)

    # WHEN it is reported
    (dev,) = summarize(load_source(path)).devices

    # THEN the parameters are the weights, the rest is other; the bump moved 64 bytes, the other moved none
    assert dev.peak_allocated_bytes == peak == 1508
    assert dev.categories_at_peak == {"kv": 0, "weights": weights, "other": peak - weights}
    assert weights == 1000 + 128 + 64
    assert dev.bytes_by_method == {"profiler_category": 64 + 128 + 64 + 16}


def test_memory_timeline_coalesced_parameters_are_weights(tmp_path: Path) -> None:
    # [times, sizes]: each row a zero column, then PARAMETER, OPTIMIZER_STATE, INPUT, TEMPORARY, ACTIVATION,
    # GRADIENT, AUTOGRAD_DETAIL and unknown (torch's _coalesce_timeline)
    times = [1000, 2000, 3000, 4000]
    sizes = [
        [0, 500, 0, 40, 0, 0, 0, 0, 8],
        [0, 500, 0, 40, 0, 300, 0, 0, 8],
        [0, 700, 0, 40, 0, 100, 0, 0, 8],
        [0, 700, 0, 40, 0, 0, 0, 0, 8],
    ]
    path = write(tmp_path, "tl.json", json.dumps([times, sizes]))
    totals = [sum(row) for row in sizes]
    peak_row = sizes[totals.index(max(totals))]

    (dev,) = summarize(load_source(path)).devices

    assert dev.peak_allocated_bytes == max(totals) == 848
    assert dev.categories_at_peak == {"kv": 0, "weights": peak_row[1], "other": max(totals) - peak_row[1]}


def test_directory_is_left_to_load_source(tmp_path: Path) -> None:
    with pytest.raises(KvtraceError, match="a folder"):
        open_source(tmp_path)


def test_readers_never_import_torch() -> None:
    code = (
        "import sys, analyzers.readers.sources, analyzers.readers.safe_pickle;"
        "import analyzers.readers.snapshot, analyzers.readers.chrome_trace;"
        "print('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("kineto", [True, False], ids=["byte-scan", "json-stream"])
@pytest.mark.parametrize("with_totals", [0, 3, 4])
def test_events_without_allocator_totals_are_counted_in_the_note(
    tmp_path: Path, kineto: bool, with_totals: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 4 CUDA [memory] events of which `with_totals` carry 'Total Allocated' (1 MB held before them)
    sizes = [1000, 2000, -1000, 500]
    events, level = [], 1_000_000
    for i, size in enumerate(sizes):
        level += size
        extra = {"Total Allocated": level} if i < with_totals else {}
        events.append(mem(100 + i, size, addr=i, **extra))
    text = kineto_text({}, events) if kineto else json.dumps({"traceEvents": events})
    path = write(tmp_path, "t.json", text)
    # WHEN read (streamed, as `report --json` does, and whole, as diagnose and the page do)
    from kvtrace.cli import main

    assert main(["report", str(path), "--json", "-q"]) == 0
    streamed = json.loads(capsys.readouterr().out)["notes"]
    notes = [streamed, read_chrome_trace(path).meta.get("input_notes", [])]
    # THEN a note says how many events lack the total, and only where any does
    said = {4: [], 3: ["cuda:0: 1 of its 4 memory events carries no 'Total Allocated'"]}.get(
        with_totals, ["cuda:0: its memory events carry no 'Total Allocated'"]
    )
    for found in notes:
        assert [n.split(" (the allocator's")[0] for n in found if "Total Allocated'" in n] == said
