"""The KV line (the page's KV panel, the exported counter track) drops where the allocator freed the cache
generate() dropped as it returned, as the trace's own free events say, not where the KV log noticed it (the
block's end); without a trace it keeps the log's times. The end figures stay those of the last step."""

from __future__ import annotations

import gzip
import io
import json
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.plotly_figures import page_figure
from tests.tiny import tiny_size

KV_HEADS, HEAD_DIM, LAYERS, BATCH, PROMPT, NEW = 2, 16, 2, 2, 12, 5
# What the block does after generate() returned and dropped its cache, before it ends
AFTER_GENERATE_S = 0.05


def _record(out: Path, **options: Any) -> Path:
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(out, model=model, **options):
        model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        time.sleep(AFTER_GENERATE_S)
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("traced") / "run")


def _lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]


def _dropped_at_end(run: Path) -> list[dict[str, Any]]:
    """The KV log's `freed` lines of the block's end: the cache generate() dropped, noticed there."""
    dropped = [line for line in _lines(run) if line["event"] == "freed" and line["phase"] == "end"]
    assert len(dropped) == 2 * LAYERS  # each layer's K and V
    return dropped


def _trace_frees_us(run: Path, dropped: list[dict[str, Any]]) -> tuple[list[float], float, float]:
    """(each dropped storage's free, the trace's first memory event, its base) in the trace's own µs: the
    free at the storage's address and size after its allocation, the latest of them at or before the log's
    sighting of the storage (its last line that made a storage there)."""
    (trace,) = (run / "profiler").glob("*.pt.trace.json*")
    raw = trace.read_bytes()
    top = json.loads(gzip.decompress(raw) if trace.name.endswith(".gz") else raw)
    memory = sorted((e for e in top["traceEvents"] if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    base_us = top["baseTimeNanoseconds"] / 1000.0
    lines = _lines(run)
    frees = []
    for line in dropped:
        addr, nbytes = line["addr"], line["storage_bytes"]
        made = [
            e["t_ns"]
            for e in lines
            if e["addr"] == addr and e["seq"] < line["seq"] and e["event"] in ("created", "grown", "replaced")
        ][-1]
        at = [e for e in memory if e["args"]["Addr"] == addr]
        allocation = [
            i for i, e in enumerate(at) if e["args"]["Bytes"] == nbytes and e["ts"] + base_us <= made / 1000.0
        ]
        free = next(e for e in at[allocation[-1] + 1 :] if e["args"]["Bytes"] == -nbytes)
        frees.append(float(free["ts"]))
    return frees, float(memory[0]["ts"]), base_us


def _counter_drop(run: Path) -> tuple[float, float]:
    """(when the exported "KV cache bytes" counter falls to 0 for good, its ts; the level just before)."""
    with gzip.open(run / "kv_counters.trace.json.gz", "rt") as fh:
        counters = [e for e in json.load(fh)["traceEvents"] if e.get("name") == "KV cache bytes"]
    held = [i for i, e in enumerate(counters) if e["args"]["kv"] > 0][-1]
    assert counters[-1]["args"]["kv"] == 0
    return counters[held + 1]["ts"], counters[held]["args"]["kv"]


def _final_bytes() -> int:
    """The cache at the end of the last step: K and V of every layer, prompt + new tokens - 1 (the last
    token is never fed back), all rows, float32."""
    return LAYERS * 2 * KV_HEADS * HEAD_DIM * (PROMPT + NEW - 1) * BATCH * 4


def test_the_kv_line_drops_where_the_allocator_freed_the_cache_generate_dropped(
    traced: Path, tmp_path: Path
) -> None:
    # GIVEN a run whose block went on after generate() returned and dropped its cache
    dropped = _dropped_at_end(traced)
    frees, first_us, base_us = _trace_frees_us(traced, dropped)
    # the log noticed the frees at the block's end, the allocator made them as generate() returned
    noticed_us = dropped[0]["t_ns"] / 1000.0 - base_us
    assert noticed_us - max(frees) > 0.8 * AFTER_GENERATE_S * 1e6
    page = tmp_path / "page.html"
    # WHEN the run is reported (the page, and the counters exported into the run)
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(traced), "-o", str(page), "-q"]) == 0
    # THEN the counter track, on the trace's own time base, falls to 0 at the last of those frees
    drop_ts, level = _counter_drop(traced)
    assert drop_ts == pytest.approx(max(frees), abs=1.0)  # µs: the float64 of Unix-epoch µs
    assert level == dropped[-1]["storage_bytes"]  # the log's last storage, freed last: only the time moved
    # and so does the page's KV line, on the page's axis (seconds from the trace's first memory event),
    # where its allocator chart drops the KV too
    traces, _ = page_figure(page.read_text(encoding="utf-8"), "kvtrace-timeline")
    line = next(t for t in traces if t.get("name") == "KV cache")
    held = [i for i, y in enumerate(line["y"]) if y > 0][-1]
    assert line["x"][held + 1] == pytest.approx((max(frees) - first_us) / 1e6, abs=1e-6)
    allocator = next(t for t in traces if t.get("name") == "kv")
    kv_held = [i for i, y in enumerate(allocator["y"]) if y > 0][-1]
    assert line["x"][held + 1] == pytest.approx(allocator["x"][kv_held + 1], abs=1e-6)


