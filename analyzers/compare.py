"""Runs side by side, and the sweep's table: the figures, then their JSON and one offline HTML page.

`compare(pairs)` turns (source, report) pairs into a `Comparison`; the renderers below only format it.

Definitions, so that the columns mean the same thing for every run:

* churn = KV bytes allocated over the run / KV bytes held at the end (1.0: written in place, like a
  static cache; a dynamic cache that grows by torch.cat every step reaches tens);
* reserved but unallocated = reserved - allocated at the peak, as `report` says it (None where the input
  has no reserved figures, e.g. CPU runs, or the peak is the level before the trace's first event);
* generated tokens per row = what the KV log shows the model's forwards yielded in each batch row of its
  cache: 1 for the prefill, then the tokens each decode step appended to the row, net of crops (a
  rejected draft of assisted or prompt-lookup decoding is appended, then cropped), a sliding window's or
  a press's evictions, and a caller's crop between two generate() calls, added back. It equals the new
  tokens generate() returns per row, whatever the tokens per forward (speculative decoding yields
  several). Only caches with the recorded model's layer
  count count (an assistant model's draft cache does not), summed over them (two generate() calls). A step
  whose forward raised (an OOM, a Ctrl-C part-way through its layers) yields none;
* tokens/s per row = generated tokens per row / wall time: how fast one sequence grows (under beam search,
  one beam, which is also how fast a returned sequence grows);
* tokens/s (all rows) = the same over every batch row the cache holds / wall time (throughput). Under beam
  search the rows are beams, not returned sequences: each beam's tokens count, and the table says so;
* wall time = from the recorder's "start" memory sample (taken once the profiler runs) to the sample at
  the end of the last step, so the profiler's start-up and trace writing are left out; without samples,
  the manifest's start to end, and a note says so. A last step whose forward raised (an OOM, a Ctrl-C)
  generated nothing: the time ends with the step before it. Compare runs recorded with the same options.
* an engine run (vLLM, transformers' continuous batching) has requests, not rows: tokens/s (all rows) is
  the output tokens of every request (each at its last event, preemptions recomputed once) over the time
  from its first request event to its last step's end; the per-row columns have no meaning there ("-").
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

from analyzers.caches import CROSS_ATTENTION, model_caches
from analyzers.engine import aborted_requests_unknown, failed_requests_unknown
from analyzers.model import MemorySource
from analyzers.render.plotly_div import figure_div
from analyzers.summary import Report
from analyzers.units import binary_unit, hover_bytes, human_bytes

__all__ = [
    "Comparison",
    "RunFigures",
    "compare",
    "comparison_to_html",
    "comparison_to_json",
    "run_figures",
    "sweep_to_html",
    "sweep_to_text",
    "tokens_per_second",
]

JSON_VERSION = 1


@dataclass(frozen=True)
class RunFigures:
    """One run's row, plus its KV timeline on the step axis (total KV bytes at the end of each step)."""

    label: str
    path: str
    peak_bytes: int | None  # None: no device in the input (a bare trace taken without profile_memory)
    kv_peak_bytes: int | None  # None: nothing in the input tells KV apart (not 0 B: unknown)
    kv_final_bytes: int | None
    churn: float | None
    fragmentation_bytes: int | None
    tokens_per_second: float | None  # over every batch row (see the module docstring)
    evicted_tokens: int | None  # None without a KV log: only kvtrace's log counts tokens
    steps: int
    batch: int | None
    step_axis: tuple[int, ...] = field(default=(), repr=False)
    kv_by_step: tuple[int, ...] = field(default=(), repr=False)
    notes: tuple[str, ...] = ()  # what the figures leave out: the report's notes, a group's missing ranks
    # a serving engine's pool (vLLM): blocks, peak blocks used, preemptions, prefix-cache hits; else None
    engine: dict[str, Any] | None = None
    tokens_per_second_per_row: float | None = None
    generated_tokens_per_row: int | None = None  # None without a KV log
    rows_are_beams: bool = False  # the cache's rows were reordered (beam search): "all rows" counts beams
    # No allocator events were recorded (profiler=False, profile_memory=False): `peak_bytes` counts only
    # what `peak_counts` names ("weights + KV", or "KV" where the weights were loaded before the trace)
    partial: bool = False
    peak_counts: str | None = None


