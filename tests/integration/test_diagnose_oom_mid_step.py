"""`kvtrace diagnose` on a run whose OutOfMemoryError came in the middle of a step, between two layers'
KV updates: the layers before it hold the step's tokens, the layers after it one token fewer (a decode
step) or none (the prefill). A token of context costs every KV layer of the model, not only those that
held KV when the error came, and the int4 cache is priced on the tokens each layer really holds.

The error is raised with PyTorch's own exception type by a pre-hook on one decoder layer of a tiny Llama 3,
as the caching allocator would when that layer's KV does not fit. Every expected figure is arithmetic on
the model's shapes.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.hf_versions import needs_fp8_cache
from tests.late_trace import TOLERANCE_US, late_copy, own_lags_us
from tests.tiny import raising_before_layer, tiny_size

LAYERS, KV_HEADS, HEAD_DIM, BATCH, FP32 = 4, 2, 16, 2, 4
ELEMENTS = 2 * KV_HEADS * HEAD_DIM  # K and V of one token, one layer, one row
PER = ELEMENTS * FP32  # their bytes: 256
# The OOM asks for 3 KiB with nothing free: a shortfall a shorter context can cover
REQUEST = 3 * 2**10
MESSAGE = (
    "CUDA out of memory. Tried to allocate 3.00 KiB. GPU 0 has a total capacity of 79.19 GiB of which 0 "
    "bytes free."
)


def _record_oom(run: Path, prompt: int, new_tokens: int, forward: int, layer: int, **given: Any) -> None:
    """generate() that raises torch.OutOfMemoryError at model forward `forward` (0: the prefill), before
    decoder layer `layer` runs; `given`: more of generate()'s arguments."""
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = torch.randint(3, 1000, (BATCH, prompt), generator=torch.Generator().manual_seed(0))
    oom = torch.OutOfMemoryError(MESSAGE)
    with (
        raising_before_layer(model, oom, forward + 1, layer),
        pytest.raises(torch.OutOfMemoryError),
        torch.no_grad(),
        kvtrace.record(run, model=model),
    ):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, **given,
        )  # fmt: skip


