"""A recorded block that raises before its first allocation: with the profiler on (record()'s default) its
trace holds no memory event and its KV log no line, yet the weights were resident all along. The run reports
them on its device as a run recorded with profiler=False does, `diagnose` says that no step ran and what the
run held, and in a run group such a rank is diagnosed by its weights (or, with no figures at all, passed over
for a rank that has them, saying why). Real recordings of the tiny Llama 3 and of two gloo ranks."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ranks_worker as worker
import torch

import kvtrace
from analyzers.units import human_bytes
from kvtrace.cli import main
from tests.integration.kvlog_math import dynamic_kv_peak
from tests.tiny import weights_bytes

WORLD = 2
MESSAGE = "stopped before generate"


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _json(argv: list[str]) -> Any:
    return json.loads(_run([*argv, "--json"]))


def _raise_in_block(model: torch.nn.Module, out: Path, profiler: bool) -> None:
    with pytest.raises(RuntimeError, match=MESSAGE), kvtrace.record(out, model=model, profiler=profiler):
        raise RuntimeError(MESSAGE)


@pytest.mark.parametrize("profiler", [True, False])
def test_a_block_that_raised_before_allocating_reports_its_weights(
    tiny_model: torch.nn.Module, tmp_path: Path, profiler: bool
) -> None:
    # GIVEN a block that raises at once, the profiler on (its trace has no memory event) or off
    run = tmp_path / "run"
    _raise_in_block(tiny_model, run, profiler)
    weights = weights_bytes(tiny_model)  # the model's parameter and buffer storages, counted here
    if profiler:
        (trace,) = (run / "profiler").glob("*.pt.trace.json*")
        events = json.loads(trace.read_text())["traceEvents"]
        assert not [e for e in events if e.get("name") == "[memory]"]
    assert (run / "kv_events.jsonl").read_text() == ""

    # WHEN it is reported
    report = _json(["report", str(run), "--no-export", "-q"])

    # THEN its device holds the weights, all of its peak, as without the profiler
    assert [(d["device"], d["peak_allocated_bytes"]) for d in report["devices"]] == [("cpu", weights)]
    assert report["peak_allocated_bytes"] == weights
    assert report["devices"][0]["categories_at_peak"]["weights"] == weights

    # AND diagnose says the block raised before its first step and what the run held then
    diagnosis = _json(["diagnose", str(run)])
    assert (diagnosis["device"], diagnosis["allocated_bytes"]) == ("cpu", weights)
    assert diagnosis["before_first_step"] == "RuntimeError"
    assert any(n.startswith(f"the recorded block raised RuntimeError: {MESSAGE}") for n in diagnosis["notes"])
    headline = _run(["diagnose", str(run)]).splitlines()[1]
    assert headline.startswith(
        "no OOM recorded: the recorded block raised RuntimeError before its first step"
    )
    assert headline.endswith(f"what the run held then on cpu: {human_bytes(weights)}")


def test_a_block_that_allocated_nothing_without_a_model_says_what_it_lacks(tmp_path: Path) -> None:
    # GIVEN a block recorded without a model that raises at once: no weights, no KV, no memory event
    run = tmp_path / "run"
    _raise_in_block(None, run, profiler=True)  # type: ignore[arg-type]

    # WHEN it is diagnosed, THEN it is refused, saying what the run lacks (not to record it with kvtrace)
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["diagnose", str(run)]) == 2
    said = err.getvalue()
    assert "no allocator event, no weights (record(model=...) lists them) and no KV" in said
    assert "(its block raised RuntimeError)" in said
    assert "record the run with kvtrace.record()" not in said


def test_a_rank_that_raised_before_allocating_is_diagnosed_by_its_weights(
    tmp_path: Path,
) -> None:
    # GIVEN rank 1 raises at once inside record() (profiler on), rank 0 records its steps
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    facts = worker.launch_facts("hf-dp-raise-first", out, facts_dir, WORLD)
    weights = facts[1]["weights"]  # rank 1's model's storages, counted on the model

    # WHEN the group is reported, THEN rank 1's row is its device and weights, and it is the one to look at
    report = _json(["report", str(out), "--no-export", "-q"])
    rank1 = next(r for r in report["ranks"] if r["rank"] == 1)
    assert (rank1["device"], rank1["peak_allocated_bytes"]) == ("cpu", weights)
    assert report["focus"] == {"rank": 1, "reason": "raised RuntimeError"}

    # AND diagnose of the group diagnoses rank 1 on its figures, saying no step ran
    diagnosis = _json(["diagnose", str(out)])
    assert diagnosis["run_group"]["rank"] == 1
    assert (diagnosis["device"], diagnosis["allocated_bytes"]) == ("cpu", weights)
    assert diagnosis["before_first_step"] == "RuntimeError"
    text = _run(["diagnose", str(out)])
    assert "diagnosing the peak on ? (-)" not in text
    assert "raised RuntimeError before its first step" in text

    # AND the export has a devices row for each rank, rank 1's holding its weights before any event
    export = tmp_path / "export"
    assert main(["export", str(out), "-o", str(export), "-q"]) == 0
    runs = {row["run_id"]: row for row in pq.read_table(export / "runs").to_pylist()}
    devices = pq.read_table(export / "devices").to_pylist()
    by_rank = {runs[d["run_id"]]["rank"]: d for d in devices}
    assert sorted(by_rank) == [0, 1]
    assert (by_rank[1]["device"], by_rank[1]["events"], by_rank[1]["baseline_bytes"]) == ("cpu", 0, weights)


def test_a_rank_without_figures_is_not_the_focus_when_another_has_them(tmp_path: Path) -> None:
    # GIVEN rank 1 raises at once inside a record() given no model (no weights, no KV, no memory event)
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    facts = worker.launch_facts("hf-dp-raise-first-bare", out, facts_dir, WORLD)
    # rank 0 (profiler=False, 1 row): its weights and a dynamic cache's KV at its highest over a prefill
    # and the decode steps
    head_dim = worker.DIM // worker.N_HEADS
    kv_peak = dynamic_kv_peak(
        worker.N_KV_HEADS, head_dim, worker.N_LAYERS, 1, worker.PROMPT_LEN, worker.DECODE_STEPS + 1
    )

    # WHEN the group is reported and diagnosed
    report = _json(["report", str(out), "--no-export", "-q"])

    # THEN the focus is rank 0, which has figures, and the reason names rank 1 and why it was passed over
    reason = "peaked (rank 1 failed first (raised RuntimeError) but has no memory figures)"
    assert report["focus"] == {"rank": 0, "reason": reason}
    diagnosis = _json(["diagnose", str(out)])
    assert diagnosis["run_group"]["rank"] == 0
    assert (diagnosis["device"], diagnosis["allocated_bytes"]) == ("cpu", facts[0]["weights"] + kv_peak)
    first = _run(["diagnose", str(out)]).splitlines()[0]
    assert f"diagnosing rank 0, which {reason}" in first


def test_a_group_without_figures_on_any_rank_is_refused_saying_why(tmp_path: Path) -> None:
    # GIVEN every rank raises at once inside a record() given no model
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    worker.launch_facts("hf-dp-raise-all-bare", out, facts_dir, WORLD)

    # WHEN the group is diagnosed, THEN it is refused in one line naming what the focus rank lacks, not a
    # diagnosis of "? (-)"
    out_text, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out_text), redirect_stderr(err):
        assert main(["diagnose", str(out)]) == 2
    assert "? (-)" not in out_text.getvalue()
    said = err.getvalue()
    assert "no rank has memory figures to diagnose; rank " in said
    assert "no allocator event, no weights (record(model=...) lists them) and no KV" in said
