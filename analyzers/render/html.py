"""The report as one self-contained HTML file: plotly's JavaScript inlined, so it opens offline."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from analyzers.model import MemorySource
from analyzers.render.json import report_to_json
from analyzers.summary import Report
from analyzers.timeline import downsample_indices
from analyzers.units import human_bytes

MAX_POINTS = 20_000
_COLORS = {"kv": "#d62728", "weights": "#1f77b4", "other": "#7f7f7f"}


def _timeline_figure(source: MemorySource, report: Report) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kv = source.meta.get("kv")
    rows = 3 if kv is not None and kv.step_live else 1
    titles = ["Memory by category over time"]
    if rows == 3:
        titles += [
            "KV cache bytes over time (exact, from the KV log)",
            "KV bytes per layer at the end of each step",
        ]
    fig = make_subplots(
        rows=rows, cols=1, subplot_titles=titles, vertical_spacing=0.08, row_heights=[0.45, 0.3, 0.25][:rows]
    )
    t0 = min((float(tl.ts_us[0]) for tl in report.timelines if len(tl.ts_us)), default=0.0)
    for tl in report.timelines:
        if len(tl.ts_us) == 0:
            continue
        keep = downsample_indices(tl.allocated, MAX_POINTS)
        x = (tl.ts_us[keep] - t0) / 1e6
        prefix = f"{tl.device} " if len(report.timelines) > 1 else ""
        for name in ("weights", "kv", "other"):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=tl.by_category[name][keep],
                    name=f"{prefix}{name}",
                    stackgroup=tl.device,
                    line={"width": 0.5, "color": _COLORS[name]},
                    hovertemplate="%{y:,} B",
                ),
                1,
                1,
            )
        fig.add_trace(
            go.Scatter(
                x=x, y=tl.allocated[keep], name=f"{prefix}allocated", line={"color": "black", "width": 1}
            ),
            1,
            1,
        )
        if tl.reserved is not None:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=tl.reserved[keep],
                    name=f"{prefix}reserved",
                    line={"color": "orange", "dash": "dot"},
                ),
                1,
                1,
            )
        if tl.capacity_bytes and tl.capacity_bytes < 4 * float(tl.allocated.max() or 1):
            fig.add_hline(
                y=tl.capacity_bytes,
                line_dash="dash",
                line_color="red",
                annotation_text="capacity",
                row=1,
                col=1,
            )
    peak_y = max((float(tl.allocated.max()) for tl in report.timelines if len(tl.allocated)), default=0.0)
    for kind, symbol, color in (
        ("step", "line-ns-open", "#2ca02c"),
        ("eviction", "triangle-down", "#9467bd"),
        ("oom", "x", "red"),
    ):
        marks = [m for m in source.markers if m.kind == kind]
        if not marks:
            continue
        fig.add_trace(
            go.Scatter(
                x=[(m.ts_us - t0) / 1e6 for m in marks],
                y=[peak_y * 1.04] * len(marks),
                mode="markers",
                name=kind,
                marker={"symbol": symbol, "size": 10, "color": color},
                text=[m.label for m in marks],
                hovertemplate="%{text}<extra></extra>",
            ),
            1,
            1,
        )
    fig.update_xaxes(title_text="seconds from first event", row=1, col=1)
    fig.update_yaxes(title_text="bytes", row=1, col=1)
    if rows == 3:
        assert kv is not None  # rows == 3 only when there is a KV log
        series = np.asarray(kv.series_bytes, dtype=np.int64)
        keep = downsample_indices(series, MAX_POINTS)
        x = (np.asarray(kv.series_t_ns, dtype=np.float64)[keep] / 1000.0 - t0) / 1e6
        line = {"color": _COLORS["kv"], "shape": "hv"}
        fig.add_trace(
            go.Scatter(x=x, y=series[keep], name="KV cache", line=line, hovertemplate="%{y:,} B"), 2, 1
        )
        fig.update_xaxes(title_text="seconds from first event", matches="x", row=2, col=1)
        fig.update_yaxes(title_text="KV bytes", row=2, col=1)
        steps = sorted(kv.step_live)
        layers = sorted({layer for live in kv.step_live.values() for layer in live})
        z = np.array([[kv.step_live[s].get(layer, 0) for s in steps] for layer in layers])
        labels = [f"{s} {kv.step_phase.get(s, '')}" for s in steps]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=labels,
                y=[f"L{layer}" for layer in layers],
                colorscale="Reds",
                colorbar={"title": "bytes", "len": 0.25, "y": 0.12},
                name="KV per layer",
                hovertemplate="step %{x}<br>%{y}: %{z:,} B<extra></extra>",
            ),
            3,
            1,
        )
    fig.update_layout(
        height=1150 if rows == 3 else 560,
        template="plotly_white",
        legend={"orientation": "h"},
        margin={"t": 60, "l": 70, "r": 30},
    )
    return fig


def _summary_table(report: Report) -> str:
    data = report_to_json(report)
    rows: list[tuple[str, str]] = []
    for dev in data["devices"]:
        rows.append((f"{dev['device']} peak allocated", human_bytes(dev["peak_allocated_bytes"])))
        for name, value in dev["categories_at_peak"].items():
            rows.append((f"&nbsp;&nbsp;{name} at peak", human_bytes(value)))
        if dev["fragmentation_at_peak_bytes"] is not None:
            rows.append(
                ("&nbsp;&nbsp;reserved but unallocated", human_bytes(dev["fragmentation_at_peak_bytes"]))
            )
    kv = data["kv"]
    rows += [
        ("KV final", human_bytes(kv["final_bytes"])),
        ("KV peak (transient copies)", human_bytes(kv["peak_bytes"])),
        ("KV allocated over the run", human_bytes(kv["allocated_bytes_total"])),
        ("evicted tokens", f"{kv['evicted_tokens']:,}"),
        ("measured from", kv["measured_from"]),
    ]
    if kv["bytes_per_token_measured"] is not None:
        rows.append(
            (
                "KV bytes/token measured vs arithmetic",
                f"{kv['bytes_per_token_measured']:,.1f} vs {kv['bytes_per_token_expected']}",
            )
        )
    body = "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='summary'>{body}</table>"


def report_to_html(source: MemorySource, report: Report, extra_sections: list[str] | None = None) -> str:
    from plotly.offline import get_plotlyjs

    fig = _timeline_figure(source, report)
    plot = fig.to_html(full_html=False, include_plotlyjs=False, div_id="kvtrace-timeline")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.notes)
    sections = "".join(extra_sections or [])
    if report.engine is not None and source.meta.get("engine") is not None:
        from analyzers.render.engine import engine_html_section

        sections = engine_html_section(source.meta["engine"], report.engine) + sections
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvtrace: {html.escape(report.path)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}} table.summary{{border-collapse:collapse}}
table.summary th{{text-align:left;padding:2px 12px 2px 0;font-weight:normal;color:#444}}
table.summary td{{font-family:monospace;text-align:right}} .note{{color:#a60}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>kvtrace: {html.escape(report.path)}</h1><p>source: {report.source_kind}, {report.steps} steps</p>
{notes}{_summary_table(report)}{sections}{plot}</body></html>
"""
