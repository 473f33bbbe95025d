"""A run group's page draws the memory budget its ranks were recorded with as the single-run page does: a
dashed line on each rank's row, an X where a rank runs out, and the diagnosis of the rank that crossed.
2 gloo ranks of the whole Hugging Face Llama (data parallel: rank r with r + 1 rows), each recorded with a
budget between the two ranks' peaks, so that rank 1 crosses it and rank 0 does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ranks_worker as worker

from analyzers.group import build_group_report
from kvtrace.cli import main
from tests.plotly_figures import page_figure

BUDGET_KIB = 445  # rank 0 peaks at about 436 KiB, rank 1 at about 454 KiB (its second row's activations)


def test_the_group_page_marks_where_a_rank_runs_out_of_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a 2-rank group recorded with a 445 KiB budget, which rank 1 crosses and rank 0 does not
    monkeypatch.setenv("KVTRACE_TEST_BUDGET", f"{BUDGET_KIB}KiB")
    out = tmp_path / "group"
    worker.launch_facts("hf-dp-budget", out, tmp_path / "facts")
    group = build_group_report(out)
    fits, crossed = (group.rank(r).report.budget for r in (0, 1))
    assert fits is not None and crossed is not None
    assert fits["bytes"] == crossed["bytes"] == BUDGET_KIB * 1024
    assert not fits["crossed"] and crossed["crossed"], (fits, crossed)
    assert crossed["allocated_after_bytes"] > BUDGET_KIB * 1024

    # WHEN its page is written
    page_path = tmp_path / "g.html"
    assert main(["report", str(out), "--no-export", "-q", "-o", str(page_path)]) == 0
    page = page_path.read_text()
    traces, layout = page_figure(page, "kvtrace-ranks")

    # THEN each rank's row has the budget's dashed line at 445 KiB (the page's unit: KiB), on its memory axis
    allocated_axis = [t["yaxis"] for t in traces if t.get("name") == "allocated"]
    assert allocated_axis == ["y", "y3"]  # each row's left axis (the right one is the KV log's)
    # (each memory level, the KV log's too, held until the next event: steps, not slopes between events)
    levels = [
        t for t in traces if t.get("name") in ("weights", "kv", "other", "allocated", "KV (log, right axis)")
    ]
    assert len(levels) == 2 * 5 and {t["line"]["shape"] for t in levels} == {"hv"}
    lines = [s for s in layout["shapes"] if s.get("line", {}).get("dash") == "dash"]
    assert sorted((s["yref"], s["y0"], s["y1"]) for s in lines) == [
        ("y", BUDGET_KIB, BUDGET_KIB),
        ("y3", BUDGET_KIB, BUDGET_KIB),
    ]
    assert [a["text"] for a in layout["annotations"]].count(f"budget {BUDGET_KIB}.00 KiB") == 2
    # AND one "runs out here" X, on rank 1's row, at the crossing: its time on the group's axis (seconds from
    # the group's first event) and the bytes allocated once the failing allocation is made
    (mark,) = [t for t in traces if t.get("name") == "runs out here"]
    t0 = min(float(tl.ts_us[0]) for r in group.ranks for tl in r.report.timelines if len(tl.ts_us))
    assert mark["yaxis"] == "y3"
    assert mark["x"] == [pytest.approx((crossed["t"] - t0) / 1e6)]
    assert mark["y"] == [crossed["allocated_after_bytes"] / 1024]
    assert mark["text"][0].startswith("rank 1: ")
    # AND the page explains the crossing as a single run's page does: rank 1's diagnosis
    assert group.focus_rank == 1
    assert "id='kvtrace-diagnosis'" in page
    assert f"would run out of memory on a {BUDGET_KIB}.00 KiB device" in page


def _cli_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(argv) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_a_budget_several_ranks_would_run_out_under_names_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the 2-rank group recorded with a roomy 1 MiB budget: rank 0 peaks at about 436 KiB, rank 1 at 454
    monkeypatch.setenv("KVTRACE_TEST_BUDGET", "1MiB")
    out = tmp_path / "group"
    worker.launch_facts("hf-dp-budget", out, tmp_path / "facts")
    report = _cli_json(capsys, ["report", str(out), "--no-export", "--json"])
    peaks = [r["peak_allocated_bytes"] for r in report["ranks"]]
    assert 430 * 1024 < peaks[0] < BUDGET_KIB * 1024 < peaks[1] < 1024 * 1024
    assert report["focus"] == {"rank": 1, "reason": "peaked"} and report["over_budget_ranks"] == []
    # WHEN it is diagnosed against a 430 KiB budget, under both ranks' peaks
    capsys.readouterr()
    assert main(["diagnose", str(out), "--budget", "430KiB"]) == 0
    text = capsys.readouterr().out
    # THEN the rank diagnosed is still the one that peaked highest, but both ranks are said to run out
    said = "which peaked highest; ranks 0 and 1 would both run out of memory on a 430.00 KiB device"
    assert text.startswith(f"run group {out} (world size 2): diagnosing rank 1, {said}\n"), text[:300]
    data = _cli_json(capsys, ["diagnose", str(out), "--budget", "430KiB", "--json"])
    assert (data["run_group"]["rank"], data["run_group"]["over_budget_ranks"]) == (1, [0, 1])
    # AND against 445 KiB, which rank 0 fits, rank 1 alone is named, as before
    data = _cli_json(capsys, ["diagnose", str(out), "--budget", f"{BUDGET_KIB}KiB", "--json"])
    assert data["run_group"]["reason"] == "peaked" and data["run_group"]["over_budget_ranks"] == [1]
    # AND a group recorded with the 430 KiB budget says so in its report, from the budget recorded
    monkeypatch.setenv("KVTRACE_TEST_BUDGET", "430KiB")
    worker.launch_facts("hf-dp-budget", tmp_path / "tight", tmp_path / "facts-tight")
    tight = _cli_json(capsys, ["report", str(tmp_path / "tight"), "--no-export", "--json"])
    assert tight["focus"] == {"rank": 1, "reason": f"peaked highest; {said.split('; ')[1]}"}
    assert tight["over_budget_ranks"] == [0, 1]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "tight"), "--no-export"]) == 0
    assert f"  look at rank 1: it peaked highest; {said.split('; ')[1]} (`kvtrace diagnose` says why)\n" in (
        capsys.readouterr().out
    )
    # AND that group diagnosed against a budget given, 1 MiB, which both ranks fit, is weighed by it alone:
    # the recorded budget's ranks are not named (before, its reason stayed the recorded budget's)
    data = _cli_json(capsys, ["diagnose", str(tmp_path / "tight"), "--budget", "1MiB", "--json"])
    assert (data["run_group"]["reason"], data["run_group"]["over_budget_ranks"]) == ("peaked", [])
    data = _cli_json(capsys, ["diagnose", str(tmp_path / "tight"), "--budget", f"{BUDGET_KIB}KiB", "--json"])
    assert (data["run_group"]["reason"], data["run_group"]["over_budget_ranks"]) == ("peaked", [1])
