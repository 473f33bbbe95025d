"""The report as a terminal summary."""

from __future__ import annotations

from typing import Any

from analyzers.caches import (
    MAX_CACHES_AS_ROWS,
    biggest_caches,
    layer_list,
    layer_tokens,
    layer_tokens_cell,
    layers_holding,
    layers_over_caches,
    model_kv_layers,
    rows_name_caches,
)
from analyzers.model import request_at_most
from analyzers.render.json import METHOD_LABELS, NO_KV_HINT, allocated_over, size_basis_said
from analyzers.summary import KvSummary, Report
from analyzers.units import a_or_an, human_bytes, times
from kvtrace.errors import printable


def _torch_categories_lines(at_peak: dict[str, int] | None, peak: int) -> list[str]:
    """A memory timeline's other at the peak in torch.profiler's own categories (PARAMETER is the weights
    line above), largest first, as its users read their memory."""
    if not at_peak:
        return []
    lines = ["      of which, by torch.profiler's category:"]
    for name, value in at_peak.items():
        if name != "PARAMETER":
            lines.append(f"        {name:<16} {human_bytes(value):>12}  {_share(value, peak)}")
    return lines if len(lines) > 1 else []


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def _buffer_slots(kv: Any) -> str:
    """What the measured bytes per token of preallocated buffers divide by (their slots), and what the
    tokens written hold each: the buffers' bytes do not follow them."""
    room = f"{kv.capacity_tokens} positions x {kv.capacity_rows} {'row' if kv.capacity_rows == 1 else 'rows'}"
    if kv.capacity_of == "static_cache":
        slots = f"the StaticCache's {room} (max_cache_len x batch)"
    elif kv.capacity_of == "tracked":
        slots = f"the {room} of the preallocated tensor behind the tracked views (max_seq x batch)"
    else:
        slots = f"the buffers' {room} (max_seq_len x max_batch_size)"
    held = next((c.final_bytes for c in kv.caches if c.main), kv.final_bytes)
    if not kv.token_rows or not held:
        return slots
    rows = "row" if kv.batch == 1 else "rows"
    per_written = held / kv.token_rows
    written = f"{kv.tokens_held:,} tokens x {kv.batch:,} {rows}"
    return f"{slots}; the {written} written hold {per_written:,.1f} each"


def _tokens_measured_over(kv: KvSummary, report: Report) -> str:
    """What the measured bytes per token of a cache that grows with its tokens divide by: its tokens x
    rows (a cache of preallocated slots divides by those: `_buffer_slots`)."""
    held = (
        f"{kv.tokens_held:,} tokens x {kv.batch:,} {'row' if kv.batch == 1 else 'rows'}"
        if kv.batch is not None or report.engine is None
        else f"the pool's capacity of {kv.tokens_held:,} tokens"
    )
    if kv.token_rows and kv.tokens_held and kv.batch and kv.token_rows != kv.tokens_held * kv.batch:
        # data-parallel ranks holding different tokens: the rows are not all as full as the fullest
        held = f"{kv.token_rows:,} tokens over {kv.batch:,} rows, up to {kv.tokens_held:,} a row"
    main_layers = [
        layer
        for layer in kv.per_layer
        if layer.cache == kv.main_cache and layer.tokens and layer.k_bytes + layer.v_bytes
    ]
    held_tokens = {tokens for layer in main_layers for tokens in layer_tokens(layer)}
    if len(held_tokens) > 1 and kv.batch:  # a sliding window's layers hold fewer
        # a run cut between a layer's K and V updates: K holds a token more than V
        split = any(len(layer_tokens(layer)) > 1 for layer in main_layers)
        whose = (
            "each layer's K and V bytes over their own tokens"
            if split
            else "each layer's bytes over its own tokens"
        )
        held = (
            f"{whose}, {min(held_tokens)} to {max(held_tokens)} a row, "
            f"x {kv.batch} {'row' if kv.batch == 1 else 'rows'}"
        )
    holding = len(layers_holding(kv.per_layer, kv.main_cache))
    model_layers = model_kv_layers(report.geometry)
    if model_layers and 0 < holding < model_layers and report.engine is None:
        # a run that stopped in its first step before the last layers held KV: the arithmetic counts them
        held += f", on the {holding:,} of the model's {model_layers:,} KV layers holding KV at the end"
    return held


