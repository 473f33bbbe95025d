"""`kvtrace compare`'s table as text and as one offline HTML page (the runs' figures, then a KV chart per
step): `analyzers.compare` makes the figures, this only formats them, the same cells in both.
"""

from __future__ import annotations

from typing import Any

from analyzers.compare import Comparison, RunFigures
from analyzers.render.event_axis import LEVEL_LINE, event_axis
from analyzers.render.html_text import html_text
from analyzers.render.plotly_div import figure_div
from analyzers.timeline import PAGE_POINTS, downsample_indices
from analyzers.units import binary_unit, hover_bytes, human_bytes, times
from kvtrace.errors import printable


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _fmt_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _fmt_all_rows_rate(run: RunFigures) -> str:
    """Every batch row's tokens; under beam search the rows are beams, and the cell says so."""
    rate = _fmt_rate(run.tokens_per_second)
    return f"{rate} (beams)" if run.rows_are_beams and run.tokens_per_second is not None else rate


def _fmt_churn(value: float | None) -> str:
    return "-" if value is None else times(value)


def _fmt_peak(run: RunFigures) -> str:
    """A peak without allocator events says what it counts: it is no measured peak. An input of several
    ranks says whose device it is (a group's highest rank, a vLLM run's first worker)."""
    peak = human_bytes(run.peak_bytes)
    if run.partial and run.peak_bytes is not None:
        peak = f"{peak} ({run.peak_counts} only)"
    if run.kv_ranks > 1 and run.peak_rank is not None:
        # a group's is its highest rank's, as `report` marks it; a vLLM run's its first worker's
        whose = f"worker {run.peak_rank}" if run.engine is not None else f"rank {run.peak_rank}: highest"
        peak = f"{peak} ({whose})"
    return peak


def _fmt_kv(value: int | None, run: RunFigures) -> str:
    """KV bytes, with the ranks (a vLLM run's workers) they sum where there are several."""
    text = human_bytes(value)
    if run.kv_ranks > 1 and value is not None:
        text = f"{text} ({run.kv_ranks} {'workers' if run.engine is not None else 'ranks'})"
    return text


def _fmt_steps(run: RunFigures) -> str:
    """A trace or snapshot has no steps to count: "-", not "0 x -"."""
    if not run.steps and run.batch is None:
        return "-"
    return f"{run.steps} x {run.batch if run.batch is not None else '-'}"


_COMPARE_ROWS = (
    ("peak allocated", _fmt_peak),
    ("KV peak", lambda r: _fmt_kv(r.kv_peak_bytes, r)),
    ("KV final", lambda r: _fmt_kv(r.kv_final_bytes, r)),
    ("KV churn (allocated / final)", lambda r: _fmt_churn(r.churn)),
    ("reserved but unallocated at the peak", lambda r: human_bytes(r.fragmentation_bytes)),
    ("tokens/s per row (generation)", lambda r: _fmt_rate(r.tokens_per_second_per_row)),
    ("tokens/s, all rows (generation)", lambda r: _fmt_all_rows_rate(r)),
    ("generated tokens per row", lambda r: _fmt_count(r.generated_tokens_per_row)),
    ("evicted tokens (all rows)", lambda r: _fmt_count(r.evicted_tokens)),
    ("steps x batch", lambda r: _fmt_steps(r)),
)


def _engine_cell(key: str, unit: str = "") -> Any:
    def cell(r: RunFigures) -> str:
        value = (r.engine or {}).get(key)
        if isinstance(value, str):
            return value
        return "-" if value is None else f"{value:,}{unit}"

    return cell


def _pool_cell(r: RunFigures) -> str:
    if (r.engine or {}).get("status") == "refused_start":
        return "refused start"
    return _engine_cell("num_blocks")(r)


def _engine_name_cell(r: RunFigures) -> str:
    """The engine row says why a run's engine cells are "-": it ran none (generate(), a trace)."""
    return "- (no engine)" if r.engine is None else _engine_cell("name")(r)


def _status_cell(r: RunFigures) -> str:
    """How the engine's run ended: ok, refused start, or the step it failed at and why (the notes have
    the whole error)."""
    engine = r.engine or {}
    status = engine.get("status")
    if status == "refused_start":
        return "refused start"
    if status != "failed":
        return "-" if status is None else str(status)
    failure = engine.get("failure") or {}
    at = f" at engine step {failure['step']}" if failure.get("step") is not None else ""
    error = str(failure.get("error") or "")
    why = "no blocks" if failure.get("reason") == "no_blocks" else error.split(":", 1)[0] or "error"
    return f"failed{at} ({why})"


