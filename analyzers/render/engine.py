"""The engine's pool in the report: a JSON object, a few text lines, and an HTML panel. Computes nothing:
the figures come from `analyzers.engine.engine_figures`."""

from __future__ import annotations

from typing import Any

import numpy as np

from analyzers.engine import COMPLETED_REASONS, EngineFigures, EngineRun
from analyzers.render.html_text import html_text
from analyzers.render.plotly_div import figure_div
from analyzers.units import human_bytes


def engine_to_json(fig: EngineFigures) -> dict[str, Any]:
    return {
        "name": fig.name,
        "version": fig.version,
        "status": fig.status,
        "num_blocks": fig.num_blocks,
        "block_size": fig.block_size,
        "bytes_per_block": fig.bytes_per_block,
        "pool_token_capacity": (fig.num_blocks or 0) * (fig.block_size or 0) or None,  # = kv.tokens_held
        "kv_cache_bytes": fig.kv_cache_bytes,
        "kv_dtype": fig.kv_dtype or None,
        "steps": fig.steps,
        "peak_blocks_used": fig.peak_blocks_used,
        "peak_step": fig.peak_step,
        "preemptions": fig.preemptions,
        # null where the request log is missing (`requests_known`): unknown, not 0
        "preempted_tokens": fig.preempted_tokens if fig.requests_known else None,
        "preempted_blocks": fig.preempted_blocks if fig.requests_known else None,
        "recomputed_tokens": fig.recomputed_tokens if fig.requests_known else None,
        "prefix_cache_evicted_blocks": fig.prefix_cache_evicted_blocks,
        "requests": fig.requests if fig.requests_known else None,
        "prompts": fig.prompts,
        "finish_reasons": fig.finish_reasons if fig.requests_known else None,
        "requests_aborted": fig.requests_aborted if fig.requests_known else None,
        "first_preemption_step": fig.first_preemption_step,
        "preemptions_by_request": fig.preemptions_by_request if fig.requests_known else None,
    }


def engine_text_lines(fig: EngineFigures) -> list[str]:
    name = f"{fig.name} {fig.version}".strip()
    if fig.status == "refused_start":
        return [f"  {name}: the engine refused to start for lack of KV memory (see `kvtrace diagnose`)"]
    kept = kept_back_phrase(fig)
    lines = [
        f"  {name} KV pool: {fig.num_blocks:,} blocks of {fig.block_size} tokens, {pool_phrase(fig)}, "
        f"{fig.steps:,} engine steps, {requests_phrase(fig)}{f'; {kept}' if kept else ''}"
    ]
    if fig.num_blocks and fig.peak_step is None:  # the pool was made, and the run ended before a step
        lines.append(f"    {peak_phrase(fig)}")
    elif fig.num_blocks:
        lines.append(
            f"    peak {peak_phrase(fig)}; prefix-cache blocks evicted: {fig.prefix_cache_evicted_blocks:,}"
        )
    see = "  (see `kvtrace diagnose`)" if fig.preemptions else ""
    lines.append(f"    preemptions: {preemptions_phrase(fig)}{see}")
    return lines


def kept_back_phrase(fig: EngineFigures) -> str:
    """What the pool's block count holds that no request gets, or "": `2 of the 10 blocks are transformers'
    trash sectors, never handed out`, so that "10 blocks" beside "8 usable" is explained where both are
    read."""
    if not fig.num_blocks or fig.blocks_reserved <= 0:
        return ""
    reserved = fig.blocks_reserved
    if fig.name == "transformers-cb":
        what = "transformers' trash sectors" if reserved > 1 else "a transformers trash sector"
    elif fig.name == "vllm":
        what = "vLLM's null block" if reserved == 1 else "vLLM's null blocks"
    else:
        what = "kept back by the engine"
    verb = "are" if reserved > 1 else "is"
    return f"{reserved:,} of the {fig.num_blocks:,} blocks {verb} {what}, never handed out"


