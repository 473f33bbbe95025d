"""The report in a Jupyter cell (`Report._repr_html_`): the summary tables and a small timeline, no JS.

A notebook shows many reports side by side, so this is compact and static: an inline SVG per device
(allocated bytes and the KV share, downsampled with every peak kept) instead of the full plotly page,
which `kvtrace report -o` still writes. Everything shown is a figure the report already holds; the budget
verdict and a serving engine's pool are the text report's own sentences.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from analyzers.caches import layer_tokens_cell, rows_name_caches
from analyzers.group import GroupReport
from analyzers.model import request_at_most
from analyzers.render.engine import engine_text_lines
from analyzers.render.group import rank_cells
from analyzers.render.html_text import html_text
from analyzers.render.text import allocated_over, budget_line
from analyzers.summary import Report
from analyzers.timeline import DeviceTimeline, downsample_together
from analyzers.units import human_bytes

_WIDTH, _HEIGHT, _POINTS = 480, 90, 400
_STYLE = (
    "<style>.kvtrace-nb table{border-collapse:collapse;margin:4px 0}"
    ".kvtrace-nb td,.kvtrace-nb th{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}"
    ".kvtrace-nb td:first-child,.kvtrace-nb th:first-child{text-align:left}"
    ".kvtrace-nb .note{color:#a15c00}</style>"
)


def _polyline(x: np.ndarray, y: np.ndarray, top: float, color: str) -> str:
    if x.size == 0 or top <= 0:
        return ""
    span = float(x[-1] - x[0]) or 1.0
    xs = (x - x[0]) / span * (_WIDTH - 2) + 1
    ys = _HEIGHT - 1 - y / top * (_HEIGHT - 2)
    # A step: each level held until the next event (the HTML timeline's "hv"), not a slope between two
    xs, ys = np.repeat(xs, 2)[1:], np.repeat(ys, 2)[:-1]
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, ys, strict=True))
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{points}"/>'


def _sparkline(timeline: DeviceTimeline) -> str:
    """Allocated (grey) and KV (blue) bytes over the device's events; the peak is drawn exactly."""
    n = int(timeline.allocated.shape[0])
    if n < 2:
        return ""
    keep = downsample_together([timeline.allocated, timeline.by_category["kv"]], _POINTS)
    x = np.asarray(timeline.ts_us, dtype=np.float64)[keep]
    top = float(timeline.allocated.max())
    lines = _polyline(x, timeline.allocated[keep].astype(np.float64), top, "#777")
    lines += _polyline(x, timeline.by_category["kv"][keep].astype(np.float64), top, "#1f77b4")
    return (
        f'<svg width="{_WIDTH}" height="{_HEIGHT}" role="img" style="border:1px solid #eee">'
        f"<title>{html_text(timeline.device)}: allocated (grey), KV cache (blue)</title>{lines}</svg>"
    )


def _text_line(line: str) -> str:
    """A line of the text report, its indent (a detail of the line above) kept as a margin."""
    indent = (len(line) - len(line.lstrip(" "))) // 2 - 1
    return f'<div style="margin-left:{max(indent, 0)}em">{html_text(line.strip())}</div>'


