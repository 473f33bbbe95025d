"""The weights `kvtrace plan --engine vllm` gives one tensor-parallel rank: what vLLM 0.32 loads there
(`analyzers.planning.vllm_rank_weights`), worked out by hand at Llama 3 sizes. vLLM's own workers are
checked in tests/vllm/test_vllm_tp_weights.py.

What a rank holds: 1/tp of each projection (q, k, v, o, gate, up, down), whole KV heads (a copy of one
when there are more ranks than KV heads), every norm whole, and padded_vocab / tp rows of the embedding and
lm_head (the vocabulary padded to a multiple of 64)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from analyzers.planning.presets import get_preset
from analyzers.planning.vllm_plan import VllmPlanRequest, plan_vllm

GIB = 2**30


def _plan(preset: str, tp: int, **geometry: int | bool) -> tuple[int | None, int, tuple[str, ...]]:
    """(weights, blocks, notes) of `preset` over `tp` ranks of 80 GiB, vLLM's default utilization."""
    request = VllmPlanRequest(
        geometry=replace(get_preset(preset), **geometry), tensor_parallel_size=tp, max_model_len=8192
    )
    result = plan_vllm(request)
    return result.weights_bytes, result.num_blocks, result.notes


def test_llama_3_1_8b_over_two_ranks_holds_every_norm_whole() -> None:
    # GIVEN Llama 3.1 8B (32 layers, hidden 4,096, 32 query and 8 KV heads of 128, MLP 14,336, 128,256
    # tokens, a multiple of 64: no padding) in bf16 over 2 ranks
    hidden, heads, kv_heads = 4096, 32, 8
    projections = 2 * hidden * heads * 128 + 2 * hidden * kv_heads * 128 + 3 * hidden * 14336
    per_layer = projections // 2 + 2 * hidden  # half of each projection, both norms whole
    vocab = 128_256 // 2 * hidden  # the embedding's rows and the lm_head's (untied), each
    rank = 32 * per_layer + 2 * vocab + hidden  # and the final norm, whole
    assert rank == 4_015_263_744

    weights, blocks, notes = _plan("llama-3.1-8b", 2)

    # THEN a rank's weights are those 8,030,527,488 B (it had 266,240 B fewer: half of each norm), and
    # its KV memory ceil(80 GiB x 0.92) less them, in blocks of 32 layers x 16 x 2 x 4 heads x 128 x 2 B
    assert weights == 2 * rank == 8_030_527_488
    assert blocks == (math.ceil(80 * GIB * 0.92) - weights) // (32 * 2 * 16 * 4 * 128 * 2) == 67_707
    assert any("one of the 2 tensor-parallel ranks'" in note and "norms" in note for note in notes)


def test_llama_3_1_70b_over_eight_ranks() -> None:
    # GIVEN Llama 3.1 70B (80 layers, hidden 8,192, 64 query and 8 KV heads of 128, MLP 28,672) over 8
    # ranks: one KV head each
    hidden = 8192
    projections = 2 * hidden * 64 * 128 + 2 * hidden * 8 * 128 + 3 * hidden * 28672
    per_layer = projections // 8 + 2 * hidden
    rank = 80 * per_layer + 2 * (128_256 // 8 * hidden) + hidden
    assert rank == 8_820_367_360

    weights, blocks, _ = _plan("llama-3.1-70b", 8)

    # THEN a rank holds 17,640,734,720 B (it had 2,308,096 B fewer: 7/8 of the norms), and 4 fewer blocks
    # of 80 layers x 16 x 2 x 1 head x 128 x 2 B than it planned (93,672)
    assert weights == 2 * rank == 17_640_734_720
    assert blocks == (math.ceil(80 * GIB * 0.92) - weights) // (80 * 2 * 16 * 128 * 2) == 93_668


@pytest.mark.parametrize(("tp", "rows"), [(1, 32_064), (2, 16_032), (4, 8_016)])
def test_a_vocabulary_is_padded_to_64_rows_before_it_is_split(tp: int, rows: int) -> None:
    # GIVEN Llama 3.1 8B's layers with a vocabulary of 32,001 tokens (a token added to 32,000): vLLM pads it
    # to 32,064 rows (`pad_vocab_size`, a multiple of 64), at one rank too, and splits those
    hidden = 4096
    projections = 2 * hidden * 32 * 128 + 2 * hidden * 8 * 128 + 3 * hidden * 14336
    layers = 32 * (projections // tp + 2 * hidden)

    weights, _, notes = _plan("llama-3.1-8b", tp, vocab_size=32_001)

    # THEN each rank holds its rows of the embedding and of the lm_head (untied): 63 rows more in all than
    # the vocabulary, 32,001 / tp rows it had (not even a whole row at 2 ranks)
    assert weights == 2 * (layers + 2 * rows * hidden + hidden)
    assert any("the vocabulary padded to 32,064 rows" in note for note in notes)


def test_more_ranks_than_kv_heads_each_hold_a_whole_heads_k_and_v() -> None:
    # GIVEN Llama 3.2 1B (16 layers, hidden 2,048, 32 query and 8 KV heads of 64, MLP 8,192, the lm_head
    # tied to the embedding) over 16 ranks: vLLM replicates each KV head on 2 of them, so a rank holds K and
    # V of one head (2,048 x 64 each), not half of one
    hidden = 2048
    per_layer = (2 * hidden * 32 * 64 + 3 * hidden * 8192) // 16 + 2 * hidden * 64 + 2 * hidden
    rank = 16 * per_layer + 128_256 // 16 * hidden + hidden

    weights, _, notes = _plan("llama-3.2-1b", 16)

    # THEN a rank holds 158,797,824 B (it had 154,476,800: a 16th of everything), and the note says why
    assert weights == 2 * rank == 158_797_824
    assert any("a copy of one of the 8 KV heads' K and V on each" in note for note in notes)


def test_a_row_parallel_layers_bias_is_whole_on_every_rank() -> None:
    # GIVEN Llama 3.1 8B's shape with biases on every attention projection and MLP matrix (vLLM's llama.py:
    # `attention_bias`, `mlp_bias`) over 2 ranks: q, k, v, gate and up are column-parallel, their biases
    # split; o and down are row-parallel, their biases added after the all-reduce, whole on each rank
    hidden = 4096
    projections = 2 * hidden * 32 * 128 + 2 * hidden * 8 * 128 + 3 * hidden * 14336
    split_biases = 32 * 128 + 2 * 8 * 128 + 2 * 14336  # q, k, v, gate, up
    per_layer = (projections + split_biases) // 2 + 2 * hidden + 2 * hidden  # o's and down's biases, norms
    rank = 32 * per_layer + 2 * (128_256 // 2 * hidden) + hidden

    weights, _, _ = _plan("llama-3.1-8b", 2, attention_bias=True, mlp_bias=True)

    assert weights == 2 * rank
