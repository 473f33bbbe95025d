"""`kvtrace plan --from-run` of a run without allocator events (`profiler=False`): on CUDA its memory samples
measured each step's allocator peak (`cuda_peak_allocated_bytes`, `max_memory_allocated`, never reset), and
the most a step's exceeds the plan's arithmetic at the run's own batch and tokens is the reserve, not the
10% guess at its activations. The real H200 OOMs (sample_traces/h200) planned the context and batch
`kvtrace diagnose` named as fitting at NO (`--context 216` of oom_b266: 25.39 GiB of its 24.96 GiB cap,
2.50 GiB of it the reserve), though the run had passed that prefill and held more tokens than that under the
cap. Every figure here is computed from the run's files (its manifest, weights table and samples) and the
plan's own prefill activations; on the CPU, where no sample gives such a peak, the 10% stays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cli_json import cli_json, plan_json
from tests.tiny import record_generate

H200 = Path(__file__).resolve().parents[2] / "sample_traces" / "h200"
PROMPT, NEW = 128, 192  # the runs' generate(): a 128-token prompt, max_new_tokens=192 (the h200 README)


def _measured_steps(run: Path) -> list[tuple[str, int, int]]:
    """(phase, tokens a row at the step's end, peak) of each step whose sample shows the allocator's running
    peak risen over the sample before it (that step's own peak), from the first prefill on; a step whose
    forward raised (the OOM's) reached part of it and is left out."""
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").open()]
    cuda = [s for s in samples if "cuda_peak_allocated_bytes" in s]
    assert [s["step"] for s in cuda if s["phase"] == "prefill"] == [1]  # one generate() call
    steps: list[tuple[str, int, int]] = []
    running = None
    for sample in cuda:
        peak = sample["cuda_peak_allocated_bytes"]
        rose = running is not None and peak > running and not sample.get("raised")
        if rose and sample["phase"] in ("prefill", "decode"):
            steps.append((sample["phase"], PROMPT + sample["step"] - 1, peak))
        running = peak if running is None else max(running, peak)
    return steps


@pytest.mark.parametrize(("name", "batch"), [("oom_b266", 266), ("oom_b261_fit", 261)])
def test_diagnose_remedies_plan_as_fitting_from_a_run_whose_samples_measured_its_peaks(
    name: str, batch: int, tmp_path: Path, capsys: Any
) -> None:
    # GIVEN a copy of a real OOM recorded with profiler=False under a 24.96 GiB cap
    run = tmp_path / name
    shutil.copytree(H200 / name, run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["options"]["profiler"] is False and manifest["device"]["type"] == "cuda"
    model = manifest["model"]
    layer_k = model["num_kv_heads"] * model["head_dim"] * 2  # one token's K in one layer, bf16
    kv_token = model["num_layers"] * 2 * layer_k
    weights = sum(json.loads(line)["storage_bytes"] for line in (run / "weights.jsonl").open())
    steps = _measured_steps(run)
    # the prefill set a new peak, and so did 32 decode steps, the last whole one (129, 256 tokens) among them
    assert [phase for phase, _, _ in steps] == ["prefill"] + ["decode"] * 32
    assert steps[-1][1] == 256
    # WHEN the run itself is planned
    recorded = plan_json(run, capsys)
    prefill_activations = recorded["prefill_activations_bytes"]  # the plan's estimate at 266 x 128

    def arithmetic(rows: int, phase: str, tokens: int, activations: int) -> int:
        """The plan's bytes of a step, no reserve: the prefill's KV and activations, or a decode step's KV
        and torch.cat's new K of one layer beside the old one."""
        if phase == "prefill":
            return weights + rows * PROMPT * kv_token + activations
        return weights + rows * tokens * kv_token + rows * (tokens - 1) * layer_k

    # THEN the reserve is the most a measured step's peak exceeds the arithmetic of that step
    reserve = max(
        peak - arithmetic(batch, phase, tokens, prefill_activations) for phase, tokens, peak in steps
    )
    assert recorded["reserve_bytes"] == reserve == {266: 636_354_816, 261: 622_523_136}[batch]
    assert recorded["request"]["reserve_fraction"] is None
    said = [note for note in recorded["notes"] if "measured the CUDA allocator's peak" in note]
    assert len(said) == 1 and f"{steps[0][2]:,} B) at its prefill" in said[0], recorded["notes"]
    assert f"{reserve:,} B) beyond it are kept as the reserve" in said[0]
    assert not any("the reserve stands for" in note for note in recorded["notes"])
    # AND the run as launched still does not fit (it ran out), now by the measured figures
    held = PROMPT + NEW - 1
    assert recorded["peak_bytes"] == arithmetic(batch, "decode", held, 0) + reserve
    assert not recorded["fits"]
    # AND the context and the batch diagnose names as fitting plan as fitting, at the peaks the same
    # arithmetic gives (before: NO, 25.39 GiB at oom_b266's context 216, 2.50 GiB of it the reserve)
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)
    remedies = {r["kind"]: r for r in diagnosis["remedies"] if r["kind"] in ("context", "batch")}
    assert remedies["context"]["fits"] and remedies["batch"]["fits"]
    context, rows = remedies["context"]["setting"], remedies["batch"]["setting"]
    assert (context, rows) == {266: (216, 223), 261: (206, 208)}[batch]
    for flag, setting, planned_rows, planned_held in (
        ("--context", context, batch, context - 1),
        ("--batch", rows, rows, held),
    ):
        planned = plan_json(run, capsys, flag, str(setting))
        activations = planned["prefill_activations_bytes"]
        peak = reserve + max(
            arithmetic(planned_rows, "prefill", PROMPT, activations),
            arithmetic(planned_rows, "decode", planned_held, 0),
        )
        assert planned["reserve_bytes"] == reserve
        assert planned["peak_bytes"] == peak <= planned["request"]["gpu_memory_bytes"]
        assert planned["fits"] is True, (flag, setting, planned["peak_bytes"])
    # AND a --reserve typed goes on top of the measured one
    typed = plan_json(run, capsys, "--context", str(context), "--reserve", "1GiB")
    assert typed["reserve_bytes"] == reserve + 2**30


def test_a_cpu_run_without_allocator_events_keeps_the_10_percent_reserve(
    tiny_model: torch.nn.Module, tmp_path: Path, capsys: Any
) -> None:
    # GIVEN a real run recorded with profiler=False on the CPU, whose samples carry no allocator peak
    run = tmp_path / "run"
    record_generate(tiny_model, run, 2, 16, 8, profiler=False)
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").open()]
    assert samples and not any("cuda_peak_allocated_bytes" in s for s in samples)
    # WHEN it is planned
    planned = plan_json(run, capsys)
    # THEN the reserve stands for its unseen activations, 10% of the 80 GiB planned for
    assert planned["request"]["gpu_memory_bytes"] == 80 * 2**30
    assert planned["reserve_bytes"] == 8 * 2**30
    assert any(
        note.endswith("its activations are unseen, so the reserve stands for them")
        for note in planned["notes"]
    )
    assert not any("allocator's peak" in note for note in planned["notes"])