@dataclass(frozen=True)
class Comparison:
    runs: tuple[RunFigures, ...]


@dataclass(frozen=True)
class Generated:
    """What the model's caches show was generated, and over how long (see the module docstring)."""

    tokens_per_row: int
    tokens_all_rows: int
    seconds: float
    rows_are_beams: bool
    # Where the time is not the samples' (none of the start, or of a step's end): what span it is instead
    span_note: str | None = None


def generated(source: MemorySource, report: Report) -> Generated | None:
    """The model's generated tokens and the wall time of the recording; None without a KV log or a clock."""
    manifest = source.meta.get("manifest") or {}
    started, ended = manifest.get("started_ns"), (manifest.get("ended") or {}).get("t_ns")
    run = source.meta.get("run")
    kv_log = source.meta.get("kv")
    samples = run.memory_samples if run is not None else []
    starts = [s["t_ns"] for s in samples if s.get("phase") == "start"]
    # A step whose forward raised generated nothing: the time ends with the last whole step
    cut = kv_log.cut if kv_log is not None else None
    raised = cut.step if cut is not None and cut.raised else None
    step_ends = [
        s["t_ns"]
        for s in samples
        if s.get("phase") in ("prefill", "decode") and s.get("raised") is not True and s.get("step") != raised
    ]
    span_note = None
    if starts and step_ends:
        started, ended = starts[0], step_ends[-1]
    if not started or not ended or ended <= started or kv_log is None or not report.kv.batch:
        return None
    if not (starts and step_ends):
        # The whole recording, 2x the steps' time on a tiny model: compared with a run timed by its samples,
        # its tokens/s would read as half as fast
        lacking = "start sample" if not starts else "step-end sample"
        span_note = (
            f"tokens/s: memory_samples.jsonl has no {lacking}, so the time is the manifest's started_ns to "
            f"ended.t_ns ({(ended - started) / 1e9:.3f} s), which also counts the recorder's start-up and "
            "the profiler trace's writing: slower than a run timed by its samples"
        )
    # The caches the recorded model's forwards were given (kvtrace >= round 3): an assistant's draft cache of
    # the same shape is not one; older runs tell drafts by their layer count only
    given = model_caches(manifest)
    drafts = {c.cache for c in report.kv.caches if c.model_shaped is False}
    # An encoder-decoder's cross-attention KV holds the encoder's tokens: none of them generated
    cross = {c.cache for c in report.kv.caches if c.role == CROSS_ATTENTION}
    mine = [
        c
        for c in kv_log.caches
        if (c.cache in given if given else c.cache not in drafts) and c.cache not in cross
    ]
    mine = mine or [c for c in kv_log.caches if c.cache == report.kv.main_cache]
    per_row = sum(c.generated_tokens for c in mine)
    # None where the log counts nothing (a module cache that logs no tokens); 0 where the first forward raised
    if not per_row and raised is None:
        return None
    return Generated(
        tokens_per_row=per_row,
        tokens_all_rows=sum(c.generated_row_tokens for c in mine),
        seconds=(ended - started) / 1e9,
        rows_are_beams=any(c.reordered for c in mine),
        span_note=span_note,
    )


def engine_generated(source: MemorySource) -> tuple[int, float] | None:
    """An engine run's output tokens, every request's at its last event, and the seconds from its first
    request event to its last step's end (see the module docstring); None without requests or steps."""
    run = source.meta.get("engine")
    requests = getattr(run, "requests", ())
    if run is None or not requests or not len(run.steps):
        return None
    output: dict[str, int] = {}
    for event in requests:
        output[event.request_id] = max(output.get(event.request_id, 0), event.output_tokens)
    started = min(event.t_ns for event in requests)
    ended = int(run.steps["t_ns"].max())
    if ended <= started:
        return None
    return sum(output.values()), (ended - started) / 1e9


