"""The report page's timeline panels leave room between them for the upper panel's x-axis labels and title
and the lower one's title, whatever panels the page has: a continuous-batching (or vLLM) run's memory chart
and CPU % chart, a run's four panels, the three of a run without CPU samples. The figures are read back from
the page the browser gets (tests.plotly_figures), from real runs: one recorded here, the sample runs."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import kvtrace
from kvtrace.cli import main
from tests.plotly_figures import page_figure

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
LAYERS, KV_HEADS = 2, 2  # cb_model's
# The page of the demo's dynamic run (four panels) drew 89 px between its panels, and its axis titles and
# panel titles were apart; the two-panel pages drew 48 px (and three-panel ones 71 px), titles over titles.
ROOM_PX = 85


def _page(run: Path, tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    page = tmp_path / "page.html"
    assert main(["report", str(run), "-o", str(page), "--no-export", "-q"]) == 0
    return page_figure(page.read_text(), "kvtrace-timeline")


def _panels(layout: dict[str, Any]) -> list[tuple[float, float]]:
    """Each panel's (bottom, top) in pixels from the plot area's bottom, top panel first: its y-axis's
    domain (a secondary y-axis overlays its panel's and has none) times the plot area's height."""
    margin = {"t": 100, "b": 80, **layout.get("margin", {})}  # plotly's defaults where the layout sets none
    area = layout["height"] - margin["t"] - margin["b"]
    axes = [axis for name, axis in layout.items() if name.startswith("yaxis")]
    domains = [axis["domain"] for axis in axes if "domain" in axis]
    return sorted(((bottom * area, top * area) for bottom, top in domains), reverse=True)


def _cb_run(path: Path, model: torch.nn.Module) -> Path:
    generation = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=4, max_batch_tokens=64)
    with kvtrace.record(path, model=model):
        model.generate_batch(
            [[1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 8, 9]],
            generation_config=generation,
            continuous_batching_config=batching,
            progress_bar=False,
        )
    return path


def _without_cpu_samples(run: Path, to: Path) -> Path:
    """A copy of `run` whose memory samples carry no CPU % (a recorder without the host monitor)."""
    shutil.copytree(run, to)
    samples = [json.loads(line) for line in (to / "memory_samples.jsonl").read_text().splitlines()]
    for sample in samples:
        sample.pop("cpu_percent", None)
    (to / "memory_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return to


@pytest.mark.parametrize("kind", ["continuous batching", "four panels", "no CPU samples"])
def test_the_timeline_panels_keep_room_for_the_axis_titles_between_them(
    kind: str, tmp_path: Path, cb_model: torch.nn.Module
) -> None:
    # GIVEN a real run whose page draws: memory and CPU % (continuous batching's pool: no KV panels); memory,
    # KV bytes, KV per layer and CPU % (the demo's dynamic run); the same without CPU samples
    titles = {
        "continuous batching": ["Memory by category over time", "Process CPU % (100 = one core)"],
        "four panels": [
            "Memory by category over time",
            "KV cache bytes over time (exact, from the KV log)",
            "KV bytes per layer at the end of each step",
            "Process CPU % (100 = one core)",
        ],
        "no CPU samples": [
            "Memory by category over time",
            "KV cache bytes over time (exact, from the KV log)",
            "KV bytes per layer at the end of each step",
        ],
    }[kind]
    if kind == "continuous batching":
        run = _cb_run(tmp_path / "cb", cb_model)
    elif kind == "four panels":
        run = shutil.copytree(SAMPLES / "dynamic_b2", tmp_path / "dynamic_b2")
    else:
        run = _without_cpu_samples(SAMPLES / "dynamic_b2", tmp_path / "dynamic_b2")

    # WHEN its page is written
    traces, layout = _page(run, tmp_path)

    # THEN it has those panels, each with an x-axis title, and between each two the room the demo's had
    assert [a["text"] for a in layout["annotations"]][: len(titles)] == titles
    panels = _panels(layout)
    assert len(panels) == len(titles)
    for (upper_bottom, _), (_, lower_top) in itertools.pairwise(panels):
        assert upper_bottom - lower_top >= ROOM_PX
    for row in range(1, len(titles) + 1):
        axis = layout["xaxis" if row == 1 else f"xaxis{row}"]
        assert axis["title"]["text"]
    # AND the KV-per-layer heatmap's colorbar stands beside its own panel, wherever the panels put it
    heatmaps = [t for t in traces if t["type"] == "heatmap"]
    if len(titles) > 2:
        (heatmap,) = heatmaps
        bar = heatmap["colorbar"]
        bottom, top = layout["yaxis3"]["domain"]
        assert bar.get("yanchor", "middle") == "middle"  # plotly's default for an upright colorbar
        assert bar["y"] - bar["len"] / 2 == pytest.approx(bottom)
        assert bar["y"] + bar["len"] / 2 == pytest.approx(top)
    else:
        assert heatmaps == []
    # AND a run recorded around its generate() (record(model=...)) keeps its time axis fitted to everything
    assert "range" not in layout["xaxis"]
