"""`kvtrace report` of a CUDA caching-allocator snapshot whose segments a private pool owns (CUDA graphs':
`segment_pool_id` other than (0, 0)): the bytes those segments hold unallocated serve only their pool's
allocations (its graphs' replays), so they are no fragmentation of the memory an ordinary allocation could
use. `diagnose` leaves them out of an OOM's reserved-but-unallocated figure; the report's
`fragmentation_at_peak_bytes` counted them. It now leaves them out and says them apart
(`private_pool_free_at_peak_bytes`, present only where a segment is a private pool's).

No published snapshot has a private pool, so the inputs are the real batch-266 OOM (sample_traces/h200) with
the segments holding its big free blocks set to a graph's pool, written back as torch's `_dump_snapshot`
writes it (`_with_graph_pool`), and two small snapshots written here in the allocator's format whose pool
changes after the peak. Every figure is computed here from the raw pickle: walked back from the dump."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from tests.cli_json import cli_json
from tests.integration.test_diagnose_capped_oom import LIVE, _PlainData
from tests.integration.test_diagnose_graph_pools_snapshot import (
    GRAPH_POOL,
    _holds_a_fragment,
    _with_graph_pool,
)

KiB = 1024
DEFAULT_AT, POOL_AT = 0x7F00_0000_0000, 0x7F00_1000_0000
FREES = ("free_completed", "free")


def _levels_at_peak(raw: dict[str, Any]) -> dict[str, int]:
    """Allocated, reserved and the pools' reserved less allocated after the trace's first highest alloc or
    free: the dump's segments walked back entry by entry (requested sizes, as the trace's)."""
    (trace,) = raw["device_traces"]
    pools = [
        (s["address"], s["address"] + s["total_size"])
        for s in raw["segments"]
        if s["segment_pool_id"] != (0, 0)
    ]

    def in_pool(address: int) -> bool:
        return any(start <= address < end for start, end in pools)

    live = [(s, b) for s in raw["segments"] for b in s["blocks"] if b["state"] in LIVE]
    allocated = sum(b.get("requested_size") or b["size"] for _, b in live)
    pool_live = sum(b.get("requested_size") or b["size"] for s, b in live if s["segment_pool_id"] != (0, 0))
    reserved = sum(s["total_size"] for s in raw["segments"])
    pool_reserved = sum(end - start for start, end in pools)
    after: list[tuple[int, int, int]] = []  # (allocated, reserved, the pools' unallocated), last entry first
    for entry in reversed(trace):
        action, size, address = entry["action"], entry.get("size", 0), entry.get("addr", -1)
        if action == "alloc" or action in FREES:
            after.append((allocated, reserved, pool_reserved - pool_live))
            moved = size if action == "alloc" else -size
            allocated -= moved
            pool_live -= moved if in_pool(address) else 0
        elif action in ("segment_alloc", "segment_map", "segment_free", "segment_unmap"):
            grown = size if action in ("segment_alloc", "segment_map") else -size
            reserved -= grown
            pool_reserved -= grown if in_pool(address) else 0
    after.reverse()
    peak, reserved_then, pools_then = max(after, key=lambda level: level[0])  # the first highest
    return {"peak": peak, "reserved": reserved_then, "pools": pools_then}


def _report(snapshot: Path, capsys: Any, tmp_path: Path) -> tuple[dict[str, Any], str, str]:
    """The device of `report --json` (the lists' path for a small snapshot), the text, the HTML page (the
    columns' path)."""
    (device,) = cli_json(["report", str(snapshot), "--json", "-q"], capsys)["devices"]
    capsys.readouterr()
    from kvtrace.cli import main

    assert main(["report", str(snapshot), "-q"]) == 0
    text = capsys.readouterr().out
    page = tmp_path / "report.html"
    assert main(["report", str(snapshot), "-q", "-o", str(page)]) == 0
    return device, text, page.read_text()


def test_real_oom_snapshot_leaves_graph_pools_out_of_the_peaks_fragmentation(
    tmp_path: Path, capsys: Any
) -> None:
    # GIVEN the real batch-266 OOM snapshot, the nine segments holding its big free blocks in a graph's pool
    run, _ = _with_graph_pool(tmp_path, _holds_a_fragment)
    snapshot = run / "snapshots" / "oom.pickle"
    with snapshot.open("rb") as stream:
        want = _levels_at_peak(_PlainData(stream).load())
    assert want == {"peak": 25_774_273_532, "reserved": 26_703_036_416, "pools": 782_763_008}
    # WHEN reported
    device, text, page = _report(snapshot, capsys, tmp_path)
    # THEN the peak's slack outside the pools is its fragmentation, the pools' unallocated bytes apart
    assert (device["peak_allocated_bytes"], device["reserved_at_peak_bytes"]) == (
        want["peak"],
        want["reserved"],
    )
    fragmentation = want["reserved"] - want["peak"] - want["pools"]
    assert device["fragmentation_at_peak_bytes"] == fragmentation == 145_999_876  # was 928,762,884
    assert device["private_pool_free_at_peak_bytes"] == want["pools"]
    # AND the text and the page say both
    assert (
        "reserved 24.87 GiB: 139.24 MiB reserved but unallocated at the peak outside private pools, "
        "746.50 MiB more in private pools (CUDA graphs': only their own allocations can use them)\n"
    ) in text
    assert "<tr><th>&nbsp;&nbsp;reserved but unallocated</th><td>139.24 MiB</td></tr>" in page
    assert (
        "<tr><th>&nbsp;&nbsp;unallocated in private pools (CUDA graphs)</th><td>746.50 MiB</td></tr>" in page
    )


def _segment(address: int, pool: tuple[int, int], blocks: list[tuple[int, int, bool]]) -> dict[str, Any]:
    """A large segment as torch's `_snapshot` writes it, of `blocks` (offset, size, live) tiling it."""
    written = [
        {
            "address": address + offset,
            "size": size,
            "requested_size": size if live else 0,
            "state": "active_allocated" if live else "inactive",
            "frames": [],
        }
        for offset, size, live in blocks
    ]
    allocated = sum(size for _, size, live in blocks if live)
    return {
        "device": 0,
        "address": address,
        "total_size": sum(size for _, size, _ in blocks),
        "allocated_size": allocated,
        "active_size": allocated,
        "requested_size": allocated,
        "stream": 0,
        "segment_type": "large",
        "segment_pool_id": pool,
        "is_expandable": False,
        "frames": [],
        "blocks": written,
    }


def _write(path: Path, entries: list[tuple[str, int, int]], segments: list[dict[str, Any]]) -> Path:
    trace = [
        {"action": action, "addr": address, "size": size, "stream": 0, "time_us": 1_000 + i, "frames": []}
        for i, (action, address, size) in enumerate(entries)
    ]
    path.write_bytes(pickle.dumps({"segments": segments, "device_traces": [trace]}, protocol=4))
    return path


def _pool_changes_after_the_peak(tmp_path: Path) -> Path:
    """2 MiB in the default pool and 2 MiB in a graph's; the peak (2,304 KiB) holds 512 KiB of the pool's
    2 MiB, which gets a 256 KiB block after it: the dump's pool holds 768 KiB."""
    p1, p2, a, b = POOL_AT, POOL_AT + 1024 * KiB, DEFAULT_AT, DEFAULT_AT + 1024 * KiB
    entries = [
        ("segment_alloc", DEFAULT_AT, 2048 * KiB),
        ("alloc", a, 1024 * KiB),
        ("segment_alloc", POOL_AT, 2048 * KiB),
        ("alloc", p1, 512 * KiB),
        ("alloc", p2, 512 * KiB),
        ("free_requested", p1, 512 * KiB),
        ("free_completed", p1, 512 * KiB),
        ("alloc", b, 768 * KiB),  # the peak: a, p2 and b
        ("free_completed", b, 768 * KiB),
        ("alloc", p1, 256 * KiB),
    ]
    default = _segment(DEFAULT_AT, (0, 0), [(0, 1024 * KiB, True), (1024 * KiB, 1024 * KiB, False)])
    pool = _segment(
        POOL_AT,
        GRAPH_POOL,
        [
            (0, 256 * KiB, True),
            (256 * KiB, 768 * KiB, False),
            (1024 * KiB, 512 * KiB, True),
            (1536 * KiB, 512 * KiB, False),
        ],
    )
    return _write(tmp_path / "after_peak.pickle", entries, [default, pool])


def _pool_made_after_the_peak(tmp_path: Path) -> Path:
    """The peak (1,792 KiB) in the default pool's 2 MiB; a graph's pool reserved after it, 512 KiB of its
    2 MiB allocated at the dump."""
    a, b = DEFAULT_AT, DEFAULT_AT + 1024 * KiB
    entries = [
        ("segment_alloc", DEFAULT_AT, 2048 * KiB),
        ("alloc", a, 1024 * KiB),
        ("alloc", b, 768 * KiB),  # the peak
        ("free_completed", b, 768 * KiB),
        ("segment_alloc", POOL_AT, 2048 * KiB),
        ("alloc", POOL_AT, 512 * KiB),
    ]
    default = _segment(DEFAULT_AT, (0, 0), [(0, 1024 * KiB, True), (1024 * KiB, 1024 * KiB, False)])
    pool = _segment(POOL_AT, GRAPH_POOL, [(0, 512 * KiB, True), (512 * KiB, 1536 * KiB, False)])
    return _write(tmp_path / "made_after.pickle", entries, [default, pool])


@pytest.mark.parametrize(
    ("made", "peak", "outside", "in_pools", "said"),
    [
        # the dump's pool (1,280 KiB unallocated) is not the peak's: 512 KiB allocated then, 1,536 KiB free
        (_pool_changes_after_the_peak, 2304 * KiB, 256 * KiB, 1536 * KiB, ("256.00 KiB", "1.50 MiB")),
        # nor is a pool reserved after the peak: none of the peak's slack is the pool's
        (_pool_made_after_the_peak, 1792 * KiB, 256 * KiB, 0, ("256.00 KiB", "0 B")),
    ],
    ids=["pool_changes_after_the_peak", "pool_made_after_the_peak"],
)
def test_the_pools_bytes_are_the_peaks_not_the_dumps(
    made: Any, peak: int, outside: int, in_pools: int, said: tuple[str, str], tmp_path: Path, capsys: Any
) -> None:
    # GIVEN a snapshot whose graph's pool differs at the dump from at the peak
    snapshot = made(tmp_path)
    with snapshot.open("rb") as stream:
        want = _levels_at_peak(_PlainData(stream).load())
    assert (want["peak"], want["reserved"] - want["peak"] - want["pools"], want["pools"]) == (
        peak,
        outside,
        in_pools,
    )
    # WHEN reported
    device, text, page = _report(snapshot, capsys, tmp_path)
    # THEN the figures are the peak's, in the JSON (lists), the text and the page (columns)
    assert device["peak_allocated_bytes"] == peak and device["reserved_at_peak_bytes"] == want["reserved"]
    assert device["fragmentation_at_peak_bytes"] == outside
    assert device["private_pool_free_at_peak_bytes"] == in_pools
    slack, pools = said
    assert (
        f"{slack} reserved but unallocated at the peak outside private pools, {pools} more in private" in text
    )
    assert f"<tr><th>&nbsp;&nbsp;reserved but unallocated</th><td>{slack}</td></tr>" in page
    assert f"<tr><th>&nbsp;&nbsp;unallocated in private pools (CUDA graphs)</th><td>{pools}</td></tr>" in page


def test_a_snapshot_without_private_pools_has_no_pool_figure(capsys: Any) -> None:
    # GIVEN the real batch-266 OOM snapshot as recorded: every segment in the default pool
    snapshot = (
        Path(__file__).resolve().parents[2]
        / "sample_traces"
        / "h200"
        / "oom_b266"
        / "snapshots"
        / "oom.pickle"
    )
    (device,) = cli_json(["report", str(snapshot), "--json", "-q"], capsys)["devices"]
    # THEN its slack at the peak is all fragmentation, and no pool figure is written
    assert (
        device["fragmentation_at_peak_bytes"]
        == device["reserved_at_peak_bytes"] - device["peak_allocated_bytes"]
    )
    assert "private_pool_free_at_peak_bytes" not in device
