"""Runs side by side: the figures, and their JSON.

`compare(pairs)` turns (source, report) pairs into a `Comparison`; `analyzers.render.compare` formats it as
text and one offline HTML page (`analyzers.render.sweep`: the sweep's table).

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
  the end of the last step, so the profiler's start-up and trace writing are left out (a run of
  `record(model="auto")`, `kvtrace run`: from the manifest's `model_found_ns`, the model's first generate(),
  not the script's start with its imports and model loading); without samples,
  the manifest's start to end, and a note says so. A last step whose forward raised (an OOM, a Ctrl-C)
  generated nothing: the time ends with the step before it. Compare runs recorded with the same options.
* an engine run (vLLM, transformers' continuous batching) has requests, not rows: tokens/s (all rows) is
  the output tokens of every request (each at its last event, preemptions recomputed once) over the time
  from its first request event to its last step's end; the per-row columns have no meaning there ("-").
  Where its request log (engine_requests.jsonl) is missing, what only that log counts (requests, failed,
  aborted, preempted and output tokens, tokens/s) is unknown ("-", null), not 0; a note says so.
* ranks: the KV figures (peak, final, per step) are every rank's or worker's summed (`kv_ranks` of them), as
  `report` of a run group sums them: a run group's ranks, a vLLM run's tensor- and pipeline-parallel
  workers (engine.json describes the first: each holds a pool of its own). The device figures (peak
  allocated, reserved, weights and other at the peak) are one device's (`peak_rank`): a group's highest
  rank, the one that runs out first, as `report` marks it; a vLLM run's first worker. A single process is
  one rank of one device (`kv_ranks` 1, `peak_rank` None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from analyzers.caches import CROSS_ATTENTION, model_caches
from analyzers.engine import aborted_requests_unknown, failed_requests_unknown
from analyzers.model import MemorySource
from analyzers.summary import Report
from analyzers.timeline import DeviceTimeline
from analyzers.units import human_bytes

__all__ = [
    "Comparison",
    "RunFigures",
    "compare",
    "comparison_to_json",
    "run_figures",
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
    # The allocator's other figures of the main device, as `report` gives them (None: unknown, as for a
    # trace whose memory events carry no reserved bytes). A trace or snapshot has no others to compare.
    final_allocated_bytes: int | None = None
    reserved_at_peak_bytes: int | None = None
    weights_at_peak_bytes: int | None = None
    other_at_peak_bytes: int | None = None
    source_kind: str = "run"  # the report's: run, run_group, snapshot, chrome_trace, memory_timeline
    # The main device's allocated bytes over time, for the page's overlay of inputs without KV steps; None
    # where it has no events, or no clock (`timed` False: a torch 2.0 snapshot's entries go by their index).
    # Left out of the JSON: the page draws it, the figures above summarise it.
    timeline: DeviceTimeline | None = field(default=None, repr=False, compare=False)
    timed: bool = field(default=True, repr=False, compare=False)
    # The ranks or workers whose KV the KV figures sum, and the rank (worker) whose device the device
    # figures are; None for a single process (see the module docstring)
    kv_ranks: int = 1
    peak_rank: int | None = None


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
        found = manifest.get("model_found_ns")
        if isinstance(found, int) and not isinstance(found, bool) and started < found < ended:
            started = found  # `kvtrace run`: from the model's first generate(), not the script's start
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
    kv_peak, kv_final = (kv.peak_bytes, kv.final_bytes) if kv_known else (None, None)
    workers = _engine_workers(source, report)
    kv_ranks, peak_rank = 1, None
    if workers is not None:
        spread, said = workers
        notes = (*(n for n in notes if not n.startswith(_ONE_WORKER_NOTES)), said)
        if spread is None:
            kv_peak = kv_final = None
            kv_by_step = ()
        else:
            kv_ranks, total, pool = spread
            peak_rank = 0 if main is not None else None
            kv_peak, kv_final = (None if b is None else b * total // pool for b in (kv_peak, kv_final))
            kv_by_step = tuple(b * total // pool for b in kv_by_step)
    timeline = next((tl for tl in report.timelines if main is not None and tl.device == main.device), None)
    return RunFigures(
        label=label,
        path=report.path,
        peak_bytes=main.peak_allocated_bytes if main else None,
        kv_peak_bytes=kv_peak,
        kv_final_bytes=kv_final,
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
        final_allocated_bytes=main.final_allocated_bytes if main else None,
        reserved_at_peak_bytes=main.reserved_at_peak if main else None,
        weights_at_peak_bytes=main.categories_at_peak.get("weights") if main else None,
        other_at_peak_bytes=main.categories_at_peak.get("other") if main else None,
        source_kind=report.source_kind,
        timeline=timeline if timeline is not None and len(timeline.ts_us) else None,
        timed="event_index" not in (source.meta.get("timestamps") or {}).values(),
        kv_ranks=kv_ranks,
        peak_rank=peak_rank,
    )


# The report's notes that its KV figures are the first vLLM worker's: compare's are every worker's
_ONE_WORKER_NOTES = ("tensor parallel ", "pipeline parallel ")


def _engine_workers(source: MemorySource, report: Report) -> tuple[tuple[int, int, int] | None, str] | None:
    """A vLLM run over several workers: ((workers, their KV bytes, the first's pool) or None where a
    pipeline stage's share was not recorded, the note saying so); None for one worker or no pool."""
    from analyzers.engine_stages import all_workers_pool, pipeline_size

    run = source.meta.get("engine")
    if run is None or report.engine is None or report.engine.status == "refused_start":
        return None
    info = run.info
    tp = info.config.get("tensor_parallel_size")
    tp = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1 else 1
    stages = pipeline_size(info)
    if tp * stages == 1 or not info.kv_cache_bytes:
        return None
    spread = all_workers_pool(info)
    parallel = " x ".join(
        f"{kind} parallel {size}" for kind, size in (("tensor", tp), ("pipeline", stages)) if size > 1
    )
    if spread is None:
        return None, (
            f"{parallel}: KV figures unknown: engine.json describes the first worker's pool alone, and the "
            "other stages' shares were not recorded (runs recorded before kvtrace kept `pipeline_stages`)"
        )
    workers, total = spread
    pool = int(info.kv_cache_bytes)
    return (workers, total, pool), (
        f"{parallel}: the KV figures are the {workers} workers' pools summed ({human_bytes(total)}; "
        f"engine.json describes the first worker's, {human_bytes(pool)}); the device figures (peak "
        "allocated, reserved) are that first worker's"
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
    return fig.requests_aborted  # the report's count


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
    elif not fig.requests_known:
        # The request log is missing (its note says so): its counts are unknown, not 0, as report says them
        figures.update(dict.fromkeys(_FROM_REQUEST_LOG))
    return figures


# The engine figures only engine_requests.jsonl counts: unknown where it is missing (`requests_known`)
_FROM_REQUEST_LOG = ("requests", "failed_requests", "aborted_requests", "preempted_tokens", "output_tokens")


def compare(pairs: list[tuple[MemorySource, Report]], labels: list[str] | None = None) -> Comparison:
    names = labels or [source.path for source, _ in pairs]
    return Comparison(tuple(run_figures(s, r, n) for (s, r), n in zip(pairs, names, strict=True)))


def comparison_to_json(comparison: Comparison) -> dict[str, Any]:
    runs = []
    for run in comparison.runs:
        row = asdict(replace(run, timeline=None))  # the page's to draw, not a figure
        del row["timeline"], row["timed"]
        row["kv_by_step"] = dict(zip(row.pop("step_axis"), row["kv_by_step"], strict=True))
        runs.append(row)
    return {"version": JSON_VERSION, "runs": runs}
