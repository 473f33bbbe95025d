"""A module-cache model's steps (Meta's reference Llama 3, `cache_k` / `cache_v` written in place) begin when
the forward begins, for every figure that needs a step's start: a moment's step without the profiler
(the step sample's `started_ns`), the prefill's window that `plan --from-run` takes its activations from, and
the per-step KV counters `report` exports. The KV log's first line of such a step comes only from the
recorder's scan at the forward's end."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace

pytest.importorskip("fairscale.nn.model_parallel.initialize")
pytest.importorskip("llama_models.llama3.model")

from test_diagnose_module_cache_steps import _step_ranges
from test_llama_models_reference import LLAMA3_VOCAB, MAX_BATCH, PROMPT_LEN, _reference_model

DECODE_STEPS = 2
ROWS = MAX_BATCH - 1
FP32 = 4
PREFILL_LOGITS = ROWS * PROMPT_LEN * LLAMA3_VOCAB * FP32  # the output projection of every prompt position
DECODE_LOGITS = ROWS * 1 * LLAMA3_VOCAB * FP32


def _record(
    run: Path, tmp_path: Path, watched_models: list[Any], profiler: bool
) -> tuple[list[int], list[int]]:
    """A prefill and DECODE_STEPS decode steps as Meta's generation loop calls them (each forward's logits
    kept until the next forward returns). Returns the test's own clock readings: just before each call, and
    inside each forward as its output projection begins (every layer has written its KV in place by then,
    and the recorder's scan that logs it comes after the forward returns)."""
    called: list[int] = []
    inside: list[int] = []
    with _reference_model(tmp_path, watched_models, vocab=LLAMA3_VOCAB) as model:
        hook = model.output.register_forward_pre_hook(lambda module, args: inside.append(time.time_ns()))
        try:
            tokens = torch.randint(0, LLAMA3_VOCAB, (ROWS, PROMPT_LEN + DECODE_STEPS))
            with kvtrace.record(run, model=model, snapshots=False, profiler=profiler), torch.inference_mode():
                called.append(time.time_ns())
                logits = model.forward(tokens[:, :PROMPT_LEN], 0)
                for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
                    called.append(time.time_ns())
                    logits = model.forward(tokens[:, pos : pos + 1], pos)
            del logits
        finally:
            hook.remove()
    return called, inside


def _step_counters(run: Path) -> list[float]:
    """The ts of the exported per-layer KV counters, one per step of the KV log (step 0, the setup, first),
    read with plain gzip and json."""
    raw = json.loads(gzip.decompress((run / "kv_counters.trace.json.gz").read_bytes()))
    return [e["ts"] for e in raw["traceEvents"] if e.get("name") == "KV bytes per layer"]


def _find(document: Any, key: str) -> list[Any]:
    if isinstance(document, dict):
        return [v for k, v in document.items() if k == key] + [
            found for v in document.values() for found in _find(v, key)
        ]
    if isinstance(document, list):
        return [found for v in document for found in _find(v, key)]
    return []


def test_without_the_profiler_a_moment_inside_a_forward_is_in_its_step(tmp_path, watched_models, capsys):
    from analyzers.budget import step_at
    from analyzers.report import build_report
    from kvtrace.cli import main

    # GIVEN a module-cache run recorded without the profiler: its only step starts are the recorder's own
    run = tmp_path / "run"
    called, inside = _record(run, tmp_path, watched_models, profiler=False)
    assert len(inside) == len(called) == 1 + DECODE_STEPS
    capsys.readouterr()

    # WHEN a moment inside each forward (before the scan logs its KV) is placed, and the counters exported
    source, _ = build_report(run, timelines=True)
    placed = [step_at(source, t_ns / 1000.0) for t_ns in inside]
    assert main(["report", str(run), "--json"]) == 0

    # THEN it is that forward's step: the KV log counts record()'s setup as step 0, the prefill as step 1
    assert placed == [(1, "prefill")] + [(2 + i, "decode") for i in range(DECODE_STEPS)]
    # AND each step's counters are stamped when its forward began (no trace: ts is the run's clock, µs)
    stamps = _step_counters(run)[-(1 + DECODE_STEPS) :]
    for stamp, before, during in zip(stamps, called, inside, strict=True):
        assert before / 1000.0 <= stamp <= during / 1000.0, (stamp, before, during)


def test_with_the_profiler_the_prefill_window_and_counters_begin_with_the_forward(
    tmp_path, watched_models, capsys
):
    from kvtrace.cli import main

    # GIVEN a module-cache run recorded with the profiler, the prefill's logits kept through the first
    # decode step (as Meta's generate loop keeps them)
    run = tmp_path / "run"
    _record(run, tmp_path, watched_models, profiler=True)
    capsys.readouterr()

    # WHEN it is planned from and its counters exported
    assert main(["plan", "--from-run", str(run), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert main(["report", str(run), "--json"]) == 0
    capsys.readouterr()

    # THEN the prefill's activations are its own forward's: its logits and a few KiB of the tiny model's
    # other tensors, not the first decode forward's logits beside them
    # (the recording's, measured; the plan's own estimate of a prefill is null with a recording)
    (prefill,) = {found for found in _find(plan, "prefill_activations_bytes") if found is not None}
    assert PREFILL_LOGITS <= prefill < PREFILL_LOGITS + DECODE_LOGITS, prefill
    # AND each step's counters are stamped at its range's start (both in the trace's ts, µs)
    ranges = _step_ranges(run)
    trace = next((run / "profiler").glob("*.pt.trace.json*"))
    raw = trace.read_bytes()
    document = json.loads(gzip.decompress(raw) if trace.name.endswith(".gz") else raw)
    base_us = document["baseTimeNanoseconds"] / 1000
    stamps = _step_counters(run)[-(1 + DECODE_STEPS) :]
    assert len(ranges) == len(stamps) == 1 + DECODE_STEPS
    for stamp, (start_us, _, _) in zip(stamps, ranges, strict=True):
        assert stamp == pytest.approx(start_us - base_us, abs=1.0), (stamp, start_us - base_us)
