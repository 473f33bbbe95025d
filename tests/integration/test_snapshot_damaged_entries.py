"""A real snapshot with one field lost (an alloc's `addr` or `size`, the segments' `total_size`, the whole
`device_traces`): the report gives the figures the rest of the file supports and says what was lost, the
same by the lists path and the columns path. Booking an alloc without `addr` at address -1 had its free
never match: 512 MiB counted twice, a peak of 3.53 GiB above the 3.52 GiB reserved, and no note. A free
that lost only its `size` frees its alloc's bytes (skipped, it kept them in the final).

Expected figures come from the raw file: the segments' own sums, and the undamaged trace replayed here.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from analyzers.readers.safe_pickle import load_pickle
from analyzers.render.json import report_to_json
from analyzers.report import build_report

SNAPSHOTS = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"
LIVE = ("active_allocated", "active_pending_free", "active_awaiting_free")
FREES = ("free_completed", "free")


def _raw(name: str) -> dict[str, Any]:
    path = SNAPSHOTS / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    data = load_pickle(str(path))
    assert isinstance(data, dict)
    return data


def _write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def _report(path: Path) -> dict[str, Any]:
    """The JSON report by the lists path, checked equal to the columns path's (timelines aside)."""
    by_path = []
    for timelines in (False, True):
        _, report = build_report(path, keep_events=False, timelines=timelines)
        as_json = report_to_json(report)
        as_json.pop("timelines", None)
        by_path.append(json.dumps(as_json, sort_keys=True))
    assert by_path[0] == by_path[1]
    result: dict[str, Any] = json.loads(by_path[0])
    return result


def _figures(device: dict[str, Any]) -> dict[str, Any]:
    keys = ("peak_allocated_bytes", "final_allocated_bytes", "reserved_at_peak_bytes", "alloc_events")
    return {key: device[key] for key in (*keys, "free_events", "final_allocated_rounded_bytes")}


def _held_at_dump(raw: dict[str, Any]) -> int:
    """Requested bytes of the blocks live at the dump: what the trace's entries end at."""
    live = [b for s in raw["segments"] for b in s["blocks"] if b["state"] in LIVE]
    return sum(b.get("requested_size") or b["size"] for b in live)


def _peak_of(trace: list[dict[str, Any]], final: int) -> tuple[int, int]:
    """(peak, index of its entry) of the undamaged trace, walked back from the level at the dump: each
    entry carries the requested size, a free the same as its alloc."""
    level, peak, at = final, final, len(trace)
    for index in range(len(trace) - 1, -1, -1):
        entry = trace[index]
        if entry["action"] == "alloc":
            level -= entry["size"]
        elif entry["action"] in FREES:
            level += entry["size"]
        if level >= peak:
            peak, at = level, index - 1
    return peak, at


def _biggest_alloc(trace: list[dict[str, Any]]) -> int:
    return max((i for i, e in enumerate(trace) if e["action"] == "alloc"), key=lambda i: trace[i]["size"])


def test_an_alloc_without_addr_is_left_out_and_noted(tmp_path: Path) -> None:
    # GIVEN the torch 2.11 snapshot whose biggest alloc (512 MiB, freed later in the trace) lost its addr
    raw = _raw("mem_snapshot.pickle")
    (trace,) = raw["device_traces"]
    damaged = copy.deepcopy(raw)
    del damaged["device_traces"][0][_biggest_alloc(trace)]["addr"]
    final = _held_at_dump(raw)
    peak, peak_at = _peak_of(trace, final)
    reserved = sum(s["total_size"] for s in raw["segments"])
    # every segment the trace reserves comes before its peak: all of them are reserved at the peak
    assert all(i < peak_at for i, e in enumerate(trace) if e["action"] == "segment_alloc")

    # WHEN it is reported, by lists and by columns
    report = _report(_write(tmp_path, "no_addr.pickle", damaged))
    (device,) = report["devices"]

    # THEN the figures are the undamaged trace's and the dump's: allocated never above reserved
    assert device["peak_allocated_bytes"] == peak
    assert device["final_allocated_bytes"] == final
    assert device["reserved_at_peak_bytes"] == reserved
    assert device["fragmentation_at_peak_bytes"] == reserved - peak >= 0
    assert device["alloc_events"] == sum(e["action"] == "alloc" for e in trace) - 1
    # AND a note counts the entry left out
    assert f"skipped 1 of {len(trace)} events: 1 cuda:0 alloc entry without addr" in report["notes"]


