"""A recorded generate() that stops inside a step: a real `torch.OutOfMemoryError` (or a Ctrl-C) raised
before decoder layer 2 of its fourth forward, so layers 0-1 have appended that step's token and layers 2-3
have not. The step yielded no token: generate() returned 3 per row before it raised. Every figure of a
whole step (generated tokens, tokens/s, the step count, the tokens held at a step's end) leaves it out; the
KV held when it raised, the KV peak and the memory timeline keep what it did; the plan of the run is the
call as launched (its max_new_tokens).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout, suppress
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, raising_before_layer, tiny_size

LAYERS, KV_HEADS, ROWS, PROMPT, NEW = 4, 2, 2, 8, 6
RAISED_AT, BEFORE_LAYER = 4, 2  # the fourth forward (step 4: the prefill is step 1), before layer 2
# One token of one row in one layer's K or V storage, float32
STORAGE_TOKEN = KV_HEADS * HEAD_DIM * 4
LAYER_TOKEN = 2 * STORAGE_TOKEN  # K and V
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB"


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


@pytest.fixture(autouse=True)
def watched(model: Any, watched_models: list[torch.nn.Module]) -> Iterator[None]:
    watched_models.append(model)  # the leak guard checks it after each test
    yield


def _record_raising(
    model: Any, run: Path, error: BaseException, forward: int, layer: int, profiler: bool, new: int = NEW
) -> None:
    """Record a greedy generate() of `new` tokens whose `forward`-th forward (1: the prefill) raises `error`
    as decoder layer `layer` begins."""
    ids = torch.randint(3, 1000, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    with (
        raising_before_layer(model, error, forward, layer),
        pytest.raises(type(error)),
        torch.no_grad(),
        kvtrace.record(run, model=model, profiler=profiler),
    ):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _json(argv: list[str]) -> Any:
    return json.loads(_run([*argv, "--json"]))


def _drop_raised_flags(run: Path) -> None:
    """The run as a recorder before the `raised` field wrote it: its step samples do not say which raised."""
    path = run / "memory_samples.jsonl"
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    kept = [{key: value for key, value in s.items() if key != "raised"} for s in samples]
    path.write_text("".join(json.dumps(s) + "\n" for s in kept))


@pytest.mark.parametrize("profiler", [True, False], ids=["profiler", "no-profiler"])
def test_an_oom_inside_a_decode_step_counts_no_token_of_that_step(
    model: Any, profiler: bool, tmp_path: Path
) -> None:
    # GIVEN a real OutOfMemoryError before layer 2 of step 4
    run = tmp_path / "run"
    _record_raising(model, run, torch.OutOfMemoryError(OOM_MESSAGE), RAISED_AT, BEFORE_LAYER, profiler)
    whole = RAISED_AT - 1  # steps 1-3 ended: the prefill's token and two decode steps' (3 generated a row)
    held = PROMPT + whole - 1  # what every layer held at the end of step 3: 10 tokens a row
    reached = [held + 1] * BEFORE_LAYER + [held] * (LAYERS - BEFORE_LAYER)  # when it raised: 11, 11, 10, 10
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    steps = [(s["step"], s.get("raised", False)) for s in samples if s["phase"] in ("prefill", "decode")]
    assert steps == [(1, False), (2, False), (3, False), (RAISED_AT, True)]

    for flagged in (True, False):  # the recorder's flag, then a run recorded before it (told from its log)
        if not flagged:
            _drop_raised_flags(run)
        # WHEN it is reported
        report = _json(["report", str(run), "--no-export", "-q"])
        # THEN the KV held when it raised is each layer's own tokens, as logged
        kv = report["kv"]
        assert [layer["tokens"] for layer in kv["per_layer"]] == reached
        assert kv["final_bytes"] == sum(reached) * ROWS * LAYER_TOKEN == 21_504
        # AND the KV peak is layer 1's new V made next to its old one, in step 4
        # (in tokens of one K or V storage: layers 0-1 at 11, layer 1's old V at 10, layers 2-3 at 10)
        grown = 2 * (held + 1) * BEFORE_LAYER + held + 2 * held * (LAYERS - BEFORE_LAYER)
        assert kv["peak_bytes"] == grown * ROWS * STORAGE_TOKEN
        # AND the step that raised is no whole step, and the note says where it stopped
        assert report["steps"] == whole
        said = (
            f"the recorded block ran out of memory (OutOfMemoryError) in step {RAISED_AT}, whose forward "
            "never finished (layers 0-1 reached the log, layers 2-3 did not): it generated no token, so "
            f"generated tokens and the step count end at step {whole}, the last whole one"
        )
        assert any(note.startswith(said) for note in report["notes"]), report["notes"]

        # AND compare counts the 3 tokens generate() produced, and says the run ran out of memory
        compared = _json(["compare", str(run), str(run)])["runs"][0]
        assert compared["generated_tokens_per_row"] == whole
        assert compared["steps"] == whole
        assert any(note.startswith(said) for note in compared["notes"])

        # AND diagnose, at the OOM in step 4, counts what the layers held at that moment (the fullest 11),
        # the KV it diagnoses, and says the step never ended
        diagnosis = _json(["diagnose", str(run)])
        assert (diagnosis["step"], diagnosis["held_step"], diagnosis["step_cut"]) == (RAISED_AT, None, True)
        assert (diagnosis["batch"], diagnosis["tokens_held"]) == (ROWS, held + 1)
        assert diagnosis["kv_bytes"] == kv["final_bytes"]
        text = _run(["diagnose", str(run)])
        label = f"batch x tokens held (at this moment; step {RAISED_AT} never ended)  {ROWS} x {held + 1}"
        assert label in text

        # AND a plan of the run is the run as launched: its rows at the PROMPT + NEW its call asked for
        plan = _json(["plan", "--from-run", str(run)])
        assert (plan["request"]["batch"], plan["request"]["context"]) == (ROWS, PROMPT + NEW)
        assert plan["kv_bytes"] == (PROMPT + NEW - 1) * ROWS * LAYERS * LAYER_TOKEN == 26_624
        said = f"ran out of memory in step {RAISED_AT}, which never finished; step {whole} was the last whole"
        assert any(said in note and f"it had reached {held + 1}" in note for note in plan["notes"])


def test_an_oom_inside_the_prefill_generates_nothing(model: Any, tmp_path: Path) -> None:
    # GIVEN a real OutOfMemoryError before layer 1 of the prefill: layer 0 holds the prompt, the others none
    run = tmp_path / "run"
    _record_raising(model, run, torch.OutOfMemoryError(OOM_MESSAGE), 1, 1, profiler=True)
    # WHEN it is compared and diagnosed
    report = _json(["report", str(run), "--no-export", "-q"])
    compared = _json(["compare", str(run), str(run)])["runs"][0]
    diagnosis = _json(["diagnose", str(run)])
    # THEN the KV held when it raised is layer 0's prompt; nothing was generated, no step ended
    assert report["kv"]["final_bytes"] == PROMPT * ROWS * LAYER_TOKEN
    made = (compared["generated_tokens_per_row"], compared["tokens_per_second"], compared["steps"])
    assert made == (0, 0, 0)
    assert any("ran out of memory (OutOfMemoryError) in step 1" in note for note in compared["notes"])
    # AND diagnose does not call the prefill's tokens those of its end
    assert (diagnosis["step"], diagnosis["held_step"], diagnosis["step_cut"]) == (1, None, True)
    assert "batch x tokens held (at this moment; step 1 never ended)" in _run(["diagnose", str(run)])
    # AND the plan is the call the run was launched with, PROMPT + NEW, and says its prefill never finished
    plan = _json(["plan", "--from-run", str(run)])
    launched = (PROMPT + NEW - 1) * ROWS * LAYERS * LAYER_TOKEN
    assert (plan["request"]["context"], plan["kv_bytes"]) == (PROMPT + NEW, launched)
    assert any("in step 1, its prefill, which never finished" in note for note in plan["notes"])


def test_a_ctrl_c_inside_a_step_counts_no_token_of_it(model: Any, tmp_path: Path) -> None:
    # GIVEN a Ctrl-C before layer 2 of step 4, without the profiler
    run = tmp_path / "run"
    _record_raising(model, run, KeyboardInterrupt(), RAISED_AT, BEFORE_LAYER, profiler=False)
    # WHEN it is compared
    compared = _json(["compare", str(run), str(run)])["runs"][0]
    # THEN generate()'s 3 tokens count, and the note says where it stopped
    assert compared["generated_tokens_per_row"] == RAISED_AT - 1
    said = (
        f"the recorded block was interrupted (Ctrl-C) in step {RAISED_AT}, whose forward never finished "
        "(layers 0-1 reached the log, layers 2-3 did not)"
    )
    assert any(note.startswith(said) for note in compared["notes"]), compared["notes"]


def test_an_oom_caught_inside_the_block_counts_no_token_of_its_step(model: Any, tmp_path: Path) -> None:
    # GIVEN an OOM in step 3 of a first generate(), caught inside the block, then a whole generate()
    run = tmp_path / "run"
    ids = torch.randint(3, 1000, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    calls = [0]

    def fail_third(module: Any, args: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError(OOM_MESSAGE)

    failing = model.model.layers[BEFORE_LAYER].register_forward_pre_hook(fail_third)
    kwargs: dict[str, Any] = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False}
    kwargs["pad_token_id"] = 0
    try:
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
            with suppress(torch.OutOfMemoryError):
                model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        failing.remove()
    # WHEN it is compared
    compared = _json(["compare", str(run), str(run)])["runs"][0]
    # THEN the first call's 2 whole steps and the second call's NEW tokens count, not the step that raised
    assert compared["generated_tokens_per_row"] == 2 + NEW
