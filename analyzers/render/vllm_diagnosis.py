"""A vLLM diagnosis (refused start, preemptions, or a run the pool served whole) as text, JSON and the report
page's HTML section. Computes nothing beyond a share for its sentence."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from analyzers.engine import EngineRun, HeldRequest
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, RefusedDiagnosis
from analyzers.planning.vllm_plan import readable_bytes
from analyzers.render.html_text import html_text
from kvtrace.errors import printable

if TYPE_CHECKING:
    from analyzers.planning.engine_run_diagnosis import Unfinished


_INTERNAL = ("pool_demand",)  # the diagnosis's own demand, for a pool priced elsewhere: its figures are above


def vllm_diagnosis_to_json(d: RefusedDiagnosis | PreemptionDiagnosis) -> dict[str, Any]:
    return {"engine": "vllm", **{k: v for k, v in asdict(d).items() if k not in _INTERNAL}}


def _remedy_lines(d: RefusedDiagnosis | PreemptionDiagnosis) -> list[str]:
    marks = {True: "[fits]", False: "[no]  ", None: "[?]   "}
    return [f"  {marks[r.fits]} {r.sentence}" for r in d.remedies]


def _refused_headline(d: RefusedDiagnosis) -> str:
    if d.kind == "node_memory" and (d.requested_bytes or 0) <= 0:
        return f"vLLM refused to start: {d.requested_by}, which leaves no memory for the KV pool"
    if d.kind == "node_memory":
        return (
            f"vLLM refused to start: the KV pool asked ({readable_bytes(d.requested_bytes or 0)}) is "
            f"more than the memory node had free ({readable_bytes(d.available_bytes)})"
        )
    return f"vLLM refused to start, not enough KV memory for max_model_len {d.max_model_len:,}"


def _node_figures(d: RefusedDiagnosis) -> list[tuple[str, str, str]]:
    """(label, bytes, how they are made up) of a pool the node could not hold: asked, free, and what one
    request of max_model_len and max_num_seqs of them take."""
    total = f"of {readable_bytes(d.node_total_bytes)}" if d.node_total_bytes else ""
    return [
        ("asked", readable_bytes(d.requested_bytes or 0), d.requested_by),
        ("node free", readable_bytes(d.available_bytes), total),
        (
            "1 request",
            readable_bytes(d.needed_bytes),
            f"max_model_len {d.max_model_len:,}: {d.needed_blocks:,} blocks x "
            f"{readable_bytes(d.bytes_per_block)}",
        ),
        (
            "full batch",
            readable_bytes(d.max_num_seqs_bytes or 0),
            "max_num_seqs such requests + vLLM's null block",
        ),
    ]


def _refused_figures(d: RefusedDiagnosis) -> list[tuple[str, str, str]]:
    """(label, bytes, how they are made up) of what one request needs and what vLLM had."""
    if d.kind == "node_memory":
        return _node_figures(d)
    groups = d.kv_groups
    layers = groups.layers_per_group if groups is not None else d.num_layers
    layer_bytes = d.bytes_per_block // max(layers, 1)
    over = f"all {layers} layers" if layers == d.num_layers else f"the {layers} layers of a group"
    window = ""
    if groups is not None and groups.window is not None:
        window = (
            f"; the sliding layers hold their last {groups.window - 1:,} tokens and the "
            f"{d.max_in_flight_tokens:,} in flight"
        )
    return [
        (
            "needed",
            readable_bytes(d.needed_bytes),
            f"{d.needed_blocks:,} blocks x {readable_bytes(d.bytes_per_block)}; a block: {d.block_size} "
            f"tokens over {over}, {readable_bytes(layer_bytes)} a layer{window}",
        ),
        ("available", readable_bytes(d.available_bytes), f"{d.available_bytes:,} B"),
        ("short by", readable_bytes(d.needed_bytes - d.available_bytes), ""),
    ]


def _largest_that_fits(d: RefusedDiagnosis) -> str:
    if d.vllm_estimated_max_model_len is None:
        vllm_estimate = ""
    elif d.vllm_estimated_max_model_len == d.estimated_max_model_len:
        vllm_estimate = " (vLLM's own estimate)"
    else:
        vllm_estimate = f" (vLLM's own estimate: {d.vllm_estimated_max_model_len:,})"
    return f"{d.estimated_max_model_len:,}{vllm_estimate}"


def _refused_text(d: RefusedDiagnosis) -> list[str]:
    lines = [f"kvtrace diagnose: {printable(str(d.path))}: {_refused_headline(d)}"]
    lines += [
        f"  {label:<10} {value:>12}" + (f"  ({detail})" if detail else "")
        for label, value, detail in _refused_figures(d)
    ]
    if d.kind != "node_memory" or d.estimated_max_model_len < d.max_model_len:
        lines.append(f"  largest max_model_len that fits: {_largest_that_fits(d)}")
    if d.message:
        lines.append(f"  vLLM said: {d.message.strip()}")  # whole: it is what is being diagnosed
    lines.append("Remedies, in vLLM's settings:")
    return lines + _remedy_lines(d)


def refused_to_html(d: RefusedDiagnosis) -> str:
    """The refusal's diagnosis as the report page's <section>, with the figures and remedies of `kvtrace
    diagnose`: a refused start has no chart and no memory to show, so this is the page's answer."""
    rows = [
        (label, f"{value} ({detail})" if detail else value) for label, value, detail in _refused_figures(d)
    ]
    if d.kind != "node_memory" or d.estimated_max_model_len < d.max_model_len:
        rows.append(("largest max_model_len that fits", _largest_that_fits(d)))
    if d.message:
        rows.append(("vLLM said", d.message.strip()))
    return _section(_refused_headline(d), rows, "", "Remedies, in vLLM's settings", d)