def _cache_line(cache: Any) -> str:
    per_token = cache.bytes_per_token_measured
    role = " main" if cache.main else ""
    figures = (
        f"{cache.layers} layers, {human_bytes(cache.final_bytes)} held, "
        f"{cache.tokens:,} tokens x {cache.rows or '-'} rows"
    )
    if per_token is not None:
        figures += f", {per_token:,.1f} bytes per token"
    if cache.cross_attention_of is not None:
        layers = layer_list(cache.cross_layers or [])
        of = cache.cross_attention_of
        figures += f", cross-attention KV of the image(s) in {layers} of cache {of}, not per token"
    elif cache.role is not None:
        kind = "cross" if cache.role == "cross_attention" else "self"
        figures += f", {kind}-attention KV of encoder-decoder cache {cache.encoder_decoder}"
    module = f"{cache.module}: " if cache.module else ""
    return f"    {cache.cache:>5}{role:<5} {module}{figures}"


def _caches_lines(kv: Any) -> list[str]:
    """A line per cache; past `MAX_CACHES_AS_ROWS` (a cache per generate() call of a long loop), how many
    and the main one and the biggest: `--json` lists them all."""
    if len(kv.caches) <= MAX_CACHES_AS_ROWS:
        return ["    caches (the headline figures are the main cache's):", *map(_cache_line, kv.caches)]
    held = [c for c in kv.caches if c.final_bytes]
    named = biggest_caches(kv.caches)
    others = len([c for c in named if not c.main])
    said = {0: "the main one", 1: "the main one and the biggest other"}.get(
        others, f"the main one and the {others} biggest others"
    )
    return [
        f"    caches: {len(kv.caches):,}, {len(held):,} of them held at the end "
        f"({human_bytes(sum(c.final_bytes for c in held))}), --json lists every one; the headline figures "
        f"are the main cache's. {said[0].upper()}{said[1:]}:",
        *map(_cache_line, named),
    ]


def _per_layer_lines(kv: Any, several: bool) -> list[str]:
    """The per-layer table: a row per cache's layer, or past `MAX_CACHES_AS_ROWS` caches a row per layer
    index summed over them (`--json` keeps each cache's rows)."""
    caches = {layer.cache for layer in kv.per_layer}
    if len(caches) > MAX_CACHES_AS_ROWS:
        lines = [
            f"    per layer, summed over the {len(caches):,} caches (--json has each cache's rows):",
            "    layer      K bytes      V bytes  caches  tokens/row  evicted (all rows)",
        ]
        for row in layers_over_caches(kv.per_layer):
            tokens = f"{row.min_tokens:,}"
            if row.max_tokens != row.min_tokens:
                tokens += f"-{row.max_tokens:,}"
            lines.append(
                f"    {row.layer:>5} {row.k_bytes:>12,} {row.v_bytes:>12,} {row.caches:>7,} {tokens:>11} "
                f"{row.evicted_tokens:>19,}"
            )
        return lines
    cache_head = "cache " if several else ""
    lines = [f"    {cache_head}layer      K bytes      V bytes  tokens/row  evicted (all rows)"]
    for layer in kv.per_layer:
        cache_cell = f"{layer.cache:>5} " if several else ""
        lines.append(
            f"    {cache_cell}{layer.layer:>5} {layer.k_bytes:>12,} {layer.v_bytes:>12,} "
            f"{layer_tokens_cell(layer):>11} {layer.evicted_tokens:>19,}"
        )
    return lines


def _rank_heads_line(share: dict[str, int]) -> str:
    """Whose KV a rank's figures are: a tensor-parallel rank's arithmetic counts only the heads it holds."""
    held, heads = share["kv_heads_held"], share["model_kv_heads"]
    who = f"rank {share['rank']} of {share['world_size']}"
    if held == heads:
        return f"{who}: its cache holds all the model's {heads} KV heads, which the arithmetic counts"
    return (
        f"{who}: its cache holds {held} of the model's {heads} KV heads (a tensor-parallel share), which the "
        "arithmetic counts; `kvtrace report` on the group gives the model's"
    )


