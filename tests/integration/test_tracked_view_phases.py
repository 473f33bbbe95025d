"""A user's own decoder that tracks its KV as views cut afresh after each forward (the README's "Record your
own run": `kvtrace.track(kv[l, 0, :, :, :pos], ...)` again after each forward): each view dies as soon as it
is tracked, while the tensor it was cut from holds the tokens. A forward of 1 new token per row over that
tensor is a decode step, and every reader of the phase says so (it was "prefill" for every forward: the dead
views read as a cache holding nothing).

The model: 2 layers, 2 KV heads of 16, fp32, one tensor [2 layers, K/V, 2 rows, 2 KV heads, 64, 16].
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvtrace
from analyzers.compare import generated
from analyzers.render.kv_heatmap import layer_grid
from analyzers.report import build_report
from kvtrace.cli import main
from tests.cli_json import cli_json
from tests.one_tensor_decoder import OneTensorDecoder, Shape

LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 64, 4, 2, 16, 128
BATCH, MAX_SEQ, PROMPT, DECODE = 2, 64, 8, 5
WRITTEN = PROMPT + DECODE  # 13 positions a row
TENSOR_BYTES = LAYERS * 2 * BATCH * KV_HEADS * MAX_SEQ * HEAD_DIM * 4  # 65,536 B


def _generate(model: OneTensorDecoder, prompt: int, decode: int) -> None:
    """A prompt of `prompt` tokens at position 0, then `decode` forwards of 1 token, the README's way: each
    layer's K and V tracked as views cut to the positions written, after every forward."""

    def track(end: int) -> None:
        for layer in range(LAYERS):
            for index, kind in enumerate("kv"):
                kvtrace.track(model.view(layer, index, end), layer=layer, kind=kind, layout=model.layout)

    logits = model(torch.randint(0, VOCAB, (BATCH, prompt)), 0)
    track(prompt)
    for pos in range(prompt, prompt + decode):
        logits = model(logits[:, -1:].argmax(-1), pos)
        track(pos + 1)


def _text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`kvtrace <argv>`'s text output."""
    assert main(argv) == 0
    return capsys.readouterr().out


def _sample_phases(run: Path) -> list[tuple[int, str]]:
    """(step, phase) of each step's end sample, as memory_samples.jsonl has them."""
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    return [(s["step"], s["phase"]) for s in samples if s["phase"] in ("prefill", "decode")]


@pytest.mark.parametrize("profiler", [False, True], ids=["no-profiler", "profiler"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decode_steps_over_views_cut_afresh_are_decode(tmp_path, watched_models, capsys, layout, profiler):
    # GIVEN the tiny decoder handed to record(): a prompt of 8 tokens, then 5 forwards of 1 token a row
    torch.manual_seed(0)
    model = OneTensorDecoder(
        Shape(LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB, BATCH, MAX_SEQ), layout
    ).eval()
    watched_models.append(model)
    run = tmp_path / "run"
    with kvtrace.record(run, model=model, profiler=profiler), torch.inference_mode():
        _generate(model, PROMPT, DECODE)

    # THEN the first forward is the prefill, the other 5 decode steps: in the step samples ...
    expected = [(1, "prefill")] + [(step, "decode") for step in range(2, 2 + DECODE)]
    assert _sample_phases(run) == expected
    # ... and in the KV log: the views tracked after a forward carry its step and phase
    lines = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    assert sorted({(line["step"], line["phase"]) for line in lines}) == expected

    # AND diagnose's moment says its step's phase: without the profiler the run's end, the last forward (13
    # tokens held a row), step 6, a decode step; with it the allocator's peak, in the prefill's forward
    step, phase, held = (1, "prefill", PROMPT) if profiler else (6, "decode", WRITTEN)
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)
    assert (diagnosis["step"], diagnosis["step_phase"], diagnosis["tokens_held"]) == (step, phase, held)
    assert diagnosis["kv_bytes"] == TENSOR_BYTES
    assert f"\n  step                                 {step} {phase}\n" in _text(
        ["diagnose", str(run)], capsys
    )

    # AND the report's step grid and step markers say the same phases
    source, report = build_report(run)
    assert layer_grid(source.meta["kv"]).columns == [f"{step} {phase}" for step, phase in expected]
    steps = [marker.label for marker in source.markers if marker.kind == "step"]
    assert steps == [f"step {step} {phase}" for step, phase in expected]

    # AND compare counts the tokens the forwards generated: 1 from the prefill and 1 from each decode step
    made = generated(source, report)
    assert made is not None
    assert (made.tokens_per_row, made.tokens_all_rows) == (1 + DECODE, (1 + DECODE) * BATCH)


def test_a_new_prompt_on_the_same_tensor_is_a_prefill(tmp_path, watched_models, capsys):
    # GIVEN two generations on the decoder's one tensor, the second starting over at position 0 while the
    # tensor still holds the first one's 13 positions: 8 + 5, then 6 + 2
    torch.manual_seed(0)
    model = OneTensorDecoder(Shape(LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB, BATCH, MAX_SEQ)).eval()
    watched_models.append(model)
    run = tmp_path / "run"
    with kvtrace.record(run, model=model, profiler=False), torch.inference_mode():
        _generate(model, PROMPT, DECODE)
        _generate(model, 6, 2)

    # THEN each generation's first forward is a prefill, its 1-token forwards decode steps
    first = [(1, "prefill")] + [(step, "decode") for step in range(2, 7)]
    assert _sample_phases(run) == [*first, (7, "prefill"), (8, "decode"), (9, "decode")]
    # AND diagnose's moment, the run's end, is the second generation's last decode step, 8 positions written
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)
    assert (diagnosis["step"], diagnosis["step_phase"], diagnosis["tokens_held"]) == (9, "decode", 6 + 2)
    # AND 9 tokens a row were generated: 1 + 5, then 1 + 2
    made = generated(*build_report(run))
    assert made is not None and made.tokens_per_row == 1 + DECODE + 1 + 2
