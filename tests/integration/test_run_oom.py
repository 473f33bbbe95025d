"""An out-of-memory error inside `record()`: re-raised unchanged, recorded, and diagnosed from the run
directory (the failing request from PyTorch's message, a batch that fits from the KV log).

The error is raised by a forward hook at decode step 3 with PyTorch's own exception type and message, as
the caching allocator would; on CUDA the same path also dumps snapshots/oom.pickle (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import tiny_size

LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT = 2, 2, 16, 4, 10
SIZE = tiny_size(LAYERS, KV_HEADS)
MESSAGE = "CUDA out of memory. Tried to allocate 8.00 KiB. GPU 0 has a total capacity of 79.19 GiB"


def test_oom_is_reraised_recorded_and_diagnosed(tmp_path: Path) -> None:
    model = build_model(SIZE)
    calls = {"n": 0}

    def fail_at_step_3(module: Any, args: Any, kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError(MESSAGE)

    handle = model.register_forward_pre_hook(fail_at_step_3, with_kwargs=True)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    run = tmp_path / "run"
    try:
        with (
            pytest.raises(torch.OutOfMemoryError) as raised,
            torch.no_grad(),
            kvtrace.record(run, model=model),
        ):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
            )
    finally:
        handle.remove()
    assert str(raised.value) == MESSAGE
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "exception"
    assert manifest["ended"]["type"] == "OutOfMemoryError"

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(out.getvalue())
    assert diagnosis["requested_bytes"] == 8 * 2**10
    # two forwards completed (prefill + 1 decode): the KV held is PROMPT + 1 tokens for every row
    kv_bytes = LAYERS * 2 * KV_HEADS * HEAD_DIM * (PROMPT + 1) * BATCH * 4
    assert diagnosis["kv_bytes"] == kv_bytes
    batch = next(r for r in diagnosis["remedies"] if r["kind"] == "batch")
    # the request must be freed: each row dropped frees its KV, kv_bytes / BATCH (two rows by the KV alone),
    # and its activations live then, among them the last step's logits (a row's: vocabulary x float32),
    # which make one row enough
    per_row = kv_bytes // BATCH
    assert -(-8 * 2**10 // per_row) == 2
    logits_row = SIZE.vocab_size * 4
    assert per_row + logits_row >= 8 * 2**10
    assert batch["setting"] == BATCH - 1
    assert batch["saved_bytes"] >= per_row + logits_row
    assert f"{human_bytes(per_row)} of KV and " in batch["sentence"]
    assert batch["fits"] is True
