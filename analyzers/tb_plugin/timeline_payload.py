"""The KV Cache plugin's memory timeline as JSON: per device, live bytes by category (kv/weights/other),
allocated and reserved, cut down peak-exactly (`analyzers.timeline.downsample_indices`), with the run's
markers, where a budget would have run out and where the KV log's final figures are taken, as the HTML
report draws them. Pure, no torch."""

from __future__ import annotations

from typing import Any

__all__ = ["timeline_payload"]

_MARKER_KINDS = ("step", "eviction", "oom", "snapshot")


def timeline_payload(name: str, source: Any, report: Any, max_points: int) -> dict[str, Any]:
    """The timeline of run `name` (`source`: its analyzers.model.MemorySource, `report`: its
    analyzers.summary.Report), at most about `max_points` points per series. The kept indices are the
    union of each series' own peak-keeping downsample, so every series reaches exactly its full-resolution
    max and min."""
    import numpy as np

    from analyzers.render.event_axis import held_points, held_span
    from analyzers.timeline import downsample_indices

    t0 = min((float(tl.ts_us[0]) for tl in report.timelines if len(tl.ts_us)), default=0.0)
    devices: list[dict[str, Any] | None] = []
    for tl in report.timelines:
        n = len(tl.ts_us)
        if not n:
            devices.append(None)  # its level, once the x the others span is known
            continue
        series = {"allocated": tl.allocated, **tl.by_category}
        if tl.reserved is not None:
            series["reserved"] = tl.reserved
        keep = np.unique(np.concatenate([downsample_indices(s, max_points) for s in series.values()]))
        # The level before the first event in front, at that event's time, as the HTML report draws
        # it: a trace that begins by freeing blocks it never allocated peaks there
        lead = [] if tl.start_allocated == int(tl.allocated[0]) else [0]

        def points(values: Any, start: int, lead: list[int] = lead, keep: Any = keep) -> list[int]:
            return [start for _ in lead] + values[keep].tolist()

        t_s = _rel_seconds(tl.ts_us[keep], t0)
        peak_i = int(np.argmax(tl.allocated))
        peak, peak_t = int(tl.allocated[peak_i]), _rel_seconds([tl.ts_us[peak_i]], t0)[0]
        if tl.start_allocated > peak:
            peak, peak_t = tl.start_allocated, t_s[0]
        devices.append(
            {
                "device": tl.device,
                "events": n,
                "points": len(lead) + len(keep),
                "t_s": t_s[:1] * len(lead) + t_s,
                "allocated": points(tl.allocated, tl.start_allocated),
                "reserved": None if tl.reserved is None else points(tl.reserved, int(tl.reserved[0])),
                **{
                    name: points(tl.by_category[name], tl.start_by_category.get(name, 0))
                    for name in ("kv", "weights", "other")
                },
                "capacity_bytes": tl.capacity_bytes,
                "peak_allocated_bytes": peak,
                "peak_t_s": peak_t,
            }
        )
    # A device without events (the weights' side of a cache offloaded elsewhere) is named by the
    # report, so served too, as the HTML report draws it: its level before the trace, flat across the
    # seconds the others' events span (the markers' where none has events)
    xs = [t for d in devices if d is not None for t in d["t_s"]]
    span = held_span(xs or [_rel_seconds([m.ts_us], t0)[0] for m in source.markers])
    for i, tl in enumerate(report.timelines):
        if devices[i] is not None:
            continue
        x, level = held_points(span)
        reserved = next((d.reserved_at_peak for d in report.devices if d.device == tl.device), None)
        devices[i] = {
            "device": tl.device,
            "events": 0,
            "points": len(x),
            "t_s": x.tolist(),
            "allocated": level(tl.allocated, tl.start_allocated).tolist(),
            "reserved": None if reserved is None else level(tl.allocated, reserved).tolist(),
            **{
                name: level(tl.by_category[name], tl.start_by_category.get(name, 0)).tolist()
                for name in ("kv", "weights", "other")
            },
            "capacity_bytes": tl.capacity_bytes,
            "peak_allocated_bytes": tl.start_allocated,  # the report's: all that is known of it
            "peak_t_s": None,  # held since before the trace: no time is known
        }
    markers = [
        {
            "kind": m.kind,
            "t_s": _rel_seconds([m.ts_us], t0)[0],
            "label": m.label,
            "device": m.device,
        }
        for m in source.markers
        if m.kind in _MARKER_KINDS
    ]
    crossing = _budget_marker(report.budget, t0)
    if crossing is not None:
        markers.append(crossing)
    from analyzers.render.engine import no_memory_timeline

    events = max((len(tl.ts_us) for tl in report.timelines), default=0)
    # Why the page draws no memory chart, in the HTML report's words; None where it draws one.
    no_chart = no_memory_timeline(source.meta.get("engine"), report.engine, events)
    return {
        "run": name,
        "t0_us": t0,
        "devices": devices,
        "markers": markers,
        "kv_final": _kv_final_marker(source, t0),
        "no_chart": no_chart,
    }


def _kv_final_marker(source: Any, t0: float) -> dict[str, Any] | None:
    """Where `kv.final_bytes` is taken (the end of the last step), the HTML report's "KV final" marker: on
    its KV line (`analyzers.kv_line`, frees at the allocator's), whose drop the allocator's `kv` category
    drawn here makes at the same time. Without it a cache generate() dropped ends the chart at 0 B beside a
    summary saying "KV final 70.00 KiB". None where the page draws no KV line (no KV log, an engine's
    pool)."""
    kv = source.meta.get("kv")
    if kv is None or not kv.step_live or source.meta.get("engine") is not None:
        return None
    from analyzers.attribution import KV_FREES
    from analyzers.kv_line import kv_final_point, kv_line
    from analyzers.units import human_bytes

    final = kv_final_point(*kv_line(kv, source.meta.get(KV_FREES)), kv)
    if final is None:
        return None
    at_ns, level = final
    return {
        "t_s": _rel_seconds([at_ns / 1000.0], t0)[0],
        "bytes": level,
        "label": f"KV final (end of the last step): {human_bytes(level)}",
    }


def _rel_seconds(ts_us: Any, t0_us: float) -> list[float]:
    """Seconds from the run's first event, rounded to the microsecond the clock has."""
    return [round((float(t) - t0_us) / 1e6, 6) for t in ts_us]


def _budget_marker(budget: dict[str, Any] | None, t0: float) -> dict[str, Any] | None:
    """Where a run crossing its budget would have run out, as the HTML report marks it ("runs out here"): at
    the allocation that took the device over, drawn at the level it took it to."""
    if budget is None or not budget["crossed"] or budget["t"] is None:
        return None
    from analyzers.render.text import budget_marker_label

    return {
        "kind": "budget",
        "t_s": _rel_seconds([budget["t"]], t0)[0],
        "label": budget_marker_label(budget),
        "device": budget["device"],
        "bytes": budget["allocated_after_bytes"] or budget["bytes"],
    }
