"""`kvtrace plan --from-run RUN --prompt P` of a model whose layers slide, past its window: sdpa's window mask
(a bool mask over prompt x prompt across the layers, its float32 copy for every row in a layer's sdpa)
grows with the prompt squared, within the masked moment that holds it, and a run whose prompt never reached
the window is priced the mask it never made. Before, the run's moments grew with the prompt alone: the tiny
Mistral below (a window of 128, 2 rows) planned from a 184-token prompt at 192 was 40,601 B under its CPU
recording, 13,824 B of them the mask's squared growth, and 26,780 B torch's CPU flash kernel's per-thread
blocks, whose query split steps up from 32 to 64 at 192 tokens (no GPU holds them: a note prices them, as
a config's plan does); planned from a 127-token prompt, 96,739 B under, the mask and K and V expanded to the
query heads unpriced."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import transformers

from tests.cli_json import plan_json, report_json
from tests.tiny import record_generate

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 2, 64, 128, 4, 2, 16, 128
BATCH, NEW = 2, 4
SHORT, BELOW, LONG = 184, 127, 192  # above the window, below it, the plan's
FP32 = 4
SCALARS = 64  # the prefill's few scalars, grown with the prompt (2 to 21 B measured)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same greedy generate() of 4 new tokens on 2 rows at each prompt, on a tiny Mistral whose 2 layers
    slide over 128 tokens."""
    config = transformers.MistralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=1000, sliding_window=WINDOW,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("window_mask")
    recorded = {}
    for prompt in (SHORT, BELOW, LONG):
        recorded[prompt] = folder / f"prompt_{prompt}"
        record_generate(model, recorded[prompt], BATCH, prompt, NEW)
    return recorded


def _thread_bytes(prompt: int) -> int:
    """torch's CPU flash kernel's blocks a thread: a query split (32, 64 from 192 tokens) x (keys + max +
    sum + head_dim of output), float32."""
    split = 64 if prompt >= 192 else 32
    return split * (prompt + 2 + HEAD_DIM) * FP32


def test_a_run_past_the_window_grows_its_mask_with_the_prompt_squared(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the 192-token recording, which peaks at its last layer's masked sdpa
    recorded = report_json(runs[LONG], capsys)["peak_allocated_bytes"]
    # WHEN the 184-token run is planned at 192 tokens
    plan = plan_json(runs[SHORT], capsys, "--prompt", str(LONG), "--context", str(LONG + NEW))
    # THEN a note prices what the CPU kernel's blocks hold more a thread than the run's grown with the prompt
    more = _thread_bytes(LONG) - math.ceil(_thread_bytes(SHORT) * LONG / SHORT)
    assert more == 26_779
    (note,) = [n for n in plan["notes"] if "flash kernel" in n]
    assert re.search(rf"\({more:,} B\) more than the run's at {SHORT:,} tokens", note), note
    # AND with them at this CPU's threads, the plan is the recording within the scalars grown (before: the
    # mask grown with the prompt alone, 13,822 B under with the blocks, no note)
    with_blocks = plan["peak_bytes"] + torch.get_num_threads() * more
    assert 0 <= with_blocks - recorded <= SCALARS, (plan["peak_bytes"], recorded, more)


def test_a_run_short_of_the_window_is_priced_the_mask_it_never_made(
    runs: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the 192-token recording, and a run whose 127-token prompt never reached the window (no mask)
    recorded = report_json(runs[LONG], capsys)["peak_allocated_bytes"]
    # WHEN that run is planned at 192 tokens
    plan = plan_json(runs[BELOW], capsys, "--prompt", str(LONG), "--context", str(LONG + NEW))
    # THEN the plan bounds the recording, its CPU kernel's blocks included (before: 96,739 B under it), by
    # at most the mask, its float32 copy for every row and K and V expanded to the 4 heads, added to the
    # run's most grown (an upper bound)
    mask = LONG * LONG + BATCH * LONG * (LONG * FP32 + 2 * HEADS * HEAD_DIM * FP32)
    assert recorded <= plan["peak_bytes"] <= recorded + mask, (plan["peak_bytes"], recorded)
