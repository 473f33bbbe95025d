"""torch.profiler's own memory categories (ACTIVATION, GRADIENT, ...) kept from a memory timeline: in the
report's text and JSON and in the export's `memory_events.torch_category`.

The real file is shared/real_traces' HTA training timeline (`export_memory_timeline_raw`, 16,845 rows);
the coalesced form is written here by torch on the CPU. Every expected figure is replayed from the file's
JSON with plain loops, following the reader's documented conventions (analyzers/readers/memory_timeline.py):
rows `[ns, action, bytes, category]`, action 1 pre-existing, 2 create, 3 version bump (a -n row, then a +n
row: the bytes change category), 4 destroy; torch's category 7 (None) is "uncategorised".
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from analyzers.load import load_tables
from analyzers.units import human_bytes
from kvtrace.cli import main

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces"
REAL_TIMELINE = REAL / "chrome" / "memory_timeline.raw.gz"
needs_real = pytest.mark.skipif(not REAL_TIMELINE.is_file(), reason=f"{REAL_TIMELINE} is absent")

NAMES = ("PARAMETER", "OPTIMIZER_STATE", "INPUT", "TEMPORARY", "ACTIVATION", "GRADIENT", "AUTOGRAD_DETAIL")


def _name(category: Any) -> str:
    return NAMES[category] if isinstance(category, int) and 0 <= category < len(NAMES) else "uncategorised"


def _named(levels: Counter[str]) -> dict[str, int]:
    return {name: value for name, value in levels.items() if value}


def _replay_raw(rows: list[list[Any]]) -> dict[str, Any]:
    """Peak, live bytes by torch's category at it, and bytes created by known category, from the raw rows.

    Live bytes follow each version bump into its new category (torch's coalesced view); the peak is the
    first row that raises the level highest, with the bumps right after it at its nanosecond."""
    events = [row for row in rows if not (row[1] == 1 or row[0] < 0)]
    assert [row[0] for row in events] == sorted(row[0] for row in events)  # in time order, as torch writes
    live: Counter[str] = Counter()
    for _ts, action, nbytes, category in rows:
        if action == 1 or _ts < 0:
            live[_name(category)] += nbytes
    level = sum(live.values())
    peak, at_peak, peak_ns, settling = level, Counter(live), None, False
    created: Counter[str] = Counter()
    for ts, action, nbytes, category in events:
        live[_name(category)] += nbytes  # a bump's -n row, then its +n row, move the bytes
        if action == 3:
            if settling and ts == peak_ns:
                at_peak = Counter(live)
            continue
        settling = False
        level += nbytes
        if action == 2 and _name(category) != "uncategorised":
            created[_name(category)] += nbytes
        if level > peak:
            peak, at_peak, peak_ns, settling = level, Counter(live), ts, True
    return {"peak": peak, "at_peak": _named(at_peak), "created": _named(created)}


def _report(path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    capsys.readouterr()
    assert main(["report", str(path), "-q", "--no-export", *flags]) == 0
    return capsys.readouterr().out


@needs_real
def test_real_timeline_reports_torch_categories_at_peak_and_over_the_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the real training timeline, replayed by hand
    expected = _replay_raw(json.loads(gzip.decompress(REAL_TIMELINE.read_bytes())))
    assert expected["at_peak"]["ACTIVATION"] > expected["at_peak"]["uncategorised"] > 0  # both counted

    # WHEN it is reported, as JSON and as text
    (device,) = json.loads(_report(REAL_TIMELINE, capsys, "--json"))["devices"]
    text = _report(REAL_TIMELINE, capsys).splitlines()

    # THEN the JSON names torch's categories at the peak, largest first, summing to the peak; PARAMETER is
    # the weights
    at_peak = device["torch_categories_at_peak"]
    assert at_peak == expected["at_peak"]
    assert list(at_peak.values()) == sorted(at_peak.values(), reverse=True)
    assert sum(at_peak.values()) == device["peak_allocated_bytes"] == expected["peak"]
    assert at_peak["PARAMETER"] == device["categories_at_peak"]["weights"]
    # and what torch's own category attributed over the run, by category
    assert device["torch_categories_allocated"] == expected["created"]
    assert sum(expected["created"].values()) == device["attributed_bytes_by_method"]["profiler_category"]

    # and the text lists other at the peak by torch's category under its line, and names what the
    # torch.profiler line of the bytes allocated over the run sums
    other = next(i for i, line in enumerate(text) if line.lstrip().startswith("at peak  other"))
    listed = sorted(
        ((name, value) for name, value in expected["at_peak"].items() if name != "PARAMETER"),
        key=lambda p: -p[1],
    )
    shown = text[other + 2 : other + 2 + len(listed)]
    assert [line.split()[0] for line in shown] == [name for name, _ in listed]
    for line, (_, value) in zip(shown, listed, strict=True):
        assert human_bytes(value) in line
    (allocated,) = [line for line in text if "torch.profiler's own category" in line]
    for name, value in expected["created"].items():
        assert f"{name} {human_bytes(value)}" in allocated
    # and the HTML page's summary has a row for each
    page = tmp_path / "report.html"
    assert main(["report", str(REAL_TIMELINE), "-o", str(page), "-q", "--no-export"]) == 0
    html = page.read_text(encoding="utf-8")
    for name, value in listed:
        assert f"{name} (torch.profiler) at peak</th><td>{human_bytes(value)}<" in html


@needs_real
def test_real_timeline_exports_torch_category_per_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the real timeline's events as the reader keeps them: creates and destroys (a version bump moves
    # no memory, unless bytes become or stop being parameters)
    rows = json.loads(gzip.decompress(REAL_TIMELINE.read_bytes()))
    kept: Counter[str] = Counter()
    bumps = [row for row in rows if row[1] == 3]
    for released, taken in zip(bumps[::2], bumps[1::2], strict=True):
        if (released[3] == 0) != (taken[3] == 0):
            kept[_name(released[3])] += 1
            kept[_name(taken[3])] += 1
    for _ts, action, _nbytes, category in rows:
        if action in (2, 4):
            kept[_name(category)] += 1

    # WHEN it is exported
    out = tmp_path / "out"
    assert main(["export", str(REAL_TIMELINE), "-o", str(out), "-q"]) == 0

    # THEN each memory event carries torch's category
    column = pq.read_table(out / "memory_events", columns=["torch_category"]).column("torch_category")
    assert dict(Counter(column.to_pylist())) == dict(kept)

    # and a part an earlier kvtrace wrote, without the column, reads with it null beside a new part
    part = next((out / "memory_events").glob("part-*.parquet"))
    pq.write_table(pq.read_table(part).drop_columns(["torch_category"]), part)
    assert load_tables(str(out)).memory_events.column("torch_category").null_count == sum(kept.values())
    capsys.readouterr()
    sql = "SELECT count(torch_category) AS named FROM memory_events"
    assert main(["query", str(out), "--json", sql]) == 0
    assert json.loads(capsys.readouterr().out) == [{"named": 0}]
    timeline = tmp_path / "second.raw.json"
    timeline.write_text(json.dumps([[-1, 1, 4096, 0], [1000, 2, 512, 4], [2000, 4, -512, 4]]))
    assert main(["export", str(timeline), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    sql = "SELECT torch_category, count(*) AS n FROM memory_events GROUP BY 1 ORDER BY 1 NULLS FIRST"
    assert main(["query", str(out), "--json", sql]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"torch_category": None, "n": sum(kept.values())},
        {"torch_category": "ACTIVATION", "n": 2},
    ]


def test_other_sources_have_no_torch_categories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a Chrome trace's memory events (kvtrace's own categories only)
    trace = tmp_path / "trace.json"
    memory = [
        {"ph": "i", "name": "[memory]", "ts": ts, "pid": 1, "tid": 1,
         "args": {"Addr": 4096, "Bytes": nbytes, "Total Allocated": total, "Device Type": 1, "Device Id": 0}}
        for ts, nbytes, total in ((10, 1024, 1024), (20, -1024, 0))
    ]  # fmt: skip
    trace.write_text(json.dumps({"traceEvents": memory}))

    # WHEN it is reported and exported
    (device,) = json.loads(_report(trace, capsys, "--json"))["devices"]
    assert main(["export", str(trace), "-o", str(tmp_path / "out"), "-q"]) == 0

    # THEN torch's categories are null: the file has none
    assert (device["torch_categories_at_peak"], device["torch_categories_allocated"]) == (None, None)
    column = pq.read_table(tmp_path / "out" / "memory_events").column("torch_category")
    assert column.null_count == len(column) == 2


def test_coalesced_timeline_peak_is_its_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch's coalesced `export_memory_timeline` ([µs times, rows of a zero column and one per category])."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # GIVEN two Adam steps of a small MLP, its timeline written by torch, coalesced and raw
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    optimizer = torch.optim.Adam(model.parameters())
    inputs = torch.randn(32, 64)
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        for _ in range(2):
            model(inputs).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    coalesced, raw = tmp_path / "timeline.json", tmp_path / "timeline.raw.json.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(str(coalesced), device="cpu")
        prof.export_memory_timeline(str(raw), device="cpu")
    _times, sizes = json.loads(coalesced.read_text())
    peak_row = max(range(len(sizes)), key=lambda i: (sum(sizes[i]), -i))  # the first highest row
    expected = _named(Counter({_name(code): value for code, value in enumerate(sizes[peak_row][1:])}))
    assert len(expected) > 3  # parameters, optimizer state, gradients, activations...

    # WHEN both are reported
    (from_coalesced,) = json.loads(_report(coalesced, capsys, "--json"))["devices"]
    (from_raw,) = json.loads(_report(raw, capsys, "--json"))["devices"]

    # THEN the coalesced form's live bytes by category at the peak are torch's row there
    assert from_coalesced["torch_categories_at_peak"] == expected
    assert from_coalesced["peak_allocated_bytes"] == sum(sizes[peak_row])
    # and the raw form's, replayed from its rows
    replayed = _replay_raw(json.loads(gzip.decompress(raw.read_bytes())))
    assert from_raw["torch_categories_at_peak"] == replayed["at_peak"]
    assert from_raw["torch_categories_allocated"] == replayed["created"]
