"""The report as one self-contained HTML file: plotly's JavaScript inlined, so it opens offline."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from analyzers.attribution import KV_FREES
from analyzers.caches import layer_list
from analyzers.kv_line import kv_final_point, kv_line
from analyzers.model import MemorySource
from analyzers.render.budget_marks import add_budget
from analyzers.render.engine import no_memory_timeline
from analyzers.render.event_axis import LEVEL_LINE, EventAxis, event_axis, held_points, held_span
from analyzers.render.history_start import begins_mid_run, history_start_label, history_start_notes
from analyzers.render.html_text import html_text
from analyzers.render.json import NO_KV_HINT, report_to_json, size_basis_said
from analyzers.render.kv_heatmap import eviction_marks, layer_grid
from analyzers.render.plotly_div import figure_div
from analyzers.render.text import allocated_over, budget_line, evicted_tokens
from analyzers.render.timeline_layout import MARGIN, before_first_generate, colorbar_beside, panel_layout
from analyzers.summary import Report
from analyzers.timeline import PAGE_POINTS, downsample_indices, timeline_indices
from analyzers.units import binary_unit, hover_bytes, human_bytes

MAX_POINTS = PAGE_POINTS
_COLORS = {"kv": "#d62728", "weights": "#1f77b4", "other": "#7f7f7f"}


def _kv_panels(source: MemorySource) -> bool:
    """Whether the chart gets the KV log's panels (bytes over time, per layer and step). Not for a vLLM
    pool, allocated once (its KV events all at step 0): per-step panels would show one column."""
    kv = source.meta.get("kv")
    return kv is not None and bool(kv.step_live) and source.meta.get("engine") is None


def _draws_nothing(source: MemorySource, report: Report) -> bool:
    """No device's memory, no KV log and no usage samples: a trace profiled without profile_memory, whose
    figures are unknown (its note says so). Its chart would be an empty axis with the steps at "0 B"."""
    return not report.timelines and not _kv_panels(source) and _usage_samples(source) is None


def _timeline_figure(source: MemorySource, report: Report) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kv = source.meta.get("kv")
    rows = 3 if _kv_panels(source) else 1
    titles = ["Memory by category over time"]  # or what the event axis says the chart holds, below
    grid = layer_grid(kv) if rows == 3 else None
    if grid is not None:
        titles += ["KV cache bytes over time (exact, from the KV log)", grid.title]
    usage = _usage_samples(source)
    if usage:
        titles.append(usage[0])
    panels = ["memory", "kv", "layers"][:rows] + (["usage"] if usage else [])
    layout = panel_layout(panels)
    fig = make_subplots(
        rows=len(panels),
        cols=1,
        subplot_titles=titles,
        vertical_spacing=layout.vertical_spacing,
        row_heights=layout.row_heights,
        specs=[[{}]] * rows + ([[{"secondary_y": True}]] if usage else []),
    )
    t0 = _origin_us(report, source, kv, usage)
    # A snapshot whose trace records no times is placed by each entry's order: say so, do not call it time
    untimed = "event_index" in (source.meta.get("timestamps") or {}).values()
    held_at = "at the dump" if source.kind == "snapshot" else "before the trace"
    axis = event_axis(
        report.timelines, t0, untimed, seconds_shared=rows > 1 or usage is not None, held_at=held_at
    )
    fig.layout.annotations[0].text = axis.title
    # The level before the trace counts: a snapshot whose trace only frees, or holds no events, peaks there
    top = max(
        (max(float(tl.allocated.max(initial=0)), tl.start_allocated) for tl in report.timelines), default=0.0
    )
    unit, factor = binary_unit(max(top, (report.budget or {}).get("bytes", 0)))
    hover = hover_bytes(unit)
    # From the level before the first event: a trace that begins by freeing blocks it never allocated
    # (a snapshot's) peaks there, as the page's figures say. Each series drawn keeps its own peak.
    placed = [
        axis.points(tl, timeline_indices(tl, MAX_POINTS)) if len(tl.ts_us) and not axis.held_only else None
        for tl in report.timelines
    ]
    span = _held_span(placed, source, axis)
    for tl, drawn in zip(report.timelines, placed, strict=True):
        if drawn is None:
            # A device without events (the weights' side of a cache offloaded elsewhere, a level held before
            # the trace) is named by the report, so drawn too: its level across the others' x, with the
            # reserved bytes as the page has them (a snapshot's segments at the dump).
            reserved = next((d.reserved_at_peak for d in report.devices if d.device == tl.device), None)
            tl = replace(tl, reserved=None if reserved is None else np.array([reserved], dtype=np.int64))
            drawn = held_points(span)
        x, lined_up = drawn

        def points(values: np.ndarray, start: int, lined_up: Any = lined_up) -> Any:
            return lined_up(values, start) / factor

        prefix = f"{tl.device} " if len(report.timelines) > 1 else ""
        for name in ("weights", "kv", "other"):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=points(tl.by_category[name], tl.start_by_category.get(name, 0)),
                    name=f"{prefix}{name}",
                    stackgroup=tl.device,
                    line={"width": 0.5, "color": _COLORS[name], "shape": LEVEL_LINE},
                    hovertemplate=hover,
                ),
                1,
                1,
            )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=points(tl.allocated, tl.start_allocated),
                name=f"{prefix}allocated",
                line={"color": "black", "width": 1, "shape": LEVEL_LINE},
                hovertemplate=hover,
            ),
            1,
            1,
        )
        if tl.reserved is not None:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=points(tl.reserved, int(tl.reserved[0])),
                    name=f"{prefix}reserved",
                    hovertemplate=hover,
                    line={"color": "orange", "dash": "dot", "shape": LEVEL_LINE},
                ),
                1,
                1,
            )
        if begins_mid_run(source, tl):  # the ring buffer's start, where the level before it is drawn
            fig.add_annotation(
                x=float(x[0]),
                y=tl.start_allocated / factor,
                text=history_start_label(tl),
                showarrow=True,
                arrowhead=2,
                ax=40,
                ay=-30,
                xanchor="left",
                font={"size": 11, "color": "#a60"},
                row=1,
                col=1,
            )
        if tl.capacity_bytes and tl.capacity_bytes < 4 * float(
            max(tl.allocated.max(initial=0), tl.start_allocated) or 1
        ):
            fig.add_hline(
                y=tl.capacity_bytes / factor,
                line_dash="dash",
                line_color="red",
                annotation_text="capacity",
                row=1,
                col=1,
            )
    peak_y = top / factor
    add_budget(fig, report.budget, axis.place, factor)
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
                x=[axis.place(m.ts_us) for m in marks],
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
    fig.update_xaxes(title_text=axis.x_title, row=1, col=1)
    if axis.in_order and axis.instant_events:  # a few events: whole ones, no "0.5" between them
        fig.update_xaxes(dtick=1, row=1, col=1)
    if axis.held_only:  # one level, no events: nothing along x to read
        fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(title_text=unit, row=1, col=1)
    if rows == 3:
        assert kv is not None and grid is not None  # rows == 3 only when there is a KV log
        # The log's frees at the allocator's, where the trace has them (analyzers.kv_line)
        t_ns, series = kv_line(kv, source.meta.get(KV_FREES))
        keep = downsample_indices(series, MAX_POINTS, t_ns)
        x = (t_ns[keep].astype(np.float64) / 1000.0 - t0) / 1e6
        line = {"color": _COLORS["kv"], "shape": LEVEL_LINE}
        kv_unit, kv_factor = binary_unit(int(series.max()) if len(series) else 0)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=series[keep] / kv_factor,
                name="KV cache",
                line=line,
                hovertemplate=hover_bytes(kv_unit),
            ),
            2,
            1,
        )
        _add_final_mark(fig, kv, t_ns, series, t0, kv_factor, kv_unit)
        fig.update_xaxes(title_text="seconds from first event", matches="x", row=2, col=1)
        fig.update_yaxes(title_text=f"KV ({kv_unit})", rangemode="tozero", row=2, col=1)
        z_unit, z_factor = binary_unit(int(grid.live_bytes.max()) if grid.live_bytes.size else 0)
        z_max = float(grid.live_bytes.max()) / z_factor if grid.live_bytes.size else 0.0
        fig.add_trace(
            go.Heatmap(
                z=grid.live_bytes / z_factor,  # a power of two: exact in float64
                x=grid.columns,
                y=grid.rows,
                colorscale="Reds",
                # From zero: a constant cache is one colour, not a gradient across a rounding error.
                zmin=0,
                zmax=z_max or 1,
                colorbar={"title": z_unit, **colorbar_beside(fig, 3), "tickformat": ",.2f"},
                name="KV per layer",
                hovertemplate="step %{x}<br>%{y}: %{z:,.2f} " + z_unit + "<extra></extra>",
            ),
            3,
            1,
        )
        # The TensorBoard tab's markers, from the same figures (analyzers.eviction_markers)
        evicted = eviction_marks(kv, grid)
        if evicted.columns:
            fig.add_trace(
                go.Scatter(
                    x=evicted.columns,
                    y=evicted.rows,
                    mode="markers",
                    name="evicted tokens",
                    marker={"symbol": "triangle-down", "size": 8, "color": "#9467bd"},
                    text=evicted.text,
                    customdata=evicted.evicted_tokens,
                    hovertemplate="%{text}<extra></extra>",
                    showlegend=False,
                ),
                3,
                1,
            )
        # Categories: a column per step of the log, named with its phase (no per-cell text for the hover);
        # a label every few columns, as on a numeric axis, not thousands of rotated ones
        fig.update_xaxes(title_text="step and phase", type="category", nticks=12, row=3, col=1)
    if usage:
        _add_usage(fig, usage, t0, len(panels))
        fitted = before_first_generate(source.meta.get("manifest") or {}, usage[1][0]["t_ns"], t0)
        if fitted is not None:
            left, note = fitted
            # Every time axis (they match x): from the left edge, to the last point drawn
            for row in [1, *([2] if rows == 3 else []), len(panels)]:
                fig.update_xaxes(range=[left, None], autorange="max", row=row, col=1)
            fig.update_xaxes(title_text=f"seconds from first event; {note}", row=len(panels), col=1)
    fig.update_layout(
        height=layout.height,
        template="plotly_white",
        legend={"orientation": "h"},
        margin=MARGIN,
    )
    return fig


def _add_final_mark(
    fig: Any, kv: Any, t_ns: np.ndarray, series: np.ndarray, t0: float, factor: float, unit: str
) -> None:
    """Where the KV log's final figures are taken (`kv.final_bytes`: the end of the last step), on the KV
    line: a cache generate() dropped is gone from the line after it, not from the figures."""
    import plotly.graph_objects as go

    final = kv_final_point(t_ns, series, kv)
    if final is None:
        return
    at_ns, level = final
    fig.add_trace(
        go.Scatter(
            x=[(at_ns / 1000.0 - t0) / 1e6],
            y=[level / factor],
            mode="markers",
            name="KV final",
            marker={"symbol": "diamond", "size": 9, "color": _COLORS["kv"]},
            text=[f"KV final (end of the last step): {human_bytes(level)}"],
            hovertemplate="%{text}<extra></extra>",
            showlegend=False,
        ),
        2,
        1,
    )


def _held_span(placed: list[Any], source: MemorySource, axis: EventAxis) -> tuple[float, float]:
    """The x a device without events is drawn across: what the devices with events cover; without any, the
    markers' (steps of a run whose KV log has no allocations), else 0 to 1 (an axis that measures nothing)."""
    xs = [float(x[i]) for x, _ in (p for p in placed if p is not None) for i in (0, -1)]
    if not xs and not axis.held_only:
        xs = [axis.place(m.ts_us) for m in source.markers]
    return held_span(xs)


