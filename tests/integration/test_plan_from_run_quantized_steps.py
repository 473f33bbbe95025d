"""A quanto or HQQ QuantizedCache recorded at settings that take it out of its usual rhythm: one that
requantizes every step (`residual_length=1`, no full-precision part ever held), and one whose KV peak is the
step that fills its residual, before the requantization. Skipped where the backend is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, tiny_size

BACKENDS = {"hqq": "hqq", "quanto": "optimum.quanto"}
LAYERS, KV_HEADS, FP32 = 2, 2, 4


def _record(
    backend: str, out: Path, rows: int, prompt: int, new: int, group: int, residual: int, bits: int = 4
) -> None:
    """generate() on the tiny Llama 3 with an int`bits` QuantizedCache of `group` and `residual`."""
    pytest.importorskip(BACKENDS[backend], reason=f"the {BACKENDS[backend]} package is not installed")
    import torch

    import kvtrace

    model = build_model(tiny_size(LAYERS, KV_HEADS)).eval()
    ids = torch.randint(3, 1000, (rows, prompt), generator=torch.Generator().manual_seed(0))
    config: dict[str, Any] = {"backend": backend, "nbits": bits, "q_group_size": group}
    config["residual_length"] = residual
    with torch.no_grad(), kvtrace.record(out, model=model, profiler=False):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=0, cache_implementation="quantized", cache_config=config,
        )  # fmt: skip


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_a_cache_that_requantizes_every_step_holds_its_tokens_in_report_and_plan(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN residual_length=1: every token quantized at once, no `data` part ever logged
    _record(backend, tmp_path / "run", rows=2, prompt=8, new=12, group=16, residual=1)
    # WHEN reported: THEN every layer holds 8 + 12 - 1 = 19 tokens a row (it was 0)
    report = report_json(tmp_path / "run", capsys)
    assert [layer["tokens"] for layer in report["kv"]["per_layer"]] == [19] * LAYERS
    # and planned (it exited 2, "the run logged no KV cache"): at those 19 tokens, all quantized
    plan = plan_json(tmp_path / "run", capsys, "--batch", "2")
    assert plan["kv_tokens"] == 19 and plan["kv_residual_bytes"] == 0


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_a_plans_kv_peak_is_the_recorded_step_that_fills_the_residual(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 3 rows, an 8-token prompt, 9 new tokens, groups of 64, residual 8: requantizes at 16 tokens
    _record(backend, tmp_path / "run", rows=3, prompt=8, new=9, group=64, residual=8)
    # WHEN planned from the run
    recorded = report_json(tmp_path / "run", capsys)["kv"]["peak_bytes"]
    plan = plan_json(tmp_path / "run", capsys)
    # THEN its KV peak is the recording's, the step at 15 tokens: each layer's prompt quantized (3 x 2 x 8
    # x 16 values, half a byte each, a float32 scale and zero-point per 64) and 7 float32 residual tokens,
    # K and V, and the last layer's old V of 6 (it was 14,112 B, the requantizing step's)
    values, row_token = 3 * KV_HEADS * 8 * HEAD_DIM, 3 * KV_HEADS * HEAD_DIM * FP32
    layer = values // 2 + values // 64 * 2 * FP32 + 7 * row_token
    assert plan["kv_peak_bytes"] == recorded == LAYERS * 2 * layer + 6 * row_token == 14_976


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_a_shorter_context_said_to_fit_fits_when_recorded(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.cli_json import cli_json

    # GIVEN 2 rows, an 8-token prompt, 12 new tokens (19 held), groups of 16, residual 3: at 17 tokens the
    # cache requantizes at its last step, its first layer's new quantized K and V beside all it held
    _record(backend, tmp_path / "run", rows=2, prompt=8, new=12, group=16, residual=3)
    peak = report_json(tmp_path / "run", capsys)["peak_allocated_bytes"]
    budget = peak - 1500
    # WHEN diagnosed 1,500 B over budget
    diagnosis = cli_json(["diagnose", str(tmp_path / "run"), "--json", "--budget", f"{budget}B"], capsys)
    context = next(r for r in diagnosis["remedies"] if r["kind"] == "context")
    # THEN the context it says fits does, recorded (it said 17 tokens freed 2,048 B, the ends' difference,
    # and a run to 17 peaked at 558,624 B, over a budget of 557,412 B: its KV peak only 288 B lower)
    assert context["fits"] and context["setting"] < 18  # prompt + new tokens, as plan's --context
    _record(backend, tmp_path / "short", rows=2, prompt=8, new=context["setting"] - 8, group=16, residual=3)
    assert report_json(tmp_path / "short", capsys)["peak_allocated_bytes"] <= budget


@pytest.mark.parametrize(
    ("backend", "bits", "rows", "new", "peak"),
    [
        # planned 8,352 B at the end, 624 B a tensor; its KV peak (9,600 B) the requantizing step's bound
        ("quanto", 4, 3, 9, None),
        ("hqq", 4, 3, 9, None),
        ("quanto", 2, 2, 12, 6_592),  # planned a KV peak of 6,528 B
        ("hqq", 2, 2, 12, 6_528),
    ],
)
def test_a_plan_packs_as_the_runs_backend_does(
    backend: str,
    bits: int,
    rows: int,
    new: int,
    peak: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN groups of 32, residual 5, an 8-token prompt: at the end, 13 (3 rows) or 18 (2 rows) quantized
    _record(backend, tmp_path / "run", rows=rows, prompt=8, new=new, group=32, residual=5, bits=bits)
    recorded = report_json(tmp_path / "run", capsys)["kv"]
    # WHEN planned from the run, its backend read from its packed parts' names
    plan = plan_json(tmp_path / "run", capsys)
    # THEN the plan's KV is the recording's: quanto packs a tensor's groups 8 / bits to a byte row
    # (ceil(groups / (8 / bits)) x 32 B), HQQ its values as they are
    written = 8 + new - 1
    residual = (written - 8) % 5
    values = rows * KV_HEADS * (written - residual) * HEAD_DIM  # a tensor's quantized values at the end
    groups, per_byte = values // 32, 8 // bits
    packed = -(-groups // per_byte) * 32 if backend == "quanto" else values * bits // 8
    tensor = packed + groups * 2 * FP32 + residual * rows * KV_HEADS * HEAD_DIM * FP32
    assert plan["kv_bytes"] == recorded["final_bytes"] == LAYERS * 2 * tensor
    if peak is None:  # the step that requantizes, priced at a bound for the recorder's part-by-part view
        assert plan["kv_peak_bytes"] >= recorded["peak_bytes"]
    else:  # the step to 17 tokens, 13 quantized: 26 groups, 7 rows of 4 with quanto (224 B), 208 B with HQQ
        assert plan["kv_peak_bytes"] == recorded["peak_bytes"] == peak