def _cli(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def _remedy(diagnosis: dict[str, Any], kind: str, bits: int | None = None) -> dict[str, Any]:
    return next(
        r for r in diagnosis["remedies"] if r["kind"] == kind and (bits is None or r["setting"] == bits)
    )


def _int4_bytes(layer_tokens: list[int], prompt: int) -> int:
    """transformers' QuantizedCache at its defaults on these layers: the prompt's tokens in int4 with a
    float32 scale and zero-point per 64 elements, the tokens after it at float32 (fewer than 128 here)."""
    quantized = ELEMENTS // 2 + ELEMENTS // 64 * 2 * FP32
    return sum((prompt * quantized + (held - prompt) * PER) * BATCH for held in layer_tokens if held)


def test_prefill_oom_prices_a_token_at_every_kv_layer(tmp_path: Path) -> None:
    # GIVEN an OOM in the prefill of a 16-token prompt, before layer 2: layers 0 and 1 hold the prompt
    prompt, reached = 16, 2
    run = tmp_path / "run"
    _record_oom(run, prompt, new_tokens=6, forward=0, layer=reached)
    held = [prompt] * reached + [0] * (LAYERS - reached)

    # WHEN it is reported and diagnosed
    report = json.loads(_cli("report", str(run), "--json", "-q", "--no-export"))
    text = _cli("report", str(run), "--no-export")
    diagnosis = json.loads(_cli("diagnose", str(run), "--json"))

    # THEN the measured figure is the two layers', and says so; the arithmetic is every layer's
    kv = sum(held) * PER * BATCH
    assert report["kv"]["final_bytes"] == kv
    assert report["kv"]["bytes_per_token_measured"] == reached * PER
    assert report["kv"]["bytes_per_token_expected"] == LAYERS * PER
    assert f"on the {reached} of the model's {LAYERS} KV layers holding KV at the end" in text
    assert diagnosis["kv_bytes"] == kv
    assert any(f"is on {reached} of the model's {LAYERS} KV layers" in note for note in diagnosis["notes"])

    # fewer new tokens free nothing at a prefill (before: "A context of 15 tokens", shorter than the prompt);
    # a token of the prompt costs every layer's KV: the shortfall is covered by ceil(3 KiB / 2 KiB) tokens
    # fewer, a lower bound (the prefill's activations shrink too, unmeasured in a prefill cut short)
    context = _remedy(diagnosis, "context")
    assert (context["setting"], context["saved_bytes"]) == (None, 0)
    token = LAYERS * PER * BATCH
    cut = math.ceil(REQUEST / token)
    shorter = _remedy(diagnosis, "prompt")
    assert (shorter["setting"], shorter["saved_bytes"], shorter["fits"]) == (prompt - cut, cut * token, True)
    assert f"{human_bytes(token)} per token across the batch" in shorter["sentence"]

    # a sliding window of 2 (the smallest: transformers' sliding cache keeps every token at 1) on every layer
    # peaks holding the whole prompt on each, and one new window
    window = _remedy(diagnosis, "sliding_window")
    assert window["setting"] == 2
    assert f"{human_bytes((LAYERS * prompt + 2) * PER * BATCH)} at its peak" in window["sentence"]

    # int4 quantizes what the two layers hold
    int4 = _remedy(diagnosis, "quantized_kv", 4)
    assert int4["saved_bytes"] == kv - _int4_bytes(held, prompt)


def test_a_prefill_oom_under_a_trace_clock_set_a_few_ms_late_keeps_its_kv(tmp_path: Path) -> None:
    # GIVEN the prefill OOM of the test above (4 KV storages: its first 2 layers' K and V), and copies of it
    # whose trace's clock base is set late, as a loaded host's Kineto base has been seen: every 50 µs from
    # just past the lead that puts each storage's own allocation beyond the join's tolerance after its
    # sighting, to 8 ms. Earlier occupants of some storages' blocks fit those as read at some of the leads
    # (they kept the trace's clock where it was: diagnose's KV at the OOM was 0 or one layer's).
    prompt, reached = 16, 2
    run = tmp_path / "run"
    _record_oom(run, prompt, new_tokens=6, forward=0, layer=reached)
    kv = prompt * reached * PER * BATCH
    assert json.loads(_cli("diagnose", str(run), "--json"))["kv_bytes"] == kv
    first = math.floor((max(own_lags_us(run)) + TOLERANCE_US) / 50 + 1) * 50
    leads = range(first, 8001, 50)

    # WHEN each is diagnosed
    got = {}
    for lead_us in leads:
        copy = late_copy(run, tmp_path / f"late{lead_us}", lead_us)
        got[lead_us] = json.loads(_cli("diagnose", str(copy), "--json"))["kv_bytes"]
        shutil.rmtree(copy)

    # THEN the KV at the OOM is the two layers' prompt at every lead: the trace put back on the run's clock
    assert got == dict.fromkeys(leads, kv)


@pytest.mark.parametrize(("prompt", "forward", "layer"), [(16, 5, 1), (8, 3, 2)])
def test_decode_oom_prices_int4_on_each_layers_tokens(
    tmp_path: Path, prompt: int, forward: int, layer: int
) -> None:
    # GIVEN an OOM at decode forward `forward`, before `layer`: the layers before it hold one token more
    run = tmp_path / "run"
    _record_oom(run, prompt, new_tokens=forward + 3, forward=forward, layer=layer)
    tokens = prompt + forward
    held = [tokens if index < layer else tokens - 1 for index in range(LAYERS)]

    # WHEN it is diagnosed
    diagnosis = json.loads(_cli("diagnose", str(run), "--json"))

    # THEN the int4 cache holds each layer's own tokens, against the KV those layers hold ...
    kv = sum(held) * PER * BATCH
    assert (diagnosis["kv_bytes"], diagnosis["tokens_held"]) == (kv, tokens)
    int4 = _remedy(diagnosis, "quantized_kv", 4)
    int4_bytes = _int4_bytes(held, prompt)
    cache_saves = f"saving {human_bytes(kv - int4_bytes)}"
    assert f"in {human_bytes(int4_bytes)} instead of {human_bytes(kv)}, {cache_saves}" in int4["sentence"]
    # ... and its updates, which dequantize a layer's K and V beside the cache, take back part of that: the
    # remedy saves what the int4 run's peak is below this moment, less than the cache alone
    assert 0 < int4["saved_bytes"] < kv - int4_bytes
    lower = f"{human_bytes(int4['saved_bytes'])} lower than this moment."
    assert "its updates dequantize a layer's K and V beside the cache" in int4["sentence"]
    assert int4["sentence"].endswith(lower), int4["sentence"]
    # a token of context costs every layer's KV, as at any step
    token = LAYERS * PER * BATCH
    context = _remedy(diagnosis, "context")
    assert context["saved_bytes"] == math.ceil(REQUEST / token) * token
    assert not any("KV layers" in note for note in diagnosis["notes"])


@needs_fp8_cache
def test_a_static_cache_for_a_quantized_run_that_ran_out_is_priced_at_its_call(tmp_path: Path) -> None:
    # GIVEN an fp8 QuantizedCache's run (a 10-token prompt, 30 new tokens asked) out of memory in step 6
    prompt, new = 10, 30
    quantized = {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}}
    _record_oom(tmp_path / "run", prompt, new, 5, 0, **quantized)
    # WHEN diagnosed
    diagnosis = json.loads(_cli("diagnose", str(tmp_path / "run"), "--json"))
    static = _remedy(diagnosis, "static_cache")
    # THEN a StaticCache is priced as generate() would size it for the call, max_cache_len = 39 (the last new
    # token is never fed back), every layer's K and V at float32 from its first update, not at the 14 tokens
    # the moment held
    held = diagnosis["tokens_held"]
    positions = prompt + new - 1
    static_kv = LAYERS * BATCH * positions * PER
    assert held == prompt + 4 < positions
    assert f"max_cache_len={positions}) holds KV at the model's float32" in static["sentence"]
    assert (
        f"{human_bytes(static_kv)} for all {positions} positions of the call from its first update, where "
        f"this moment holds {held}, which adds {human_bytes(static_kv - diagnosis['kv_bytes'])}"
    ) in static["sentence"]
    assert static["saved_bytes"] == 0 and static["fits"] is False
