"""A recorded memory budget drawn on a memory chart: one source for the single-run page
(analyzers.render.html) and a run group's page (analyzers.render.group), which draws it on each rank's row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from analyzers.render.text import budget_marker_label
from analyzers.units import human_bytes

__all__ = ["add_budget"]


def add_budget(
    fig: Any,
    budget: dict[str, Any] | None,
    place: Callable[[float], float],
    factor: int,
    row: int = 1,
    who: str = "",
) -> None:
    """The budget as a dashed line on subplot `row`, and an X where the run crosses it (the allocation
    that would fail), placed on the chart's x by `place` (an EventAxis's); `who` ("rank 1") starts the
    hover text on a page of several runs."""
    import plotly.graph_objects as go

    if budget is None:
        return
    fig.add_hline(
        y=budget["bytes"] / factor,
        line_dash="dash",
        line_color="#d62728",
        annotation_text=f"budget {human_bytes(budget['bytes'])}",
        row=row,
        col=1,
    )
    if budget["crossed"] and budget["t"] is not None:
        label = budget_marker_label(budget)
        fig.add_trace(
            go.Scatter(
                x=[place(budget["t"])],
                y=[(budget["allocated_after_bytes"] or budget["bytes"]) / factor],
                mode="markers",
                name="runs out here",
                marker={"symbol": "x", "size": 14, "color": "#d62728"},
                text=[f"{who}: {label}" if who else label],
                hovertemplate="%{text}<extra></extra>",
            ),
            row,
            1,
        )
