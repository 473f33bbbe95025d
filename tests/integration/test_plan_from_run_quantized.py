"""`kvtrace plan --from-run` of a dynamic cache's run, planned as a QuantizedCache: where the plan peaks in
a decode step's update, its dequantized and returned K and V sit beside what the run held inside its own
update, not beside the logits its peak (a step's end) held; where the run peaked at its prefill, the
quantized prefill's quantize temporaries (the backend's own) are not measured, and the plan keeps the
update's copies on top of the peak's activations, a bound, and says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS = 2
BACKENDS = {"hqq": "hqq", "quanto": "optimum.quanto"}


def _backend(name: str) -> None:
    pytest.importorskip(BACKENDS[name], reason=f"the {BACKENDS[name]} package is not installed")


def _quantized(backend: str) -> dict[str, Any]:
    return {"cache_implementation": "quantized", "cache_config": {"backend": backend}}


def _record_quantized(model: Any, out: Path, batch: int, prompt: int, new: int, backend: str) -> None:
    """`record_generate` with transformers' default QuantizedCache (int4, groups of 64, residual 128)."""
    import torch

    import kvtrace

    ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(out, model=model):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=0, **_quantized(backend),
        )  # fmt: skip


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_a_decode_peaked_run_plans_int4_at_its_recorded_peak(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _backend(backend)
    # GIVEN a dynamic cache's run peaking in its last steps (a 4-token prompt, 40 new tokens), and the same
    # generate() recorded with an int4 QuantizedCache
    kv_heads, batch, prompt, new = 2, 4, 4, 40
    model = build_model(tiny_size(LAYERS, kv_heads)).eval()
    record_generate(model, tmp_path / "dynamic", batch, prompt, new)
    _record_quantized(model, tmp_path / "int4", batch, prompt, new, backend)
    recorded = report_json(tmp_path / "int4", capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is planned as the quantized cache
    plan = plan_json(tmp_path / "dynamic", capsys, "--cache", "quantized")
    # THEN its peak is the quantized recording's, from above, by less than one layer's K of every written
    # token (float32). Its last update holds, per token of one layer's K, 2 x 4 dequantized (the prompt),
    # 2 x 43 returned and 38 of the old residual V: 132 tokens, which, before, went on top of the
    # step-end's logits (828,900 B planned for 741,784 recorded)
    written = prompt + new - 1
    side = batch * kv_heads * HEAD_DIM * 4
    assert plan["dynamic_realloc_peak_bytes"] == side * (2 * prompt + 2 * written + (written - 1 - prompt))
    assert recorded <= plan["peak_bytes"] < recorded + side * written


def test_a_prefill_peaked_run_keeps_the_quantized_prefill_bound_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _backend("hqq")
    # GIVEN a dynamic cache's run peaking at its prefill (a 40-token prompt, 8 new tokens), and the same
    # generate() recorded with hqq's int4 QuantizedCache, whose prefill quantize temporaries are its peak
    kv_heads, batch, prompt, new = 4, 8, 40, 8
    model = build_model(tiny_size(LAYERS, kv_heads)).eval()
    record_generate(model, tmp_path / "dynamic", batch, prompt, new)
    at_peak = report_json(tmp_path / "dynamic", capsys)["categories_at_peak"]
    assert at_peak["kv"] == batch * prompt * LAYERS * 2 * kv_heads * HEAD_DIM * 4  # the prompt's KV alone
    _record_quantized(model, tmp_path / "int4", batch, prompt, new, "hqq")
    recorded = report_json(tmp_path / "int4", capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is planned as the quantized cache
    plan = plan_json(tmp_path / "dynamic", capsys, "--cache", "quantized")
    # THEN it is priced as a bound over the recording (the two moments' pricing, which leaves the quantize
    # temporaries out, planned 1,561,496 B for 1,908,648 recorded), and a note says what it does not price
    assert plan["peak_bytes"] >= recorded
    assert any("temporaries that depend on the backend" in note for note in plan["notes"])
