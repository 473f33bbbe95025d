"""`diagnose` names the step of a moment inside a module-cache model's forward (Meta's reference Llama 3,
`cache_k` / `cache_v`) by the forward's step range, not by the KV log's first line of the step, which the
recorder writes only when it scans the buffers at the forward's end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

import kvtrace

pytest.importorskip("fairscale.nn.model_parallel.initialize")
pytest.importorskip("llama_models.llama3.model")

from test_llama_models_reference import (
    LLAMA3_VOCAB,
    MAX_BATCH,
    PROMPT_LEN,
    _reference_model,
)

DECODE_STEPS = 2


def _step_ranges(run_dir: Path) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of the trace's kvtrace step ranges on the run's clock, in time order, read
    from the profiler's file with plain json."""
    (path,) = (run_dir / "profiler").glob("*.pt.trace.json*")
    raw = path.read_bytes()
    trace = json.loads(gzip.decompress(raw) if path.name.endswith(".gz") else raw)
    base_us = trace["baseTimeNanoseconds"] / 1000
    return sorted(
        (e["ts"] + base_us, e["ts"] + base_us + e["dur"], e["name"])
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("kvtrace/")
    )


def test_peak_inside_a_module_cache_forward_is_in_that_forward_s_step(tmp_path, watched_models, capsys):
    # GIVEN Meta's reference model, its buffers made for MAX_BATCH rows, run on one row fewer with the
    # profiler on: the Llama 3 vocabulary's output projection makes the prefill's logits the run's peak,
    # inside the prefill's forward and before the recorder's scan logs the step's first KV line
    from kvtrace.cli import main

    batch = MAX_BATCH - 1
    with _reference_model(tmp_path, watched_models, vocab=LLAMA3_VOCAB) as model:
        tokens = torch.randint(0, LLAMA3_VOCAB, (batch, PROMPT_LEN + DECODE_STEPS))
        with kvtrace.record(tmp_path / "run", model=model, snapshots=False), torch.inference_mode():
            model.forward(tokens[:, :PROMPT_LEN], 0)
            for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
                model.forward(tokens[:, pos : pos + 1], pos)
    capsys.readouterr()  # fairscale's own lines

    # WHEN it is diagnosed, alone and against a budget just under its peak
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    peak = json.loads(capsys.readouterr().out)
    budget = peak["allocated_bytes"] - 1
    assert main(["diagnose", str(tmp_path / "run"), "--budget", f"{budget}B", "--json"]) == 0
    crossed = json.loads(capsys.readouterr().out)

    # THEN the step is the one whose range holds the peak: the KV log's numbering counts record()'s setup
    # as step 0, so the n-th range (from 0) is step n + 1, the prefill step 1
    ranges = _step_ranges(tmp_path / "run")
    assert len(ranges) == 1 + DECODE_STEPS
    holding = [i for i, (start, end, _) in enumerate(ranges) if start <= peak["ts_us"] <= end]
    assert len(holding) == 1, (peak["ts_us"], ranges)
    expected_step = holding[0] + 1
    expected_phase = "prefill" if ranges[holding[0]][2] == "kvtrace/prefill" else "decode"
    assert (peak["step"], peak["step_phase"]) == (expected_step, expected_phase)
    # AND what is held at that step's end follows it: the rows used, the prompt plus a token per decode
    assert (peak["batch"], peak["tokens_held"]) == (batch, PROMPT_LEN + expected_step - 1)
    # AND the budget's crossing (the peak's own allocation or one before it) names the peak's step
    assert crossed["budget_crossing"]["step"] == expected_step
    assert crossed["step"] == expected_step