def pool_phrase(fig: EngineFigures) -> str:
    """The pool's bytes and KV dtype: `1.00 MiB (bfloat16)`."""
    return f"{human_bytes(fig.kv_cache_bytes)} ({fig.kv_dtype or 'KV dtype not recorded'})"


def peak_phrase(fig: EngineFigures) -> str:
    """The pool's peak against what requests could take, as the text report and the page both say it:
    `15 of 15 usable blocks used (100%, counted while each step ran) at step 26`. Usable leaves out what the
    engine keeps back (vLLM's null block, transformers' trash sectors), so a full pool reads 100%."""
    usable = max((fig.num_blocks or 0) - fig.blocks_reserved, 1)
    if fig.peak_step is None:
        return (
            f"no engine step ran: the run ended before its first step, none of {usable:,} usable blocks used"
        )
    share = 100.0 * fig.peak_blocks_used / usable
    counted = "while each step ran" if fig.peak_in_step else "after each step"
    return (
        f"{fig.peak_blocks_used:,} of {usable:,} usable blocks used ({share:.0f}%, counted {counted}) "
        f"at step {fig.peak_step}"
    )


def preemptions_phrase(fig: EngineFigures) -> str:
    """`2 (first at step 26), 128 tokens dropped, 128 recomputed`, or `none`: what preempting cost the run
    (the tokens recomputed are what it paid again), in the text report's and the page's words."""
    if not fig.preemptions:
        return "none"
    if not fig.requests_known:  # the request log is missing: what the preemptions dropped is not known
        return f"{fig.preemptions} (first at step {fig.first_preemption_step}), tokens dropped unknown"
    return (
        f"{fig.preemptions} (first at step {fig.first_preemption_step}), "
        f"{fig.preempted_tokens:,} tokens dropped, {fig.recomputed_tokens:,} recomputed"
    )


def requests_phrase(fig: EngineFigures) -> str:
    """The requests, and how they ended when some did not complete: `8 requests (6 completed, 2 aborted)`.
    Under parallel sampling, the prompts the caller sent too: `12 requests (3 prompts sampled n=4)`."""
    if not fig.requests_known:
        return "requests unknown (no request log)"
    reasons = fig.finish_reasons
    phrase = f"{fig.requests} requests"
    sampled = ""
    if fig.prompts is not None:
        n = "/".join(str(count) for count in fig.samples_per_prompt)
        sampled = f"{fig.prompts} prompt{'s' if fig.prompts != 1 else ''}"
        some = f", {fig.prompts_sampled}" if fig.prompts_sampled != fig.prompts else ""
        sampled += f"{some} sampled n={n}"
    if not set(reasons) - set(COMPLETED_REASONS):
        return f"{phrase} ({sampled})" if sampled else phrase
    parts = [f"{fig.requests_completed} completed"]
    named = {"abort": "aborted", "error": "failed"}
    parts += [f"{n} {named.get(r, r)}" for r, n in sorted(reasons.items()) if r not in COMPLETED_REASONS]
    return f"{phrase} ({sampled + '; ' if sampled else ''}{', '.join(parts)})"


def peak_when(fig: EngineFigures) -> str:
    """When the pool's use peaked: "step N", or "before its first step" for a run without engine steps."""
    return "before its first step" if fig.peak_step is None else f"step {fig.peak_step}"


def no_memory_timeline(run: EngineRun | None, fig: EngineFigures | None, memory_events: int) -> str | None:
    """Why an engine's run gets no memory timeline, or None where it gets one. An engine allocates its pool
    once, before its first step: without a profiler trace, that allocation is the run's one memory event, and
    a chart of one point would only mislead. The HTML report and the TensorBoard tab both say this."""
    if run is None or fig is None or memory_events > 1:
        return None
    name = f"{fig.name} {fig.version}".strip()
    if fig.status == "refused_start":
        return f"No memory timeline and no pool chart: {name} refused to start, and no engine step ran."
    what = "has no memory event" if memory_events == 0 else "has one memory event, its KV pool's allocation"
    if len(run.steps) == 0:
        return f"No memory timeline and no pool chart: this {name} run {what}, and no engine step ran."
    preempted = f"{fig.preemptions} preemption{'s' if fig.preemptions != 1 else ''}"
    return (
        f"No memory timeline: this {name} run {what} (before its first engine step). The KV pool chart below "
        f"is its timeline: blocks used against the total over {fig.steps:,} engine steps, {preempted}."
    )