def _free_of(trace: list[dict[str, Any]], alloc: int) -> int:
    """The index of the free that completes the alloc at index `alloc`."""
    address = trace[alloc]["addr"]
    return next(
        i for i in range(alloc + 1, len(trace)) if trace[i]["action"] in FREES and trace[i]["addr"] == address
    )


@pytest.mark.parametrize(("action", "field"), [("alloc", "addr"), ("alloc", "size"), ("free", "addr")])
def test_an_entry_without_a_field_reads_as_the_file_without_that_entry(
    tmp_path: Path, action: str, field: str
) -> None:
    # GIVEN the snapshot with one alloc or its free lacking `field`, and the same file with that entry deleted
    raw = _raw("mem_snapshot.pickle")
    (trace,) = raw["device_traces"]
    alloc = _biggest_alloc(trace)
    index = alloc if action == "alloc" else _free_of(trace, alloc)
    damaged, deleted = copy.deepcopy(raw), copy.deepcopy(raw)
    del damaged["device_traces"][0][index][field]
    del deleted["device_traces"][0][index]

    # WHEN both are reported
    with_hole = _report(_write(tmp_path, f"without_{field}.pickle", damaged))
    without = _report(_write(tmp_path, "deleted.pickle", deleted))

    # THEN their figures are the same, and only the damaged one has a note
    assert [_figures(d) for d in with_hole["devices"]] == [_figures(d) for d in without["devices"]]
    reason = f"1 cuda:0 {trace[index]['action']} entry without {field}"
    if action == "free":  # AND a free's note says its block stays counted: in the final, 512 MiB too high
        reason += ": the block it freed stays counted (the final may hold it)"
        (device,) = with_hole["devices"]
        assert device["final_allocated_bytes"] == _held_at_dump(raw) + trace[alloc]["size"]
    assert f"skipped 1 of {len(trace)} events: {reason}" in with_hole["notes"]
    assert without["notes"] == []


@pytest.mark.parametrize("name", ["mem_snapshot.pickle", "memory_forward_bf16_128.pickle"])
@pytest.mark.parametrize("stripped", [("free_completed",), ("free_requested", "free_completed")])
def test_a_free_without_size_frees_its_allocation(
    tmp_path: Path, name: str, stripped: tuple[str, ...]
) -> None:
    # GIVEN a real snapshot whose biggest alloc's free (and, in the tester's file, its free_requested too)
    # lost its size, the address intact. Leaving that free out kept the block in the final: 542.25 MiB for
    # mem_snapshot.pickle's 30.25 MiB, 504.05 MiB for memory_forward_bf16_128.pickle's 499.55 MiB.
    raw = _raw(name)
    (trace,) = raw["device_traces"]
    alloc = _biggest_alloc(trace)
    address = trace[alloc]["addr"]
    free = _free_of(trace, alloc)
    damaged = copy.deepcopy(raw)
    lost = [
        i
        for i in range(alloc + 1, free + 1)
        if trace[i]["action"] in stripped and trace[i]["addr"] == address
    ]
    assert trace[free]["action"] in stripped and trace[alloc]["size"] > 0
    for index in lost:
        del damaged["device_traces"][0][index]["size"]
    final = _held_at_dump(raw)
    peak, _ = _peak_of(trace, final)

    # WHEN it is reported, by lists and by columns
    report = _report(_write(tmp_path, "free_without_size.pickle", damaged))
    intact = _report(SNAPSHOTS / name)

    # THEN the free frees its alloc's bytes: every figure is the undamaged file's
    (device,) = report["devices"]
    assert device["final_allocated_bytes"] == final
    assert device["peak_allocated_bytes"] == peak
    assert device["alloc_events"] == sum(e["action"] == "alloc" for e in trace)
    assert device["free_events"] == sum(e["action"] in FREES for e in trace)
    assert _figures(device) == _figures(intact["devices"][0])
    # AND a note says the entry was read with its allocation's size, none that it was skipped
    action = trace[free]["action"]
    assert f"cuda:0: 1 {action} entry without size: its allocation's size used" in report["notes"]
    assert not any(note.startswith("skipped") for note in report["notes"])


