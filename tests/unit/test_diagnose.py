"""`diagnose` on real snapshots: every figure checked against arithmetic on the raw pickle."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from analyzers.planning.diagnose import diagnose
from analyzers.render.diagnosis import diagnosis_html_for, diagnosis_to_json, diagnosis_to_text
from analyzers.report import build_report

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"
OOM_SNAPSHOT = REAL / "oom_snapshot.pickle"
LIVE = ("active_allocated", "active_pending_free", "active_awaiting_free")

pytestmark = pytest.mark.skipif(not OOM_SNAPSHOT.exists(), reason=f"{OOM_SNAPSHOT} not present")


class _PlainData(pickle.Unpickler):
    """The test's own restricted unpickler: plain data only, independent of the code under test."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _raw() -> dict[str, Any]:
    with OOM_SNAPSHOT.open("rb") as stream:
        return _PlainData(stream).load()


def _expected(raw: dict[str, Any]) -> dict[str, int]:
    blocks = [b for s in raw["segments"] for b in s["blocks"]]
    return {
        "allocated": sum(b.get("requested_size") or b["size"] for b in blocks if b["state"] in LIVE),
        "reserved": sum(s["total_size"] for s in raw["segments"]),
        "largest_free": max(b["size"] for b in blocks if b["state"] == "inactive"),
    }


def test_bare_snapshot_peak_figures_match_the_raw_file() -> None:
    # GIVEN the real near-OOM snapshot (no oom entry) WHEN diagnosed
    raw = _raw()
    expected = _expected(raw)
    source, report = build_report(OOM_SNAPSHOT)
    d = diagnose(source, report)
    # THEN the peak is diagnosed with the raw file's figures
    assert d.event == "peak" and d.requested_bytes is None
    assert d.allocated_bytes == expected["allocated"]
    assert d.reserved_bytes == expected["reserved"]
    assert d.largest_free_block_bytes == expected["largest_free"]
    assert d.reserved_unallocated_bytes == expected["reserved"] - expected["allocated"]
    # top stacks come from the blocks' own histories and sum to at most what is allocated
    assert d.top_stacks and sum(s.bytes for s in d.top_stacks) <= expected["allocated"]
    assert "flex_opt.py" in d.top_stacks[0].stack
    # without KV geometry, remedies say what cannot be computed instead of inventing figures
    by_kind = {r.kind: r for r in d.remedies}
    assert by_kind["expandable_segments"].saved_bytes == expected["reserved"] - expected["allocated"]
    for kind in ("batch", "context", "static_cache", "quantized_kv", "offloading", "sliding_window"):
        assert by_kind[kind].saved_bytes is None and "cannot be computed" in by_kind[kind].sentence


@pytest.mark.parametrize("over", [True, False])
def test_a_budget_against_a_snapshot_without_trace_events_is_weighed_at_its_dump(over: bool) -> None:
    # GIVEN the real snapshot, whose trace holds no alloc or free (one moment: what was live at its dump),
    # and a budget 1 MiB under or over what its blocks hold
    allocated = _expected(_raw())["allocated"]
    budget = allocated - 2**20 if over else allocated + 2**20
    # WHEN diagnosed against it
    d = diagnose(*build_report(OOM_SNAPSHOT), budget_bytes=budget)
    c = d.budget_crossing
    # THEN that moment is weighed whole: over, it runs out (before, it "fit with the whole budget to spare",
    # its peak counted as 0); under, the headroom is the budget less it
    assert c is not None and c.crossed is over and c.at_dump and c.peak_bytes == allocated
    assert c.headroom_bytes == budget - allocated
    text = diagnosis_to_text(d)
    if over:
        assert d.event == "budget" and c.allocated_after_bytes == allocated and c.request_bytes is None
        assert text.splitlines()[1] == (
            "would run out of memory on an 11.03 GiB device (cuda:0): the 11.03 GiB allocated when the "
            "snapshot was taken exceed it (its trace holds no allocs or frees: the allocation that crossed "
            "it is not seen)"
        )
    else:
        assert d.event == "peak" and "to spare" in text.splitlines()[1]
        assert diagnosis_to_json(d)["budget_crossing"]["headroom_bytes"] == 2**20