def engine_pool_title(fig: EngineFigures) -> str:
    return f"{fig.name} {fig.version} KV pool".strip()


def blocks_row(fig: EngineFigures) -> str:
    """The page's "blocks" cell: `10 blocks of 4 tokens (2 of the 10 blocks are transformers' trash sectors,
    never handed out)`, the text report's words (it read "10 of 4 tokens", like a fraction)."""
    kept = kept_back_phrase(fig)
    return f"{fig.num_blocks:,} blocks of {fig.block_size} tokens" + (f" ({kept})" if kept else "")


def engine_pool_rows(fig: EngineFigures) -> list[tuple[str, str]]:
    """The pool's table beside its chart: (label, figure) rows, the text report's engine lines cell by cell
    (the same phrases), so that a reader of the page alone misses none of them."""
    return [
        ("blocks", blocks_row(fig)),
        ("pool", pool_phrase(fig)),
        ("engine steps", f"{fig.steps:,}"),
        ("requests", requests_phrase(fig)),
        ("peak", peak_phrase(fig)),
        ("preemptions", preemptions_phrase(fig)),
        ("prefix-cache blocks evicted", f"{fig.prefix_cache_evicted_blocks:,}"),
    ]


def engine_html_section(run: EngineRun, fig: EngineFigures) -> str:
    """The pool's table and chart (`engine_pool_figure`). A pool made by a run that ended before its first
    step gets its table alone, as the text report gives its lines; a refused start has no pool to show."""
    fig_plot = engine_pool_figure(run)
    if fig_plot is None and (fig.status == "refused_start" or not fig.num_blocks):
        return ""
    div = figure_div(fig_plot, "kvtrace-engine-pool") if fig_plot is not None else ""
    title = html_text(engine_pool_title(fig))
    table = "".join(f"<tr><th>{k}</th><td>{html_text(v)}</td></tr>" for k, v in engine_pool_rows(fig))
    return f"<h2>{title}</h2><table class='summary'>{table}</table>{div}"