def tokens_per_second(source: MemorySource, report: Report) -> float | None:
    """Generated tokens over every batch row (an engine's requests) / wall time of the recording (see the
    module docstring); None when unknown."""
    figures = generated(source, report)
    if figures is None:
        made = engine_generated(source)
        return made[0] / made[1] if made is not None else None
    return figures.tokens_all_rows / figures.seconds


def run_figures(source: MemorySource, report: Report, label: str) -> RunFigures:
    main = report.main_device
    kv_log = source.meta.get("kv")
    steps, kv_by_step = _kv_by_step(source)
    kv = report.kv
    # A bare trace or snapshot with nothing marking KV allocations shows "-", not 0 B: unknown, not empty.
    # Nor are the figures of a refused vLLM start, which made no pool (Report.kv_measured, device_measured)
    kv_known = kv.measured_from != "none" and report.kv_measured
    if main is not None and not report.device_measured(main):
        main = None
    made = generated(source, report)
    # The report's notes say what its figures lack: a block that raised, a run still recording, a peak
    # without allocator events, a missing file
    notes = tuple(report.notes)
    if made is not None and made.span_note is not None:
        notes += (made.span_note,)
    if made is not None and made.rows_are_beams:
        notes += (
            "the cache's rows were reordered (beam search): tokens/s (all rows) counts every beam's tokens; "
            "a returned sequence grows at the per-row rate",
        )
    rate = tokens_per_second(source, report)
    if rate is None and made is None and kv_log is not None and report.engine is None:
        notes += _untimed_note(report)
    notes += _requests_unknown_notes(report.engine, source)
    if report.engine is not None and report.engine.status == "refused_start":
        notes += (
            "vLLM refused to start for lack of KV memory: no pool was allocated and nothing ran, so its "
            "figures are not a run's (see `kvtrace diagnose`)",
        )
    partial = report.partial and main is not None
    return RunFigures(
        label=label,
        path=report.path,
        peak_bytes=main.peak_allocated_bytes if main else None,
        kv_peak_bytes=kv.peak_bytes if kv_known else None,
        kv_final_bytes=kv.final_bytes if kv_known else None,
        churn=(kv.allocated_bytes_total / kv.final_bytes) if kv_known and kv.final_bytes else None,
        fragmentation_bytes=main.fragmentation_at_peak_bytes if main else None,
        tokens_per_second=rate,
        evicted_tokens=kv.evicted_tokens if kv_log is not None and report.kv_measured else None,
        steps=report.steps,
        batch=kv.batch,
        step_axis=steps,
        kv_by_step=kv_by_step,
        notes=notes,
        engine=_engine_figures(report.engine, engine_generated(source), source),
        tokens_per_second_per_row=made.tokens_per_row / made.seconds if made is not None else None,
        generated_tokens_per_row=made.tokens_per_row if made is not None else None,
        rows_are_beams=made.rows_are_beams if made is not None else False,
        partial=partial,
        peak_counts=_peak_counts(main) if partial else None,
    )


def _untimed_note(report: Report) -> tuple[str, ...]:
    """Why a run's forwards have no tokens/s where none of them updated a cache (`use_cache=False`): the
    KV log is what counts the tokens and rows they yielded, and a forward alone says neither."""
    if not report.steps or report.kv.batch:
        return ()
    passes = "forward pass" if report.steps == 1 else f"{report.steps} forward passes"
    return (
        f"tokens/s, generated tokens and batch unknown: kvtrace counts the tokens a forward generated, and "
        f"the rows it ran, from its KV cache's updates, and its {passes} made none (use_cache=False, "
        "or a cache kvtrace does not follow): a forward alone does not say what it yielded (a token per row "
        "in generate(), none in a scoring pass)",
    )


