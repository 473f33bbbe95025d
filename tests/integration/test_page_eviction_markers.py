"""The HTML report's "KV per layer" grid marks the KV log's evictions as the TensorBoard tab's heatmap does,
from the same figures: a sliding window's evictions (logged on `created`/`replaced` lines, reason
"window") as well as a press's or a crop's (`evicted`/`cropped` lines)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from analyzers.units import human_bytes
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


def test_the_memory_chart_marks_a_sliding_windows_evictions_with_what_they_dropped(tmp_path: Path) -> None:
    import torch

    import kvtrace
    from kvtrace.cli import main
    from kvtrace.llama import build_model, make_cache
    from tests.tiny import HEAD_DIM, cache_arg, tiny_size

    # GIVEN a real recording of `kvtrace demo --cache sliding`'s cache (a DynamicCache of window 8, which
    # keeps the last 7 tokens) over a 13-token prompt and 6 new tokens, 2 rows, 2 layers of 2 KV heads
    layers, rows, prompt, new, window, kv_heads = 2, 2, 13, 6, 8, 2
    torch.manual_seed(0)
    model = build_model(tiny_size(layers, kv_heads))
    cache, _ = make_cache("sliding", model, rows, prompt + new, window=window)
    ids = torch.randint(3, 1000, (rows, prompt))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            **cache_arg(cache),
        )
    # the window drops 13 - 7 = 6 tokens a row at the prefill, then 1 at each of the 5 decode steps (the
    # last new token is never fed back), on every layer; a token a row is 2 heads x 16 x 4 B in K, as in V
    per_row = {1: prompt - (window - 1), **{step: 1 for step in range(2, new + 1)}}
    token_bytes = 2 * kv_heads * HEAD_DIM * 4  # K and V
    assert _window_evictions_from_the_raw_log(run) == {
        (step, layer): n * rows for step, n in per_row.items() for layer in range(layers)
    }

    # WHEN its page is written
    out = tmp_path / "s.html"
    assert main(["report", str(run), "--no-export", "-q", "-o", str(out)]) == 0
    traces, _ = page_figure(out.read_text(), "kvtrace-timeline")

    # THEN the memory chart (the first row's axes) marks each step the window evicted from, as it marks a
    # press's or a crop's evictions, its hover saying the tokens (all rows and layers) and K's and V's bytes
    (marks,) = [t for t in traces if t.get("name") == "eviction"]
    assert (marks["xaxis"], marks["yaxis"]) == ("x", "y") and marks["hovertemplate"].startswith("%{text}")
    expected = [
        f"sliding window, step {step}: {n * rows * layers:,} tokens dropped over {layers} layers, "
        f"{human_bytes(n * rows * layers * token_bytes)} of K and V"
        for step, n in per_row.items()
    ]
    assert marks["text"] == expected
    assert expected[0].endswith("24 tokens dropped over 2 layers, 6.00 KiB of K and V")
    assert expected[1].endswith("4 tokens dropped over 2 layers, 1.00 KiB of K and V")
    # AND in time order, at or after the step markers of their steps
    (steps,) = [t for t in traces if t.get("name") == "step"]
    assert marks["x"] == sorted(marks["x"]) and len(steps["x"]) == new
    assert all(at >= start for at, start in zip(marks["x"], steps["x"], strict=True))