def _origin_us(
    report: Report, source: MemorySource, kv: Any, usage: tuple[str, list[dict[str, Any]]] | None
) -> float:
    """Where the time axis starts: the first memory event; without a memory timeline (a trace with no
    `[memory]` events, a run without the profiler whose model wrote no KV), the earliest step marker, KV
    log entry, usage sample or budget crossing, so that nothing is drawn at Unix-epoch seconds."""
    firsts = [float(tl.ts_us[0]) for tl in report.timelines if len(tl.ts_us)]
    if firsts:
        return min(firsts)
    times = [float(m.ts_us) for m in source.markers]
    if kv is not None and len(kv.series_t_ns):
        times.append(float(kv.series_t_ns[0]) / 1000.0)
    if usage:
        times.append(usage[1][0]["t_ns"] / 1000.0)
    crossed = (report.budget or {}).get("t")
    if isinstance(crossed, int | float):
        times.append(float(crossed))
    return min(times, default=0.0)


def _usage_samples(source: MemorySource) -> tuple[str, list[dict[str, Any]]] | None:
    """(subplot title, samples) of the per-step CPU % and GPU use, or None when the run has none."""
    run = source.meta.get("run")
    samples = [s for s in (run.memory_samples if run is not None else []) if "cpu_percent" in s]
    if not samples:
        return None
    has_gpu = any("gpu_utilization_percent" in s for s in samples)
    title = "Process CPU % and GPU utilization (NVML)" if has_gpu else "Process CPU % (100 = one core)"
    return title, samples


