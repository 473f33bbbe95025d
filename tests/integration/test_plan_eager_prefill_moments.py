"""`kvtrace plan --from-run RUN --prompt P` of an eager run grows its prefill's mask and scores with the
prompt squared within the moment that holds them, inside a layer's attention, and its MLP's and logits'
moments with the prompt alone: the run's prefill moments tell eager's tensors over prompt x prompt by their
sizes (a row's mask in the compute dtype, each head's scores in it and in float32). Before, the pairs beyond
the run's prompt were added to the most of any moment, which at a short prompt is the MLP's or the logits',
holding no scores: the tiny Llama 3 (2 layers, eager) planned from a 16-token prompt at 256 said
39,196,928 B where its recording peaked at 37,501,108 (+4.5%; bf16, 22,678,624 for 20,613,396, +10.0%; on
a 1,000-token vocabulary, fp32, +5.7%). What is left above the recording: the few scalars generate() and
the model hold through the prefill (8 B and less each), grown with the prompt as the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtrace.llama import ModelSize, build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HIDDEN, record_generate

SHORT, NEW = 24, 4  # 24 tokens: no pair tensor's size is a hidden state's (at 16, one head's width, it is)
SCALARS = 8 * 8  # at most 8 scalars of 8 B held through the prefill, each grown with the prompt
LLAMA3_VOCAB = 128256
# (vocabulary, dtype, rows, longer prompts: 4 and 16 times the run's); on Llama 3's vocabulary a 96-token
# prompt's peak is a decode step's logits, which this file does not price
SHAPES = {
    "fp32": (1000, torch.float32, 1, (96, 384)),
    "bf16": (1000, torch.bfloat16, 2, (96, 384)),
    "llama3_vocab": (LLAMA3_VOCAB, torch.bfloat16, 2, (384,)),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[int, Path]]:
    """The same greedy generate() of 4 new tokens at each prompt of the param's shape, eager, on a 2-layer
    Llama 3 shape (GQA 4:2); at the longer prompts each peaks at its prefill, inside a layer's attention."""
    vocab, dtype, batch, longer = SHAPES[request.param]
    size = ModelSize(
        hidden_size=HIDDEN, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=vocab
    )
    model = build_model(size, dtype=dtype).eval()
    model.set_attn_implementation("eager")
    folder = tmp_path_factory.mktemp(f"eager_moments_{request.param}")
    recorded = {}
    for prompt in (SHORT, *longer):
        recorded[prompt] = folder / f"prompt_{prompt}"
        record_generate(model, recorded[prompt], batch, prompt, NEW)
    return request.param, recorded


def test_an_eager_run_planned_at_a_longer_prompt_is_its_recording_but_the_scalars(
    runs: tuple[str, dict[int, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    shape, recorded = runs
    _, dtype, batch, longer = SHAPES[shape]
    token_row = 2 * 2 * 2 * 16 * torch.finfo(dtype).bits // 8  # layers x (K, V) x KV heads x head_dim
    for prompt in longer:
        # GIVEN the recording at a longer prompt, which peaks at its prefill, inside a layer's attention
        measured = report_json(recorded[prompt], capsys)
        assert measured["categories_at_peak"]["kv"] == batch * prompt * token_row  # the prompt's KV
        # WHEN the short run is planned at that prompt, the same new tokens
        plan = plan_json(recorded[SHORT], capsys, "--prompt", str(prompt), "--context", str(prompt + NEW))
        # THEN the plan is the recording's peak, an upper bound by the scalars grown with the prompt alone
        # (before: 2.1% to 14.6% over; after: 120 B to 660 B)
        peak = measured["peak_allocated_bytes"]
        most = peak + SCALARS * (prompt // SHORT - 1)
        assert peak <= plan["peak_bytes"] <= most, (prompt, plan["peak_bytes"], peak)
    # AND the run planned as itself is its own peak, as measured
    own = report_json(recorded[SHORT], capsys)["peak_allocated_bytes"]
    assert plan_json(recorded[SHORT], capsys)["peak_bytes"] == own
