"""`kvtrace plan --from-run RUN --prompt N` at a longer prompt, on Llama 3's 128,256-token vocabulary: the
prefill's logits are the last position's alone (transformers' generate() passes `logits_to_keep=1`), float32,
and the logits processors' vectors are over the vocabulary, none of which a longer prompt grows; the prompt's
hidden states, attention and ids do. Before, all of the prefill's activations grew with the prompt: on the
tiny Llama 3 (4 layers, batch 1, 4 new tokens) planned from a 16-token prompt at 256 the plan said
111,149,568 B where the recording peaked at 73,190,324 (+51.9%; a static cache, +63.1%; eager, +55.4%).
A generate() told `logits_to_keep=0` computes every position's logits at its prefill: those grow, and the
plan still bounds its recording."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import ModelSize, build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HIDDEN, record_generate

BATCH, SHORT, LONG, NEW = 2, 16, 128, 4
WITHIN = 0.01  # a plan from the short run may be over the longer recording by this share, never under
LLAMA3_VOCAB = 128256


@pytest.fixture(
    scope="module",
    params=[
        ("sdpa", "dynamic", None),
        ("sdpa", "static", None),
        ("eager", "dynamic", None),
        ("sdpa", "dynamic", 0),
    ],
)
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same greedy generate() of 4 new tokens on 2 rows of a 16- and a 128-token prompt, on a 2-layer
    Llama 3 with the real vocabulary, with the attention, cache and `logits_to_keep` the param names."""
    attention, cache, logits_to_keep = request.param
    size = ModelSize(hidden_size=HIDDEN, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    assert size.vocab_size == LLAMA3_VOCAB
    model = build_model(size).eval()
    model.config._attn_implementation = attention
    folder = tmp_path_factory.mktemp(f"prompt_logits_{attention}_{cache}_{logits_to_keep}")
    short, long = folder / "short", folder / "long"
    kind = None if cache == "dynamic" else cache
    record_generate(model, short, BATCH, SHORT, NEW, cache=kind, logits_to_keep=logits_to_keep)
    record_generate(model, long, BATCH, LONG, NEW, cache=kind, logits_to_keep=logits_to_keep)
    return short, long


def test_a_longer_prompt_planned_from_a_short_run_bounds_its_recording_closely(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    short, long = runs
    # GIVEN the longer prompt's recording, whose float32 logits over the last position are as long as the
    # short run's (2 rows x 128,256 x 4 bytes, 1 MB: a third of what it holds beside its weights and KV)
    measured = report_json(long, capsys)["peak_allocated_bytes"]
    # WHEN the short run is planned at the longer prompt, the same new tokens
    plan = plan_json(short, capsys, "--prompt", str(LONG), "--context", str(LONG + NEW))
    # THEN the plan bounds the recording, tightly (before: +104% to +124%; every position's logits, +21%)
    assert plan["prompt_tokens"] == LONG
    assert measured <= plan["peak_bytes"] <= measured * (1 + WITHIN), (plan["peak_bytes"], measured)
    # AND each run planned as itself is its own peak, as measured
    for run in (short, long):
        assert plan_json(run, capsys)["peak_bytes"] == report_json(run, capsys)["peak_allocated_bytes"]