def _add_usage(fig: Any, usage: tuple[str, list[dict[str, Any]]], t0: float, row: int) -> None:
    import plotly.graph_objects as go

    _, samples = usage
    x = [(s["t_ns"] / 1000.0 - t0) / 1e6 for s in samples]
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[s["cpu_percent"] for s in samples],
            name="process CPU %",
            line={"color": "#8c564b", "shape": "hv"},
            hovertemplate="%{y:.1f}% CPU",
        ),
        row,
        1,
    )
    if any("gpu_utilization_percent" in s for s in samples):
        gpu = [s for s in samples if "gpu_utilization_percent" in s]
        gx = [(s["t_ns"] / 1000.0 - t0) / 1e6 for s in gpu]
        fig.add_trace(
            go.Scatter(
                x=gx,
                y=[s["gpu_utilization_percent"] for s in gpu],
                name="GPU utilization %",
                line={"color": "#17becf", "shape": "hv"},
                hovertemplate="%{y}% GPU",
            ),
            row,
            1,
        )
        mem_unit, mem_factor = binary_unit(max(s["gpu_memory_used_bytes"] for s in gpu))
        fig.add_trace(
            go.Scatter(
                x=gx,
                y=[s["gpu_memory_used_bytes"] / mem_factor for s in gpu],
                name="GPU memory used (NVML, all processes)",
                line={"color": "#bcbd22", "dash": "dot"},
                hovertemplate=hover_bytes(mem_unit),
            ),
            row=row,
            col=1,
            secondary_y=True,
        )
        # From 0, as the memory panels: a range fitted to the samples (16-72 GiB) drew ticks at 13.3, 36.3...
        fig.update_yaxes(
            title_text=f"device memory ({mem_unit})",
            rangemode="tozero",
            tickmode="auto",  # its own round ticks, not the % axis grid's (0, 28.2, 56.3 GiB)
            showgrid=False,
            row=row,
            col=1,
            secondary_y=True,
        )
    fig.update_yaxes(title_text="%", rangemode="tozero", row=row, col=1, secondary_y=False)
    fig.update_xaxes(title_text="seconds from first event", matches="x", row=row, col=1)