def report_to_text(report: Report) -> str:
    lines = [f"kvtrace report: {printable(str(report.path))} ({report.source_kind})"]
    for note in report.notes:
        lines.append(f"  note: {printable(note)}")
    for dev in report.devices:
        cap = f" of {human_bytes(dev.capacity_bytes)}" if dev.capacity_bytes else ""
        if not report.device_measured(dev):  # its 0s are for want of any event: unknown, as the HTML's "-"
            lines.append(
                f"  {dev.device}: peak -{cap}, final - (not measured), "
                f"{dev.alloc_events:,} allocs / {dev.free_events:,} frees"
            )
            continue
        lines.append(
            f"  {dev.device}: peak {human_bytes(dev.peak_allocated_bytes)}{cap}, final "
            f"{human_bytes(dev.final_allocated_bytes)}, "
            f"{dev.alloc_events:,} allocs / {dev.free_events:,} frees "
            f"({size_basis_said(dev.size_basis, dev.device)})"
        )
        if dev.alloc_events == 0 and dev.peak_allocated_bytes == 0:
            continue
        peak = dev.peak_allocated_bytes
        unmarked = report.kv.measured_from == "none"  # no KV attribution: its bytes, if any, are in other
        for name in ("kv", "weights", "other"):
            value = dev.categories_at_peak.get(name, 0)
            if name == "kv" and unmarked and not value:
                lines.append(f"    at peak  {name:<8} {'-':>12}  (not attributed: counted in other)")
                continue
            if name == "weights" and not value and report.weights_untold:
                lines.append(f"    at peak  {name:<8} {'-':>12}  ({report.weights_untold})")
                continue
            lines.append(f"    at peak  {name:<8} {human_bytes(value):>12}  {_share(value, peak)}")
        lines.extend(_torch_categories_lines(dev.torch_categories_at_peak, peak))
        if dev.fragmentation_at_peak_bytes is not None and dev.private_pool_free_at_peak is not None:
            lines.append(
                f"    reserved {human_bytes(dev.reserved_at_peak)}: "
                f"{human_bytes(dev.fragmentation_at_peak_bytes)} reserved but unallocated at the peak "
                f"outside private pools, {human_bytes(dev.private_pool_free_at_peak)} more in private pools "
                "(CUDA graphs': only their own allocations can use them)"
            )
        elif dev.fragmentation_at_peak_bytes is not None:
            lines.append(
                f"    reserved {human_bytes(dev.reserved_at_peak)}: "
                f"{human_bytes(dev.fragmentation_at_peak_bytes)} reserved but unallocated at the peak"
            )
        elif dev.peak_before_trace and dev.reserved_at_peak is not None:
            lines.append(
                f"    reserved {human_bytes(dev.reserved_at_peak)} when the trace began: cached by the "
                "allocator earlier, not the slack of a peak"
            )
        if dev.bytes_by_method:
            over = allocated_over(report, [dev])
            lines.append(f"    allocated {over}, by how each allocation was attributed:")
            for method, nbytes in sorted(dev.bytes_by_method.items(), key=lambda item: -item[1]):
                label = METHOD_LABELS.get(method, method)
                if method == "profiler_category" and dev.torch_categories_allocated:
                    label += ": " + ", ".join(
                        f"{name} {human_bytes(value)}"
                        for name, value in dev.torch_categories_allocated.items()
                    )
                lines.append(f"      {human_bytes(nbytes):>12}  {label}")
    kv = report.kv
    lines.append(f"  KV cache ({kv.measured_from}):")
    if kv.measured_from == "none" and report.kv_measured:  # a refused vLLM start: the line below says why
        lines.append(f"    no KV attribution: {NO_KV_HINT}")
    if kv.measured_from == "none" and report.kv_measured and not kv.peak_bytes:
        # Unknown, not 0: a bare trace's KV (if its model had one) is among the unattributed bytes
        lines.append("    final -, peak - (not attributed: unknown, not 0)")
    elif report.kv_measured:
        held = f"final {human_bytes(kv.final_bytes)}, peak {human_bytes(kv.peak_bytes)}"
        lines.append(f"    {held} (with transient copies)")
    else:
        lines.append("    final -, peak - (not measured: no KV entry, the engine made no pool)")
    image = sum(c.final_bytes for c in kv.caches if c.cross_attention_of is not None)
    if image:  # Mllama's cross-attention layers: the image's KV, held whatever the tokens
        lines.append(
            f"    of which cross-attention (image) KV: {human_bytes(image)}, a fixed cost, not per token"
        )
    if kv.final_bytes:
        churn = kv.allocated_bytes_total / kv.final_bytes
        over = allocated_over(report, report.devices)
        over += ":" if over != "over the run" else ""  # a span is said in words: a colon sets the bytes apart
        lines.append(
            f"    allocated {over} {human_bytes(kv.allocated_bytes_total)} = {times(churn)} its final size"
        )
    if kv.bytes_per_token_measured is not None:
        expected = "-" if kv.bytes_per_token_expected is None else f"{kv.bytes_per_token_expected:,}"
        # Preallocated buffers divide by their slots, known before any forward wrote a token (a run killed
        # or raised in its prefill holds the buffers with no tokens or rows known)
        held = (
            _buffer_slots(kv)
            if kv.capacity_rows and kv.capacity_tokens
            else _tokens_measured_over(kv, report)
        )
        if len([c for c in kv.caches if c.final_bytes]) > 1:
            held += f" of cache {kv.main_cache}"
        lines.append(
            f"    bytes per token: measured {kv.bytes_per_token_measured:,.1f} ({held}), "
            f"arithmetic {expected}"
        )
        if kv.bytes_per_token_note:
            lines.append(f"      ({kv.bytes_per_token_note})")
    elif kv.tokens_held and kv.batch and report.engine is None:
        # The main cache was let go before the end (another model's generated after it): its tokens are
        # still the headline's, with nothing held to measure
        expected = "-" if kv.bytes_per_token_expected is None else f"{kv.bytes_per_token_expected:,}"
        of = f" of cache {kv.main_cache}" if kv.main_cache is not None else ""
        lines.append(
            f"    bytes per token: measured - ({kv.tokens_held:,} tokens x {kv.batch:,} "
            f"{'row' if kv.batch == 1 else 'rows'}{of}, which holds nothing at the end), "
            f"arithmetic {expected}"
        )
    if kv.rank_heads:
        lines.append(f"    {_rank_heads_line(kv.rank_heads)}")
    if kv.evicted_tokens or kv.evictions:
        lines.append(f"    evicted tokens (all rows and layers): {evicted_tokens(kv)}")
    if kv.evictions:
        ev = kv.evictions
        released = ev.get("released_bytes", ev["freed_bytes"])
        net = human_bytes(released) if released >= 0 else f"-{human_bytes(-released)} (memory grew)"
        lines.append(
            f"    press evictions: {ev['events']} (K and V), claimed {human_bytes(ev['claimed_bytes'])}, "
            f"really released {net}: old storages freed {human_bytes(ev['freed_bytes'])}, their "
            f"copies take {human_bytes(ev.get('new_storage_bytes', 0))}"
        )
        reasons: dict[str, int] = {}
        for item in ev["freed_nothing"]:
            reasons[item["explanation"]] = reasons.get(item["explanation"], 0) + 1
        for explanation, count in reasons.items():
            lines.append(f"      {count} freed nothing: {explanation}")
    several = rows_name_caches((layer.cache for layer in kv.per_layer), kv.main_cache)
    if several:
        lines += _caches_lines(kv)
    if kv.per_layer:
        lines += _per_layer_lines(kv, several)
    if report.engine is not None:
        from analyzers.render.engine import engine_text_lines

        lines += engine_text_lines(report.engine)
    if report.budget is not None:
        lines.append(budget_line(report.budget, report.engine))
    if report.oom:
        oom = report.oom
        requested = human_bytes(oom["requested_bytes"])
        if oom["requested_bytes"] is None and oom.get("segment_bytes") is not None:
            segment = oom["segment_bytes"]
            largest = human_bytes(request_at_most(segment))
            requested = f"at most {largest} ({a_or_an(human_bytes(segment))} segment)"
        # a per-process cap (set_per_process_memory_fraction) bounds what it could reserve, not the device
        cap = f", {human_bytes(oom['limit_bytes'])} allowed" if oom.get("limit_bytes") is not None else ""
        lines.append(
            f"  OOM on {oom['device']}: requested {requested}, "
            f"free {human_bytes(oom['device_free_bytes'])}{cap}  (see `kvtrace diagnose`)"
        )
    return "\n".join(lines)


