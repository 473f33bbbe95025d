"""`kvtrace sweep`'s table as text and as one offline HTML page: peak and KV per shape, against the budget."""

from __future__ import annotations

from typing import Any

from analyzers.render.compare import _fmt_rate, _page
from analyzers.render.html_text import html_text
from analyzers.render.plotly_div import figure_div
from analyzers.units import binary_unit, hover_bytes, human_bytes

_RATE = "tokens/s (all rows)"

# The sweep table's columns: (JSON key, heading people read, cell formatter).
_SWEEP_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("batch", "batch", str),
    ("context", "prompt tokens", str),
    ("cache", "cache", str),
    ("status", "status", str),
    ("peak_bytes", "peak allocated", human_bytes),
    ("kv_final_bytes", "KV at the end", human_bytes),
    ("kv_peak_bytes", "KV peak", human_bytes),
    # Over every batch row, as compare's "tokens/s, all rows": a bare "tokens/s" read as one row's rate
    ("tokens_per_second", _RATE, _fmt_rate),
)


def _sweep_cells(row: dict[str, Any], budget_bytes: int | None) -> list[str]:
    cells = [fmt(row[key]) if row.get(key) is not None else "-" for key, _, fmt in _SWEEP_COLUMNS]
    if budget_bytes is not None:
        where = row.get("runs_out_at")
        if row["fits_budget"]:
            cells.append("fits")
        elif where and where.get("before_first_step"):
            cells.append("over before the first step")
        elif where:
            layer = f", layer {where['layer']}" if where.get("layer") is not None else ""
            cells.append(f"runs out at step {where['step']}{layer}")
        else:
            cells.append("does not fit")
    return cells


def _sweep_headings(budget_bytes: int | None) -> list[str]:
    headings = [heading for _, heading, _ in _SWEEP_COLUMNS]
    if budget_bytes is not None:
        headings.append(f"fits {human_bytes(budget_bytes)}?")
    return headings


def sweep_to_text(rows: list[dict[str, Any]], budget_bytes: int | None, title: str) -> str:
    """The sweep's table for the terminal: the same headings and cells as the HTML page."""
    table = [_sweep_headings(budget_bytes)] + [_sweep_cells(row, budget_bytes) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [title]
    for n, line in enumerate(table):
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


# One color per cache kind for its peak, its KV and its tokens/s, none of them the budget line's red:
# plotly's default second color, a red too, made a cache's KV line read as the budget.
_BUDGET_COLOR = "red"
_CACHE_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22")
# Kinds whose figures are equal (a dynamic and a static cache end with the same KV, and peak within bytes of
# each other, at every point) draw one line over the other: each kind has its own dash, and each is
# drawn thinner, with smaller markers, than the kind before it, so that the one below shows around it.
_CACHE_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
# The memory series, by marker: (JSON key, name, right axis?, marker symbol)
_MEMORY_SERIES = (
    ("peak_bytes", "peak allocated", False, "circle"),
    ("kv_peak_bytes", "KV peak", True, "diamond"),
    ("kv_final_bytes", "KV at the end", True, "square"),
)


def _cache_style(number: int, kinds: int) -> tuple[dict[str, Any], float]:
    """(the line, the marker size) of the `number`th of `kinds` cache kinds drawn: each thinner and smaller
    than the one before it, from 3.0 to 1.5 px and 11 to 5 px, so that equal lines all show."""
    step = number / (kinds - 1) if kinds > 1 else 0.0
    line = {
        "color": _CACHE_COLORS[number % len(_CACHE_COLORS)],
        "dash": _CACHE_DASHES[number % len(_CACHE_DASHES)],
        "width": 3.0 - 1.5 * step,
    }
    return line, 11.0 - 6.0 * step


def sweep_to_html(rows: list[dict[str, Any]], budget_bytes: int | None, title: str) -> str:
    """The sweep's table and one plot: measured peak and KV at its peak and at the end (on an axis of its
    own, so that it is not a flat line beside the weights) and tokens/s per grid point, per cache."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    esc = html_text
    header = "".join(f"<th>{esc(h)}</th>" for h in _sweep_headings(budget_bytes))
    lines = []
    for row in rows:
        over = " class='over'" if row["fits_budget"] is False or row["status"] != "ok" else ""
        cells = _sweep_cells(row, budget_bytes)
        lines.append(f"<tr{over}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("memory per point", f"{_RATE} per point"),
        specs=[[{"secondary_y": True}, {}]],
    )
    peak_unit, peak_factor = binary_unit(max([r["peak_bytes"] for r in rows] + [budget_bytes or 0]))
    kv_unit, kv_factor = binary_unit(max((r["kv_peak_bytes"] or 0 for r in rows), default=0))
    kinds = sorted({row["cache"] for row in rows})
    for number, cache in enumerate(kinds):
        mine = [r for r in rows if r["cache"] == cache]
        line, size = _cache_style(number, len(kinds))
        x = [f"batch {r['batch']}, {r['context']} tok" for r in mine]
        for key, said, right, symbol in _MEMORY_SERIES:
            unit, factor = (kv_unit, kv_factor) if right else (peak_unit, peak_factor)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[None if r[key] is None else r[key] / factor for r in mine],  # unknown: a gap
                    name=f"{cache}: {said}" + (" (right axis)" if right else ""),
                    line=line,
                    marker={"symbol": symbol, "size": size, "color": line["color"]},
                    hovertemplate=hover_bytes(unit),
                ),
                row=1,
                col=1,
                secondary_y=right,
            )
        fig.add_trace(
            go.Bar(
                x=x,
                y=[r["tokens_per_second"] for r in mine],
                name=f"{cache}: {_RATE}",
                marker_color=line["color"],
                hovertemplate=f"%{{y:,.1f}} {_RATE}",  # rounded as the table is, not 17 digits
            ),
            row=1,
            col=2,
        )
    if budget_bytes is not None:
        fig.add_hline(
            y=budget_bytes / peak_factor,
            line_dash="dash",
            line_color=_BUDGET_COLOR,
            annotation_text=f"budget {human_bytes(budget_bytes)}",
            annotation_position="top left",  # clear of the right axis' ticks
            row=1,
            col=1,
            secondary_y=False,
        )
    peak_title, kv_title = f"peak allocated ({peak_unit})", f"KV cache ({kv_unit})"
    fig.update_yaxes(title_text=peak_title, rangemode="tozero", secondary_y=False, row=1, col=1)
    # Its own round ticks (not the left axis' lines re-labelled), and no second grid
    kv_axis = {"title_text": kv_title, "rangemode": "tozero", "tickmode": "auto", "showgrid": False}
    fig.update_yaxes(**kv_axis, secondary_y=True, row=1, col=1)
    fig.update_yaxes(title_text=_RATE, row=1, col=2)
    # The legend below the rotated point labels, not over them
    fig.update_layout(
        template="plotly_white", height=640, legend={"orientation": "h", "y": -0.32}, margin={"b": 150}
    )
    plot = figure_div(fig, "kvtrace-sweep")
    budget = f"<p>budget: {human_bytes(budget_bytes)}</p>" if budget_bytes is not None else ""
    return _page(title, f"{budget}<table><tr>{header}</tr>{''.join(lines)}</table>{plot}")