def engine_pool_figure(run: EngineRun) -> Any:
    """Pool occupancy over engine steps (blocks used while each step ran, and cached, against the total,
    with preemption and prefix-eviction markers) and the blocks each request held, one lane per request:
    a plotly figure, or None for a run without engine steps. The HTML report and the TensorBoard tab draw
    this one figure."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    steps = run.steps
    if len(steps) == 0:
        return None
    x = steps["step"]
    lanes = _request_lanes(run)
    rows = 2 if lanes[0] else 1
    fig_plot = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        row_heights=[0.55, 0.45][:rows],
        subplot_titles=["KV pool: blocks used over engine steps", "Blocks held per request"][:rows],
    )
    line = {"shape": "hv"}
    # What the requests held while each step ran, the report's peak among them: after the step, those that
    # finished in it hold none (a run of max_tokens=1 requests would draw 0 throughout). Older logs say
    # only what was held after each step.
    used = steps.blocks_held()
    held: dict[str, Any]
    if steps.in_step:
        held = {
            "name": "blocks used while the step ran",
            "customdata": steps["blocks_used"],
            "hovertemplate": "step %{x}: %{y} blocks held while it ran, %{customdata} after it"
            "<extra></extra>",
        }
    else:
        held = {
            "name": "blocks used after each step",
            "hovertemplate": "step %{x}: %{y} blocks held after it<extra></extra>",
        }
    fig_plot.add_trace(go.Scatter(x=x, y=used, line={**line, "color": "#d62728"}, **held), 1, 1)
    fig_plot.add_trace(
        go.Scatter(
            x=x, y=steps["blocks_cached"], name="free, prefix-cached", line={**line, "color": "#ff9896"}
        ),
        1,
        1,
    )
    fig_plot.add_trace(
        go.Scatter(
            x=x, y=steps["blocks_total"], name="blocks total", line={**line, "color": "black", "dash": "dash"}
        ),
        1,
        1,
    )
    top = float(max(steps["blocks_total"].max(), used.max(), 1))
    preempt_rows = [i for i, ids in enumerate(steps.preempted) if ids]
    if preempt_rows:
        fig_plot.add_trace(
            go.Scatter(
                x=[int(x[i]) for i in preempt_rows],
                y=[top * 1.05] * len(preempt_rows),
                mode="markers",
                name="preemption",
                marker={"symbol": "x", "size": 10, "color": "red"},
                text=[", ".join(steps.preempted[i]) for i in preempt_rows],
                hovertemplate="step %{x}: preempted %{text}<extra></extra>",
            ),
            1,
            1,
        )
    evicted = np.nonzero(steps["prefix_evicted_blocks"])[0]
    if len(evicted):
        fig_plot.add_trace(
            go.Scatter(
                x=x[evicted],
                y=[top * 1.1] * len(evicted),
                mode="markers",
                name="prefix-cache eviction",
                marker={"symbol": "triangle-down", "size": 9, "color": "#9467bd"},
                text=[f"{int(n)} blocks" for n in steps["prefix_evicted_blocks"][evicted]],
                hovertemplate="step %{x}: %{text} evicted<extra></extra>",
            ),
            1,
            1,
        )
    fig_plot.update_yaxes(title_text="blocks", row=1, col=1)
    if rows == 2:
        ids, z = lanes
        fig_plot.add_trace(
            go.Heatmap(
                z=z,
                x=x,
                y=[f"req {rid}" for rid in ids],
                colorscale="Reds",
                colorbar={"title": "blocks", "len": 0.4, "y": 0.2},
                hovertemplate="step %{x}<br>%{y}: %{z} blocks<extra></extra>",
                name="blocks per request",
            ),
            2,
            1,
        )
        fig_plot.update_yaxes(autorange="reversed", row=2, col=1)
    fig_plot.update_xaxes(title_text="engine step", row=rows, col=1)
    fig_plot.update_layout(
        height=420 + 22 * len(lanes[0]) if rows == 2 else 420,
        template="plotly_white",
        legend={"orientation": "h"},
        margin={"t": 50, "l": 80, "r": 30},
    )
    return fig_plot


def _request_lanes(run: EngineRun) -> tuple[list[str], np.ndarray]:
    """Blocks each request held in each step: a (requests x steps) grid, requests in order of first
    appearance. As the pool's curve: a request that finished in a step held its blocks while it ran, where
    the step log says what steps held then (older logs: at the end of each step, when it held none)."""
    step_ids = [int(s) for s in run.steps["step"]]
    column = {s: i for i, s in enumerate(step_ids)}
    order: list[str] = []
    for e in run.requests:
        if e.request_id not in order:
            order.append(e.request_id)
    z = np.zeros((len(order), len(step_ids)), dtype=np.int64)
    row = {rid: i for i, rid in enumerate(order)}
    last: dict[str, tuple[int, int]] = {}  # request -> (column, blocks) from its last event
    for e in run.requests:
        col = column.get(e.step)
        if col is None:
            # an event at a step the step log lacks: put it at the next logged step
            col = int(np.searchsorted(np.asarray(step_ids), e.step))
            if col >= len(step_ids):
                continue
        blocks = 0 if e.event == "finished" else e.blocks
        r = row[e.request_id]
        prev = last.get(e.request_id)
        if prev is not None and e.event == "finished" and run.steps.in_step:
            z[r, prev[0] : col + 1] = prev[1]  # through the step it finished in: free from the next
            last[e.request_id] = (col + 1, 0)
            continue
        if prev is not None:
            z[r, prev[0] : col] = prev[1]
        z[r, col] = blocks
        last[e.request_id] = (col, blocks)
    for rid, (col, blocks) in last.items():
        z[row[rid], col:] = blocks
    return order, z
