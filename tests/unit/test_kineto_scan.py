"""The byte scan (Kineto's layout) and the streaming JSON reader (any layout) give the same events, on real
traces written by torch.profiler on real GPUs and on re-indented copies of them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from analyzers.model import MemorySource
from analyzers.readers import kineto_scan
from analyzers.readers.chrome_trace import read_chrome_trace
from tests.same_source import assert_same_devices

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "real_traces" / "chrome"
TRACES = sorted(REAL.glob("*.json.gz")) + sorted(ROOT.glob("sample_traces/**/profiler/*.pt.trace.json.gz"))
H200_TRACE = next(ROOT.glob("sample_traces/h200/dynamic_b24/profiler/*.pt.trace.json.gz"))


def _same(a: MemorySource, b: MemorySource) -> None:
    assert_same_devices(a, b)
    assert a.markers == b.markers
    assert a.meta["trace_events"] == b.meta["trace_events"]


@pytest.mark.parametrize("path", TRACES, ids=[p.name[:40] for p in TRACES])
def test_byte_scan_in_small_blocks_equals_the_json_reader(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kineto_scan, "_BLOCK_BYTES", 64 << 10)  # many blocks, cut anywhere
    scanned = read_chrome_trace(path)
    whole = read_chrome_trace(path, byte_scan=False)
    decoded = read_chrome_trace(path, byte_scan=False, in_memory=False)
    assert [s.meta["reader"] for s in (scanned, whole, decoded)] == ["byte_scan", "in_memory", "json_stream"]
    _same(scanned, decoded)
    _same(scanned, whole)


def test_a_cuda_torch_2_11_trace_memory_events_are_read_by_the_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN the trace torch 2.11+cu130 wrote on an H200 (its memory events' head on two lines, not the CPU
    # build's five), 23,761 memory events among kernels
    text = gzip.decompress(H200_TRACE.read_bytes())
    memory = text.count(b'"name": "[memory]"')
    assert memory == 23_761
    decoded: list[int] = []
    decode = kineto_scan._decode
    monkeypatch.setattr(kineto_scan, "_decode", lambda *args: decoded.append(1) or decode(*args))
    # WHEN the byte scan reads it
    scanned = read_chrome_trace(H200_TRACE)
    # THEN no memory event was decoded (only its 8 step ranges were), and the
    # columns are the JSON reader's
    assert scanned.meta["reader"] == "byte_scan"
    assert sum(len(device.delta_bytes) for device in scanned.devices) == memory
    assert len(decoded) == len(scanned.markers) == 8
    _same(scanned, read_chrome_trace(H200_TRACE, byte_scan=False, in_memory=False))


def test_a_number_of_over_24_characters_is_read_as_json_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN memory events in Kineto's layout, one of whose ts is written in 25 characters ("1009" as
    # "1.0090000000000000000e+03": cut to 24, as a fixed-width column would, it reads 1.009)
    monkeypatch.setattr(kineto_scan, "_BLOCK_BYTES", 64 << 10)
    events = [MEMORY % (1000 + i, 0, 1 << 30, 64 * (i + 1), 64, 0x7F00 + i, i) for i in range(2000)]
    events[9] = events[9].replace('"ts": 1009.000', '"ts": 1.0090000000000000000e+03')
    path, _ = _kineto_file(tmp_path / "long.json", events, monkeypatch)
    one_line = tmp_path / "long-one-line.json"
    one_line.write_text(path.read_text().replace("\n", ""))
    # WHEN read by the byte scan, the whole-text reader (on one line) and json THEN all say ts 1009
    decoded = read_chrome_trace(path, byte_scan=False, in_memory=False)
    (device,) = decoded.devices
    assert device.ts_us[9] == 1009.0
    sources = [read_chrome_trace(path), read_chrome_trace(one_line)]
    assert [source.meta["reader"] for source in sources] == ["byte_scan", "in_memory"]
    for source in sources:
        _same(source, decoded)


@pytest.mark.parametrize("name", ["worker0.1623143089861.pt.trace.json.gz", "rank0.json.gz"])
def test_a_re_indented_trace_falls_back_and_reads_the_same(tmp_path: Path, name: str) -> None:
    original = REAL / name
    if not original.exists():
        pytest.skip(f"{original} is not here")
    copy = tmp_path / "reindented.json"
    copy.write_text(json.dumps(json.loads(gzip.decompress(original.read_bytes())), indent=1))
    scanned = read_chrome_trace(original)
    reindented = read_chrome_trace(copy, in_memory=False)
    assert scanned.meta["reader"] == "byte_scan"
    assert reindented.meta["reader"] == "json_stream"
    _same(scanned, reindented)
    whole = read_chrome_trace(copy)
    assert whole.meta["reader"] == "in_memory"
    _same(scanned, whole)


def test_a_lost_comma_between_blocks_is_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = REAL / "worker0.1623143089861.pt.trace.json.gz"
    if not original.exists():
        pytest.skip(f"{original} is not here")
    monkeypatch.setattr(kineto_scan, "_BLOCK_BYTES", 64 << 10)
    text = gzip.decompress(original.read_bytes()).decode()
    at = text.index("\n  },\n  {", len(text) * 3 // 4)
    path = tmp_path / "t.json"
    path.write_text(text[: at + 4] + text[at + 5 :])
    with pytest.raises(Exception, match="corrupt JSON"):
        read_chrome_trace(path)


MEMORY = (
    '{\n    "ph": "i",\n    \n    "cat": "cpu_instant_event",\n    "s": "t",\n    "name": "[memory]",\n'
    '    "pid": 7,\n    "tid": 7,\n    "ts": %d.%03d\n    ,\n    "args": {\n      "Total Reserved": %d,'
    ' "Total Allocated": %d, "Bytes": %d, "Device Id": 0, "Device Type": 1, "Addr": %d, "finished": true,'
    ' "Ev Idx": %d\n    }\n  }'
)
KERNEL = (
    '{\n    "ph": "X", "cat": "kernel", "name": "void k<{lambda()#1}>(float*)", "pid": 0, "tid": 7,\n'
    '    "ts": %d.500, "dur": 3,\n    "args": {\n      "stream": 7, "grid": [1, 1, 1]\n    }\n  }'
)
STEP = (
    '{\n    "ph": "X", "cat": "user_annotation", "name": "ProfilerStep#%d", "pid": 7, "tid": 7,\n'
    '    "ts": %d.250, "dur": 5,\n    "args": {\n      "External id": 1\n    }\n  }'
)


def _kineto_file(path: Path, events: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[int]]:
    """`events` written in Kineto's layout, and a list that grows by one per event the JSON decoder gets."""
    path.write_text('{\n  "schemaVersion": 1,\n  "traceEvents": [\n  ' + ",\n  ".join(events) + "\n  ]\n}\n")
    decoded: list[int] = []
    decode = kineto_scan._decode
    monkeypatch.setattr(kineto_scan, "_decode", lambda *args: decoded.append(1) or decode(*args))
    return path, decoded


