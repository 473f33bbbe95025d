"""Evictions by code that rebinds a cache layer's keys/values (as eviction libraries do), in the main
environment; kvpress itself is tested in its own environment (tests/kvpress)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import storage_lives
from test_recorder_profiler_join import (
    Allocation,
    cpu_allocations,
    load_trace,
    match,
    trace_clock_lead_us,
)

import kvtrace
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.format import KvEvent
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.tiny import tiny_size

LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT, KEEP = 2, 2, 16, 2, 17, 8
SIZE = tiny_size(LAYERS, KV_HEADS)


@contextmanager
def keep_last(model: Any, keep: int, contiguous: bool, one_by_one: bool = False) -> Iterator[None]:
    """A minimal StreamingLLM-like press: after each attention forward at prefill, keep the last tokens.
    As kvpress does, the kept K and V are both made before either old tensor is let go; `one_by_one`: K is
    copied and its old tensor dropped before V is copied (`layer.keys = layer.keys[...].clone()`)."""

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        cache = kwargs.get("past_key_values") or kwargs.get("cache")
        layer = cache.layers[module.layer_idx]
        if layer.keys.shape[-2] > keep and one_by_one:
            layer.keys = layer.keys[:, :, -keep:, :].clone()
            layer.values = layer.values[:, :, -keep:, :].clone()
        elif layer.keys.shape[-2] > keep:
            keys, values = layer.keys[:, :, -keep:, :], layer.values[:, :, -keep:, :]
            layer.keys = keys.contiguous() if contiguous else keys
            layer.values = values.contiguous() if contiguous else values

    handles = [
        m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if hasattr(m, "layer_idx")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(tmp_path: Path, *, grad: bool, contiguous: bool) -> dict[str, Any]:
    from transformers import DynamicCache

    model = build_model(SIZE)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    run = tmp_path / "run"
    cache = DynamicCache()
    with torch.set_grad_enabled(grad), kvtrace.record(run, model=model), keep_last(model, KEEP, contiguous):
        output = model(input_ids=ids, past_key_values=cache, use_cache=True)
    del output
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(run), "--json", "-q"]) == 0
    return json.loads(out.getvalue())


def test_eviction_under_no_grad_frees_the_old_storage(tmp_path: Path) -> None:
    data = _run(tmp_path, grad=False, contiguous=True)
    evicted_per_row = PROMPT - KEEP
    assert [layer["evicted_tokens"] for layer in data["kv"]["per_layer"]] == [
        evicted_per_row * BATCH
    ] * LAYERS
    assert data["kv"]["evicted_tokens"] == LAYERS * evicted_per_row * BATCH
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH  # one token, all rows, K or V
    ev = data["kv"]["evictions"]
    assert ev["claimed_bytes"] == LAYERS * 2 * evicted_per_row * row_bytes
    assert ev["freed_bytes"] == LAYERS * 2 * PROMPT * row_bytes  # the whole old storage is released
    # ... and the kept tokens' new copies take their own: the net release is what was claimed
    assert ev["new_storage_bytes"] == LAYERS * 2 * KEEP * row_bytes
    assert ev["released_bytes"] == ev["claimed_bytes"]
    assert ev["freed_nothing"] == []
    assert data["kv"]["final_bytes"] == LAYERS * 2 * KEEP * row_bytes


def test_eviction_with_grad_enabled_frees_nothing_and_says_why(tmp_path: Path) -> None:
    data = _run(tmp_path, grad=True, contiguous=True)
    ev = data["kv"]["evictions"]
    assert ev["freed_bytes"] == 0
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH
    assert ev["released_bytes"] == -LAYERS * 2 * KEEP * row_bytes  # the copies add to the kept old storage
    assert {item["reason"] for item in ev["freed_nothing"]} == {"grad_enabled"}
    assert len(ev["freed_nothing"]) == LAYERS * 2


def test_slicing_to_a_view_frees_nothing(tmp_path: Path) -> None:
    data = _run(tmp_path, grad=False, contiguous=False)
    ev = data["kv"]["evictions"]
    assert ev["freed_bytes"] == 0
    assert {item["reason"] for item in ev["freed_nothing"]} == {"view"}
    # the memory still held is the whole prompt's storage
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH
    assert data["kv"]["final_bytes"] == LAYERS * 2 * PROMPT * row_bytes
    events = read_run(tmp_path / "run").kv_events
    views = [e for e in events if e.event == "evicted"]
    assert all(e.view_offset == (PROMPT - KEEP) * HEAD_DIM * 4 for e in views)


@pytest.mark.parametrize("grad", [False])
def test_eviction_nvtx_ranges_and_markers(tmp_path: Path, grad: bool) -> None:

    _run(tmp_path, grad=grad, contiguous=True)
    source, _ = build_report(tmp_path / "run")
    # one marker for the prefill's press, every layer and row: (PROMPT - KEEP) tokens a row and layer, K's
    # and V's bytes (KV_HEADS x HEAD_DIM float32 each) in its hover
    (mark,) = [m for m in source.markers if m.kind == "eviction"]
    dropped = (PROMPT - KEEP) * BATCH * LAYERS
    assert mark.detail == {
        "reason": "press",
        "step": 1,
        "evicted_tokens": dropped,
        "evicted_bytes": dropped * 2 * KV_HEADS * HEAD_DIM * 4,
        "layers": LAYERS,
    }
    assert mark.label.startswith(f"evicted, step 1: {dropped:,} tokens dropped over {LAYERS} layers")


def test_a_crop_after_a_press_is_counted_too(tmp_path: Path) -> None:
    from transformers import DynamicCache

    # GIVEN a prefill whose press keeps KEEP tokens, then a crop of CROP more
    crop = 3
    model = build_model(SIZE)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    cache = DynamicCache()
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        with keep_last(model, KEEP, contiguous=True):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.crop(-crop)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(tmp_path / "run"), "--json", "-q", "--no-export"]) == 0
    kv = json.loads(out.getvalue())["kv"]

    # THEN each layer counts both, over every row, and so do the totals by kind
    press, cropped = (PROMPT - KEEP) * BATCH, crop * BATCH
    assert [(layer["evicted_tokens"], layer["evicted_by_reason"]) for layer in kv["per_layer"]] == [
        (press + cropped, {"press": press, "crop": cropped})
    ] * LAYERS
    assert kv["evicted_tokens"] == LAYERS * (press + cropped)
    assert kv["evictions_by_reason"] == {"press": LAYERS * press, "crop": LAYERS * cropped}
    assert [layer["tokens"] for layer in kv["per_layer"]] == [KEEP - crop] * LAYERS
    # ... and the memory chart marks each once, every layer, with K's and V's bytes (float32)
    source, _ = build_report(tmp_path / "run")
    token_bytes = 2 * KV_HEADS * HEAD_DIM * 4
    assert [
        (m.detail["reason"], m.detail["evicted_tokens"], m.detail["evicted_bytes"], m.detail["layers"])
        for m in source.markers
        if m.kind == "eviction"
    ] == [
        ("press", LAYERS * press, LAYERS * press * token_bytes, LAYERS),
        ("crop", LAYERS * cropped, LAYERS * cropped * token_bytes, LAYERS),
    ]


def _report(run: Path) -> dict[str, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(run), "--json", "-q", "--no-export"]) == 0
    return json.loads(out.getvalue())


def _kv_allocations(
    run: Path, events: list[KvEvent], lead_us: float | None = None
) -> list[Allocation | None]:
    """The profiler's allocation of each KV storage of the log (None: none found), paired on the trace's
    clock (`trace_clock_lead_us`; `lead_us` to pair on another, 0 for the trace's as read)."""
    trace = load_trace(next((run / "profiler").glob("*.pt.trace.json*")))
    allocations = cpu_allocations(trace)
    lives = storage_lives(events)
    lead = trace_clock_lead_us(allocations, lives) if lead_us is None else lead_us
    return [match(life, allocations, lead) for life in lives]


def _peak(allocations: list[Allocation]) -> int:
    """The most bytes these allocations held at once, by their own alloc and free times."""
    changes: list[tuple[float, int]] = []
    for allocation in allocations:
        changes.append((allocation.alloc_us, allocation.nbytes))
        if allocation.free_us is not None:
            changes.append((allocation.free_us, -allocation.nbytes))
    live = peak = 0
    for _, nbytes in sorted(changes):  # at one instant a free sorts first (negative bytes)
        live += nbytes
        peak = max(peak, live)
    return peak


def _allocator_peak(run: Path, events: list[KvEvent]) -> int:
    """The most bytes the KV storages of the log held at once, by the profiler's own alloc/free events."""
    allocations = _kv_allocations(run, events)
    lives = storage_lives(events)
    assert None not in allocations, [life for life, a in zip(lives, allocations, strict=True) if a is None]
    return _peak([allocation for allocation in allocations if allocation is not None])


def _record_prefill_with_hook(tmp_path: Path, layers: int, one_by_one: bool) -> Path:
    from transformers import DynamicCache

    model = build_model(tiny_size(layers, KV_HEADS))
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    run = tmp_path / "run"
    cache = DynamicCache()
    with (
        torch.no_grad(),
        kvtrace.record(run, model=model, profiler=True),
        keep_last(model, KEEP, contiguous=True, one_by_one=one_by_one),
    ):
        output = model(input_ids=ids, past_key_values=cache, use_cache=True)
    del output
    return run


ORDER_LAYERS = 3


def test_an_eviction_in_an_attention_hook_is_logged_before_the_next_layer_writes(tmp_path: Path) -> None:
    # GIVEN a press-like hook that compresses each layer right after its attention, before the next layer
    # writes (the next layer's new K may then take the address the old K freed)
    run = _record_prefill_with_hook(tmp_path, ORDER_LAYERS, one_by_one=False)
    events = read_run(run).kv_events
    # THEN each layer's eviction, and the frees of its old storages, come right after its own update
    per_layer = [
        ("created", "k"),
        ("created", "v"),
        ("evicted", "k"),
        ("evicted", "v"),  # both copies exist before either old storage goes, as in the hook
        ("freed", "k"),
        ("freed", "v"),
    ]
    expected = [(event, layer, kv) for layer in range(ORDER_LAYERS) for event, kv in per_layer]
    assert [(e.event, e.layer, e.kv) for e in events if e.step == 1] == expected
    assert [e.evicted_tokens for e in events if e.event == "evicted" and e.kv == "k"] == [
        PROMPT - KEEP
    ] * ORDER_LAYERS
    # ... and the peak is the last layer's full K and V beside their two copies and the compressed layers
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH  # one token, all rows, K or V
    compressed = (ORDER_LAYERS - 1) * 2 * KEEP * row_bytes
    peak = compressed + 2 * PROMPT * row_bytes + 2 * KEEP * row_bytes
    assert peak == 2 * 2 * 8 * 256 + 2 * 17 * 256 + 2 * 8 * 256 == 20992
    data = _report(run)
    assert data["kv"]["peak_bytes"] == peak
    assert data["kv"]["final_bytes"] == ORDER_LAYERS * 2 * KEEP * row_bytes
    # ... which is what the allocator itself went through (torch.profiler's memory events)
    assert _allocator_peak(run, events) == peak


def test_a_hook_copying_k_then_v_one_by_one_is_logged_at_most_one_copy_high(tmp_path: Path) -> None:
    # GIVEN a hook that copies K and drops the old K before it copies V: seen only afterwards, the log
    # cannot tell it from the press above, and shows both copies beside both old storages (an upper bound),
    # unless the V copy took the old K's address, which proves the old K went first
    run = _record_prefill_with_hook(tmp_path, ORDER_LAYERS, one_by_one=True)
    events = read_run(run).kv_events
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH
    compressed = (ORDER_LAYERS - 1) * 2 * KEEP * row_bytes
    true_peak = compressed + 2 * PROMPT * row_bytes + KEEP * row_bytes  # the K copy beside the full K, V
    assert _allocator_peak(run, events) == true_peak
    assert _report(run)["kv"]["peak_bytes"] in (true_peak, true_peak + KEEP * row_bytes)
    # each layer's eviction still comes before the next layer's update
    order = [(e.event, e.layer) for e in events if e.step == 1 and e.kv == "k" and e.event != "freed"]
    assert order == [(event, layer) for layer in range(ORDER_LAYERS) for event in ("created", "evicted")]


def _set_base_late(run: Path, late_ns: int) -> None:
    """Rewrite the run's trace with its baseTimeNanoseconds `late_ns` later, as a loaded Kineto sets it."""
    (path,) = (run / "profiler").glob("*.pt.trace.json*")
    trace = load_trace(path)
    trace["baseTimeNanoseconds"] += late_ns
    text = json.dumps(trace).encode()
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)