def _section(
    headline: str,
    rows: list[tuple[str, str]],
    middle: str,
    remedies_title: str,
    d: RefusedDiagnosis | PreemptionDiagnosis,
) -> str:
    """The page's diagnosis <section>: headline, figures, `middle` (more HTML), remedies, notes."""
    esc = html_text
    figures = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    marks = {True: "[fits]", False: "[no]", None: "[?]"}
    remedies = "".join(
        f"<li><b>{esc(r.knob)}</b> {marks[r.fits]}: {esc(r.sentence)}</li>" for r in d.remedies
    )
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in d.notes)
    return (
        "<section class='diagnosis' id='kvtrace-diagnosis'>"
        f"<h2>Diagnosis</h2><p>{esc(headline)}</p><table class='summary'>{figures}</table>{middle}"
        f"<h3>{esc(remedies_title)}</h3><ol>{remedies}</ol>{notes}</section>"
    )


def _preemption_headline(d: PreemptionDiagnosis) -> str:
    return (
        f"vLLM preempted {d.preemptions} time(s), {d.preempted_tokens:,} KV tokens dropped, "
        f"{d.recomputed_tokens:,} recomputed"
    )


def _pool(d: PreemptionDiagnosis) -> str:
    return (
        f"{d.num_blocks:,} blocks of {d.block_size} tokens ({d.usable_blocks:,} usable), "
        f"{readable_bytes(d.kv_cache_bytes)}, {readable_bytes(d.bytes_per_block)} a block"
    )


def _in_flight(held: HeldRequest) -> str:
    """Tokens a request's blocks hold beyond its prompt and output: async scheduling's token in flight."""
    return f" + {held.in_flight:,} in flight" if held.in_flight else ""


def _held_as_of(d: PreemptionDiagnosis, held: HeldRequest) -> str:
    return "" if held.as_of_step == d.first_preemption_step else f", as of step {held.as_of_step}"


def _demand(d: PreemptionDiagnosis) -> str:
    """What the requests would have needed; "at least" where the run stopped with requests unfinished
    counted at the lengths they had reached, not their final ones; at most where each was counted at its
    max_tokens, the most it may reach."""
    short = d.unfinished_requests
    asked = short and d.asked_requests >= short
    bound = "at least " if short and not asked else ""
    left = ""
    if asked:
        left = f", counting the {short} unfinished request(s) at their max_tokens"
    elif short and d.asked_requests:
        left = (
            f", counting {d.asked_requests} of the {short} unfinished request(s) at their max_tokens and the "
            f"other {short - d.asked_requests} at the lengths they had reached"
        )
    elif short:
        left = f", counting the {short} unfinished request(s) at the lengths they had reached"
    return (
        f"{bound}{d.demand_bound_blocks:,} blocks (+{d.blocks_needed - d.demand_bound_blocks} null = "
        f"{d.blocks_needed:,}){left}; on the recorded schedule it peaked at {d.recorded_peak_demand_blocks:,}"
    )


