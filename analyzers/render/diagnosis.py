"""A `Diagnosis` as JSON, terminal text or an HTML section. Formatting only: every figure comes from
`analyzers.planning.diagnose`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from analyzers.model import MemorySource, request_at_most
from analyzers.planning.diagnose import Diagnosis, Remedy, StackShare, diagnose
from analyzers.planning.diagnosis import KV_REMEDIES
from analyzers.render.html_text import html_text
from analyzers.run_stop import SIGTERM_SENDERS
from analyzers.summary import Report
from analyzers.units import a_or_an, human_bytes
from kvtrace.errors import printable

__all__ = ["diagnosis_html_for", "diagnosis_to_html", "diagnosis_to_json", "diagnosis_to_text"]

JSON_VERSION = 1


def diagnosis_to_json(diagnosis: Diagnosis) -> dict[str, Any]:
    data = asdict(diagnosis)
    data["top_layers"] = [{"layer": layer, "kv_bytes": nbytes} for layer, nbytes in diagnosis.top_layers]
    if diagnosis.top_cache_layers:  # several caches at that moment: each cache's layer, not their sum
        data["top_layers"] = [
            {"cache": cache, "layer": layer, "kv_bytes": nbytes}
            for cache, layer, nbytes in diagnosis.top_cache_layers
        ]
    del data["top_cache_layers"]
    data["notes"] = list(diagnosis.notes)
    return {"version": JSON_VERSION, **data}


def _first_frames(share: StackShare, count: int = 3) -> str:
    """A stack by its heading (its Python frames, where it has any), innermost first."""
    lines = (share.heading or share.stack).splitlines()
    more = f" (+{len(lines) - count} frames)" if len(lines) > count else ""
    return " <- ".join(lines[:count]) + more


def _crossing_rows(d: Diagnosis) -> list[tuple[str, str]]:
    c = d.budget_crossing
    if c is None:
        return []
    rows = [("budget (device size)", human_bytes(c.bytes))]
    if not c.crossed:
        at_most = " (at most)" if d.peak_leaves_out else ""  # the peak is a lower bound
        return [*rows, (f"headroom at the peak{at_most}", human_bytes(c.headroom_bytes))]
    if c.before_first_step:
        return [*rows, ("already allocated before the first step", human_bytes(c.allocated_after_bytes))]
    if c.at_dump:
        return [*rows, ("allocated at the snapshot's dump", human_bytes(c.allocated_after_bytes))]
    if c.step is not None:  # a bare snapshot or trace may have no steps to name
        where = f"step {c.step} ({c.phase})" + (f", layer {c.layer}" if c.layer is not None else "")
        rows.append(("would run out at", where))
    if c.request_bytes is not None:
        what = f" {c.request_category}" if c.request_category else ""
        request = f"{human_bytes(c.request_bytes)}{what} ({c.request_bytes:,} B)"
        rows.append(("request that would fail", request))
    rows.append(("allocated before it", human_bytes(c.allocated_before_bytes)))
    rows.append(("free on that device", human_bytes(c.bytes - (c.allocated_before_bytes or 0))))
    if c.layer_from:
        rows.append(("layer from", c.layer_from))
    return rows


def _figure_rows(d: Diagnosis) -> list[tuple[str, str]]:
    crossing = _crossing_rows(d)
    rows = _moment_rows(d)
    if d.event == "budget":  # the figures below describe the peak, which has to fit under the budget
        rows = [(f"at the peak: {label.replace(' at this moment', '')}", value) for label, value in rows]
    return crossing + rows


def _moment_rows(d: Diagnosis) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if d.requested_bytes is not None:
        rows.append(("request that failed", f"{human_bytes(d.requested_bytes)} ({d.requested_bytes:,} B)"))
    elif d.segment_bytes is not None:
        rows.append(("request that failed", f"at most {human_bytes(request_at_most(d.segment_bytes))}"))
        rows.append(("segment it needed", f"{human_bytes(d.segment_bytes)} ({d.segment_bytes:,} B)"))
    held = [
        ("allocated", human_bytes(d.allocated_bytes)),
        ("reserved", human_bytes(d.reserved_bytes)),
        ("reserved but unallocated", human_bytes(d.reserved_unallocated_bytes)),
    ]
    if d.private_pool_bytes:  # cached free for CUDA graphs: held, not reusable (PyTorch's message names them)
        pools = human_bytes(d.private_pool_bytes)
        held.insert(1, ("in private pools (CUDA graphs), counted in allocated", pools))
    if d.held_from_message:  # no snapshot: PyTorch's message's figures, to two decimals
        held = [(label, f"about {value} (PyTorch's message)") for label, value in held]
    rows += [*held, ("free on the device", human_bytes(d.free_bytes))]
    if d.limit_bytes is not None:  # a per-process cap: what the allocator could reserve, not the device
        rows += [
            ("per-process limit (PyTorch's 'allowed', 2 decimals)", f"about {human_bytes(d.limit_bytes)}"),
            ("free within the limit (allowed - reserved)", f"about {human_bytes(d.free_within_limit_bytes)}"),
        ]
    largest = "largest free block in reserved segments"
    if d.private_pool_bytes and d.largest_free_block_bytes is not None:  # a snapshot's: theirs left out
        largest += " outside private pools"
    rows.append((largest, human_bytes(d.largest_free_block_bytes)))
    if d.device is not None and not d.device.startswith("cuda"):
        rows = [(label, value) for label, value in rows if value != "-"]  # no allocator figures off CUDA
    verdict = _fragmentation_verdict(d)
    if verdict is not None:
        rows.append(("fragmentation caused it", verdict))
    if d.shortfall_bytes is not None and d.shortfall_bytes > 0:  # a run that fits: its headroom is said
        rows.append(("shortfall to cover", human_bytes(d.shortfall_bytes)))
    if d.kv_bytes is not None:
        share = f" ({d.kv_share:.1%} of allocated)" if d.kv_share is not None else ""
        rows.append(("KV cache at this moment", human_bytes(d.kv_bytes) + share))
    if d.kv_peak_bytes is not None:
        rows.append(("KV peak / final", f"{human_bytes(d.kv_peak_bytes)} / {human_bytes(d.kv_final_bytes)}"))
    if d.batch is not None:  # at the moment's step: the run may end holding more
        label = f"batch x tokens held (end of step {d.step})" if d.step is not None else "batch x tokens held"
        if d.held_step is not None:  # the moment's step was cut: it never ended
            label = f"batch x tokens held (end of step {d.held_step}, the last whole one)"
        elif d.step_cut:  # and no step came before it: what its layers held then
            label = f"batch x tokens held (at this moment; step {d.step} never ended)"
        beams = f" ({d.batch // d.beams} prompts x {d.beams} beams)" if d.beams else ""
        rows.append((label, f"{d.batch} x {d.tokens_held}{beams}"))
    if d.step is not None:
        rows.append(("step", f"{d.step} {d.step_phase or ''}".strip()))
    if d.top_layers:  # live at the moment, a layer's transient copy included
        label = "KV by layer at this moment"
        shares = [f"L{layer} {human_bytes(b)}" for layer, b in d.top_layers]
        if d.kv_layers_live > len(d.top_layers):
            label += f" (the largest {len(d.top_layers)} of {d.kv_layers_live} layers)"
        if d.top_cache_layers:
            label = "KV by cache and layer at this moment"
            shares = [f"cache {cache} L{layer} {human_bytes(b)}" for cache, layer, b in d.top_cache_layers]
        rows.append((label, ", ".join(shares)))
    return rows


def _fragmentation_verdict(d: Diagnosis) -> str | None:
    """Whether fragmentation caused the OOM: where not, what caused it instead (too few free bytes in total)
    or what was large enough (a free block); where the figures show room for a new segment, that they
    cannot tell; without a largest free block (no snapshot), that it may have where the free bytes in total
    reach the request. None where there is no verdict to give (no request, no segments)."""
    request, room, largest = d.requested_bytes, d.reservable_bytes, d.largest_free_block_bytes
    within = " within the limit" if d.limit_bytes is not None else ""
    if d.fragmented is None and d.fragmentation_possible:  # no largest free block: it may have
        return (
            f"maybe: {human_bytes(d.reserved_unallocated_bytes)} reserved but unallocated and "
            f"{human_bytes(room)} free{within or ' on the device'} together reach the request, but without a "
            "snapshot (snapshots=True) no largest free block says whether one did"
        )
    if d.fragmented is None:
        if d.event != "oom" or request is None or room is None or largest is None or room < request:
            return None
        why = (
            "the allowed figure's rounding in PyTorch's message hides how little was left"
            if d.limit_bytes is not None
            else "a per-process limit this input does not give refused it (PyTorch's OOM message names it: "
            '"... allowed")'
        )
        where = within or " on the device"
        return f"cannot tell: {human_bytes(room)} was free{where}, yet the request failed: {why}"
    if d.fragmented:
        return "yes: enough free bytes in total, no block large enough"
    if request is None or (d.reserved_unallocated_bytes or 0) + (room or 0) < request:
        return f"no: not enough free memory in total{within}"
    assert largest is not None  # fragmented is False: the request fitted a free block
    return f"no: a free block of {human_bytes(largest)} in the reserved segments was large enough"


def _headline(d: Diagnosis) -> str:
    where = d.device or "?"
    if d.event == "oom":
        what = f"out of memory on {where}"
        if d.requested_bytes is not None:
            what += f" requesting {human_bytes(d.requested_bytes)}"
        elif d.segment_bytes is not None:
            what += f" requesting at most {human_bytes(request_at_most(d.segment_bytes))}"
        return what + (f": {d.message}" if d.message else "")
    c = d.budget_crossing
    # The figures leave something out: a crossing comes no later, no fit can be told
    later = f" (or earlier: the figures leave out {d.peak_leaves_out})" if d.peak_leaves_out else ""
    if d.event == "budget" and c is not None:
        size = human_bytes(c.bytes)
        if c.before_first_step:
            return (
                f"would run out of memory on {a_or_an(size)} device before the first step (weights and setup)"
            )
        if c.at_dump:
            return (
                f"would run out of memory on {a_or_an(size)} device ({where}): the "
                f"{human_bytes(c.allocated_after_bytes)} allocated when the snapshot was taken exceed it "
                "(its trace holds no allocs or frees: the allocation that crossed it is not seen)"
            )
        layer = f", layer {c.layer}" if c.layer is not None else ""
        what = f" {c.request_category}" if c.request_category else ""
        at = f" at step {c.step} ({c.phase})" if c.step is not None else ""  # a bare snapshot has no steps
        return (
            f"would run out of memory on {a_or_an(size)} device ({where}){at}{layer}{later}: "
            f"{a_or_an(human_bytes(c.request_bytes))}{what} request with "
            f"{human_bytes(c.allocated_before_bytes)} already allocated"
        )
    fits = ""
    if c is not None:
        fits = f"; it fits the {human_bytes(c.bytes)} budget with {human_bytes(c.headroom_bytes)} to spare"
        if d.peak_leaves_out:
            fits = (
                f"; that is {human_bytes(c.headroom_bytes)} under the {human_bytes(c.bytes)} budget, but "
                "whether the run fits cannot be told"
            )
        elif c.partial:
            fits = (
                f"; its KV cache and weights fit the {human_bytes(c.bytes)} budget with "
                f"{human_bytes(c.headroom_bytes)} to spare (no allocator events were recorded: other "
                "allocations unseen)"
            )
    peak = human_bytes(d.allocated_bytes)
    if d.peak_leaves_out:
        peak += f", a lower bound: it leaves out {d.peak_leaves_out}"
    recorded, upto = "no OOM recorded", ""
    if d.unfinished == "died":
        recorded += (
            ", but the run never finished: its process died, perhaps killed for lack of host memory by the "
            "kernel's OOM killer, which leaves no record"
        )
        upto = " up to its last flushed step"
    elif d.unfinished == "terminated":
        recorded += (
            f", but the run never finished: its process got SIGTERM ({SIGTERM_SENDERS}) and was killed "
            "while it wrote the run's end"
        )
        upto = " up to its last step"
    elif d.unfinished == "recording":
        recorded += " so far (the run is still being recorded)"
    if d.before_first_step:
        return (
            f"{recorded}: the recorded block raised {d.before_first_step} before its first step (no "
            f"inference ran); what the run held then on {where}: {peak}{fits}"
        )
    return f"{recorded}; diagnosing the peak{upto} on {where} ({peak}){fits}"


def _remedy_mark(fits: bool | None, saved: int | None = None) -> str:
    """The remedy's mark: "no" for a change that adds memory (a static cache raising the peak) or saves none
    (a static cache for a run whose cache is one), which a run within its budget does not make "fits"; else
    whether it fits."""
    if saved is not None and saved <= 0:
        return "no"
    return {True: "fits", False: "not enough", None: ""}[fits]


def _listed_remedies(d: Diagnosis) -> tuple[list[Remedy], str | None]:
    """The remedies to list one by one, and the line that stands for the KV remedies of an input without KV
    figures (a bare trace or snapshot marking none), or of a run that held no KV at all (a script that
    never generated, a vLLM engine kvtrace could not follow): each would say only that it cannot be priced,
    five or six lines that bury the remedies that are (expandable_segments) and the note that says why the
    run holds none. None where there is nothing to fold. The JSON keeps them all, `saved_bytes` null, for
    scripts that look a remedy up by kind."""
    held_none = d.kv_figures and d.kv_peak_bytes == 0
    if d.kv_figures and not held_none:
        return list(d.remedies), None
    folded = [r for r in d.remedies if r.saved_bytes is None and r.kind in KV_REMEDIES]
    if not folded:
        return list(d.remedies), None
    names = ", ".join(KV_REMEDIES[r.kind] for r in folded)
    why = (
        "no KV cache was held in this run (the KV log shows none; see the notes below)"
        if held_none
        else "this input has no KV figures; record the run with kvtrace.record() for its KV cache, batch "
        "and tokens held"
    )
    line = f"KV remedies ({names}): cannot be priced: {why}"
    return [r for r in d.remedies if r not in folded], line


def diagnosis_to_text(d: Diagnosis) -> str:
    lines = [f"kvtrace diagnose: {printable(str(d.path))} ({d.source_kind})", _headline(d), ""]
    rows = _figure_rows(d)
    width = max(len(label) for label, _ in rows)
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    if d.top_stacks:
        lines += ["", "top allocations by stack (live at this moment):"]
        lines.append(f"  {'bytes':>12}  {'allocs':>6}  stack (innermost first)")
        for share in d.top_stacks:
            count = share.allocations or ""
            lines.append(f"  {human_bytes(share.bytes):>12}  {count:>6}  {_first_frames(share)}")
    # none where the diagnosis prices none (an engine's pool read without its files): a note says why
    listed, folded = _listed_remedies(d)
    lines += ["", "remedies, ranked by what they buy on this run:" if listed else "remedies: none priced"]
    for rank, remedy in enumerate(listed, 1):
        mark = _remedy_mark(remedy.fits, remedy.saved_bytes)
        lines.append(f"  {rank}. [{remedy.kind}{', ' + mark if mark else ''}] {remedy.sentence}")
    if folded is not None:
        lines.append(f"  {folded}")
    lines += [f"note: {printable(note)}" for note in d.notes]
    return "\n".join(lines)


def diagnosis_to_html(d: Diagnosis) -> str:
    """An HTML <section> for the report page (no script: it must not depend on plotly's)."""
    esc = html_text
    figures = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _figure_rows(d))
    stacks = "".join(
        f"<tr><td>{esc(human_bytes(s.bytes))}</td><td>{s.allocations or ''}</td>"
        f"<td><code>{esc(_first_frames(s))}</code></td></tr>"
        for s in d.top_stacks
    )
    listed, folded = _listed_remedies(d)
    remedies = "".join(
        f"<li><b>{esc(r.kind)}</b> {esc(_remedy_mark(r.fits, r.saved_bytes))}: {esc(r.sentence)}</li>"
        for r in listed
    )
    unpriced = f"<p class='note'>{esc(folded)}</p>" if folded is not None else ""
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in d.notes)
    return (
        "<section class='diagnosis' id='kvtrace-diagnosis'>"
        f"<h2>Diagnosis</h2><p>{esc(_headline(d))}</p>"
        f"<table class='summary'>{figures}</table>"
        + (
            f"<h3>Top allocations by stack</h3><table class='stacks'><tr><th>bytes</th><th>allocs</th>"
            f"<th>stack (innermost first)</th></tr>{stacks}</table>"
            if stacks
            else ""
        )
        + f"<h3>Remedies, ranked</h3><ol>{remedies}</ol>{unpriced}{notes}</section>"
    )


def diagnosis_html_for(source: MemorySource, report: Report) -> str:
    """The section `kvtrace report -o` adds when the input holds an OOM."""
    return diagnosis_to_html(diagnose(source, report))
