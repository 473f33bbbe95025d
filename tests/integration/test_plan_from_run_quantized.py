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
from tests.tiny import HEAD_DIM, cache_arg, record_generate, tiny_size

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


def _cache_storage_bytes(cache: Any) -> int:
    """Bytes of the distinct storages a QuantizedCache's layers hold: the residual's K and V and the
    quantized tensors' own plain tensors (quanto's `_data`, `_scale`, `_shift`; HQQ's packed values and
    meta), found by flattening each tensor subclass, as torch itself does."""
    import torch

    storages: dict[int, int] = {}

    def walk(obj: Any) -> None:
        if (
            isinstance(obj, torch.Tensor)
            and type(obj) is not torch.Tensor
            and hasattr(obj, "__tensor_flatten__")
        ):
            for name in obj.__tensor_flatten__()[0]:
                walk(getattr(obj, name))
        elif isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, list | tuple):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)

    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            walk(getattr(layer, name, None))
    storages.pop(0, None)  # the emptied residual's storage, which holds nothing
    return sum(storages.values())


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_a_quantized_run_is_planned_and_diagnosed_at_its_caches_own_bytes(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _backend(backend)
    import torch
    from transformers import QuantizedCache

    import kvtrace
    from tests.cli_json import cli_json

    # GIVEN a 3-layer tiny Llama 3 (layers 32 wide, narrower than a group of 64), 2 rows, a 12-token
    # prompt, generated with transformers' default QuantizedCache for 8 new tokens (19 held) and for 4 (15)
    model = build_model(tiny_size(3, 2)).eval()
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    held = {}
    for new in (8, 4):
        cache = QuantizedCache(backend=backend, config=model.config)
        with torch.no_grad(), kvtrace.record(tmp_path / f"new{new}", model=model, profiler=False):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0, **cache_arg(cache),
            )  # fmt: skip
        held[new] = _cache_storage_bytes(cache)
    # the arithmetic: a layer's quantized K of 2 x 2 x 12 x 16 values (384 B packed, 12 groups of a float32
    # scale and zero-point), and 7 (or 3) tokens in the float32 residual
    values, token = 2 * 2 * 12 * HEAD_DIM, 3 * 2 * 2 * 2 * HEAD_DIM * 4
    packed = 3 * 2 * (values // 2 + values // 64 * 2 * 4)
    assert (held[8], held[4]) == (packed + 7 * token, packed + 3 * token)
    recorded = report_json(tmp_path / "new8", capsys)["kv"]
    # WHEN the longer run is planned with no other flag: THEN its KV final and peak are the recording's
    # (it was 14,208 and 31,616 B for 13,632 and 15,168)
    plan = plan_json(tmp_path / "new8", capsys)
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (recorded["final_bytes"], recorded["peak_bytes"])
    assert plan["kv_bytes"] == held[8]
    # and diagnosed: a context of 16 (15 tokens held) frees what the shorter run's KV peak holds less (it was
    # 2.80 KiB, then the two ends' 6,144 B): the cache's bytes, and, in the last layer's residual cat, the old
    # V of 6 tokens beside the new, not of 2 (one layer's V a token: 2 rows x 2 heads x 16 x float32)
    diagnosis = cli_json(["diagnose", str(tmp_path / "new8"), "--json"], capsys)
    context = next(r for r in diagnosis["remedies"] if r["kind"] == "context")
    old_v = 2 * 2 * HEAD_DIM * 4
    assert (context["setting"], context["saved_bytes"]) == (16, held[8] - held[4] + (6 - 2) * old_v)
    shorter = report_json(tmp_path / "new4", capsys)["kv"]["peak_bytes"]
    assert context["saved_bytes"] == recorded["peak_bytes"] - shorter
