"""A memory budget (`record(..., gpu_memory=...)`): where the run would have run out, checked against the
KV arithmetic of a real recording, then explained by `diagnose` as an OOM."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.errors import KvtraceError
from kvtrace.llama import ModelSize

PROMPT, NEW_TOKENS, BATCH = 8, 6, 1


def _weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer storage: what the device holds before the first step."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _kv_allocations(size: ModelSize) -> list[tuple[int, int, str, int, int]]:
    """(step, layer, kv, request bytes, device bytes after it) of every KV allocation of a dynamic cache,
    from the arithmetic alone: prefill writes P tokens per layer; each decode step s replaces K then V of
    every layer by a copy one token longer (new storage first, the old one freed right after)."""
    per_token = BATCH * size.num_kv_heads * (size.hidden_size // size.num_heads) * 4  # float32
    live, out = 0, []
    for step in range(1, NEW_TOKENS + 1):
        tokens = PROMPT + step - 1
        for layer in range(size.num_layers):
            for kv in ("k", "v"):
                request = per_token * tokens
                live += request
                out.append((step, layer, kv, request, live))
                if step > 1:
                    live -= per_token * (tokens - 1)
    return out


def _record(model: torch.nn.Module, out: Path, gpu_memory: int | str) -> None:
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(out, model=model, profiler=False, gpu_memory=gpu_memory):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )


def _json(argv: list[str]) -> dict:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(argv) == 0
    return json.loads(buffer.getvalue())


def test_crossing_step_layer_and_request_match_the_arithmetic(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    # GIVEN a budget just under the allocation of layer 1's V at decode step 4, and above every earlier one
    weights = _weights_bytes(tiny_model)
    allocations = _kv_allocations(tiny_size)
    target = next(i for i, a in enumerate(allocations) if a[:3] == (4, 1, "v"))
    budget = weights + max(a[4] for a in allocations[:target])
    step, layer, _, request, after = allocations[target]
    assert weights + after > budget  # the test's own premise: this allocation is the first over the line
    # WHEN the run is recorded with that budget and reported
    _record(tiny_model, tmp_path / "run", budget)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["options"]["gpu_memory"] == budget
    crossing = _json(["report", str(tmp_path / "run"), "--json", "-q", "--no-export"])["budget"]
    # THEN the crossing is that allocation: its step, layer, size and the bytes already allocated
    assert crossing["bytes"] == budget and crossing["crossed"] is True
    assert (crossing["step"], crossing["phase"], crossing["layer"]) == (step, "decode", layer)
    assert crossing["request_bytes"] == request and crossing["request_category"] == "kv"
    assert crossing["allocated_before_bytes"] == weights + after - request
    peak = weights + max(a[4] for a in allocations)
    assert crossing["peak_bytes"] == peak and crossing["headroom_bytes"] == budget - peak
    # AND diagnose explains it as an OOM, with remedies priced against the budget at the run's peak
    diagnosis = _json(["diagnose", str(tmp_path / "run"), "--json"])
    assert diagnosis["event"] == "budget" and diagnosis["budget_bytes"] == budget
    assert diagnosis["budget_crossing"]["step"] == step and diagnosis["budget_crossing"]["layer"] == layer
    assert diagnosis["shortfall_bytes"] == peak - budget
    assert any(r["fits"] for r in diagnosis["remedies"])  # dropping a few tokens of KV is enough here
    # remedies fit the device: nothing to offload to the CPU on a CPU run, no CUDA allocator setting
    assert {r["kind"] for r in diagnosis["remedies"]}.isdisjoint({"offloading", "expandable_segments"})
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["diagnose", str(tmp_path / "run")]) == 0
    assert f"at step {step} (decode), layer {layer}" in text.getvalue()


def test_a_budget_that_fits_reports_the_headroom(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    _record(tiny_model, tmp_path / "run", "1GiB")
    peak = _weights_bytes(tiny_model) + max(a[4] for a in _kv_allocations(tiny_size))
    crossing = _json(["report", str(tmp_path / "run"), "--json", "-q", "--no-export"])["budget"]
    assert crossing["bytes"] == 2**30 and crossing["crossed"] is False
    assert crossing["headroom_bytes"] == 2**30 - peak and crossing["step"] is None
    # recorded with profiler=False, only the KV cache and weights were seen: the verdict says so
    assert crossing["partial"] is True and "were not recorded" in crossing["counts"]
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["report", str(tmp_path / "run"), "-q", "--no-export"]) == 0
    assert "budget 1.00 GiB: the KV cache and weights fit" in text.getvalue()
    assert "the run may not" in text.getvalue()


@pytest.mark.parametrize("bad", ["8G", "lots", "-1GiB", 0])
def test_a_bad_budget_is_refused_before_recording(bad: object, tmp_path: Path) -> None:
    with pytest.raises(KvtraceError):
        kvtrace.record(tmp_path / "never", gpu_memory=bad)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("1.5B", "a size in bytes must be a whole number, got '1.5B' (B means bytes: 1.5GB is 1.5e9 bytes)"),
        ("1.7B", "a size in bytes must be a whole number, got '1.7B'"),
        ("1.5", "a size in bytes must be a whole number, got '1.5' (or give a unit: 1.5GiB)"),
        ("70M", "cannot read size '70M'"),
        (0, "a memory size must be positive, got 0"),
        ("0.1B", "a size in bytes must be a whole number"),
        (True, "not a size: True"),
        ("1e99", "size too large: '1e99'"),
    ],
)
def test_a_bad_budget_is_one_line_naming_gpu_memory(bad: object, said: str, tmp_path: Path) -> None:
    # WHEN a budget is a fraction of a byte, unreadable, zero or absurd
    # THEN record() refuses it with the exception the package exports, naming the option, before writing
    with pytest.raises(kvtrace.RecordingError) as raised:
        kvtrace.record(tmp_path / "never", gpu_memory=bad)
    message = str(raised.value)
    assert message.startswith("record(gpu_memory=...): ") and said in message and "\n" not in message
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("given", "stored"), [("12345B", 12345), ("1.5e3B", 1500), ("0.5KiB", 512)])
def test_a_whole_byte_budget_keeps_every_byte(given: str, stored: int, tmp_path: Path) -> None:
    assert kvtrace.record(tmp_path / "run", gpu_memory=given).options.gpu_memory == stored