_ENGINE_ROWS = (  # worded for any engine: a run may be vLLM's, another transformers' continuous batching
    ("engine", _engine_name_cell),
    ("engine status", _status_cell),
    ("engine requests", _engine_cell("requests")),
    ("engine failed requests", _engine_cell("failed_requests")),
    ("engine aborted requests", _engine_cell("aborted_requests")),
    ("engine pool (blocks)", _pool_cell),
    ("engine peak blocks used", _engine_cell("peak_blocks_used")),
    ("engine output tokens (all requests)", _engine_cell("output_tokens")),
    ("engine preemptions", _engine_cell("preemptions")),
    ("engine preempted tokens", _engine_cell("preempted_tokens")),
    ("engine prefix-cache hit tokens", _engine_cell("prefix_hit_tokens")),
)


# The allocator's figures `report` gives of any input: all a trace or snapshot has to compare, where the KV
# rows are "-" (nothing in it marks KV). After "peak allocated"; "-" where the input does not say (a trace
# whose memory events carry no reserved bytes).
_ALLOCATOR_ROWS = (
    ("final allocated", lambda r: human_bytes(r.final_allocated_bytes)),
    ("weights at the peak", lambda r: human_bytes(r.weights_at_peak_bytes)),
    ("other at the peak", lambda r: human_bytes(r.other_at_peak_bytes)),
    ("reserved at the peak", lambda r: human_bytes(r.reserved_at_peak_bytes)),
)
_RUN_KINDS = ("run", "run_group")  # kvtrace's own records: KV log, steps, tokens


def _has_bare_inputs(comparison: Comparison) -> bool:
    """Whether an input is a trace or snapshot, not a kvtrace run (whose table stays as it was)."""
    return any(r.source_kind not in _RUN_KINDS for r in comparison.runs)


# Where an input spans several ranks: the rows of one device's figures, and those summed over the ranks
_DEVICE_ROWS = {"peak allocated", "reserved but unallocated at the peak"} | {
    name for name, _ in _ALLOCATOR_ROWS
}
_SUMMED_ROWS = {"KV peak", "KV final"}


def _rows(comparison: Comparison) -> tuple[tuple[str, Any], ...]:
    """The table's rows: the allocator's when an input is a trace or snapshot, the engine's only when a run
    has one. Where an input spans several ranks (a run group, a tensor-parallel vLLM run), the rows say
    which figures are one rank's device and which every rank's, as `report` of a group does."""
    rows = _COMPARE_ROWS[:1] + (_ALLOCATOR_ROWS if _has_bare_inputs(comparison) else ()) + _COMPARE_ROWS[1:]
    rows += _ENGINE_ROWS if any(r.engine for r in comparison.runs) else ()
    if not any(r.kv_ranks > 1 for r in comparison.runs):
        return rows
    return tuple(
        (f"{name} (one rank)" if name in _DEVICE_ROWS else f"{name} (all ranks)", cell)
        if name in _DEVICE_ROWS | _SUMMED_ROWS
        else (name, cell)
        for name, cell in rows
    )


def comparison_to_text(comparison: Comparison) -> str:
    rows = _rows(comparison)
    width = max(len(name) for name, _ in rows)
    cells = [(name, [cell(r) for r in comparison.runs]) for name, cell in rows]
    # each run's column as wide as its widest cell (a partial peak's mark), at least 14
    labels = [printable(r.label) for r in comparison.runs]  # a folder named with a newline: one header line
    cols = [max(14, len(label), *(len(row[i]) for _, row in cells)) for i, label in enumerate(labels)]
    lines = [" " * width + "  " + "  ".join(f"{label:>{c}}" for label, c in zip(labels, cols, strict=True))]
    for name, row in cells:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(row, cols, strict=True)))
    lines += [f"note: {printable(f'{r.label}: {note}')}" for r in comparison.runs for note in r.notes]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:24px} table{border-collapse:collapse}"
    "th,td{padding:3px 10px;border-bottom:1px solid #ddd} td{font-family:monospace;text-align:right}"
    "th{text-align:left;font-weight:normal;color:#444} tr.over td{color:#b00} .note{color:#a60}"
)


def _page(title: str, body: str) -> str:
    from plotly.offline import get_plotlyjs

    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html_text(title)}</title>'
        f'<style>{_STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body><h1>{html_text(title)}</h1>{body}</body></html>\n"
    )