def _monitor_note(source: MemorySource) -> str | None:
    """Why GPU utilization is missing from the timeline, when it is (a CPU run, NVML unavailable)."""
    manifest = source.meta.get("manifest") or {}
    nvml = (manifest.get("monitors") or {}).get("nvml") or {}
    if not nvml or nvml.get("status") == "ok":
        return None
    # A CPU run needs no more reason; older runs' reason repeated this sentence's own words.
    on_cuda = (manifest.get("device") or {}).get("type") == "cuda"
    reason = (nvml.get("reason") or "unknown") if on_cuda else "the run is not on CUDA"
    return f"GPU utilization and device memory (NVML) are absent: {reason}"


def _summary_table(report: Report) -> str:
    # A figure never measured (a refused vLLM start's) is null in the JSON: "-" here, as any unknown figure
    data = report_to_json(report)
    kv = data["kv"]
    # its KV, unknown, is in `other`, as the text report says (a refused vLLM start's was never measured)
    unattributed = kv["measured_from"] == "none" and report.kv_measured
    rows: list[tuple[str, str]] = []
    for dev in data["devices"]:
        rows.append((f"{dev['device']} peak allocated", human_bytes(dev["peak_allocated_bytes"])))
        if dev["peak_allocated_bytes"] is not None:  # in which sizes, as the text's device line says
            basis = size_basis_said(dev["size_basis"], dev["device"])
            rows.append(("&nbsp;&nbsp;sizes counted", basis))
        for name, value in dev["categories_at_peak"].items():
            shown = human_bytes(value)
            if name == "kv" and unattributed:
                shown = "- (not attributed: counted in other)"
            elif name == "weights" and value == 0 and report.weights_untold:  # None: never measured, "-"
                shown = f"- ({report.weights_untold})"
            rows.append((f"&nbsp;&nbsp;{name} at peak", shown))
        for name, value in (dev["torch_categories_at_peak"] or {}).items():  # a memory timeline's: of other
            if name != "PARAMETER":
                rows.append((f"&nbsp;&nbsp;&nbsp;&nbsp;{name} (torch.profiler) at peak", human_bytes(value)))
        if dev["fragmentation_at_peak_bytes"] is not None:
            rows.append(
                ("&nbsp;&nbsp;reserved but unallocated", human_bytes(dev["fragmentation_at_peak_bytes"]))
            )
        if dev.get("private_pool_free_at_peak_bytes") is not None:  # left out of the row above
            pools = human_bytes(dev["private_pool_free_at_peak_bytes"])
            rows.append(("&nbsp;&nbsp;unallocated in private pools (CUDA graphs)", pools))
    rows += [
        ("KV final", human_bytes(kv["final_bytes"])),
        ("KV peak (transient copies)", human_bytes(kv["peak_bytes"])),
        # a snapshot's sums its trace's span, not the run: the text's words (keys go in unescaped)
        (
            f"KV allocated {html_text(allocated_over(report, report.devices))}",
            human_bytes(kv["allocated_bytes_total"]),
        ),
        (
            "evicted tokens (all rows and layers)",
            evicted_tokens(report.kv) if kv["evicted_tokens"] is not None else "-",
        ),
        ("measured from", kv["measured_from"]),
    ]
    if kv["bytes_per_token_measured"] is not None:
        expected = kv["bytes_per_token_expected"]  # None without model geometry: "-", as the text report
        note = kv["bytes_per_token_note"]  # why the two differ (a window's spare positions), as the text says
        rows.append(
            (
                "KV bytes/token measured vs arithmetic",
                f"{kv['bytes_per_token_measured']:,.1f} vs {'-' if expected is None else f'{expected:,}'}"
                + (f" ({note})" if note else ""),
            )
        )
        if kv.get("capacity_rows") and kv.get("capacity_tokens"):  # preallocated buffers: per slot
            rows.append(
                (
                    {
                        "static_cache": "KV StaticCache's slots (max_cache_len x batch)",
                        "tracked": "KV tracked views' slots (their tensor's max_seq x batch)",
                    }.get(kv.get("capacity_of") or "", "KV buffers' slots (max_seq_len x max_batch_size)"),
                    f"{kv['capacity_tokens']:,} positions x {kv['capacity_rows']:,} rows",
                )
            )
    held = [cache for cache in kv["caches"] if cache["final_bytes"]]
    if len(held) > 1:  # which cache the figures above describe, and each cache's own
        for cache in held:
            per_token = cache["bytes_per_token_measured"]
            figures = (
                f"{cache['layers']} layers, {human_bytes(cache['final_bytes'])}, "
                f"{cache['tokens']} tokens x {cache['rows']} rows"
            )
            if per_token is not None:
                figures += f", {per_token:,.1f} B/token"
            if cache.get("cross_attention_of") is not None:
                layers = layer_list(cache.get("cross_layers") or [])
                figures += (
                    f", cross-attention KV of the image(s) in {layers} of cache "
                    f"{cache['cross_attention_of']}, not per token"
                )
            elif cache.get("role"):
                kind = "cross" if cache["role"] == "cross_attention" else "self"
                figures += f", {kind}-attention KV of encoder-decoder cache {cache.get('encoder_decoder')}"
            if cache.get("module"):  # a module cache: which of the model's modules holds it
                figures = f"{cache['module']}: {figures}"
            rows.append((f"cache {cache['cache']}{' (main)' if cache['main'] else ''}", figures))
    body = "".join(f"<tr><th>{k}</th><td>{html_text(v)}</td></tr>" for k, v in rows)
    return f"<table class='summary'>{body}</table>"


