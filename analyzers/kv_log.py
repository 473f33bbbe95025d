"""KV figures from kvtrace's own KV event log: exact, per layer, per step.

Replays the log as the allocator would see it: a storage is live from the event that first shows its
address until its `freed` event. A reallocation logs the new storage before the old one's free, so the
replay shows the transient copy exactly as it happened.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from kvtrace.format import KvEvent

_NO_NEW_STORAGE = ("freed", "written")

# Why tokens left a cache: its own sliding window, a crop (assisted decoding), or an eviction library
# (kvpress) or other code rebinding keys/values, which the recorder sees as `evicted` events.
EVICTION_REASONS = ("window", "press", "crop")


# Parts whose tensor is the KV itself, shaped [batch, kv_heads, tokens, head_dim] (or Meta's [batch, tokens,
# heads, dim] buffers): full-precision data, module buffers, tracked tensors, and the quantized data of fp8
# (`q.0`, next to its scale `q.1`) and quanto (`q._data`). Their dtype is the cache's, their first dimension
# the batch. hqq's packed `q.0` is 2-D, so the shape test leaves it out.
_KV_DATA_PARTS = ("data", "buffer", "tracked", "q.0", "q._data")


def is_kv_data(ev: KvEvent) -> bool:
    """Whether the event's tensor holds the KV values themselves (not a scale, nor packed bits)."""
    if ev.part in ("data", "buffer", "tracked"):
        return True
    return ev.part in _KV_DATA_PARTS and len(ev.shape or ()) >= 4


def eviction_reason(ev: KvEvent) -> str:
    """The kind of eviction an event with `evicted_tokens` reports (runs before the window kind: press)."""
    if ev.reason == "window":
        return "window"
    if ev.event == "cropped":
        return "crop"
    return "press"


@dataclass
class LayerFigures:
    layer: int
    k_bytes: int = 0
    v_bytes: int = 0
    evicted_tokens: int = 0
    tokens: int = 0
    evicted_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class KvLogAnalysis:
    """What the KV log says: final state (last step, before teardown), peak, churn, evictions, series."""

    final_bytes: int
    peak_bytes: int
    peak_t_ns: int
    allocated_bytes_total: int
    evicted_tokens: int
    per_layer: list[LayerFigures]
    evicted_by_reason: dict[str, int] = field(default_factory=dict)
    """Evicted tokens (all rows, all layers) by kind: window, press, crop (see EVICTION_REASONS)."""
    # One point per event: (t_ns, live KV bytes); and per step: {layer: live bytes} at the step's end.
    series_t_ns: list[int] = field(default_factory=list)
    series_bytes: list[int] = field(default_factory=list)
    layer_series: dict[int, list[int]] = field(default_factory=dict)
    step_live: dict[int, dict[int, int]] = field(default_factory=dict)
    step_phase: dict[int, str] = field(default_factory=dict)
    step_start_ns: dict[int, int] = field(default_factory=dict)
    evictions: list[KvEvent] = field(default_factory=list)
    storages: list[tuple[int, int, int, int, int, str]] = field(default_factory=list)
    """Every KV storage: (addr, bytes, first_t_ns, last_t_ns, layer, kv); last_t_ns = free time or -1."""