def evicted_tokens(kv: KvSummary) -> str:
    """The evicted-token count with what evicted them ("160 (sliding window 160)"), as the text report and
    the HTML page say it."""
    kinds = {"window": "sliding window", "press": "eviction library (press)", "crop": "crop"}
    by_kind = ", ".join(f"{kinds.get(k, k)} {n:,}" for k, n in kv.evictions_by_reason.items())
    return f"{kv.evicted_tokens:,}" + (f" ({by_kind})" if by_kind else "")


def budget_line(budget: dict[str, Any], engine: Any = None) -> str:
    """One line on a run's memory budget: where it would have run out, or the headroom left. `engine`: the
    run's engine figures, to name its pool when the pool is the allocation that crossed it."""
    size = human_bytes(budget["bytes"])
    if budget.get("rank") is not None:  # a run group's: the rank that crossed it first
        size += f" (rank {budget['rank']})"
    unseen = ""
    if budget.get("unseen_bytes"):
        held = human_bytes(budget["unseen_bytes"])
        unseen = f"; with {held} the engine held before the trace began, from engine.json"
    if not budget["crossed"]:
        peak, left = human_bytes(budget["peak_bytes"]), human_bytes(budget["headroom_bytes"])
        if budget.get("partial"):
            return (
                f"  budget {size}: the KV cache and weights fit, peak {peak} leaves {left}; the run may not "
                f"(no allocator events were recorded: activations and other allocations unseen){unseen}"
            )
        return f"  budget {size}: fits, peak {peak} leaves {left}{unseen}"
    peak = human_bytes(budget["peak_bytes"])
    what = f" {budget['request_category']}" if budget.get("request_category") else ""
    if budget["before_first_step"] and budget.get("request_bytes") is None:
        return (
            f"  budget {size}: exceeded before the first step "
            f"({human_bytes(budget['allocated_after_bytes'])} already allocated: weights and what the "
            f"process held before{unseen})"
        )
    request = human_bytes(budget["request_bytes"])
    before = human_bytes(budget["allocated_before_bytes"])
    if budget["before_first_step"]:  # a cache preallocated at record()'s setup, an engine's pool at its start
        pool = getattr(engine, "kv_cache_bytes", None)
        by = f"{a_or_an(request)}{what} allocation"
        if pool and budget.get("request_category") == "kv" and budget["request_bytes"] == pool:
            name = "vLLM" if engine.name == "vllm" else engine.name
            by = f"the {name} KV pool, allocated at the engine's start: {request}"
        return (
            f"  budget {size}: exceeded before the first step by {by} on top of {before} "
            f"(peak {peak}{unseen}; see `kvtrace diagnose`)"
        )
    at = f" at step {budget['step']}" if budget.get("step") is not None else ""
    at += f" ({budget['phase']})" if at and budget.get("phase") else ""
    layer = f", layer {budget['layer']}" if budget.get("layer") is not None else ""
    return (
        f"  budget {size}: would run out{at}{layer}: {a_or_an(request)}{what} allocation on top of {before} "
        f"(peak {peak}{unseen}; see `kvtrace diagnose`)"
    )


def budget_marker_label(budget: dict[str, Any]) -> str:
    """The hover text of a chart's "runs out here" mark on a crossed budget (the HTML report's and the
    TensorBoard tab's): the allocation that would fail where there is one, with only the step, phase and
    layer known. Crossed before the first step by what was already held, there is no request to name."""
    size = human_bytes(budget["bytes"])
    if budget.get("request_bytes") is None:
        held = budget["allocated_after_bytes"]
        over = human_bytes(held - budget["bytes"])  # the two sizes alone can round to one figure
        return (
            f"exceeded on {a_or_an(size)} device before the first step: "
            f"{human_bytes(held)} already allocated, {over} over"
        )
    where = []
    if budget.get("before_first_step"):  # step 0: record()'s setup or an engine's start, no phase
        where.append("before the first step")
    elif budget.get("step") is not None:
        phase = f" ({budget['phase']})" if budget.get("phase") else ""
        where.append(f"step {budget['step']}{phase}")
    if budget.get("layer") is not None:
        where.append(f"layer {budget['layer']}")
    where.append(f"{a_or_an(human_bytes(budget['request_bytes']))} request")
    return f"would run out on {a_or_an(size)} device: {', '.join(where)}"
