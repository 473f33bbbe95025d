"""`kvtrace plan --config` of a model whose layers slide, at a prompt past the window: transformers makes the
window's mask, and each layer's sdpa its copy in the compute dtype, K and V expanded to the query heads,
the plan's peak there, as on a GPU. A CPU recording holds more: torch's CPU flash kernel keeps, for each of
its threads, a 64-query block of float32 scores over the prompt's keys, with their max, sum and output, which
no GPU kernel holds. Before, nothing said so: the tiny Mistral below (a window of 128, 2 rows of a 198-token
prompt) was planned 113,816 B under its CPU recording, 110,592 B of them those blocks (2 threads) and 3,224
B the recording script's own attention mask and scalars; now the plan's note prices the blocks, a thread's
55,296 B, and the plan with them is the recording within a few scalars."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from analyzers.units import human_bytes
from tests.cli_json import cli_json, report_json
from tests.tiny import record_generate

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 2, 64, 128, 4, 2, 16, 128
BATCH, PROMPT, NEW = 2, 198, 2
ROWS = BATCH * PROMPT
FP32 = 4
SCALARS = 64  # what the recording holds beside the plan's tensors: a few scalars (56 B measured)
# torch's CPU flash kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): queries split by 64 from a
# 192-token prompt, the keys by 512 (here all 198)
QUERY_SPLIT = 64


def test_the_plan_of_a_window_mask_prices_what_a_cpu_kernel_adds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny Mistral whose layers slide over 128 tokens, recorded on this CPU with a 198-token prompt
    config = transformers.MistralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=1000, sliding_window=WINDOW,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    config.save_pretrained(tmp_path / "config")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    record_generate(model, tmp_path / "run", BATCH, PROMPT, NEW)
    recorded = report_json(tmp_path / "run", capsys)["peak_allocated_bytes"]
    # WHEN its config is planned at the run's shape, no reserve
    argv = ["plan", "--config", str(tmp_path / "config"), "--dtype", "fp32", "--batch", str(BATCH)]
    shape = ["--context", str(PROMPT + NEW), "--prompt", str(PROMPT), "--reserve", "0", "--json"]
    planned = cli_json([*argv, *shape], capsys)
    # THEN its prefill peaks at the last layer's masked sdpa: across the layers the embeddings, cos and sin,
    # the positions and the window's bool mask; in the layer its input and normed input, the mask in float32
    # for every row, the rotated q and the output, K and V expanded to the 4 heads, the log-sum-exp
    q_width = HEADS * HEAD_DIM
    held = ROWS * (HIDDEN + 2 * HEAD_DIM) * FP32 + ROWS * 16 + PROMPT * PROMPT
    masked = BATCH * PROMPT * PROMPT * FP32 + 4 * ROWS * q_width * FP32 + BATCH * HEADS * PROMPT * FP32
    assert planned["prefill_activations_bytes"] == held + 2 * ROWS * HIDDEN * FP32 + masked
    # AND its note prices the CPU kernel's blocks a thread: 64 queries x (198 keys + max + sum + 16 output)
    thread = QUERY_SPLIT * (PROMPT + 2 + HEAD_DIM) * FP32
    (note,) = [n for n in planned["notes"] if n.startswith("prefill activations:")]
    assert f"holds {human_bytes(thread)} ({thread:,} B) more for each of its threads beside" in note
    # AND with this CPU's threads' blocks, the plan is the recording within a few scalars (before: the plan
    # alone, 113,816 B under it, with nothing to say why)
    beside = recorded - planned["peak_bytes"] - torch.get_num_threads() * thread
    assert 0 <= beside <= SCALARS, (recorded, planned["peak_bytes"], thread)