def test_memory_events_interleaved_with_kernels_are_read_by_the_pattern(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a GPU-style trace: memory events scattered among kernels, a step range every 500 events
    monkeypatch.setattr(kineto_scan, "_BLOCK_BYTES", 64 << 10)
    events, allocated, steps = [], 0, 0
    for i in range(6000):
        if i % 3 == 0:
            delta = (i % 7 - 3) * 512
            allocated += delta
            events.append(MEMORY % (1000 + i, i % 1000, 1 << 30, allocated, delta, 0x7F00 + i, i))
        elif i % 500 == 1:
            events.append(STEP % (steps, 1000 + i))
            steps += 1
        else:
            events.append(KERNEL % (1000 + i))
    path, decoded = _kineto_file(tmp_path / "gpu.json", events, monkeypatch)

    scanned = read_chrome_trace(path)

    assert scanned.meta["reader"] == "byte_scan"
    assert len(decoded) == steps  # only the step events went through the JSON decoder
    _same(scanned, read_chrome_trace(path, byte_scan=False))
    (device,) = scanned.devices
    assert len(device) == 2000


def test_only_names_that_begin_with_a_step_prefix_are_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN kvtrace ranges and steps, and stack frames and kernels that merely mention them
    frame = (
        '{\n    "ph": "X", "cat": "python_function", "name": "%s", "pid": 7, "tid": 7,\n'
        '    "ts": %d, "dur": 2\n  }'
    )
    names = ("kvtrace/decode step {}", "/lib/kvtrace/recorder.py(12): update", "after ProfilerStep#{}")
    events = [
        STEP % (i, 100 + 10 * i) if i % 4 == 3 else frame % (names[i % 4].format(i), 100 + 10 * i)
        for i in range(40)
    ]
    path, decoded = _kineto_file(tmp_path / "frames.json", events, monkeypatch)

    scanned = read_chrome_trace(path)

    # THEN the ranges are the JSON reader's, and only the 20 events whose name begins so were decoded; of
    # those, the 10 frames named like kvtrace's ranges (a frame of its files, named below sys.path) are no
    # steps: the steps are the 10 ranges
    assert scanned.meta["reader"] == "byte_scan"
    assert len(decoded) == 20
    assert [m.label for m in scanned.markers] == [f"ProfilerStep#{i}" for i in range(3, 40, 4)]
    _same(scanned, read_chrome_trace(path, byte_scan=False))


def test_two_processes_on_one_device_are_summed_on_every_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two processes' memory events on cuda:0, each with its own running 'Total Allocated'
    monkeypatch.setattr(kineto_scan, "_BLOCK_BYTES", 64 << 10)
    events, totals, level, peak = [], {7: 0, 8: 0}, 0, 0
    for i in range(3000):
        pid = 7 if i % 5 else 8
        delta = (1 << 20) if (i // 50) % 2 == 0 else -(1 << 20)
        if totals[pid] + delta < 0:
            delta = -delta
        totals[pid] += delta
        level += delta
        peak = max(peak, level)
        text = MEMORY % (1000 + i, 0, 1 << 34, totals[pid], delta, 0x7F00 + i, i)
        events.append(text.replace('"pid": 7,\n    "tid": 7', f'"pid": {pid},\n    "tid": {pid}'))
    path, _ = _kineto_file(tmp_path / "two.json", events, monkeypatch)
    reindented = tmp_path / "reindented.json"
    reindented.write_text(json.dumps(json.loads(path.read_text()), indent=1))
    # WHEN read by the byte scan, the streaming JSON reader (its Kineto fast runs), plain JSON decoding and
    # the whole-text reader
    sources = [read_chrome_trace(path), read_chrome_trace(path, byte_scan=False, in_memory=False)]
    sources += [read_chrome_trace(reindented, in_memory=False), read_chrome_trace(reindented)]
    assert [s.meta["reader"] for s in sources] == ["byte_scan", "json_stream", "json_stream", "in_memory"]
    # THEN no path follows one process's totals: the device's curve is the sum of both
    for source in sources:
        (device,) = source.devices
        assert device.total_allocated is None and device.total_reserved is None
        assert any("2 processes" in note for note in source.meta["input_notes"])
    for source in sources[1:]:
        _same(sources[0], source)
    from kvtrace.cli import main

    assert main(["report", str(path), "--json", "--no-export", "-q"]) == 0
    (figures,) = json.loads(capsys.readouterr().out)["devices"]
    assert figures["peak_allocated_bytes"] == peak and figures["final_allocated_bytes"] == level
