"""`kvtrace plan --from-run` of a beam search at a longer context grows beam search's own tensors, which
transformers allocates over the whole generation's length before the prefill (sequences [prompts, beams,
max_length] int64, beam indices [prompts, beams, max_length - prompt] int32) and each step's top-k
candidates of them. Before, the plan grew them with the rows alone and fell below its recording: on the
tiny Llama (2 layers, 2 prompts x 2 beams, a 20-token prompt) planned from context 24 at 64, by 3,840 B;
on the demo's tiny Llama 3, planned from context 28 at 128, by 12,800 B."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import kvtrace
from analyzers.planning.beam_tensors import beam_search_bytes
from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, tiny_size

LAYERS, KV_HEADS, PROMPTS, BEAMS, PROMPT, SHORT, LONG = 2, 2, 2, 2, 20, 24, 64
ROWS = PROMPTS * BEAMS
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32
WITHIN = 0.03  # a plan from a short run may be over its recording by this share, never under


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same beam search (2 prompts x 2 beams, a 20-token prompt) recorded at contexts 24 and 64."""
    model = build_model(tiny_size(LAYERS, KV_HEADS)).eval()
    folder = tmp_path_factory.mktemp("beam_context")
    ids = torch.randint(3, 1000, (PROMPTS, PROMPT), generator=torch.Generator().manual_seed(0))
    found = {}
    for context in (SHORT, LONG):
        found[context] = folder / f"c{context}"
        gc.collect()  # tensors earlier tests left in cycles, freed mid-recording, are not this run's
        with torch.no_grad(), kvtrace.record(found[context], model=model):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=context - PROMPT,
                min_new_tokens=context - PROMPT, num_beams=BEAMS, do_sample=False, pad_token_id=0,
            )  # fmt: skip
    return found


def test_a_longer_context_grows_beam_searchs_tensors(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the beam search's recording at context 64
    measured = report_json(runs[LONG], capsys)["peak_allocated_bytes"]
    # WHEN the run at context 24 is planned at 64
    plan = plan_json(runs[SHORT], capsys, "--context", str(LONG))
    # THEN its KV is the arithmetic's, and its peak an upper bound of the recording, a tight one
    assert plan["kv_bytes"] == TOKEN_ROW * ROWS * (LONG - 1)
    assert measured <= plan["peak_bytes"] <= measured * (1 + WITHIN), (plan["peak_bytes"], measured)


def test_the_plan_of_the_run_itself_is_still_its_peak(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN each run, WHEN planned with no flag, THEN its own peak: beam search's tensors add nothing there
    for context in (SHORT, LONG):
        plan = plan_json(runs[context], capsys)
        assert plan["peak_bytes"] == report_json(runs[context], capsys)["peak_allocated_bytes"], context


def test_beam_search_bytes_are_transformers_shapes() -> None:
    # running and finished sequences [prompts, beams, context] int64 and beam indices [prompts, beams, new]
    # int32, and a step's top-k of each at 2 x beams; a greedy search makes none
    sequences, indices = ROWS * SHORT * 8, ROWS * (SHORT - PROMPT) * 4
    assert beam_search_bytes(ROWS, BEAMS, PROMPT, SHORT) == 2 * sequences + 2 * indices + 2 * (
        sequences + indices
    )
    assert beam_search_bytes(ROWS, 1, PROMPT, SHORT) == 0
