"""The HTML report's "KV per layer" grid marks the KV log's evictions as the TensorBoard tab's heatmap does,
from the same figures: a sliding window's evictions (logged on `created`/`replaced` lines, reason
"window") as well as a press's or a crop's (`evicted`/`cropped` lines)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.plotly_figures import page_figure

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _window_evictions_from_the_raw_log(run: Path) -> dict[tuple[int, int], int]:
    """(step, layer) -> tokens evicted over every batch row, from the KV log's K data lines: each line's
    `evicted_tokens` (per row) times its rows."""
    evicted: dict[tuple[int, int], int] = {}
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("evicted_tokens") and event["kv"] == "k" and event["part"] == "data":
            assert event["reason"] == "window"
            slot = (event["step"], event["layer"])
            evicted[slot] = evicted.get(slot, 0) + event["evicted_tokens"] * event["shape"][0]
    return evicted


def test_the_page_marks_a_sliding_windows_evictions_as_the_tab_does(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore
    from kvtrace.cli import main

    # GIVEN the sliding-window run at batch 2: its window evicts on each of its 4 layers at the prefill
    # and at every decode step, 160 tokens over both rows (40 a layer)
    run = shutil.copytree(SAMPLES / "sliding_b2", tmp_path / "sliding_b2")
    expected = _window_evictions_from_the_raw_log(run)
    steps = sorted({step for step, _ in expected})
    assert sum(expected.values()) == 160 and len(expected) == 4 * len(steps) == 64

    # WHEN its page is written
    out = tmp_path / "s.html"
    assert main(["report", str(run), "--no-export", "-q", "-o", str(out)]) == 0
    traces, _ = page_figure(out.read_text(), "kvtrace-timeline")

    # THEN the per-layer grid (the third row's axes) has one marker per step and layer that evicted, on
    # that step's column and that layer's row, counting the tokens of both rows: 160 in all, 40 a layer
    heatmap = next(t for t in traces if t["type"] == "heatmap")
    (marks,) = [t for t in traces if t.get("name") == "evicted tokens"]
    assert (marks["xaxis"], marks["yaxis"]) == (heatmap["xaxis"], heatmap["yaxis"]) == ("x3", "y3")
    column = {int(label.split()[0]): label for label in heatmap["x"]}
    assert sorted(zip(marks["x"], marks["y"], marks["customdata"], strict=True)) == sorted(
        (column[step], f"L{layer}", tokens) for (step, layer), tokens in expected.items()
    )
    assert sum(marks["customdata"]) == 160
    assert all(
        text.endswith(f"sliding window {n:,}")
        for text, n in zip(marks["text"], marks["customdata"], strict=True)
    )
    # AND they are the tab's own markers, every step shown there
    tab = RunStore(tmp_path).layers("sliding_b2")
    assert len(tab["steps"]) == tab["steps_total"]
    assert sorted(
        (column[m["step"]], f"L{m['layer']}", m["evicted_tokens"]) for m in tab["evictions"]
    ) == sorted(zip(marks["x"], marks["y"], marks["customdata"], strict=True))