def test_the_end_figures_stay_the_last_steps_and_the_page_marks_them(
    traced: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(traced), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert kv["final_bytes"] == _final_bytes()
    page = tmp_path / "page.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(traced), "-o", str(page), "--no-export", "-q"]) == 0
    traces, layout = page_figure(page.read_text(encoding="utf-8"), "kvtrace-timeline")
    (final,) = [t for t in traces if t.get("name") == "KV final"]
    line = next(t for t in traces if t.get("name") == "KV cache")
    unit = next(a["title"]["text"] for k, a in layout.items() if k.startswith("yaxis") and "KV (" in str(a))
    assert unit == "KV (KiB)"
    assert final["y"] == [_final_bytes() / 1024]
    # on the line, before its drop: the last step's end, not the block's
    held = [i for i, y in enumerate(line["y"]) if y > 0][-1]
    assert final["x"][0] <= line["x"][held]


def test_without_a_trace_the_kv_line_keeps_the_logs_times(tmp_path: Path) -> None:
    run = _record(tmp_path / "run", profiler=False)
    dropped = _dropped_at_end(run)
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(run), "-q"]) == 0
    drop_ts, _ = _counter_drop(run)
    # no trace base: the counters are on the log's clock, in µs
    assert drop_ts == dropped[-1]["t_ns"] / 1000.0


def test_the_tensorboard_tab_marks_kv_final_and_drops_where_the_page_does(
    traced: Path, tmp_path: Path
) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    dropped = _dropped_at_end(traced)
    frees, first_us, _ = _trace_frees_us(traced, dropped)
    # WHEN the same run is drawn by the HTML page and served to the TensorBoard tab
    page = tmp_path / "page.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(traced), "-o", str(page), "--no-export", "-q"]) == 0
    traces, _ = page_figure(page.read_text(encoding="utf-8"), "kvtrace-timeline")
    (page_final,) = [t for t in traces if t.get("name") == "KV final"]
    timeline = RunStore(traced.parent).timeline(traced.name)
    # THEN the tab has the page's "KV final" marker: the arithmetic's bytes, at the end of the last step
    tab_final = timeline["kv_final"]
    assert tab_final["bytes"] == _final_bytes() == page_final["y"][0] * 1024
    assert tab_final["t_s"] == pytest.approx(page_final["x"][0], abs=1e-6)
    assert tab_final["label"] == page_final["text"][0]
    # on the tab's KV chart, which holds that level there and drops where the page's KV line does: at the
    # allocator's last free of the cache generate() dropped
    (device,) = timeline["devices"]
    at_mark = max(i for i, t in enumerate(device["t_s"]) if t <= tab_final["t_s"])
    assert device["kv"][at_mark] == _final_bytes()
    held = [i for i, y in enumerate(device["kv"]) if y > 0][-1]
    assert device["t_s"][held + 1] == pytest.approx((max(frees) - first_us) / 1e6, abs=1e-6)
    assert device["t_s"][held + 1] > tab_final["t_s"]
