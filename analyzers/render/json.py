"""The report as JSON: the machine-readable output, and the golden format of the tests."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from analyzers.summary import DeviceSummary, Report
from analyzers.trace_coverage import trace_span_words

JSON_VERSION = 1

NO_KV_HINT = (
    "nothing here marks KV-cache allocations: record the run with kvtrace.record() for exact KV figures "
    "per layer and step, or profile with torch.profiler(..., with_stack=True) so that cache updates are "
    "found by their stacks"
)


def size_basis_said(size_basis: str, device: str) -> str:
    """Which size a device's byte figures count, in a few words for the text and the page (the JSON's
    `size_basis`): a snapshot's requested bytes and a profiler's blocks differ by up to ~1 MiB a block, so a
    figure set beside memory_viz's or memory_allocated()'s needs its unit said. Each device says its own: a
    run group's ranks may differ (one rank's profiler trace gone), as their own reports do."""
    if size_basis == "tensors":  # a run without allocator events: the tensors' own bytes, no allocator's
        return "the KV log's and the weights' tensor sizes"
    if size_basis == "requested":
        return "requested sizes, as memory_viz's timeline counts them"
    # a run group's devices are named after their rank (`rank0/cuda:0`): the device's own kind decides
    if device.rpartition("/")[2].startswith("cuda"):
        return "the allocator's block sizes, as memory_allocated() counts them"
    return "sizes as the allocator reported them"


METHOD_LABELS = {
    "kv_log": "KV log (matched to a KV storage kvtrace saw)",
    "stack_rule": "stack rule (a cache update in the allocation's stack)",
    "weights_table": "weights table",
    "profiler_category": "torch.profiler's own category (memory timeline: PARAMETER is weights)",
    # no KV-log storage, weights-table entry or stack rule matched these allocations
    "none": "not attributed, counted as other (activations, logits, temporaries; in a bare trace, KV too)",
}


def allocated_over(report: Report, devices: list[DeviceSummary]) -> str:
    """What "allocated" sums over: a snapshot's trace span (a ring buffer, maybe begun mid-run), said with
    its entries and seconds where one device's trace holds them; else the run. The text, page, notebook and
    the JSON's `kv.allocated_over` (which the TensorBoard tab shows) say it alike."""
    spans = [d for d in devices if d.trace_entries is not None]
    if report.source_kind != "snapshot" or not spans:
        return "over the run"
    if len(spans) == 1:
        return f"over {trace_span_words(spans[0].trace_entries or 0, spans[0].trace_span_us)}"
    return "over the traces' spans (each device's last entries before the dump)"


def report_to_json(report: Report) -> dict[str, Any]:
    kv = report.kv
    devices = [_device_json(report, d) for d in report.devices]
    main_device = report.main_device
    main = next((dev for d, dev in zip(report.devices, devices, strict=True) if d is main_device), None)
    measured = report.kv_measured  # a figure never measured is null, not 0
    # nor one never attributed: a bare trace or snapshot without KV marks counts its KV in `other`
    attributed = measured and kv.measured_from != "none"
    return {
        "version": JSON_VERSION,
        "source": {"kind": report.source_kind, "path": report.path},
        "devices": devices,
        "peak_allocated_bytes": main["peak_allocated_bytes"] if main is not None else 0,
        "peak_time": main["peak_time"] if main is not None else None,
        "final_allocated_bytes": main["final_allocated_bytes"] if main is not None else 0,
        "size_basis": main["size_basis"] if main is not None else None,
        "categories_at_peak": main["categories_at_peak"] if main is not None else {},
        "partial": report.partial,
        "kv": {
            "peak_bytes": kv.peak_bytes if attributed else None,
            "final_bytes": kv.final_bytes if attributed else None,
            "allocated_bytes_total": kv.allocated_bytes_total if attributed else None,
            "allocated_over": allocated_over(report, report.devices),
            "evicted_tokens": kv.evicted_tokens if attributed else None,
            "evictions_by_reason": kv.evictions_by_reason,
            "measured_from": kv.measured_from,
            "bytes_per_token_measured": kv.bytes_per_token_measured,
            "bytes_per_token_expected": kv.bytes_per_token_expected,
            "bytes_per_token_note": kv.bytes_per_token_note,
            "rank_heads": kv.rank_heads,
            "tokens_held": kv.tokens_held,
            "batch": kv.batch,
            "token_rows": kv.token_rows,
            "capacity_rows": kv.capacity_rows,
            "capacity_tokens": kv.capacity_tokens,
            "capacity_of": kv.capacity_of,
            "evictions": kv.evictions,
            # a refused vLLM start measured no KV for want of a pool, not of a way to attribute it
            "how_to_attribute": NO_KV_HINT if kv.measured_from == "none" and measured else None,
            "per_layer": [
                {
                    "layer": layer.layer,
                    "k_bytes": layer.k_bytes,
                    "v_bytes": layer.v_bytes,
                    "evicted_tokens": layer.evicted_tokens,
                    "evicted_by_reason": layer.evicted_by_reason,
                    "tokens": layer.tokens,
                    "k_tokens": layer.k_tokens,
                    "v_tokens": layer.v_tokens,
                    "cache": layer.cache,
                }
                for layer in kv.per_layer
            ],
            "main_cache": kv.main_cache,
            "caches": [asdict(cache) for cache in kv.caches],
        },
        "geometry": report.geometry,
        "steps": report.steps,
        "oom": report.oom,
        "engine": _engine_json(report),
        "budget": report.budget,
        "notes": report.notes,
    }


def _device_json(report: Report, d: DeviceSummary) -> dict[str, Any]:
    """One device; its byte figures null where it measured nothing (Report.device_measured)."""
    measured = report.device_measured(d)
    device = {
        "device": d.device,
        "alloc_events": d.alloc_events,
        "free_events": d.free_events,
        "peak_allocated_bytes": d.peak_allocated_bytes if measured else None,
        "peak_time": d.peak_time,
        "final_allocated_bytes": d.final_allocated_bytes if measured else None,
        "size_basis": d.size_basis,
        "final_allocated_rounded_bytes": d.final_allocated_rounded_bytes,
        "capacity_bytes": d.capacity_bytes,
        "categories_at_peak": d.categories_at_peak if measured else dict.fromkeys(d.categories_at_peak),
        "reserved_at_peak_bytes": d.reserved_at_peak,
        "fragmentation_at_peak_bytes": d.fragmentation_at_peak_bytes,
        "peak_before_trace": d.peak_before_trace,
        "attributed_bytes_by_method": d.bytes_by_method,
        "torch_categories_at_peak": d.torch_categories_at_peak,
        "torch_categories_allocated": d.torch_categories_allocated,
    }
    if d.private_pool_free_at_peak is not None:  # a snapshot with private pools (CUDA graphs') only
        device["private_pool_free_at_peak_bytes"] = d.private_pool_free_at_peak
    return device


def _engine_json(report: Report) -> dict[str, Any] | None:
    if report.engine is None:
        return None
    from analyzers.render.engine import engine_to_json

    return engine_to_json(report.engine)
