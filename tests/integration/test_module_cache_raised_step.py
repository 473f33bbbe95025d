"""A module-cache model's forward that raises part-way (Meta's reference Llama 3, `cache_k` / `cache_v`
written in place, found by the recorder's scan at the forward's end): only the layers whose buffers show a
write hold the step's token. An OOM raised in the embedding or before layer 0 leaves every layer at what it
held; one raised before layer 1 leaves layer 0 one token ahead of layer 1. Where no version counter can show
a write (bfloat16's inference-mode copies), no layer claims the step's token."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.run_reader import read_run

pytest.importorskip("fairscale.nn.model_parallel.initialize")
pytest.importorskip("llama_models.llama3.model")

from test_llama_models_reference import MAX_BATCH, N_LAYERS, PROMPT_LEN, VOCAB, _reference_model

ROWS = MAX_BATCH - 1  # fewer rows than the buffers have: the rows figure is the forward's, not the shape's
WHOLE_DECODES = 2  # decode steps that finish before the one that raises
RAISED_STEP = 1 + WHOLE_DECODES + 1  # the KV log counts record()'s setup as step 0, the prefill as step 1
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB"


def _json(argv: list[str]) -> Any:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


def _record_raising(
    run: Path, tmp_path: Path, watched_models: list[Any], where: str, dtype: torch.dtype
) -> None:
    """A prefill and WHOLE_DECODES decode steps as Meta's generation loop calls them, then a decode forward
    that raises an OOM as the module `where` begins."""
    forwards = 1 + WHOLE_DECODES + 1
    with _reference_model(tmp_path, watched_models, dtype=dtype) as model:
        calls = [0]

        def oom_at_last_forward(module: Any, args: Any) -> None:
            calls[0] += 1
            if calls[0] == forwards:
                raise torch.OutOfMemoryError(OOM_MESSAGE)

        hook = model.get_submodule(where).register_forward_pre_hook(oom_at_last_forward)
        tokens = torch.randint(0, VOCAB, (ROWS, PROMPT_LEN + forwards))
        try:
            with (
                pytest.raises(torch.OutOfMemoryError),
                kvtrace.record(run, model=model, profiler=False, snapshots=False),
                torch.inference_mode(),
            ):
                model.forward(tokens[:, :PROMPT_LEN], 0)
                for pos in range(PROMPT_LEN, PROMPT_LEN + forwards - 1):
                    model.forward(tokens[:, pos : pos + 1], pos)
        finally:
            hook.remove()


@pytest.mark.parametrize(
    ("where", "layers_written"),
    [("tok_embeddings", 0), ("layers.0", 0), ("layers.1", 1)],
    ids=["in-the-embedding", "before-layer-0", "before-layer-1"],
)
def test_a_raised_forward_logs_only_the_layers_it_wrote(
    where: str, layers_written: int, tmp_path: Path, watched_models: list[Any]
) -> None:
    # GIVEN the reference model whose decode forward after WHOLE_DECODES whole ones raises an OOM as the
    # module `where` begins: the layers before it have written the step's token in place, the others not
    _record_raising(tmp_path / "run", tmp_path, watched_models, where, torch.float32)

    # WHEN its KV log is read
    run = read_run(tmp_path / "run")
    held = PROMPT_LEN + WHOLE_DECODES  # the prompt and a token per whole decode step
    reached = [held + 1] * layers_written + [held] * (N_LAYERS - layers_written)
    # THEN each layer's K and V last hold its own tokens: the step's token only where it was written, logged
    # in the step that raised; a layer the forward never reached logs nothing in it
    for layer, tokens_held in enumerate(reached):
        for kv in ("k", "v"):
            events = [e for e in run.kv_events if (e.layer, e.kv) == (layer, kv) and e.event != "freed"]
            last = events[-1]
            assert (last.event, last.tokens) == ("written", tokens_held), (layer, kv, events)
            assert last.step == (RAISED_STEP if tokens_held > held else RAISED_STEP - 1), (layer, kv, events)
            assert last.rows == ROWS
    raised_layers = {e.layer for e in run.kv_events if e.step == RAISED_STEP}
    assert raised_layers == set(range(layers_written))

    # AND report's per-layer tokens are those, and diagnose, at the OOM, holds the fullest layer's tokens
    report = _json(["report", str(tmp_path / "run"), "--no-export", "-q"])
    assert [layer["tokens"] for layer in report["kv"]["per_layer"]] == reached
    # ... and its note says which layers' updates reached the log, without saying one thing twice
    (cut,) = [note for note in report["notes"] if "reached the log" in note]
    if layers_written:
        assert "(layer 0 reached the log, layer 1 did not)" in cut, cut
    else:
        assert "(no layer's update reached the log (layers 0-1))" in cut and "did not" not in cut, cut
    diagnosis = _json(["diagnose", str(tmp_path / "run")])
    assert (diagnosis["step"], diagnosis["held_step"], diagnosis["step_cut"]) == (RAISED_STEP, None, True)
    assert (diagnosis["batch"], diagnosis["tokens_held"]) == (ROWS, max(reached))


def test_a_raised_forward_claims_no_token_its_buffers_cannot_show(
    tmp_path: Path, watched_models: list[Any]
) -> None:
    # GIVEN the reference model in bfloat16, whose buffers are the `.to()` copies its first forward makes in
    # inference mode (no version counter shows their writes), its decode forward raising before layer 1
    _record_raising(tmp_path / "run", tmp_path, watched_models, "layers.1", torch.bfloat16)
    # WHEN its KV log is read
    run = read_run(tmp_path / "run")
    # THEN no layer claims the step's token, layer 0's included, which nothing shows it wrote: each holds the
    # prompt and a token per whole decode step, as logged by the last whole step
    held = PROMPT_LEN + WHOLE_DECODES
    assert not [e for e in run.kv_events if e.step == RAISED_STEP]
    for layer in range(N_LAYERS):
        last = [e for e in run.kv_events if e.layer == layer and e.event != "freed"][-1]
        assert (last.step, last.tokens) == (RAISED_STEP - 1, held)
    diagnosis = _json(["diagnose", str(tmp_path / "run")])
    assert (diagnosis["step"], diagnosis["batch"], diagnosis["tokens_held"]) == (RAISED_STEP, ROWS, held)