def _kv_by_step(source: MemorySource) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The steps of the chart's axis and the KV bytes held at the end of each. A serving engine (vLLM,
    transformers' continuous batching) allocates its pool once, before its first step, and holds it whole
    through every step, whatever its requests use: its engine steps (engine_steps.jsonl), each at the pool's
    bytes (engine.json). Its KV log has the pool at step 0 only, which would draw one dot before any step.
    Otherwise the KV log's steps (1 = prefill); none without either."""
    run = source.meta.get("engine")
    if run is not None and run.info.status == "ok" and run.info.kv_cache_bytes and len(run.steps):
        steps = tuple(sorted({int(step) for step in run.steps["step"].tolist()}))
        return steps, (int(run.info.kv_cache_bytes),) * len(steps)
    kv_log = source.meta.get("kv")
    if kv_log is None:
        return (), ()
    steps = tuple(sorted(kv_log.step_live))
    return steps, tuple(sum(kv_log.step_live[s].values()) for s in steps)


def _peak_counts(main: Any) -> str:
    """What a peak without allocator events counts: the KV log's bytes over the weights kvtrace listed (a
    vLLM engine loads its weights before the trace: none)."""
    return "weights + KV" if main.categories_at_peak.get("weights") else "KV"


def _failed_requests_unknown(fig: Any, source: MemorySource) -> str | None:
    """Why the run's request log cannot count its failed requests (`failed_requests_unknown`), or None."""
    run = source.meta.get("engine")
    if fig is None or run is None or fig.status == "refused_start":
        return None
    return failed_requests_unknown(fig, run, source.meta.get("manifest") or {})


def _aborted_requests_unknown(fig: Any, source: MemorySource) -> str | None:
    """Why the run's request log cannot count its aborted requests (`aborted_requests_unknown`), or None."""
    run = source.meta.get("engine")
    if fig is None or run is None or fig.status == "refused_start":
        return None
    return aborted_requests_unknown(fig, run)


def _requests_unknown_notes(fig: Any, source: MemorySource) -> tuple[str, ...]:
    """The notes on the engine's request counts its log cannot give: one where failed and aborted are unknown
    for one reason (a vLLM run recorded before kvtrace logged finish reasons)."""
    failed, aborted = _failed_requests_unknown(fig, source), _aborted_requests_unknown(fig, source)
    if failed is not None and failed == aborted:
        return (f"engine failed and aborted requests unknown: {failed}",)
    notes = () if failed is None else (f"engine failed requests unknown: {failed}",)
    return notes + (() if aborted is None else (f"engine aborted requests unknown: {aborted}",))


def _aborted_requests(fig: Any, source: MemorySource) -> int | None:
    """Requests the engine aborted (vLLM's `abort_request`, a client gone): those its request log ends with
    reason "abort", as the report counts them ("2 aborted"). None for a refused start, and where the log
    cannot say (the note says why)."""
    if fig.status == "refused_start" or _aborted_requests_unknown(fig, source) is not None:
        return None
    return int(fig.finish_reasons.get("abort", 0))


def _failed_requests(fig: Any, source: MemorySource) -> int | None:
    """Requests the engine failed: those its request log ends with reason "error", as the report and diagnose
    count them ("2 failed"). None for a refused start, and where the log cannot say (the note says why)."""
    if fig.status == "refused_start" or _failed_requests_unknown(fig, source) is not None:
        return None
    return len(fig.failed_requests)


def _engine_figures(fig: Any, made: tuple[int, float] | None, source: MemorySource) -> dict[str, Any] | None:
    if fig is None:
        return None
    run = source.meta.get("engine")
    failure = run.info.failure if run is not None and fig.status == "failed" else None
    figures = {
        "name": fig.name,  # vllm or transformers-cb: the rows below are that engine's
        "status": fig.status,
        # engine.json's: the step the engine stopped the run at, why, its error, the requests it failed
        "failure": dict(failure) if isinstance(failure, dict) else None,
        "requests": fig.requests,
        "failed_requests": _failed_requests(fig, source),
        "aborted_requests": _aborted_requests(fig, source),
        "num_blocks": fig.num_blocks,
        "block_size": fig.block_size,
        "peak_blocks_used": fig.peak_blocks_used,
        "preemptions": fig.preemptions,
        "preempted_tokens": fig.preempted_tokens,
        "prefix_hit_tokens": fig.prefix_hit_tokens,
        "prefix_query_tokens": fig.prefix_query_tokens,
        "output_tokens": made[0] if made is not None else None,  # every request's (the module docstring)
    }
    if fig.status == "refused_start":  # no pool was allocated and no step ran: unknown, not 0
        figures.update(dict.fromkeys([key for key in figures if key not in ("name", "status")]))
    return figures