def test_snapshot_with_an_oom_entry(tmp_path: Path) -> None:
    # GIVEN the real snapshot with an allocator `oom` entry appended to device 0's trace
    raw = _raw()
    request, device_free = 3 * 2**30 + 12_345, 1_234_567_890
    raw["device_traces"][0].append(
        {"action": "oom", "size": request, "device_free": device_free, "addr": 0, "stream": 0, "frames": []}
    )
    path = tmp_path / "with_oom.pickle"
    path.write_bytes(pickle.dumps(raw, protocol=4))
    expected = _expected(raw)
    # WHEN diagnosed
    source, report = build_report(path)
    d = diagnose(source, report)
    # THEN the OOM's figures are the raw file's
    assert d.event == "oom"
    assert d.requested_bytes == request
    assert d.free_bytes == device_free
    assert d.allocated_bytes == expected["allocated"]
    assert d.reserved_bytes == expected["reserved"]
    assert d.largest_free_block_bytes == expected["largest_free"]
    assert d.shortfall_bytes == request - device_free
    total_free = expected["reserved"] - expected["allocated"] + device_free
    assert d.fragmented is (total_free >= request > max(expected["largest_free"], device_free))
    # and every renderer shows them
    as_json = diagnosis_to_json(d)
    assert as_json["requested_bytes"] == request and as_json["free_bytes"] == device_free
    assert "out of memory on cuda:0" in diagnosis_to_text(d)
    section = diagnosis_html_for(source, report)
    assert section.startswith("<section") and "Remedies" in section


@pytest.mark.parametrize("stream", [0, 7])
def test_an_oom_is_served_only_by_its_own_streams_segments(tmp_path: Path, stream: int) -> None:
    # GIVEN the real snapshot (every segment on stream 0) with an OOM of 1 GiB requested on `stream`
    raw = _raw()
    request = 2**30
    raw["device_traces"][0].append(
        {"action": "oom", "size": request, "device_free": 0, "addr": 0, "stream": stream, "frames": []}
    )
    path = tmp_path / "oom.pickle"
    path.write_bytes(pickle.dumps(raw, protocol=4))
    # WHEN diagnosed
    d = diagnose(*build_report(path))
    # THEN the largest free block is the largest in that stream's segments: the caching allocator never
    # serves one stream's request from another's blocks
    own = [s for s in raw["segments"] if s["stream"] == stream]
    usable = [b["size"] for s in own for b in s["blocks"] if b["state"] == "inactive"]
    assert d.largest_free_block_bytes == max(usable, default=0)
    total_free = sum(s["total_size"] for s in raw["segments"]) - _expected(raw)["allocated"]
    assert d.fragmented is (total_free >= request > max(usable, default=0))
    assert any("another stream's segment" in note for note in d.notes) is (stream == 7)
    text = diagnosis_to_text(d)
    if not d.fragmented:
        assert ("not enough free memory in total" in text) is (total_free < request)


@pytest.mark.parametrize(
    ("request_bytes", "device_free", "verdict"),
    [
        (2**20, 0, "no: a free block of 1.98 MiB in the reserved segments was large enough"),
        (
            3 * 2**20,
            10 * 2**20,
            "cannot tell: 10.00 MiB was free on the device, yet the request failed: a per-process limit this "
            'input does not give refused it (PyTorch\'s OOM message names it: "... allowed")',
        ),
        (2**30, 0, "no: not enough free memory in total"),
    ],
)
def test_a_verdict_other_than_yes_says_why(
    tmp_path: Path, request_bytes: int, device_free: int, verdict: str
) -> None:
    # GIVEN the real snapshot (largest free block 2,080,768 B, 4,554,752 B free in its segments) with an
    # allocator `oom` entry that no fragmentation explains
    raw = _raw()
    blocks = [b for s in raw["segments"] for b in s["blocks"]]
    assert max(b["size"] for b in blocks if b["state"] == "inactive") == 2_080_768
    entry = {"action": "oom", "size": request_bytes, "device_free": device_free, "addr": 0, "stream": 0}
    raw["device_traces"][0].append({**entry, "frames": []})
    path = tmp_path / "oom.pickle"
    path.write_bytes(pickle.dumps(raw, protocol=4))
    # WHEN diagnosed
    d = diagnose(*build_report(path))
    # THEN the verdict names what held (or would have held) the request, and no per-process cap is invented
    assert d.fragmented is (None if device_free >= request_bytes else False)
    row = next(line for line in diagnosis_to_text(d).splitlines() if "fragmentation caused it" in line)
    assert row.split("fragmentation caused it")[1].strip() == verdict
    assert diagnosis_to_json(d)["limit_bytes"] is None and d.free_within_limit_bytes is None
