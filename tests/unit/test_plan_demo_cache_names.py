"""`kvtrace plan --cache` takes `kvtrace demo --cache`'s names, as its help and the README say: fp8, quanto
and hqq are a QuantizedCache of that backend (it said "invalid choice: 'fp8'", diagnose's first remedy on the
demo), and offloaded, which plan does not place, is refused saying what to plan instead."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvtrace.cli import main

PLAN = ["plan", "--preset", "llama-3.1-8b", "--gpu-memory", "24GiB", "--context", "8192", "--json"]


def _plan(capsys: Any, *argv: str) -> dict[str, Any]:
    assert main([*PLAN, *argv]) in (0, 1)
    return json.loads(capsys.readouterr().out)


def test_fp8_is_the_quantized_cache_of_fp8_kv(capsys: Any) -> None:
    # GIVEN Llama 3.1 8B at 8,192 tokens; WHEN planned with demo's fp8 and with plan's own spelling of it
    named, spelled = (
        _plan(capsys, "--cache", "fp8"),
        _plan(capsys, "--cache", "quantized", "--kv-dtype", "fp8"),
    )
    # THEN the same cache: 32 layers x K,V x 8 heads x 128 x 1 B = 65,536 B a token, and the same peak
    assert (named["request"]["cache"], named["request"]["kv_dtype"]) == ("quantized", "fp8")
    assert named["kv_bytes_per_token"] == 32 * 2 * 8 * 128 * 1 == spelled["kv_bytes_per_token"]
    assert named["peak_bytes"] == spelled["peak_bytes"]


def test_quanto_and_hqq_are_int4_quantized_caches_of_their_backend(capsys: Any) -> None:
    quanto, hqq = _plan(capsys, "--cache", "quanto"), _plan(capsys, "--cache", "hqq")
    plain = _plan(capsys, "--cache", "quantized")
    # THEN int4 KV (transformers' default nbits), quanto's packing what plan prices without a backend, and
    # hqq's, which pads no group to a byte row, no larger
    for named, backend in ((quanto, "quanto"), (hqq, "hqq")):
        assert (named["request"]["kv_dtype"], named["request"]["quant_backend"]) == ("int4", backend)
    assert quanto["kv_bytes"] == plain["kv_bytes"] >= hqq["kv_bytes"]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["--cache", "fp8", "--kv-dtype", "int4"],
            "--cache fp8 holds fp8 KV, not --kv-dtype int4: use --cache ",
        ),
        (["--cache", "offloaded"], "--cache offloaded: plan does not model an offloaded cache"),
    ],
)
def test_a_demo_name_plan_cannot_take_as_typed_is_refused_in_one_line(
    capsys: Any, argv: list[str], said: str
) -> None:
    assert main([*PLAN, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvtrace plan: error: {said}") and err.count("\n") == 1, err
