"""`kvtrace plan --from-run RUN --dtype fp32` of a run recorded in bf16 grows the run's activations with the
compute dtype, as its weights and KV already follow it: all but generate()'s float32 logits and the
vocabulary-long vectors, which no model dtype changes. Before, the bf16 activations were kept: 683,940 B
planned where the fp32 recording of the same batch and context peaked at 694,168 (-1.5%; the demo's tiny
Llama with its 128,256-token vocabulary: -2.2%)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW, VOCAB = 2, 2, 4, 11, 6, 1000
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same generate() recorded with the model in bf16 and in fp32."""
    folder = tmp_path_factory.mktemp("dtypes")
    for name, dtype in DTYPES.items():
        model = build_model(tiny_size(LAYERS, KV_HEADS)).eval().to(dtype)
        record_generate(model, folder / name, BATCH, PROMPT, NEW)
    return {name: folder / name for name in DTYPES}


def test_a_bf16_run_planned_in_fp32_bounds_the_fp32_recording(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp32 recording's peak
    measured = report_json(runs["fp32"], capsys)["peak_allocated_bytes"]
    # WHEN the bf16 run is planned in fp32, weights and KV and compute
    plan = plan_json(runs["bf16"], capsys, "--dtype", "fp32")
    # THEN its weights and KV are fp32's, and its peak at least the fp32 recording's, within a few percent
    assert plan["request"]["kv_dtype"] == "fp32"
    assert measured <= plan["peak_bytes"] <= measured * 1.03
    # AND the bf16 run's peak (a decode step's end) told generate()'s float32 logits apart: at least one
    # copy of the rows' last-position logits, 4 bytes a value whatever the model's dtype
    recorded = plan["request"]["recorded"]
    assert (recorded["compute_dtype"], recorded["phase"]) == ("bf16", "decode")
    assert recorded["dtype_fixed_bytes"] >= BATCH * VOCAB * 4


def test_a_plan_in_the_runs_own_or_a_narrower_dtype_keeps_its_activations(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN both recordings
    measured = {name: report_json(runs[name], capsys)["peak_allocated_bytes"] for name in DTYPES}
    # WHEN each is planned in its own dtype, typed: THEN it is the run itself
    for name in DTYPES:
        assert plan_json(runs[name], capsys, "--dtype", name)["peak_bytes"] == measured[name]
    # WHEN the fp32 run is planned in bf16: THEN its activations stay as measured (generate's float32
    # tensors do not shrink), an upper bound of the bf16 recording
    narrower = plan_json(runs["fp32"], capsys, "--dtype", "bf16")
    assert narrower["peak_bytes"] >= measured["bf16"]


def _held_at_half(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers stored at 2 B an element but those kept in float32 (4 B):
    what it holds in fp16 as in bf16, from its own counts."""
    tensors = [*model.parameters(), *model.buffers()]  # parameters() once each, tied or not
    return sum(t.numel() * (4 if t.dtype == torch.float32 else 2) for t in tensors)


def test_a_bf16_run_planned_in_fp16_weighs_its_buffers_as_the_run_held_them(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the bf16 run, its model cast whole by `.to(torch.bfloat16)`: its rotary inv_freq and
    # original_inv_freq are bf16 too, not the float32 transformers keeps under dtype=
    cast = build_model(tiny_size(LAYERS, KV_HEADS)).eval().to(torch.bfloat16)
    assert {b.dtype for b in cast.buffers()} == {torch.bfloat16}
    # WHEN it is planned in fp16, as wide as bf16
    plan = plan_json(runs["bf16"], capsys, "--dtype", "fp16")
    # THEN every parameter and buffer is 2 B an element, as the run held them (before: its buffers at 4 B,
    # 32 B more under transformers 5.25)
    held = report_json(runs["bf16"], capsys)["categories_at_peak"]["weights"]
    assert plan["weights_bytes"] == _held_at_half(cast) == held
    # AND a model built with dtype=bf16, which keeps its rotary tables in float32, keeps them at 4 B
    kept = transformers.AutoModelForCausalLM.from_config(cast.config, dtype=torch.bfloat16).eval()
    assert torch.float32 in {b.dtype for b in kept.buffers()}
    record_generate(kept, tmp_path / "kept", BATCH, PROMPT, NEW)
    assert plan_json(tmp_path / "kept", capsys, "--dtype", "fp16")["weights_bytes"] == _held_at_half(kept)
