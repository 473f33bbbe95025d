"""A run group as JSON, terminal text and one offline HTML page. Formatting only: every figure comes from
`analyzers.group` (the single-run renderers format the group's summed `total`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from analyzers.attribution import KV_FREES
from analyzers.group import GroupReport, RankReport
from analyzers.group_stops import stop_mark, stopped_from_outside
from analyzers.kv_line import kv_line
from analyzers.planning.diagnosis import Diagnosis
from analyzers.render.budget_marks import add_budget
from analyzers.render.diagnosis import diagnosis_to_json, diagnosis_to_text
from analyzers.render.event_axis import LEVEL_LINE, event_axis, held_points, held_span
from analyzers.render.html_text import html_text
from analyzers.render.json import report_to_json, size_basis_said
from analyzers.render.plotly_div import figure_div
from analyzers.render.text import budget_line, report_to_text
from analyzers.timeline import downsample_indices, timeline_indices
from analyzers.units import binary_unit, hover_bytes, human_bytes
from kvtrace.errors import printable

__all__ = [
    "group_diagnosis_to_json",
    "group_diagnosis_to_text",
    "group_report_to_html",
    "group_report_to_json",
    "group_report_to_text",
]

MAX_POINTS = 5_000  # per rank and series: a page of 64 ranks stays light
_COLORS = {"kv": "#d62728", "weights": "#1f77b4", "other": "#7f7f7f"}


def group_report_to_json(group: GroupReport) -> dict[str, Any]:
    """The single-run fields for the whole group (KV summed over ranks, the peak rank's memory peak; see
    analyzers.group), plus `ranks` and which rank peaked, ran out or failed."""
    data = report_to_json(group.total)
    device_ranks = [r.rank for r in group.ranks for _ in r.report.devices]
    for entry, rank in zip(data["devices"], device_ranks, strict=True):
        entry["rank"] = rank
    data["world_size"] = group.world_size
    data["ranks"] = [
        {
            "rank": r.rank,
            "world_size": r.world_size,
            "local_rank": r.local_rank,
            "hostname": r.hostname,
            "device": r.device,
            "status": r.status,
            "ended": r.ended,
            "path": r.path,
            "peak_allocated_bytes": r.peak_allocated_bytes,
            "steps": r.report.steps,
            "oom": r.report.oom,
            "kv": report_to_json(r.report)["kv"],
        }
        for r in group.ranks
    ]
    data["peak_rank"] = group.peak_rank
    data["oom_rank"] = group.oom_rank
    data["failed_ranks"] = group.failed_ranks
    data["missing_ranks"] = group.missing_ranks
    data["focus"] = {"rank": group.focus_rank, "reason": group.focus_reason}
    data["over_budget_ranks"] = group.over_budget_ranks
    data["notes"] = group.notes
    return data


def rank_mark(group: GroupReport, rank: RankReport) -> str:
    if rank.rank == group.oom_rank:
        return "ran out of memory"
    if rank.rank in group.failed_ranks:  # a rank SIGTERMed "stopped by SIGTERM", not `Terminated`
        return stop_mark(rank) or str(rank.ended.get("type") or rank.status)
    return "peak" if rank.rank == group.peak_rank else ""


def rank_cells(group: GroupReport, r: RankReport) -> tuple[object, ...]:
    """One rank's row of the ranks table (HTML and notebook): rank, status, device, peak allocated, KV
    final, KV peak, and its mark."""
    return (
        r.rank,
        r.status,
        r.device or "-",
        human_bytes(r.peak_allocated_bytes),
        human_bytes(r.report.kv.final_bytes),
        human_bytes(r.report.kv.peak_bytes),
        rank_mark(group, r),
    )


def group_report_to_text(group: GroupReport) -> str:
    """The ranks side by side, then the whole group as one report (KV summed over ranks)."""
    world = group.world_size or "?"
    lines = [f"kvtrace report: {printable(str(group.path))} (run group, world size {world})"]
    header = ("rank", "status", "device", "peak", "KV final", "KV peak")
    lines.append("  {:>5}  {:<11}  {:<10}  {:>11}  {:>11}  {:>11}".format(*header))
    for r in group.ranks:
        mark = rank_mark(group, r)
        lines.append(
            f"  {r.rank:>5}  {r.status:<11}  {r.device or '-':<10}  {human_bytes(r.peak_allocated_bytes):>11}"
            f"  {human_bytes(r.report.kv.final_bytes):>11}  {human_bytes(r.report.kv.peak_bytes):>11}"
            + (f"  <- {mark}" if mark else "")
        )
    for rank in group.missing_ranks:
        lines.append(f"  {rank:>5}  (no run)")
    lines.append(f"  look at rank {group.focus_rank}: it {group.focus_reason} (`kvtrace diagnose` says why)")
    for note in group.notes:
        lines.append(f"  note: {printable(note)}")
    total = report_to_text(dataclasses.replace(group.total, notes=[]))
    lines += ["", total.replace("(run_group)", f"({_summed_over(group)})", 1)]
    return "\n".join(lines)


def _summed_over(group: GroupReport) -> str:
    """Which ranks the group's KV sums: all, or those present of the world size (a rank with no run holds
    KV the sum lacks, so the figure is not the model's)."""
    if not group.missing_ranks:
        return "all ranks, KV summed over ranks"
    names = ", ".join(str(rank) for rank in group.missing_ranks)
    present = len(group.ranks)
    return f"KV summed over {present} of {present + len(group.missing_ranks)} ranks: no run from rank {names}"