def compare(pairs: list[tuple[MemorySource, Report]], labels: list[str] | None = None) -> Comparison:
    names = labels or [source.path for source, _ in pairs]
    return Comparison(tuple(run_figures(s, r, n) for (s, r), n in zip(pairs, names, strict=True)))


def comparison_to_json(comparison: Comparison) -> dict[str, Any]:
    runs = []
    for run in comparison.runs:
        row = asdict(run)
        row["kv_by_step"] = dict(zip(row.pop("step_axis"), row["kv_by_step"], strict=True))
        runs.append(row)
    return {"version": JSON_VERSION, "runs": runs}


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _fmt_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _fmt_all_rows_rate(run: RunFigures) -> str:
    """Every batch row's tokens; under beam search the rows are beams, and the cell says so."""
    rate = _fmt_rate(run.tokens_per_second)
    return f"{rate} (beams)" if run.rows_are_beams and run.tokens_per_second is not None else rate


def _fmt_churn(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_peak(run: RunFigures) -> str:
    """A peak without allocator events says what it counts: it is no measured peak."""
    peak = human_bytes(run.peak_bytes)
    return f"{peak} ({run.peak_counts} only)" if run.partial and run.peak_bytes is not None else peak


_COMPARE_ROWS = (
    ("peak allocated", _fmt_peak),
    ("KV peak", lambda r: human_bytes(r.kv_peak_bytes)),
    ("KV final", lambda r: human_bytes(r.kv_final_bytes)),
    ("KV churn (allocated / final)", lambda r: _fmt_churn(r.churn)),
    ("reserved but unallocated at the peak", lambda r: human_bytes(r.fragmentation_bytes)),
    ("tokens/s per row (generation)", lambda r: _fmt_rate(r.tokens_per_second_per_row)),
    ("tokens/s, all rows (generation)", lambda r: _fmt_all_rows_rate(r)),
    ("generated tokens per row", lambda r: _fmt_count(r.generated_tokens_per_row)),
    ("evicted tokens (all rows)", lambda r: _fmt_count(r.evicted_tokens)),
    ("steps x batch", lambda r: f"{r.steps} x {r.batch if r.batch is not None else '-'}"),
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


def _rows(comparison: Comparison) -> tuple[tuple[str, Any], ...]:
    """The table's rows: the engine's only when a run has one."""
    return _COMPARE_ROWS + (_ENGINE_ROWS if any(r.engine for r in comparison.runs) else ())


def comparison_to_text(comparison: Comparison) -> str:
    rows = _rows(comparison)
    width = max(len(name) for name, _ in rows)
    cells = [(name, [cell(r) for r in comparison.runs]) for name, cell in rows]
    # each run's column as wide as its widest cell (a partial peak's mark), at least 14
    cols = [max(14, len(r.label), *(len(row[i]) for _, row in cells)) for i, r in enumerate(comparison.runs)]
    lines = [
        " " * width + "  " + "  ".join(f"{r.label:>{c}}" for r, c in zip(comparison.runs, cols, strict=True))
    ]
    for name, row in cells:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(row, cols, strict=True)))
    lines += [f"note: {r.label}: {note}" for r in comparison.runs for note in r.notes]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:24px} table{border-collapse:collapse}"
    "th,td{padding:3px 10px;border-bottom:1px solid #ddd} td{font-family:monospace;text-align:right}"
    "th{text-align:left;font-weight:normal;color:#444} tr.over td{color:#b00}"
)


