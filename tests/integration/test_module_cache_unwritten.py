"""A module-cache run whose buffers no forward wrote (Meta's reference Llama 3, `cache_k` / `cache_v` made
with the model for max_batch_size x max_seq_len): its prefill ran out of memory before layer 0, or the
process was SIGKILLed in it (the kernel's OOM killer), or the block raised before its first forward. The
KV log holds the buffers from their creation with no tokens or rows written, which `report` gives over
their slots and `plan --from-run` plans whole, as it plans any run of them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main

pytest.importorskip("fairscale.nn.model_parallel.initialize")
pytest.importorskip("llama_models.llama3.model")

from test_llama_models_reference import (
    DIM,
    MAX_BATCH,
    MAX_SEQ,
    N_HEADS,
    N_KV_HEADS,
    N_LAYERS,
    PROMPT_LEN,
    VOCAB,
    _reference_model,
)

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB"
# every layer's K and V of one position of one row, float32: 2 x 2 x 2 x 16 x 4 = 512 B
SLOT_BYTES = N_LAYERS * 2 * N_KV_HEADS * (DIM // N_HEADS) * 4
BUFFERS_BYTES = MAX_BATCH * MAX_SEQ * SLOT_BYTES  # 2 rows x 32 positions: 32 KiB

# The reference model SIGKILLed as layer 0 of its prefill begins, after the writer's 0.1 s flush
_KILLED = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch, kvtrace
    sys.path.insert(0, "tests/integration")
    from test_llama_models_reference import MAX_BATCH, PROMPT_LEN, VOCAB, _reference_model

    def killed(module, args):
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)

    run = sys.argv[1]
    with _reference_model(__import__("pathlib").Path(run).parent, []) as model:
        model.layers[0].register_forward_pre_hook(killed)
        tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN))
        with kvtrace.record(run, model=model, profiler=False), torch.inference_mode():
            model.forward(tokens, 0)
    """
)


def _record(run: Path, tmp_path: Path, watched_models: list[Any], how: str) -> None:
    """The reference model's prefill stopped before any layer wrote its buffers, `how` says how."""
    if how == "killed-in-prefill":
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(
            [sys.executable, "-c", _KILLED, str(run)], capture_output=True, text=True, timeout=120, cwd=root
        )
        assert done.returncode == -9, done.stderr[-3000:]
        return
    with _reference_model(tmp_path, watched_models) as model:

        def oom(module: Any, args: Any) -> None:
            raise torch.OutOfMemoryError(OOM_MESSAGE)

        hook = model.layers[0].register_forward_pre_hook(oom)
        tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN))
        try:
            with (
                pytest.raises((torch.OutOfMemoryError, ValueError)),
                kvtrace.record(run, model=model, profiler=False, snapshots=False),
                torch.inference_mode(),
            ):
                if how == "raised-before-first-forward":
                    raise ValueError("prompt too long")  # the caller's own check, before any forward
                model.forward(tokens, 0)
        finally:
            hook.remove()


def _out(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


HOWS = ["oom-before-layer-0", "raised-before-first-forward", "killed-in-prefill"]


@pytest.mark.parametrize("how", HOWS)
def test_buffers_no_forward_wrote_are_reported_over_their_slots_and_planned_whole(
    tmp_path: Path, watched_models: list[Any], how: str
) -> None:
    # GIVEN a reference run whose buffers (2 rows x 32 positions) hold no token: no forward wrote them
    run = tmp_path / "run"
    _record(run, tmp_path, watched_models, how)
    # WHEN it is reported as text (the default): THEN the bytes per token are the buffers' over their slots
    # and the arithmetic, both 512 B, not an internal error for want of tokens and rows
    text = _out(["report", str(run), "--no-export"])
    slots = f"the buffers' {MAX_SEQ} positions x {MAX_BATCH} rows (max_seq_len x max_batch_size)"
    assert f"    bytes per token: measured {SLOT_BYTES:,.1f} ({slots}), arithmetic {SLOT_BYTES}\n" in text
    # WHEN planned from the run: THEN the buffers as any run of them plans them, a static cache of
    # max_batch_size rows at max_seq_len + 1, their 32 KiB, not "the run logged no KV cache"
    plan = json.loads(_out(["plan", "--from-run", str(run), "--json"]))
    request = plan["request"]
    assert (request["cache"], request["batch"], request["context"]) == ("static", MAX_BATCH, MAX_SEQ + 1)
    assert plan["kv_bytes"] == BUFFERS_BYTES == 32768
    # AND its note says how the run stopped and that the buffers are planned whole, naming no other context
    stopped = [note for note in plan["notes"] if "planned whole" in note]
    assert len(stopped) == 1, plan["notes"]
    assert not any("planned at a context of" in note for note in plan["notes"]), plan["notes"]


def test_a_run_stopped_mid_decode_names_no_context_its_buffers_plan_does_not_use(
    tmp_path: Path, watched_models: list[Any]
) -> None:
    # GIVEN a reference run whose second decode forward ran out of memory as layer 0 began: the prompt and
    # one decode step written, 7 of the buffers' 32 positions a row
    run = tmp_path / "run"
    with _reference_model(tmp_path, watched_models) as model:
        calls = [0]

        def oom_at_third_forward(module: Any, args: Any) -> None:
            calls[0] += 1
            if calls[0] == 3:
                raise torch.OutOfMemoryError(OOM_MESSAGE)

        hook = model.layers[0].register_forward_pre_hook(oom_at_third_forward)
        tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + 2))
        try:
            with (
                pytest.raises(torch.OutOfMemoryError),
                kvtrace.record(run, model=model, profiler=False, snapshots=False),
                torch.inference_mode(),
            ):
                model.forward(tokens[:, :PROMPT_LEN], 0)
                for pos in range(PROMPT_LEN, PROMPT_LEN + 2):
                    model.forward(tokens[:, pos : pos + 1], pos)
        finally:
            hook.remove()
    # WHEN planned from the run
    plan = json.loads(_out(["plan", "--from-run", str(run), "--json"]))
    # THEN at the buffers' max_seq_len + 1 (33), and no note says it was planned at the 8 tokens it reached
    assert (plan["request"]["context"], plan["kv_bytes"]) == (MAX_SEQ + 1, BUFFERS_BYTES)
    assert not any("planned at a context of" in note for note in plan["notes"]), plan["notes"]
    (stopped,) = [note for note in plan["notes"] if "planned whole" in note]
    assert stopped.startswith("the run ran out of memory in step 3"), stopped