def preemption_to_html(d: PreemptionDiagnosis) -> str:
    """The preemptions' diagnosis as the report page's <section>, with the figures and remedies of `kvtrace
    diagnose`: what the pool held when vLLM first preempted, what the requests needed, what to change."""
    esc = html_text
    held = sum(h.blocks for h in d.held_at_first)
    rows = [
        ("pool", _pool(d)),
        (
            f"held at the first preemption (step {d.first_preemption_step})",
            f"{held:,} of {d.usable_blocks:,} usable blocks, {len(d.held_at_first)} requests",
        ),
        ("demand if nothing were preempted", _demand(d)),
        ("model", d.model),
    ]
    requests = "".join(
        f"<tr><td>{esc(h.request_id)}</td><td>{h.blocks:,}</td><td>{h.tokens:,}</td>"
        f"<td>prompt {h.prompt_tokens:,}, output {h.output_tokens:,}{esc(_in_flight(h))}"
        f"{esc(_held_as_of(d, h))}</td></tr>"
        for h in d.held_at_first
    )
    middle = (
        f"<h3>The pool at the first preemption (step {d.first_preemption_step})</h3><table class='held'>"
        f"<tr><th>request</th><th>blocks</th><th>tokens</th><th></th></tr>{requests}"
        f"<tr><td>total</td><td>{held:,}</td><td></td><td>{esc(_listed_again(d, held)[2:])}</td></tr></table>"
    )
    return _section(_preemption_headline(d), rows, middle, "Would have avoided every preemption", d)


def _listed_again(d: PreemptionDiagnosis, total: int) -> str:
    """After the held table's total, where parallel samples list their prompt's shared blocks each."""
    again = d.held_listed_again_blocks
    if not again:
        return ""
    shared = f"{again:,} are prompts' blocks their samples share, listed in each"
    return f", {total - again:,} in the pool: {shared}"


# A request id longer than this is elided in the middle in the text's table (a served run's are
# `0_cmpl-<32 hex digits>-0`: 41 characters); the JSON and HTML keep them whole
ID_WIDTH = 20


def _short_ids(ids: list[str]) -> list[str]:
    """The ids as the text's table shows them: printable, and over ID_WIDTH characters their head and tail
    around "...", which tell a served run's ids apart (the head is the prompt's index, the tail its id's
    end); whole where two would read the same."""
    shown = [printable(rid) for rid in ids]
    head = (ID_WIDTH - 3) // 2
    tail = ID_WIDTH - 3 - head
    short = [rid if len(rid) <= ID_WIDTH else f"{rid[:head]}...{rid[-tail:]}" for rid in shown]
    return short if len(set(short)) == len(set(shown)) else shown


def _preemption_text(d: PreemptionDiagnosis) -> list[str]:
    lines = [
        f"kvtrace diagnose: {printable(str(d.path))}: {_preemption_headline(d)}",
        f"  pool: {_pool(d)}",
        f"  at the first preemption (step {d.first_preemption_step}) the pool held:",
    ]
    ids = _short_ids([held.request_id for held in d.held_at_first])
    width = max([10, *(len(rid) for rid in ids)])
    for held, rid in zip(d.held_at_first, ids, strict=True):
        lines.append(
            f"    request {rid:<{width}} {held.blocks:>5} blocks {held.tokens:>7,} tokens "
            f"(prompt {held.prompt_tokens:,}, output {held.output_tokens:,}{_in_flight(held)}"
            f"{_held_as_of(d, held)})"
        )
    total = sum(h.blocks for h in d.held_at_first)
    lines.append(f"    total   {'':<{width}} {total:>5} blocks{_listed_again(d, total)}")
    lines += [f"  demand if nothing were preempted: {_demand(d)}", f"  model: {d.model}"]
    lines += [f"  note: {printable(n)}" for n in d.notes]
    lines.append("Would have avoided every preemption:")
    return lines + _remedy_lines(d)


def vllm_diagnosis_to_text(d: RefusedDiagnosis | PreemptionDiagnosis) -> str:
    lines = _refused_text(d) if isinstance(d, RefusedDiagnosis) else _preemption_text(d)
    lines += [f"  note: {printable(n)}" for n in d.notes] if isinstance(d, RefusedDiagnosis) else []
    return "\n".join(lines)


