"""`kvtrace sweep`'s memory chart draws every cache kind where the kinds' figures are equal: a dynamic and a
static cache peak within bytes of each other and end with the same KV at every point, and the static lines
covered the dynamic ones (a user saw one kind). Their KV peaks differ (a dynamic cache's concatenation
copies): the chart draws those too. The rows are the figures of a real tiny sweep (batch 1 and 4, 64-token
prompts, dynamic and static; their peaks made equal, as drawn), read back from the page as the browser gets
it."""

from __future__ import annotations

from typing import Any

from analyzers.render.sweep import sweep_to_html
from tests.plotly_figures import page_figure

KIB, MIB = 2**10, 2**20


def _row(batch: int, cache: str, peak: int, kv_final: int, kv_peak: int) -> dict[str, Any]:
    return {
        "batch": batch,
        "context": 64,
        "cache": cache,
        "status": "ok",
        "peak_bytes": peak,
        "kv_final_bytes": kv_final,
        "kv_peak_bytes": kv_peak,
        "tokens_per_second": 10.0,
        "fits_budget": True,
        "runs_out_at": None,
    }


ROWS = [
    _row(1, "dynamic", 72993780, 72704, 81664),
    _row(1, "static", 72993780, 72704, 72704),
    _row(4, "dynamic", 82452924, 290816, 326656),
    _row(4, "static", 82452924, 290816, 290816),
]


def test_equal_figures_of_two_cache_kinds_both_show_and_the_kv_peak_is_drawn() -> None:
    # WHEN the sweep's page draws a dynamic and a static cache whose peak and final KV are equal
    page = sweep_to_html(ROWS, 80 * MIB, "sweep")
    traces, _ = page_figure(page, "kvtrace-sweep")
    lines = {t["name"]: t for t in traces if t["type"] == "scatter"}

    # THEN each kind has its peak allocated (MiB, left axis), its KV peak and its KV at the end (KiB, right)
    expected = {
        "peak allocated": ("y", "peak_bytes", MIB),
        "KV peak (right axis)": ("y2", "kv_peak_bytes", KIB),
        "KV at the end (right axis)": ("y2", "kv_final_bytes", KIB),
    }
    assert sorted(lines) == sorted(f"{cache}: {said}" for cache in ("dynamic", "static") for said in expected)
    for said, (axis, key, unit) in expected.items():
        for cache in ("dynamic", "static"):
            trace = lines[f"{cache}: {said}"]
            assert trace["yaxis"] == axis
            assert trace["x"] == ["batch 1, 64 tok", "batch 4, 64 tok"]
            assert trace["y"] == [r[key] / unit for r in ROWS if r["cache"] == cache]
    assert lines["dynamic: KV peak (right axis)"]["y"] == [81664 / KIB, 326656 / KIB]
    assert lines["static: KV peak (right axis)"]["y"] == [72704 / KIB, 290816 / KIB]

    # AND where two kinds draw the same points, the one drawn later has its own dash, and a thinner line and
    # smaller markers than the one below it, which shows around it
    drawn = [t for t in traces if t["type"] == "scatter"]
    overlaps = 0
    for below_at, below in enumerate(drawn):
        for above in drawn[below_at + 1 :]:
            if (above["yaxis"], above["y"]) != (below["yaxis"], below["y"]):
                continue
            if above["name"].split(":")[0] == below["name"].split(":")[0]:
                continue  # one kind's KV peak and KV at the end (a static cache's): told by their markers
            overlaps += 1
            assert above["line"]["dash"] != below["line"]["dash"]
            assert above["line"]["width"] < below["line"]["width"]
            assert above["marker"]["size"] < below["marker"]["size"]
    # (peak allocated; KV at the end; static's KV peak over dynamic's KV at the end)
    assert overlaps == 3
    # AND one kind's series are told apart by their markers
    for cache in ("dynamic", "static"):
        symbols = [lines[f"{cache}: {said}"]["marker"]["symbol"] for said in expected]
        assert len(set(symbols)) == 3
