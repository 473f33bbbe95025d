"""A plotly figure as one `<div>` of a kvtrace page, drawn by the page's inlined plotly.js.

The pages work offline and can hold private traces: plotly.js's own defaults add a "Share chart..."
button that posts the figure's data to cloud.plotly.com, and a logo linking there, so both are off.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLOT_CONFIG", "figure_div"]

# The TensorBoard tab's kvcache.js turns the same buttons off in its own PLOT_CONFIG.
PLOT_CONFIG: dict[str, Any] = {
    "responsive": True,
    "showSendToCloud": False,
    "displaylogo": False,
}


def figure_div(fig: Any, div_id: str) -> str:
    """The figure's div and newPlot script, without plotly.js (the page inlines it once)."""
    return str(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=dict(PLOT_CONFIG)))