def _row(*cells: object, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{html_text(str(c))}</{tag}>" for c in cells) + "</tr>"


def report_to_notebook_html(report: Report) -> str:
    parts = [_STYLE, '<div class="kvtrace-nb">']
    if report.group is not None:
        parts += _group_head(report.group)
        timelines = [
            dataclasses.replace(timeline, device=f"rank{rank.rank}/{timeline.device}")
            for rank in report.group.ranks
            for timeline in rank.report.timelines
        ]
    else:
        parts.append(
            f"<b>kvtrace report</b>: <code>{html_text(report.path)}</code> ({html_text(report.source_kind)})"
        )
        timelines = report.timelines
    parts += [f'<div class="note">note: {html_text(note)}</div>' for note in report.notes]
    if report.budget is not None:  # the text report's sentence: where the run would have run out, or fits
        crossed = ' class="note"' if report.budget.get("crossed") else ""
        parts.append(f"<div{crossed}>{html_text(budget_line(report.budget, report.engine).strip())}</div>")
    rows = [
        _row(
            "device",
            "peak",
            "KV at peak",
            "weights at peak",
            "other at peak",
            "final",
            "capacity",
            header=True,
        )
    ]
    # a bare trace's or snapshot's KV, never attributed, is unknown (in `other`), not 0: "-", as the page says
    unattributed = report.kv.measured_from == "none" and report.kv_measured
    for dev in report.devices:
        measured = report.device_measured(dev)  # a refused vLLM start's may not be: "-", as the report's HTML
        at_peak = dev.categories_at_peak
        figures: list[int | None] = [dev.peak_allocated_bytes]
        figures += [
            None if name == "kv" and unattributed else at_peak.get(name, 0)
            for name in ("kv", "weights", "other")
        ]
        figures.append(dev.final_allocated_bytes)
        cells = [human_bytes(value if measured else None) for value in figures]
        rows.append(_row(dev.device, *cells, human_bytes(dev.capacity_bytes)))
    parts.append("<table>" + "".join(rows) + "</table>")
    kv = report.kv
    measured = report.kv_measured and not unattributed
    kv_rows = [
        _row("KV cache", "", header=True),
        _row("peak", human_bytes(kv.peak_bytes if measured else None)),
        _row("final", human_bytes(kv.final_bytes if measured else None)),
        _row(
            f"allocated {allocated_over(report, report.devices)}",
            human_bytes(kv.allocated_bytes_total if measured else None),
        ),
        _row("evicted tokens (all rows and layers)", f"{kv.evicted_tokens:,}" if measured else "-"),
        _row("measured from", kv.measured_from),
    ]
    if kv.bytes_per_token_measured is not None:
        kv_rows.append(_row("bytes per token (measured)", f"{kv.bytes_per_token_measured:,.0f}"))
    if kv.bytes_per_token_expected is not None:
        kv_rows.append(_row("bytes per token (geometry)", f"{kv.bytes_per_token_expected:,}"))
    parts.append("<table>" + "".join(kv_rows) + "</table>")
    if kv.per_layer:
        several = rows_name_caches((f.cache for f in kv.per_layer), kv.main_cache)
        cache_head: tuple[object, ...] = ("cache",) if several else ()
        head = (*cache_head, "layer", "K", "V", "tokens per row", "evicted tokens (all rows)")
        layer_rows = [_row(*head, header=True)]
        layer_rows += [
            _row(
                *((f.cache,) if several else ()),
                f.layer,
                human_bytes(f.k_bytes),
                human_bytes(f.v_bytes),
                layer_tokens_cell(f),
                f.evicted_tokens,
            )
            for f in kv.per_layer
        ]
        parts.append(
            "<details><summary>per layer</summary><table>" + "".join(layer_rows) + "</table></details>"
        )
    if report.engine is not None:  # the serving engine's pool and preemptions, as the text report says them
        parts.append(
            "<div>" + "".join(_text_line(line) for line in engine_text_lines(report.engine)) + "</div>"
        )
    if report.oom is not None:
        requested = human_bytes(report.oom.get("requested_bytes"))
        segment = report.oom.get("segment_bytes")
        if report.oom.get("requested_bytes") is None and segment is not None:
            requested = f"at most {human_bytes(request_at_most(segment))}"
        parts.append(
            f'<div class="note">out of memory on {html_text(str(report.oom.get("device")))}: '
            f"requested {html_text(requested)}</div>"
        )
    parts += [_sparkline(t) for t in timelines]
    parts.append("</div>")
    return "".join(parts)


def _group_head(group: GroupReport) -> list[str]:
    """The ranks side by side and the rank to look at, as `kvtrace report` on a group begins; the tables
    that follow are the group's (every rank's devices, KV summed over ranks)."""
    world = group.world_size or "?"
    parts = [f"<b>kvtrace report</b>: <code>{html_text(group.path)}</code> (run group, world size {world})"]
    rows = [_row("rank", "status", "device", "peak", "KV final", "KV peak", "", header=True)]
    rows += [_row(*rank_cells(group, r)) for r in group.ranks]
    rows += [_row(rank, "(no run)", "", "", "", "", "") for rank in group.missing_ranks]
    parts.append("<table>" + "".join(rows) + "</table>")
    parts.append(
        f"<div>look at rank {group.focus_rank}: it {html_text(group.focus_reason)} "
        "(<code>kvtrace diagnose</code> says why)</div>"
    )
    parts.append("<div><b>all ranks</b>, KV summed over ranks:</div>")
    return parts