def _group_figure(group: GroupReport) -> Any:
    """One row per rank, all on one time axis (seconds from the group's first event; ranks share the Unix
    clock): memory by category, allocated, the exact KV log, the budget and where a rank crosses it, and
    where a rank failed."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ranks = group.ranks
    titles = [f"rank {r.rank} ({r.device or '-'}, {r.status})" for r in ranks]
    fig = make_subplots(
        rows=len(ranks),
        cols=1,
        shared_xaxes=True,
        subplot_titles=titles,
        vertical_spacing=0.04,
        specs=[[{"secondary_y": True}]] * len(ranks),  # the KV log on its own scale: beside weights, flat
    )
    every = [tl for r in ranks for tl in r.report.timelines]
    t0 = min((float(tl.ts_us[0]) for tl in every if len(tl.ts_us)), default=0.0)
    # Each device from the level before its first event, as the single-run page draws it (seconds on the
    # clock the ranks share); a device without events (None here) is drawn at that level alone, below.
    axis = event_axis(every, t0, untimed=False, seconds_shared=True)
    placed = [
        [
            axis.points(tl, timeline_indices(tl, MAX_POINTS)) if len(tl.ts_us) else None
            for tl in r.report.timelines
        ]
        for r in ranks
    ]
    # One unit for every rank (MiB, GiB...), as the rest of the page writes sizes; the level before the trace
    # counts (a device without events holds only that: the weights beside a cache offloaded elsewhere)
    unit, factor = binary_unit(
        max((max(int(tl.allocated.max(initial=0)), tl.start_allocated) for tl in every), default=0)
    )
    kv_logs = [r.source.meta.get("kv") for r in ranks]
    kv_top = max((max(kv.series_bytes) for kv in kv_logs if kv is not None and kv.series_bytes), default=0)
    kv_unit, kv_factor = binary_unit(kv_top)
    legend: set[str] = set()
    for row, (r, drawn) in enumerate(zip(ranks, placed, strict=True), start=1):
        first = row == 1
        # A device without events is named by the rank's report, so drawn too: its level across the x its
        # rank's other devices cover (the whole group's where the rank has none)
        span = held_span(_covered(drawn) or _covered([d for ds in placed for d in ds]))
        several = len(r.report.timelines) > 1
        for tl, points in zip(r.report.timelines, drawn, strict=True):
            x, lined_up = points if points is not None else held_points(span)
            prefix = f"{tl.device} " if several else ""
            for name in ("weights", "kv", "other"):
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=lined_up(tl.by_category[name], tl.start_by_category.get(name, 0)) / factor,
                        name=prefix + name,
                        legendgroup=prefix + name,
                        showlegend=prefix + name not in legend,
                        stackgroup=f"r{r.rank}{tl.device}",
                        line={"width": 0.5, "color": _COLORS[name], "shape": LEVEL_LINE},
                        hovertemplate=f"rank {r.rank} {prefix}{name}: " + hover_bytes(unit),
                    ),
                    row,
                    1,
                )
                legend.add(prefix + name)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=lined_up(tl.allocated, tl.start_allocated) / factor,
                    name=f"{prefix}allocated",
                    legendgroup=f"{prefix}allocated",
                    showlegend=f"{prefix}allocated" not in legend,
                    line={"color": "black", "width": 1, "shape": LEVEL_LINE},
                    hovertemplate=f"rank {r.rank} {prefix}allocated: " + hover_bytes(unit),
                ),
                row,
                1,
            )
            legend.add(f"{prefix}allocated")
        kv = r.source.meta.get("kv")
        if kv is not None and len(kv.series_bytes):
            # The rank's frees at its allocator's, where its trace has them (analyzers.kv_line)
            t_ns, series = kv_line(kv, r.source.meta.get(KV_FREES))
            keep = downsample_indices(series, MAX_POINTS, t_ns)
            x = (t_ns[keep].astype(np.float64) / 1000.0 - t0) / 1e6
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=series[keep] / kv_factor,
                    name="KV (log, right axis)",
                    legendgroup="kvlog",
                    showlegend=first,
                    line={"color": _COLORS["kv"], "shape": LEVEL_LINE, "dash": "dot"},
                    hovertemplate=f"rank {r.rank} KV: " + hover_bytes(kv_unit),
                ),
                row,
                1,
                secondary_y=True,
            )
            kv_axis = {"title_text": f"KV ({kv_unit})", "rangemode": "tozero", "tickmode": "auto"}
            fig.update_yaxes(**kv_axis, showgrid=False, secondary_y=True, row=row, col=1)
        # Each rank was recorded with the budget (one device each): its line, and where that rank runs out
        add_budget(fig, r.report.budget, axis.place, factor, row, who=f"rank {r.rank}")
        end_ns = r.ended.get("t_ns")
        if r.status != "ok" and isinstance(end_ns, (int, float)):
            fig.add_vline(x=(end_ns / 1000.0 - t0) / 1e6, line_color="red", line_dash="dash", row=row, col=1)
        fig.update_yaxes(title_text=unit, secondary_y=False, row=row, col=1)
    fig.update_xaxes(title_text="seconds from the group's first event", row=len(ranks), col=1)
    fig.update_layout(
        height=160 + 260 * len(ranks), template="plotly_white", legend={"orientation": "h"}, margin={"t": 60}
    )
    return fig


def _covered(drawn: list[Any]) -> list[float]:
    """The first and last x of each device drawn from its events (None: a device without events)."""
    return [float(points[0][i]) for points in drawn if points is not None for i in (0, -1)]


def _sizes_counted(r: RankReport) -> str:
    """Which size a rank's peak counts (its main device's), in the words its text report's device line
    says it; "-" where that device measured nothing. Ranks may differ: one whose profiler trace is gone
    counts the KV log's tensors, where the others count the allocator's blocks."""
    main = r.report.main_device
    if main is None or not r.report.device_measured(main):
        return "-"
    return size_basis_said(main.size_basis, main.device)


def _page_cells(group: GroupReport, r: RankReport) -> tuple[object, ...]:
    """`rank_cells` with the rank's `_sizes_counted` after its peak, as the single-run page's summary says
    it under the device's peak."""
    cells = rank_cells(group, r)
    return (*cells[:4], _sizes_counted(r), *cells[4:])