@pytest.fixture(scope="module")
def one_by_one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of the one-by-one hook, its profiler's memory events on: recorded once, for copies."""
    return _record_prefill_with_hook(tmp_path_factory.mktemp("one_by_one"), ORDER_LAYERS, one_by_one=True)


@pytest.mark.parametrize("late_ms", [1, 2, 4, 8])
def test_the_allocator_peak_is_found_under_a_trace_base_set_late(
    one_by_one_run: Path, tmp_path: Path, late_ms: int
) -> None:
    # GIVEN a copy of the one-by-one hook's run whose trace's baseTimeNanoseconds is late_ms late, as a
    # loaded host's Kineto sets it now and then (each allocation read that much later)
    edited = tmp_path / "edited"
    shutil.copytree(one_by_one_run, edited)
    _set_base_late(edited, late_ms * 1_000_000)
    events = read_run(edited).kv_events

    # WHEN its KV storages are paired with the trace's allocations on the trace's clock, and as read
    got = _kv_allocations(edited, events)
    as_read = _kv_allocations(edited, events, lead_us=0.0)

    # THEN as read, some storage seen soon after its allocation (a prefill storage: tens of µs) finds none
    # within the pairing's tolerance, or another's (the flake) ...
    assert as_read != got
    # ... while on the trace's clock each has the allocation it has in the run as recorded, read late_ms later
    want = _kv_allocations(one_by_one_run, events)
    assert None not in got and None not in want
    found = [(a.addr, a.nbytes, a.alloc_us) for a in got if a is not None]
    recorded = [(a.addr, a.nbytes, a.alloc_us + late_ms * 1000) for a in want if a is not None]
    assert [f[:2] for f in found] == [r[:2] for r in recorded]
    # (Unix-epoch µs in float64 step by 0.25 µs)
    assert [f[2] for f in found] == pytest.approx([r[2] for r in recorded], rel=0, abs=1.0)
    # ... and the peak is the true one, as with the base as recorded: 2 compressed layers' K and V copies
    # (KEEP tokens), the last layer's full K and V (PROMPT tokens) and its K copy (float32, 2 KV heads of
    # 16 dims, BATCH rows)
    row_bytes = KV_HEADS * HEAD_DIM * 4 * BATCH
    true_peak = (ORDER_LAYERS - 1) * 2 * KEEP * row_bytes + 2 * PROMPT * row_bytes + KEEP * row_bytes
    assert true_peak == 2 * 2 * 8 * 256 + 2 * 17 * 256 + 8 * 256 == 18944
    assert _allocator_peak(edited, events) == _allocator_peak(one_by_one_run, events) == true_peak
    # ... and so does the report's memory timeline, whose KV is the analyzers' own join of the two
    _, report = build_report(edited)
    assert int(report.timelines[0].by_category["kv"].max()) == true_peak


def test_evict_ranges_in_the_trace_are_not_steps(tmp_path: Path) -> None:
    """The profiler's trace holds kvtrace's evict ranges inside the step's: the timeline's step markers are
    the forwards only (one prefill here), the evictions one eviction marker (the step's, every layer)."""

    run = _record_prefill_with_hook(tmp_path, ORDER_LAYERS, one_by_one=False)
    trace = load_trace(next((run / "profiler").glob("*.pt.trace.json*")))
    ranges = [
        e.get("name", "") for e in trace["traceEvents"] if str(e.get("name", "")).startswith("kvtrace/")
    ]
    assert sum(name.startswith("kvtrace/evict") for name in ranges) == 2 * ORDER_LAYERS  # K and V per layer
    source, report = build_report(run)
    assert [(m.label, m.detail["range"]) for m in source.markers if m.kind == "step"] == [
        ("step 1 prefill", "kvtrace/prefill")
    ]
    (mark,) = [m for m in source.markers if m.kind == "eviction"]
    assert (mark.detail["step"], mark.detail["layers"]) == (1, ORDER_LAYERS)
    assert report.steps == 1