def _page(title: str, body: str) -> str:
    from plotly.offline import get_plotlyjs

    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{_STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def comparison_to_html(comparison: Comparison) -> str:
    """One self-contained page: the table and the runs' KV timelines overlaid on a shared step axis."""
    import plotly.graph_objects as go

    esc = html.escape
    head = "".join(f"<th>{esc(r.label)}</th>" for r in comparison.runs)
    body = "".join(
        f"<tr><th>{esc(name)}</th>" + "".join(f"<td>{esc(cell(r))}</td>" for r in comparison.runs) + "</tr>"
        for name, cell in _rows(comparison)
    )
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
    plot = figure_div(fig, "kvtrace-compare")
    table = f"<table><tr><th></th>{head}</tr>{body}</table>"
    notes = "".join(f"<p>note: {esc(r.label)}: {esc(note)}</p>" for r in comparison.runs for note in r.notes)
    return _page("kvtrace compare", table + notes + plot)


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


# The sweep table's columns: (JSON key, heading people read, cell formatter).
_SWEEP_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("batch", "batch", str),
    ("context", "prompt tokens", str),
    ("cache", "cache", str),
    ("status", "status", str),
    ("peak_bytes", "peak allocated", human_bytes),
    ("kv_final_bytes", "KV at the end", human_bytes),
    ("kv_peak_bytes", "KV peak", human_bytes),
    ("tokens_per_second", "tokens/s", _fmt_rate),
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


# One color per cache kind for its peak (solid), its KV (dotted) and its tokens/s, none of them the budget
# line's red: plotly's default second color, a red too, made a cache's KV line read as the budget.
_BUDGET_COLOR = "red"
_CACHE_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22")


def sweep_to_html(rows: list[dict[str, Any]], budget_bytes: int | None, title: str) -> str:
    """The sweep's table and one plot: measured peak and KV (on an axis of its own, so that it is not a
    flat line beside the weights) and tokens/s per grid point, per cache."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    esc = html.escape
    header = "".join(f"<th>{esc(h)}</th>" for h in _sweep_headings(budget_bytes))
    lines = []
    for row in rows:
        over = " class='over'" if row["fits_budget"] is False or row["status"] != "ok" else ""
        cells = _sweep_cells(row, budget_bytes)
        lines.append(f"<tr{over}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("memory per point", "tokens/s per point"),
        specs=[[{"secondary_y": True}, {}]],
    )
    peak_unit, peak_factor = binary_unit(max([r["peak_bytes"] for r in rows] + [budget_bytes or 0]))
    kv_unit, kv_factor = binary_unit(max((r["kv_peak_bytes"] or 0 for r in rows), default=0))
    for number, cache in enumerate(sorted({row["cache"] for row in rows})):
        mine = [r for r in rows if r["cache"] == cache]
        color = _CACHE_COLORS[number % len(_CACHE_COLORS)]
        x = [f"batch {r['batch']}, {r['context']} tok" for r in mine]
        peak_y = [r["peak_bytes"] / peak_factor for r in mine]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=peak_y,
                name=f"{cache}: peak allocated",
                line={"color": color},
                hovertemplate=hover_bytes(peak_unit),
            ),
            row=1,
            col=1,
            secondary_y=False,
        )
        kv_y = [(r["kv_final_bytes"] or 0) / kv_factor for r in mine]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=kv_y,
                name=f"{cache}: KV at the end (right axis)",
                line={"dash": "dot", "color": color},
                hovertemplate=hover_bytes(kv_unit),
            ),
            row=1,
            col=1,
            secondary_y=True,
        )
        fig.add_trace(
            go.Bar(
                x=x, y=[r["tokens_per_second"] for r in mine], name=f"{cache}: tokens/s", marker_color=color
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
    fig.update_yaxes(title_text="tokens/s", row=1, col=2)
    # The legend below the rotated point labels, not over them
    fig.update_layout(
        template="plotly_white", height=640, legend={"orientation": "h", "y": -0.32}, margin={"b": 150}
    )
    plot = figure_div(fig, "kvtrace-sweep")
    budget = f"<p>budget: {human_bytes(budget_bytes)}</p>" if budget_bytes is not None else ""
    return _page(title, f"{budget}<table><tr>{header}</tr>{''.join(lines)}</table>{plot}")