def group_report_to_html(group: GroupReport, extra_sections: list[str] | None = None) -> str:
    """One self-contained page: a table of the ranks, `extra_sections` (the focus rank's diagnosis, as
    `kvtrace report -o` adds it), then the ranks side by side on one time axis."""
    from plotly.offline import get_plotlyjs

    esc = html_text
    columns = ("rank", "status", "device", "peak allocated", "sizes counted", "KV final", "KV peak", "")
    head = "".join(f"<th>{c}</th>" for c in columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in _page_cells(group, r)) + "</tr>"
        for r in group.ranks
    )
    total = group.total.kv
    summary = (
        f"<p>world size {group.world_size or '?'}; KV final ({esc(_summed_over(group))}) "
        f"{human_bytes(total.final_bytes)}, "
        f"KV peak {human_bytes(total.peak_bytes)}; look at rank {group.focus_rank}: it "
        f"{esc(group.focus_reason)}.</p>"
    )
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in group.notes)
    if group.total.budget is not None:  # the rank that crossed the recorded budget first
        notes += f"<p class='note'>{esc(budget_line(group.total.budget).strip())}</p>"
    plot = figure_div(_group_figure(group), "kvtrace-ranks")
    sections = "".join(extra_sections or [])
    title = f"kvtrace: {group.path}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}} table{{border-collapse:collapse}}
th,td{{padding:2px 10px;border-bottom:1px solid #ddd}} td{{font-family:monospace;text-align:right}}
.note{{color:#a60}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{esc(title)}</h1>{summary}{notes}<table><tr>{head}</tr>{rows}</table>{sections}{plot}</body></html>
"""


def _group_line(group: GroupReport) -> str:
    focus = group.rank(group.focus_rank)
    message = str(focus.ended.get("message") or "")
    # A signal's own message ("SIGTERM: the process was told to stop") says nothing the reason does not
    said = f": {message.splitlines()[0][:200]}" if message and focus.status != "ok" else ""
    if stopped_from_outside(focus):
        said = ""
    return (
        f"run group {group.path} (world size {group.world_size or '?'}): diagnosing rank {focus.rank}, "
        f"which {group.focus_reason}{said}"
    )


def group_diagnosis_to_json(group: GroupReport, diagnosis: Diagnosis) -> dict[str, Any]:
    """The focus rank's diagnosis, plus `run_group`: which rank it is and why that one."""
    return {
        **diagnosis_to_json(diagnosis),
        "run_group": {
            "path": group.path,
            "world_size": group.world_size,
            "rank": group.focus_rank,
            "reason": group.focus_reason,
            "peak_rank": group.peak_rank,
            "oom_rank": group.oom_rank,
            "failed_ranks": group.failed_ranks,
            "missing_ranks": group.missing_ranks,
            "over_budget_ranks": group.over_budget_ranks,
        },
    }


def group_diagnosis_to_text(group: GroupReport, diagnosis: Diagnosis) -> str:
    others = ", ".join(
        f"rank {r.rank} {stop_mark(r) or r.status} peak {human_bytes(r.peak_allocated_bytes)}"
        for r in group.ranks
        if r.rank != group.focus_rank
    )
    lines = [_group_line(group)]
    if others:
        lines.append(f"  other ranks: {others}")
    for note in group.notes:  # as `report` says them: missing, failed or unreadable ranks
        lines.append(f"  note: {printable(note)}")
    return "\n".join([*lines, "", diagnosis_to_text(diagnosis)])
