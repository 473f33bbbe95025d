"""Where the report's timeline panels sit, and where its time axis starts.

Panel heights and the gap between panels are pixels, not fractions of the figure: a fraction of 0.07 gave
89 px between panels on a page with four of them but 48 px on one with two (a vLLM or continuous-batching
run: memory, then CPU %), where the memory panel's x-axis title was drawn over the CPU panel's title."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Each panel's plot area, in pixels: memory by category, the KV log's bytes, its per-layer heatmap, and
# the per-step CPU % (and GPU) samples.
PANEL_PX = {"memory": 420, "kv": 260, "layers": 220, "usage": 180}
# Every panel has an x-axis title under its tick labels, and the next one's title sits above it: 12 px
# tick labels, a 14 px axis title and a 16 px subplot title, with their padding, fit in 90 px.
GAP_PX = 90
MARGIN = {"t": 60, "b": 80, "l": 70, "r": 30}


@dataclass(frozen=True, kw_only=True)
class PanelLayout:
    """The arguments make_subplots and the figure's layout take for these panels."""

    row_heights: list[float]  # fractions of the plot area, as make_subplots takes them
    vertical_spacing: float  # GAP_PX as a fraction of the plot area
    height: int  # the figure's, in pixels: panels, gaps and margins


def panel_layout(panels: list[str]) -> PanelLayout:
    """The layout of `panels` (keys of PANEL_PX, top to bottom) with GAP_PX between each two."""
    plot_px = sum(PANEL_PX[name] for name in panels) + GAP_PX * (len(panels) - 1)
    return PanelLayout(
        row_heights=[PANEL_PX[name] / plot_px for name in panels],
        vertical_spacing=GAP_PX / plot_px,
        height=plot_px + MARGIN["t"] + MARGIN["b"],
    )


def colorbar_beside(fig: Any, row: int) -> dict[str, Any]:
    """A colorbar's `y`, `len` and `yanchor` that put it beside the panel in `row` (a one-column figure)."""
    bottom, top = fig.get_subplot(row, 1).yaxis.domain
    return {"y": (bottom + top) / 2, "len": top - bottom, "yanchor": "middle"}


def before_first_generate(
    manifest: dict[str, Any], first_sample_ns: int, t0_us: float
) -> tuple[float, str] | None:
    """(the axis' left edge in seconds from `t0_us`, the note saying what is left of it) for a run whose
    model was found at its first generate() (`kvtrace run`, `record(model="auto")`) after its first CPU
    sample; else None.

    Such a run samples CPU % from the script's start but traces memory from that generate() only: an axis
    fitted to every sample left most of the memory panels empty (-0.7 s to 0 of a -0.7 to 0.5 s axis).
    The axis starts at the generate() instead; the earlier samples stay in the figure, for autoscale."""
    found = manifest.get("model_found_ns")
    if not isinstance(found, int) or isinstance(found, bool) or first_sample_ns >= found:
        return None
    lead_s = (found - first_sample_ns) / 1e9
    note = (
        f"the axis starts at the model's first generate(): the {lead_s:.2f} s of CPU % before it (imports, "
        "model loading, no memory traced) is off its left, autoscale shows it"
    )
    return (found / 1000.0 - t0_us) / 1e6, note