def ran_fine_to_json(
    run: EngineRun, over_budget: bool = False, unfinished: Unfinished | None = None
) -> dict[str, Any]:
    """A vLLM run that neither preempted nor was refused: no request ran short of blocks. Its pool was
    allocated at start, so a shorter context or a smaller batch would not have changed its size. What
    `kvtrace diagnose` says of it (`sentence`), and the report page beside the budget it crossed
    (`over_budget`: then "nothing ran out" is not said). A run that stopped short with requests unfinished
    (`unfinished`, analyzers.planning.engine_run_diagnosis) had not reached their final lengths: whether
    the pool would have held them is unknown, as transformers' continuous batching says (kvtrace diagnose),
    unless each one's max_tokens is known: then the most they need at once says it holds them, or that vLLM
    may preempt (`asked_demand_blocks`, in the JSON of a run that stopped short)."""
    from analyzers.engine import engine_figures
    from analyzers.planning.vllm_diagnose import NULL_BLOCKS
    from analyzers.render.engine import peak_when  # numpy: not for diagnose's other paths

    figures = engine_figures(run)
    usable = max((figures.num_blocks or 0) - NULL_BLOCKS, 0)
    share = f" ({100 * figures.peak_blocks_used / usable:.0f}% of the {usable:,} usable)" if usable else ""
    worst = unfinished.asked_demand_blocks if unfinished is not None else None
    if unfinished is not None and worst is not None:
        # each unfinished request at its max_tokens: the most they may need at once, an upper bound
        stopped = (
            f"vLLM started normally and preempted nothing before the run stopped, with {unfinished.clause()}"
        )
        at_most = f"counted at their max_tokens, its requests need at most {worst:,} blocks at once"
        if worst <= usable:
            outcome = (
                f"{stopped}; {at_most}, which the {usable:,} usable blocks hold: the pool suffices, and none "
                "would have been preempted had it run to its end."
            )
        else:
            outcome = (
                f"{stopped}; {at_most}, more than the {usable:,} usable blocks: vLLM may preempt before they "
                f"finish (a pool of {worst + NULL_BLOCKS:,} blocks, with vLLM's null block, holds them)."
            )
    elif unfinished is not None:
        outcome = (
            "vLLM started normally and preempted nothing before the run stopped, with "
            f"{unfinished.clause()}: whether the pool would have sufficed cannot be told from this run."
        )
    else:
        outcome = f"vLLM preempted nothing and started normally{'' if over_budget else ': nothing ran out'}."
    sentence = (
        f"{outcome} Peak "
        f"{figures.peak_blocks_used:,} blocks used{share} at {peak_when(figures)}; the pool is allocated at "
        f"start, so context and batch do not change its size (size one: kvtrace plan --engine vllm "
        f"--from-run {run.path})."
    )
    return {
        "kind": "no_preemption",
        "path": run.path,
        "engine": figures.name,  # as every other engine diagnosis: scripts tell the engine by this key
        "num_blocks": figures.num_blocks,
        "usable_blocks": usable,
        "peak_blocks_used": figures.peak_blocks_used,
        "peak_step": figures.peak_step,
        # a run that stopped short: the most blocks its requests need at once, each unfinished one at its
        # max_tokens; None where one's is unknown
        **({"asked_demand_blocks": worst} if unfinished is not None else {}),
        "sentence": sentence,
    }


def preempted_unpriced_to_json(run: EngineRun) -> dict[str, Any]:
    """A vLLM run that preempted and whose request log is missing (`EngineRun.requests_missing`): how often
    and when, from its steps, and no remedy, as every remedy is priced on the requests' lengths. Read as no
    requests, a pool of one block "fitted" a run that preempted 6 times."""
    from analyzers.engine import engine_figures
    from analyzers.planning.vllm_diagnose import NULL_BLOCKS
    from analyzers.render.engine import peak_when

    figures = engine_figures(run)
    usable = max((figures.num_blocks or 0) - NULL_BLOCKS, 0)
    sentence = (
        f"vLLM preempted {figures.preemptions} time(s) (first at step {figures.first_preemption_step}); peak "
        f"{figures.peak_blocks_used:,} of {usable:,} usable blocks at {peak_when(figures)}. Without its "
        "request log, what the requests needed, and so every remedy, cannot be priced from this run."
    )
    return {
        "kind": "preemption",
        "path": run.path,
        "engine": figures.name,
        "num_blocks": figures.num_blocks,
        "usable_blocks": usable,
        "block_size": figures.block_size,
        "preemptions": figures.preemptions,
        "first_preemption_step": figures.first_preemption_step,
        "peak_blocks_used": figures.peak_blocks_used,
        "requests": None,  # unknown: not 0
        "remedies": [],
        "sentence": sentence,
    }


def ran_fine_to_html(result: dict[str, Any]) -> str:
    """`ran_fine_to_json`'s sentence as the report page's diagnosis <section>."""
    return (
        "<section class='diagnosis' id='kvtrace-diagnosis'>"
        f"<h2>Diagnosis</h2><p>{html_text(result['sentence'])}</p></section>"
    )