def analyze_kv_log(events: list[KvEvent]) -> KvLogAnalysis:
    live: dict[int, tuple[int, int, str]] = {}  # addr -> (bytes, layer, kv)
    open_storage: dict[int, int] = {}  # addr -> index in storages
    storages: list[tuple[int, int, int, int, int, str]] = []
    live_total = 0
    peak = 0
    peak_t = 0
    allocated_total = 0
    layer_live: dict[int, int] = defaultdict(int)
    layer_series: dict[int, list[int]] = defaultdict(list)
    series_t: list[int] = []
    series_b: list[int] = []
    step_live: dict[int, dict[int, int]] = {}
    step_phase: dict[int, str] = {}
    step_start: dict[int, int] = {}
    evicted_by_layer: dict[int, int] = defaultdict(int)
    evicted_by_layer_reason: dict[int, dict[str, int]] = defaultdict(dict)
    tokens_by_layer: dict[int, int] = {}
    evictions: list[KvEvent] = []
    final_state: dict[int, tuple[int, int, str]] | None = None
    final_total = 0

    for ev in events:
        if ev.phase == "end" and final_state is None:
            final_state = dict(live)
            final_total = live_total
        if ev.phase != "end":
            step_phase.setdefault(ev.step, ev.phase)
            step_start.setdefault(ev.step, ev.t_ns)
        if ev.event == "freed":
            entry = live.pop(ev.addr, None)
            if entry is not None:
                live_total -= entry[0]
                layer_live[entry[1]] -= entry[0]
                index = open_storage.pop(ev.addr)
                addr, nbytes, first, _, layer, kv = storages[index]
                storages[index] = (addr, nbytes, first, ev.t_ns, layer, kv)
        elif ev.addr and ev.addr not in live and ev.event not in _NO_NEW_STORAGE:
            live[ev.addr] = (ev.storage_bytes, ev.layer, ev.kv)
            live_total += ev.storage_bytes
            layer_live[ev.layer] += ev.storage_bytes
            allocated_total += ev.storage_bytes
            open_storage[ev.addr] = len(storages)
            storages.append((ev.addr, ev.storage_bytes, ev.t_ns, -1, ev.layer, ev.kv))
        if ev.event != "freed" and is_kv_data(ev):
            tokens_by_layer[ev.layer] = ev.tokens
        if ev.evicted_tokens:
            rows = ev.shape[0] if ev.shape else 1
            evicted_by_layer[ev.layer] += ev.evicted_tokens * rows
            by_reason = evicted_by_layer_reason[ev.layer]
            reason = eviction_reason(ev)
            by_reason[reason] = by_reason.get(reason, 0) + ev.evicted_tokens * rows
        if ev.event in ("evicted", "cropped") and ev.kv == "k":
            evictions.append(ev)
        if live_total > peak:
            peak, peak_t = live_total, ev.t_ns
        series_t.append(ev.t_ns)
        series_b.append(live_total)
        if ev.phase != "end":
            step_live[ev.step] = dict(layer_live)
        layer_series[ev.layer].append(layer_live[ev.layer])
    if final_state is None:
        final_state, final_total = dict(live), live_total

    per_layer: dict[int, LayerFigures] = {}
    for layer in sorted(set(tokens_by_layer) | {entry[1] for entry in final_state.values()}):
        per_layer[layer] = LayerFigures(
            layer=layer,
            evicted_tokens=evicted_by_layer.get(layer, 0),
            tokens=tokens_by_layer.get(layer, 0),
            evicted_by_reason=dict(evicted_by_layer_reason.get(layer, {})),
        )
    for nbytes, layer, kv in final_state.values():
        figures = per_layer.setdefault(layer, LayerFigures(layer=layer))
        if kv == "k":
            figures.k_bytes += nbytes
        else:
            figures.v_bytes += nbytes
    return KvLogAnalysis(
        final_bytes=final_total,
        peak_bytes=peak,
        peak_t_ns=peak_t,
        allocated_bytes_total=allocated_total,
        evicted_tokens=sum(evicted_by_layer.values()),
        per_layer=[per_layer[k] for k in sorted(per_layer)],
        evicted_by_reason=_total_by_reason(evicted_by_layer_reason),
        series_t_ns=series_t,
        series_bytes=series_b,
        layer_series=dict(layer_series),
        step_live=step_live,
        step_phase=step_phase,
        step_start_ns=step_start,
        evictions=evictions,
        storages=storages,
    )


def _total_by_reason(by_layer: dict[int, dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for by_reason in by_layer.values():
        for reason, count in by_reason.items():
            totals[reason] = totals.get(reason, 0) + count
    return {reason: totals[reason] for reason in EVICTION_REASONS if reason in totals}
