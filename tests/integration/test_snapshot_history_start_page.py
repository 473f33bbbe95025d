"""The HTML page of a snapshot whose allocator history begins mid-run (torch's ring buffer of its last
actions) says so: the chart starts at the level held before the history's first event, and a category
the trace's own allocations attribute (KV) climbs from 0 there, which read as the run's KV growing.

The level is computed from the raw pickle with the test's own restricted unpickler and plain loops:
the sizes of frees whose alloc the history never saw, and of blocks live at the dump it never saw
allocated."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from tests.plotly_figures import page_figure

ROOT = Path(__file__).resolve().parents[2]
OOM = ROOT / "sample_traces" / "h200" / "oom_b266" / "snapshots" / "oom.pickle"
LIVE = ("active_allocated", "active_pending_free", "active_awaiting_free")


class _Plain(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _held_before_history(path: Path) -> int:
    """Bytes allocated before the device trace's first event, by hand from the pickle."""
    data = _Plain(io.BytesIO(path.read_bytes())).load()
    (trace,) = [t for t in data["device_traces"] if t]
    live: dict[int, int] = {}
    orphan_frees = 0
    for entry in trace:
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry["size"]
        elif entry["action"] == "free_completed" and live.pop(entry["addr"], None) is None:
            orphan_frees += entry["size"]
    held_unseen = sum(
        block.get("requested_size", block["size"])
        for segment in data["segments"]
        for block in segment["blocks"]
        if block["state"] in LIVE and block["address"] not in live
    )
    return orphan_frees + held_unseen


def _page(snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    page = tmp_path / "page.html"
    assert main(["report", str(snapshot), "-o", str(page), "--no-export", "-q"]) == 0
    capsys.readouterr()
    return page.read_text(encoding="utf-8")


def test_a_snapshot_page_says_its_history_begins_mid_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the H200 OOM snapshot, whose history of 12,000 actions began after 23.49 GiB was allocated
    held = _held_before_history(OOM)
    assert held == 25_220_979_832
    gib = held / 2**30
    # WHEN its page is drawn
    page = _page(OOM, tmp_path, capsys)
    # THEN a note says what the chart's start is (the page said nothing, and its KV climbed from 0)
    assert (
        "cuda:0: the snapshot&#x27;s allocator history begins mid-run (torch keeps its last max_entries "
        "actions, or the history was turned on after the run began): 23.49 GiB was allocated before its "
        "first event (blocks it frees, or still holds at the dump, without having seen them allocated). "
        "The chart starts at that level, counted as other (their stacks name no KV or weights): a category "
        "that climbs from 0 at the start (KV) is the history beginning, not the run&#x27;s memory growing"
    ) in page
    # AND the chart marks that level at its first point, where the allocated line starts
    traces, layout = page_figure(page, "kvtrace-timeline")
    (allocated,) = [t for t in traces if t["name"] == "allocated"]
    (mark,) = [a for a in layout["annotations"] if a["text"].startswith("allocator history begins")]
    assert mark["text"] == "allocator history begins: 23.49 GiB held before it"
    assert (mark["x"], mark["y"]) == (allocated["x"][0], allocated["y"][0])
    assert mark["y"] == pytest.approx(gib, rel=1e-12)


def _whole_history(source: Path, tmp_path: Path) -> Path:
    """A copy of `source` cut to what its history saw: the frees of blocks it never saw allocated left out,
    and the blocks live at the dump that it never saw allocated marked free. Its history then holds the
    whole run, as a snapshot of a short run (fewer actions than max_entries) does."""
    data = _Plain(io.BytesIO(source.read_bytes())).load()
    (trace,) = [t for t in data["device_traces"] if t]
    live: set[int] = set()
    kept = []
    for entry in trace:
        if entry["action"] == "alloc":
            live.add(entry["addr"])
        elif entry["action"] in ("free_requested", "free_completed"):
            if entry["addr"] not in live:
                continue
            if entry["action"] == "free_completed":
                live.discard(entry["addr"])
        kept.append(entry)
    trace[:] = kept
    for segment in data["segments"]:
        for block in segment["blocks"]:
            if block["state"] in LIVE and block["address"] not in live:
                block["state"] = "inactive"
    path = tmp_path / "whole_history.pickle"
    path.write_bytes(pickle.dumps(data))
    return path


def test_a_snapshot_whose_history_holds_the_whole_run_gets_no_such_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the H200 OOM snapshot cut to what its history saw: it saw every block it frees or holds allocated
    snapshot = _whole_history(OOM, tmp_path)
    assert _held_before_history(snapshot) == 0
    # WHEN its page is drawn
    page = _page(snapshot, tmp_path, capsys)
    # THEN it says nothing of a history begun mid-run, and its chart has no such mark
    assert "begins mid-run" not in page and "allocator history begins" not in page
    _, layout = page_figure(page, "kvtrace-timeline")
    assert not [a for a in layout.get("annotations", []) if a["text"].startswith("allocator history")]