def comparison_to_html(comparison: Comparison) -> str:
    """One self-contained page: the table, the runs' KV timelines overlaid on a shared step axis, and, where
    an input has no KV steps (a trace, a snapshot), every input's allocated memory over time."""
    esc = html_text
    head = "".join(f"<th>{esc(r.label)}</th>" for r in comparison.runs)
    body = "".join(
        f"<tr><th>{esc(name)}</th>" + "".join(f"<td>{esc(cell(r))}</td>" for r in comparison.runs) + "</tr>"
        for name, cell in _rows(comparison)
    )
    stepless = [r for r in comparison.runs if not r.step_axis]
    charts = []
    if len(stepless) < len(comparison.runs):
        charts.append(_kv_chart(comparison))
    else:  # an empty chart of no steps said nothing: say why there is none
        charts.append(
            "<p class='note'>No chart of KV bytes per step: none of these inputs has KV steps (only a "
            "kvtrace run's KV log tells the KV cache apart step by step; a trace or snapshot does not).</p>"
        )
    if stepless and (_has_bare_inputs(comparison) or len(stepless) == len(comparison.runs)):
        charts.append(_allocated_chart(comparison))
    table = f"<table><tr><th></th>{head}</tr>{body}</table>"
    notes = "".join(f"<p>note: {esc(r.label)}: {esc(note)}</p>" for r in comparison.runs for note in r.notes)
    return _page("kvtrace compare", table + notes + "".join(charts))


def _kv_chart(comparison: Comparison) -> str:
    """The runs' KV bytes at the end of each step, overlaid."""
    import plotly.graph_objects as go

    fig = go.Figure()
    unit, factor = binary_unit(max((max(r.kv_by_step, default=0) for r in comparison.runs), default=0))
    for run in comparison.runs:
        fig.add_trace(
            go.Scatter(
                x=list(run.step_axis),
                y=[b / factor for b in run.kv_by_step],
                mode="lines+markers",
                name=run.label,
                hovertemplate=("engine step" if _on_engine_steps(run) else "step")
                + " %{x}: "
                + hover_bytes(unit),
            )
        )
    fig.update_layout(
        title="KV bytes held at the end of each step",
        xaxis_title=_step_axis_title(comparison),
        yaxis_title=unit,
        template="plotly_white",
        height=520,
    )
    return figure_div(fig, "kvtrace-compare")


def _allocated_chart(comparison: Comparison) -> str:
    """Each input's main device's allocated bytes over time, from its own first event (the inputs' clocks
    are unrelated), drawn as steps and cut peak-exactly as the report's timeline; a note names the inputs
    that cannot be drawn so."""
    import plotly.graph_objects as go

    esc = html_text
    drawn = [r for r in comparison.runs if r.timeline is not None and r.timed]
    left_out = [
        f"{r.label} ({'its snapshot records no times' if r.timeline is not None else 'no allocator events'})"
        for r in comparison.runs
        if r not in drawn
    ]
    said = esc("; ".join(left_out))
    note = f"<p class='note'>Not in the allocated memory chart: {said}.</p>" if left_out else ""
    if not drawn:
        return note
    top = max(max(int(r.timeline.allocated.max()), r.timeline.start_allocated) for r in drawn if r.timeline)
    unit, factor = binary_unit(top)
    fig = go.Figure()
    for run in drawn:
        timeline = run.timeline
        assert timeline is not None  # drawn holds only runs with one
        axis = event_axis([timeline], float(timeline.ts_us[0]), untimed=False, seconds_shared=True)
        keep = downsample_indices(timeline.allocated, PAGE_POINTS, timeline.ts_us)
        x, lined_up = axis.points(timeline, keep)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=lined_up(timeline.allocated, timeline.start_allocated) / factor,
                name=f"{run.label} ({timeline.device})",
                line={"shape": LEVEL_LINE},
                hovertemplate=f"{esc(run.label)}: " + hover_bytes(unit),
            )
        )
    fig.update_layout(
        title="Allocated memory over time (each input's main device, from its own first event)",
        xaxis_title="seconds from the input's first memory event",
        yaxis_title=unit,
        template="plotly_white",
        height=520,
    )
    return note + figure_div(fig, "kvtrace-compare-allocated")


def _on_engine_steps(run: RunFigures) -> bool:
    """A serving engine's run, drawn on its engine steps (see `_kv_by_step`)."""
    return run.engine is not None and run.engine["status"] == "ok" and bool(run.step_axis)


def _step_axis_title(comparison: Comparison) -> str:
    """The shared x axis: generate()'s steps (1 = its prefill), an engine's steps (a step schedules prefills
    and decodes of many requests at once: none is "the" prefill), or both, each said."""
    drawn = [run for run in comparison.runs if run.step_axis]
    engines = sum(_on_engine_steps(run) for run in drawn)
    if not engines:
        return "step (1 = prefill)"
    if engines == len(drawn):
        return "engine step"
    return "step (1 = prefill; a serving engine's run: its engine step)"