def test_a_free_without_size_of_a_block_from_before_the_trace_is_left_out(tmp_path: Path) -> None:
    # GIVEN the snapshot whose biggest free of a block allocated before its trace began lost its size, and
    # the same file with that free deleted
    raw = _raw("memory_snapshot.pickle")
    (trace,) = raw["device_traces"]
    live: set[int] = set()
    orphans = []  # frees of an address no alloc of the trace holds then
    for index, entry in enumerate(trace):
        if entry["action"] == "alloc":
            live.add(entry["addr"])
        elif entry["action"] in FREES and entry["addr"] not in live:
            orphans.append(index)
        elif entry["action"] in FREES:
            live.remove(entry["addr"])
    free = max(orphans, key=lambda i: trace[i]["size"])  # 327,680,000 B
    damaged, deleted = copy.deepcopy(raw), copy.deepcopy(raw)
    del damaged["device_traces"][0][free]["size"]
    del deleted["device_traces"][0][free]

    # WHEN both are reported
    with_hole = _report(_write(tmp_path, "orphan_without_size.pickle", damaged))
    without = _report(_write(tmp_path, "deleted.pickle", deleted))

    # THEN its size cannot be known: the free is left out, the final is still the dump's, and the note says
    # the levels before it lack its block
    assert [_figures(d) for d in with_hole["devices"]] == [_figures(d) for d in without["devices"]]
    (device,) = with_hole["devices"]
    assert device["final_allocated_bytes"] == _held_at_dump(raw)
    reason = (
        f"1 cuda:0 {trace[free]['action']} entry without size at an address no alloc in the trace holds: the "
        "levels before it lack the block it freed (the peak may be higher)"
    )
    assert f"skipped 1 of {len(trace)} events: {reason}" in with_hole["notes"]


def test_segments_without_total_size_reserve_their_blocks(tmp_path: Path) -> None:
    # GIVEN the snapshot whose segments all lost their total_size
    raw = _raw("mem_snapshot.pickle")
    damaged = copy.deepcopy(raw)
    for segment in damaged["segments"]:
        del segment["total_size"]
    blocks = sum(b["size"] for s in raw["segments"] for b in s["blocks"])

    # WHEN it is reported
    report = _report(_write(tmp_path, "no_total.pickle", damaged))
    intact = _report(SNAPSHOTS / "mem_snapshot.pickle")

    # THEN each segment reserves its blocks, which are what the undamaged file says it reserves
    assert blocks == sum(s["total_size"] for s in raw["segments"])
    (device,) = report["devices"]
    assert device["reserved_at_peak_bytes"] == blocks
    assert _figures(device) == _figures(intact["devices"][0])
    n = len(raw["segments"])
    assert any(
        note.startswith(f"cuda:0: {n} of its {n} segments have no total_size") for note in report["notes"]
    )


def test_a_snapshot_without_device_traces_says_its_peak_is_the_dump(tmp_path: Path) -> None:
    # GIVEN the snapshot without its device_traces (as if recorded without _record_memory_history)
    raw = _raw("mem_snapshot.pickle")
    damaged = {key: value for key, value in raw.items() if key != "device_traces"}

    # WHEN it is reported
    report = _report(_write(tmp_path, "no_traces.pickle", damaged))

    # THEN its peak is what the dump holds, and a note says that is one moment, not the run's peak
    (device,) = report["devices"]
    assert device["peak_allocated_bytes"] == device["final_allocated_bytes"] == _held_at_dump(raw)
    assert device["reserved_at_peak_bytes"] == sum(s["total_size"] for s in raw["segments"])
    assert any(
        note.startswith("cuda:0: the snapshot's trace holds no allocs or frees: the peak and final are what")
        for note in report["notes"]
    )


@pytest.mark.parametrize("entry", [["alloc", 512], "alloc", 7], ids=["list", "str", "int"])
def test_a_trace_entry_that_is_no_dict_is_refused_in_one_line(
    tmp_path: Path, entry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real snapshot whose first trace entry was replaced by something that is not an event
    from kvtrace.cli import main

    data = copy.deepcopy(_raw("1.3b_snapshot.pickle"))
    trace = next(t for t in data["device_traces"] if t)
    trace[0] = entry
    path = _write(tmp_path, "damaged.pickle", data)
    # WHEN it is reported
    code = main(["report", str(path), "--json", "--no-export"])
    # THEN a usage-class error naming the file and the problem, not kvtrace's internal error
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert str(path) in err and "malformed snapshot" in err and "internal error" not in err
