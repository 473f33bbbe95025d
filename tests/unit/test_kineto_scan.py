"""The byte scan (Kineto's layout) and the streaming JSON reader (any layout) give the same events, on real
traces written by torch.profiler on real GPUs and on re-indented copies of them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from analyzers.model import MemorySource
from analyzers.readers import kineto_scan
from analyzers.readers.chrome_trace import read_chrome_trace

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "real_traces" / "chrome"
TRACES = sorted(REAL.glob("*.json.gz")) + sorted(ROOT.glob("sample_traces/*/profiler/*.pt.trace.json.gz"))


def _same(a: MemorySource, b: MemorySource) -> None:
    assert [d.device for d in a.devices] == [d.device for d in b.devices]
    for x, y in zip(a.devices, b.devices, strict=True):
        for column in ("ts_us", "addr", "delta_bytes", "total_allocated", "total_reserved"):
            left, right = getattr(x, column), getattr(y, column)
            assert (left is None) == (right is None), column
            if left is not None:
                assert left.dtype == right.dtype, column
                np.testing.assert_array_equal(left, right)
        assert (x.baseline_bytes, x.capacity_bytes) == (y.baseline_bytes, y.capacity_bytes)
    assert a.markers == b.markers
    assert a.meta["trace_events"] == b.meta["trace_events"]


@pytest.mark.parametrize("path", TRACES, ids=[p.name[:40] for p in TRACES])
def test_byte_scan_in_small_blocks_equals_the_json_reader(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kineto_scan, "_BLOCK_BYTES", 64 << 10)  # many blocks, cut anywhere
    scanned = read_chrome_trace(path)
    decoded = read_chrome_trace(path, byte_scan=False)
    assert scanned.meta["reader"] == "byte_scan"
    assert decoded.meta["reader"] == "json_stream"
    _same(scanned, decoded)


@pytest.mark.parametrize("name", ["worker0.1623143089861.pt.trace.json.gz", "rank0.json.gz"])
def test_a_re_indented_trace_falls_back_and_reads_the_same(tmp_path: Path, name: str) -> None:
    original = REAL / name
    if not original.exists():
        pytest.skip(f"{original} is not here")
    copy = tmp_path / "reindented.json"
    copy.write_text(json.dumps(json.loads(gzip.decompress(original.read_bytes())), indent=1))
    scanned = read_chrome_trace(original)
    reindented = read_chrome_trace(copy)
    assert scanned.meta["reader"] == "byte_scan"
    assert reindented.meta["reader"] == "json_stream"
    _same(scanned, reindented)


def test_a_lost_comma_between_blocks_is_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kineto_scan, "_BLOCK_BYTES", 64 << 10)
    text = gzip.decompress((REAL / "worker0.1623143089861.pt.trace.json.gz").read_bytes()).decode()
    at = text.index("\n  },\n  {", len(text) * 3 // 4)
    path = tmp_path / "t.json"
    path.write_text(text[: at + 4] + text[at + 5 :])
    with pytest.raises(Exception, match="corrupt JSON"):
        read_chrome_trace(path)