def _steps_said(steps: int) -> str:
    """The page header's count of steps: none said where the input marks none (a snapshot, a trace without
    step ranges), where "0 steps" read as a run that made no forward pass."""
    if not steps:
        return ""
    return ", 1 step" if steps == 1 else f", {steps:,} steps"


def report_to_html(source: MemorySource, report: Report, extra_sections: list[str] | None = None) -> str:
    from plotly.offline import get_plotlyjs

    plot = ""
    events = max((len(tl.ts_us) for tl in report.timelines), default=0)
    # A vLLM run without a trace has one memory event (the pool's allocation): its engine section below is
    # the timeline, and a chart of one point would only mislead.
    no_timeline = no_memory_timeline(source.meta.get("engine"), report.engine, events)
    if no_timeline is None and not _draws_nothing(source, report):
        fig = _timeline_figure(source, report)
        plot = figure_div(fig, "kvtrace-timeline")
    extra_notes = [n for n in (_monitor_note(source), no_timeline) if n]
    if plot:  # what the chart's start is, where a snapshot's history began mid-run
        extra_notes += history_start_notes(source, report)
    if report.kv.measured_from == "none" and report.kv_measured:  # not a refused vLLM start: no pool made
        extra_notes.append(f"KV cache: {NO_KV_HINT}")
    if report.budget is not None:
        extra_notes.append(budget_line(report.budget, report.engine).strip())
    notes = "".join(f"<p class='note'>{html_text(n)}</p>" for n in [*report.notes, *extra_notes])
    sections = "".join(extra_sections or [])
    if report.engine is not None and source.meta.get("engine") is not None:
        from analyzers.render.engine import engine_html_section

        sections = engine_html_section(source.meta["engine"], report.engine) + sections
    # plotly's script (4.6 MB) only on a page that draws with it: a vLLM start refused has no chart at all
    drawn = "Plotly.newPlot" in plot + sections
    script = f'<script type="text/javascript">{get_plotlyjs()}</script>' if drawn else ""
    steps = _steps_said(report.steps)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvtrace: {html_text(report.path)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}} table.summary{{border-collapse:collapse}}
table.summary th{{text-align:left;padding:2px 12px 2px 0;font-weight:normal;color:#444}}
table.summary td{{font-family:monospace;text-align:right}} .note{{color:#a60}}</style>
{script}</head>
<body><h1>kvtrace: {html_text(report.path)}</h1><p>source: {report.source_kind}{steps}</p>
{notes}{_summary_table(report)}{sections}{plot}</body></html>
"""
