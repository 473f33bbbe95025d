"""The capacity planner: every expected figure is worked out here by hand, never read back from the code."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from analyzers.planning.hf_config import geometry_from_config
from analyzers.planning.param_count import param_count, weights_bytes
from analyzers.planning.plan import PlanRequest, blocks, format_text, parse_size, plan, to_json
from analyzers.planning.plan_types import PlanResult, RecordedPeak
from analyzers.planning.presets import PRESETS, ModelGeometry, get_preset
from kvtrace.commands.plan import PlanCommand
from kvtrace.errors import KvtraceError

GIB = 2**30
REPO_ROOT = Path(__file__).resolve().parents[2]

# (layers, heads, kv_heads, head_dim, hidden, intermediate, tied) as published in each config.json.
PUBLISHED = {
    "llama-3-8b": (32, 32, 8, 128, 4096, 14336, False),
    "llama-3-70b": (80, 64, 8, 128, 8192, 28672, False),
    "llama-3.1-8b": (32, 32, 8, 128, 4096, 14336, False),
    "llama-3.1-70b": (80, 64, 8, 128, 8192, 28672, False),
    "llama-3.1-405b": (126, 128, 8, 128, 16384, 53248, False),
    "llama-3.2-1b": (16, 32, 8, 64, 2048, 8192, True),
    "llama-3.2-3b": (28, 24, 8, 128, 3072, 8192, True),
    "llama-3.3-70b": (80, 64, 8, 128, 8192, 28672, False),
}

LLAMA_3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


# Llama 3 8B's RoPE table as transformers builds it: inv_freq and original_inv_freq, head_dim / 2 float32
# each, whatever the weights' dtype
ROPE_BYTES = 2 * (128 // 2) * 4
# Its weights in bf16: 8,030,261,248 parameters at 2 B, and the RoPE table
LLAMA_3_8B_BF16 = 8_030_261_248 * 2 + ROPE_BYTES
# Its prefill's activations a row and prompt token, at the last layer's MLP (transformers 5.25, sdpa): the
# gate's activation, the up projection and their product (3 x 14,336), 4 hidden states of 4,096 (the
# embeddings, the layer's input, its residual, the normed input), rotary cos and sin (2 x 128), all bf16, and
# two int64 position tensors: 119,312 B, a little below a token's KV (131,072 B)
PREFILL_ROW_TOKEN = 3 * 14_336 * 2 + 4 * 4096 * 2 + 2 * 128 * 2 + 2 * 8


def prefill(batch: int, prompt: int) -> int:
    """Llama 3 8B's prefill activations, bf16, for `batch` rows of `prompt` tokens."""
    return batch * prompt * PREFILL_ROW_TOKEN


def llama_3_8b() -> ModelGeometry:
    return get_preset("llama-3-8b")


def request(**overrides: object) -> PlanRequest:
    fields: dict[str, object] = {"geometry": llama_3_8b(), "reserve_bytes": 0}
    fields.update(overrides)
    return PlanRequest(**fields)  # type: ignore[arg-type]


# --- presets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_published_configs(name: str) -> None:
    layers, heads, kv_heads, head_dim, hidden, inter, tied = PUBLISHED[name]
    geom = PRESETS[name]
    assert (geom.num_layers, geom.num_attention_heads, geom.num_kv_heads, geom.head_dim) == (
        layers,
        heads,
        kv_heads,
        head_dim,
    )
    assert (geom.hidden_size, geom.intermediate_size, geom.tie_word_embeddings) == (hidden, inter, tied)
    assert geom.vocab_size == 128256 and geom.sliding_window is None


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bf16_kv_bytes_per_token_of_every_preset(name: str) -> None:
    layers, _, kv_heads, head_dim, *_ = PUBLISHED[name]
    result = plan(request(geometry=PRESETS[name], context=2))
    assert result.kv_bytes_per_token == layers * 2 * kv_heads * head_dim * 2


def test_llama_3_8b_kv_per_token_and_paged_blocks() -> None:
    # 32 layers x (K, V) x 8 KV heads x 128 dims x 2 bytes.
    assert plan(request()).kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 == 131_072
    # 11.12 GiB of KV in blocks of 16 tokens: 11.12 * 2**30 / (131072 * 16) = 11.12 * 512 = 5693.44.
    assert blocks(int(11.12 * GIB), 131_072, 16) == math.floor(11.12 * 2**30 / (131_072 * 16)) == 5693
    # 5,691 blocks (a figure quoted for this model) is 11.1152 GiB of KV, which a 2-decimal log shows as
    # 11.12 GiB: the displayed size is rounded, so blocks must be computed from bytes, not from the log line.
    assert blocks(5691 * 131_072 * 16, 131_072, 16) == 5691
    assert f"{5691 * 131_072 * 16 / GIB:.2f}" == "11.12"


def test_result_kv_blocks_use_the_budget_after_weights_and_reserve() -> None:
    result = plan(request(gpu_memory_bytes=40 * GIB, reserve_bytes=2 * GIB))
    # and the prefill's activations (the worst prompt, 8,191 tokens), which share the GPU with the KV at the
    # peak: before they were estimated, the budget was 0.91 GiB larger
    budget = 40 * GIB - 2 * GIB - LLAMA_3_8B_BF16 - prefill(1, 8191)
    assert result.kv_budget_bytes == budget
    assert result.kv_blocks == budget // (131_072 * 16)


def independent_param_count(
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    inter: int,
    tied: bool,
    vocab: int = 128256,
) -> int:
    per_layer = (
        hidden * heads * head_dim  # q_proj
        + 2 * hidden * kv_heads * head_dim  # k_proj, v_proj
        + heads * head_dim * hidden  # o_proj
        + 3 * hidden * inter  # gate, up, down
        + 2 * hidden  # input and post-attention RMSNorm
    )
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("llama-3-8b", 8_030_261_248),
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3-70b", 70_553_706_496),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.2-3b", 3_212_749_824),
        ("llama-3.1-405b", 405_853_388_800),
    ],
)
def test_param_counts_match_published_figures(name: str, published: int) -> None:
    assert independent_param_count(*PUBLISHED[name]) == published
    assert param_count(PRESETS[name]) == published


def test_weights_bytes_scale_with_dtype() -> None:
    # the parameters in the dtype; the RoPE table float32 in every one of them
    assert weights_bytes(llama_3_8b(), "bf16") == 8_030_261_248 * 2 + ROPE_BYTES
    assert weights_bytes(llama_3_8b(), "fp32") == 8_030_261_248 * 4 + ROPE_BYTES
    assert weights_bytes(llama_3_8b(), "fp8") == 8_030_261_248 + ROPE_BYTES
    assert weights_bytes(llama_3_8b(), "int4") == 8_030_261_248 // 2 + ROPE_BYTES


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(KvtraceError, match="llama-3-8b"):
        get_preset("llama-9-1t")


# --- KV sizes by cache kind ----------------------------------------------------------------------------


def test_dynamic_and_static_hold_the_same_kv_but_only_dynamic_has_a_growth_peak() -> None:
    dynamic = plan(request(batch=4, context=1000, cache="dynamic"))
    static = plan(request(batch=4, context=1000, cache="static"))
    # A context of 1000 (prompt + new tokens): generate() never writes the last new token, so 999 are held.
    assert dynamic.kv_bytes == static.kv_bytes == 4 * 999 * 131_072
    # The last torch.cat keeps one layer's old K (998 tokens) alive next to the new one.
    assert dynamic.dynamic_realloc_peak_bytes == 4 * 998 * 8 * 128 * 2
    assert static.dynamic_realloc_peak_bytes == 0
    assert static.kv_preallocated_bytes == static.kv_bytes and dynamic.kv_preallocated_bytes == 0
    assert dynamic.kv_peak_bytes - static.kv_peak_bytes == 4 * 998 * 8 * 128 * 2
    # Both peak at the prefill of the longest prompt, 999 tokens, the same (its activations, 454.61 MiB,
    # are more than the growth copy, 15.59 MiB): before they were estimated, the growth copy set them apart
    assert dynamic.peak_bytes == static.peak_bytes == LLAMA_3_8B_BF16 + 4 * 999 * 131_072 + prefill(4, 999)


def test_sliding_window_caps_the_tokens_held() -> None:
    long = plan(request(batch=2, context=10_000, cache="static_sliding", window=4096))
    short = plan(request(batch=2, context=1000, cache="static_sliding", window=4096))
    assert long.kv_bytes == 2 * 4096 * 131_072
    assert short.kv_bytes == 2 * 999 * 131_072  # the last of the 1000 tokens is never written
    assert long.dynamic_realloc_peak_bytes == 0
    # the window caps the KV, so with the prompt given any context fits; the worst prompt, context - 1,
    # grows the prefill's activations with the context (before they were estimated: any context)
    assert long.max_context is not None
    given = plan(request(batch=2, context=10_000, cache="static_sliding", window=4096, prompt=1000))
    assert given.max_context is None
    # The dynamic one (demo's `sliding`) holds the worst prompt, 9,998 tokens, until its first decode step,
    # when layer 0 makes its window's K and V beside it
    dynamic = plan(request(batch=2, context=10_000, cache="sliding", window=4096))
    assert dynamic.kv_bytes == long.kv_bytes and dynamic.kv_preallocated_bytes == 0
    assert dynamic.kv_peak_bytes == 2 * 9998 * 131_072 + 2 * 4096 * 131_072 // 32
    assert dynamic.max_context is not None  # the worst prompt grows with the context


def test_sliding_window_defaults_to_the_models_own() -> None:
    mistral_like = ModelGeometry("m", 32, 32, 8, 128, 4096, 14336, 32000, False, sliding_window=4096)
    result = plan(request(geometry=mistral_like, context=32_768, cache="sliding"))
    assert result.kv_bytes == 4096 * 32 * 2 * 8 * 128 * 2
    with pytest.raises(KvtraceError, match="no sliding window"):
        request(cache="sliding")
    with pytest.raises(KvtraceError, match="window"):
        request(cache="dynamic", window=128)


def test_the_cache_holds_the_context_less_the_last_new_token() -> None:
    # A context of 2 is a 1-token prompt and 1 new token: generate() writes the prompt alone, with no
    # decode step to copy anything; a context of 3 has one step, whose cat copies one layer's 1-token K.
    two, three = plan(request(context=2)), plan(request(context=3))
    assert (two.kv_tokens, two.kv_bytes, two.dynamic_realloc_peak_bytes) == (1, 131_072, 0)
    assert (three.kv_tokens, three.kv_bytes) == (2, 2 * 131_072)
    assert three.dynamic_realloc_peak_bytes == 8 * 128 * 2
    text = format_text(plan(request(context=68)))
    # the KV's worst prompt, 66 tokens (one decode step's growth copy); the peak is the 67-token prefill's
    said = "68 tokens: a 66-token prompt (the KV's worst case; the prefill activations' is 67 tokens: note)"
    assert said in text
    assert "prefill activations    7.62 MiB (1 x 67 tokens, sdpa, at the peak" in text
    assert f"{prefill(1, 67) / 2**20:.2f}" == "7.62"
    assert "of which the cache holds 67" in text


def test_a_plan_of_two_worst_prompts_says_which_figure_is_which() -> None:
    # GIVEN a plan without --prompt at context 68: the KV's worst prompt is 66 tokens (68 - 2: one decode
    # step, whose cat copies a layer's 66-token K), the prefill's the longest, 67 (its activations grow)
    result = plan(request(context=68))
    assert result.prompt_tokens == 66 and result.dynamic_realloc_peak_bytes == 66 * 8 * 128 * 2
    assert result.prefill_activations_bytes == prefill(1, 67)
    # THEN a note says there are two prompts on purpose, which figure each is for, and which moment is the
    # peak (the prefill: its 67 tokens' KV and activations beat the 67 tokens' KV and a 66-token copy)
    note = (
        "two prompts, each the worst case of its own figures: the KV figures are for a 66-token prompt, the "
        "one whose KV peaks highest at 68 tokens, and the prefill activations for the longest, 67 tokens and "
        "one new token, since activations grow with the prompt; the peak is the larger moment, here the "
        "prefill's (--prompt plans one prompt for both)"
    )
    assert note in result.notes
    assert f"  note: {note}" in format_text(result)
    # AND a plan of one prompt, typed, has no such note
    assert not [n for n in plan(request(context=68, prompt=60)).notes if n.startswith("two prompts")]


MISTRAL_LIKE = ModelGeometry("m", 32, 32, 8, 128, 4096, 14336, 32000, False, sliding_window=4096)
LAYER_TOKEN = 2 * 8 * 128 * 2  # one layer's K and V of one token, bf16


def test_a_dynamic_caches_sliding_layers_hold_the_whole_prompt_until_the_first_decode_step() -> None:
    # GIVEN a 10,000-token prompt and 100 new tokens on a model whose 32 layers all keep a 4,096-token window
    given = plan(request(geometry=MISTRAL_LIKE, context=10_100, prompt=10_000))
    # THEN every layer holds the prompt after prefill; at the first decode step layer 0 makes its window's
    # K and V before it lets go of the prompt; at the end each layer's storage is its window, a view of whose
    # last 4,095 tokens it holds (DynamicSlidingWindowLayer keeps window - 1)
    assert given.prompt_tokens == 10_000
    assert given.kv_prefill_bytes == 32 * 10_000 * LAYER_TOKEN
    assert given.kv_peak_bytes == (32 * 10_000 + 4096) * LAYER_TOKEN
    assert (given.kv_tokens, given.kv_bytes) == (4095, 32 * 4096 * LAYER_TOKEN)
    # AND the peak is the prefill's: the prompt's KV and its activations, Llama 3 8B's a row and token and,
    # the prompt past the window, sdpa's bool mask of its window over prompt x prompt (transformers cannot
    # skip it), 10,000 x 10,000 B
    assert given.prefill_activations_bytes == prefill(1, 10_000) + 10_000 * 10_000
    assert given.peak_bytes == given.weights_bytes + given.kv_prefill_bytes + given.prefill_activations_bytes
    assert given.max_context is None  # later steps only slide: the prompt, not the context, sets the peak
    # AND without a prompt the worst one for the context is planned: 10,098 tokens and one decode step
    # (32 x 10,098 + 4,096 tokens of layer KV beats a 10,099-token prompt alone, 32 x 10,099)
    worst = plan(request(geometry=MISTRAL_LIKE, context=10_100))
    assert worst.prompt_tokens == 10_098
    assert worst.kv_peak_bytes == (32 * 10_098 + 4096) * LAYER_TOKEN
    assert worst.max_context is not None  # the worst prompt grows with the context
    # AND a static cache writes only the window, from the prefill on
    static = plan(request(geometry=MISTRAL_LIKE, context=10_100, cache="static"))
    assert static.kv_peak_bytes == static.kv_prefill_bytes == static.kv_bytes == 32 * 4096 * LAYER_TOKEN
    # AND where the prompt does not fit, the remedies are that static cache and windows below the model's own
    # (room for 5,000 tokens of KV beside the worst prompt's prefill activations, 10,099 tokens, which
    # every cache's prefill holds: before they were estimated, the room was the KV's alone)
    room = 32 * 5000 * LAYER_TOKEN + prefill(1, 10_099) + 10_099 * 10_099
    tight = plan(request(geometry=MISTRAL_LIKE, context=10_100, gpu_memory_bytes=given.weights_bytes + room))
    remedies = {remedy.kind: remedy for remedy in tight.remedies}
    assert not tight.fits and remedies["static_cache"].fits
    assert remedies["sliding_window"].setting == 4095


def test_a_sliding_layers_step_copies_both_k_and_v() -> None:
    # A 100-token prompt and 5,000 new tokens: the window is full long before the last step, which makes
    # one layer's new K and V of 4,096 tokens before it frees the old ones.
    result = plan(request(geometry=MISTRAL_LIKE, context=5100, prompt=100))
    assert result.kv_bytes == 32 * 4096 * LAYER_TOKEN
    assert result.dynamic_realloc_peak_bytes == 4096 * LAYER_TOKEN


def test_a_prompt_leaves_room_for_a_new_token() -> None:
    with pytest.raises(KvtraceError, match="below the context"):
        request(context=100, prompt=100)
    with pytest.raises(KvtraceError, match="prompt"):
        request(context=100, prompt=0)


def test_fp8_and_int4_kv_sizes() -> None:
    assert plan(request(kv_dtype="fp8")).kv_bytes_per_token == 32 * 2 * 8 * 128 * 1
    assert plan(request(kv_dtype="fp32")).kv_bytes_per_token == 32 * 2 * 8 * 128 * 4
    assert plan(request(kv_dtype="int4")).kv_bytes_per_token == 32 * 2 * 8 * 128 // 2


def test_quantized_cache_counts_scales_and_residual_apart() -> None:
    result = plan(request(batch=3, context=1001, cache="quantized", kv_dtype="int4"))  # 1000 written
    data = 32 * 2 * 8 * 128 // 2  # packed int4
    scales = 32 * 2 * (8 * 128 // 64) * 2 * 2  # groups of 64, scale + zero-point, bf16
    full = 131_072  # residual tokens stay bf16
    residual_tokens = 127  # transformers requantizes when the residual would reach 128
    assert result.kv_bytes_per_token == data == 32_768
    assert result.kv_scale_bytes_per_token == scales == 4096
    assert result.kv_scale_bytes == 3 * (1000 - residual_tokens) * scales
    assert result.kv_residual_bytes == 3 * residual_tokens * full
    assert result.kv_bytes == 3 * ((1000 - residual_tokens) * (data + scales) + residual_tokens * full)
    assert result.prompt_tokens == 1000 - residual_tokens  # the worst prompt: 127 tokens since quantizing
    # The last step's update, in bf16, per row one layer's K (or V) of 8 x 128 a token: the dequantized K and
    # V of its quantized tokens (the 873 of the prompt), the K and V it returns (all 1000 written), and its
    # old residual V (126 tokens) beside the new one its cat makes (the new one is in kv_bytes)
    quantized, written, old_residual = 1000 - residual_tokens, 1000, residual_tokens - 1
    side = 3 * 8 * 128 * 2
    copies = 2 * quantized + 2 * written + old_residual
    assert result.dynamic_realloc_peak_bytes == side * copies == side * (2 * 873 + 2 * 1000 + 126)


# The tour's tiny Llama 3: 3 layers, 2 KV heads of 16, float32; 2 rows, a 12-token prompt, 8 new tokens
TINY_LLAMA = ModelGeometry("tiny", 3, 4, 2, 16, 64, 128, 1000, False)


def test_a_quantized_cache_narrower_than_a_group_is_priced_as_quanto_lays_it_out() -> None:
    # GIVEN the int4 QuantizedCache at transformers' defaults (groups of 64, residual 128) of a model whose
    # layers' K are 32 wide, 2 rows, 19 tokens written (12 of the prompt quantized, 7 in the residual)
    result = plan(
        request(geometry=TINY_LLAMA, batch=2, context=20, prompt=12, cache="quantized", kv_dtype="int4",
                weights_dtype="fp32")
    )  # fmt: skip
    # THEN a layer's K is quanto's tensor of 2 x 2 x 12 x 16 = 768 values: 384 B packed, and 768 / 64 = 12
    # groups of a float32 scale and shift (its _scale is (12, 1)), 96 B: the groups run across tokens, so
    # a token's row pays half a group a layer's K, not a whole one (it was priced 14,208 B)
    values = 2 * 2 * 12 * 16
    quantized = 3 * 2 * (values // 2 + values // 64 * 2 * 4)
    residual_row = 2 * 2 * 16 * 4  # a token of one layer's K (or V), both rows, float32
    residual = 3 * 2 * 7 * residual_row
    assert result.kv_scale_bytes_per_token == 3 * 2 * 32 // 64 * 2 * 4 == 24
    assert result.kv_bytes == quantized + residual == 13_632
    # and its KV peak is what the cache's storages hold at most: the last update's cat makes the last
    # layer's new residual V of 7 tokens beside the old one of 6 (as a recording's KV peak counts them; it
    # was 31,616 B, the update's dequantized and returned K and V counted as KV)
    assert result.kv_peak_bytes == result.kv_bytes + 6 * residual_row == 15_168
    # while the peak still counts those copies beside it: one layer's K and V dequantized (the 12 quantized
    # tokens) and returned (all 19)
    assert result.dynamic_realloc_peak_bytes == residual_row * (6 + 2 * 12 + 2 * 19)


def test_a_2_bit_quantized_cache_packs_four_values_a_byte() -> None:
    # GIVEN a QuantizedCache of nbits=2 (quanto or HQQ: four values a byte), 1000 tokens written
    result = plan(request(batch=3, context=1001, cache="quantized", kv_dtype="int2"))
    # THEN its data is a quarter byte a value (it was planned as int4, half a byte: twice this), while the
    # group scales, the bf16 residual of 127 tokens and one layer's dequantized copies are int4's
    data = 32 * 2 * 8 * 128 // 4
    scales = 32 * 2 * (8 * 128 // 64) * 2 * 2
    residual_tokens, full = 127, 32 * 2 * 8 * 128 * 2
    kv = 3 * ((1000 - residual_tokens) * (data + scales) + residual_tokens * full)
    assert (result.kv_bytes_per_token, result.kv_scale_bytes_per_token) == (16_384, scales)
    assert result.kv_bytes == kv
    # side x (2 x quantized + 2 x written + old residual), as int4's: the copies are in bf16 whatever the bits
    assert result.dynamic_realloc_peak_bytes == 3 * 8 * 128 * 2 * (2 * 873 + 2 * 1000 + 126)


def test_quantized_cache_rejects_float_kv() -> None:
    with pytest.raises(KvtraceError, match="int4 or int8"):
        request(cache="quantized", kv_dtype="bf16")


# --- fit, max_batch, max_context ----------------------------------------------------------------------


def test_totals_and_headroom() -> None:
    result = plan(
        request(batch=8, context=8192, gpu_memory_bytes=80 * GIB, reserve_bytes=None, reserve_fraction=0.1)
    )
    weights = LLAMA_3_8B_BF16
    kv = 8 * 8191 * 131_072  # the context's last token is never written
    reserve = 8 * GIB
    growth = 8 * 8190 * 8 * 128 * 2
    assert (result.weights_bytes, result.kv_bytes, result.reserve_bytes) == (weights, kv, reserve)
    assert result.total_bytes == weights + kv + reserve
    # The peak is the prefill of the longest prompt, 8,191 tokens, which holds the KV whole and 7.28 GiB of
    # activations, more than the last step's growth copy (128 MiB), the peak before they were estimated
    activations = prefill(8, 8191)
    assert activations > growth
    assert (result.prefill_activations_bytes, result.activations_bytes) == (activations, activations)
    assert result.kv_at_peak_bytes == kv
    assert result.peak_bytes == weights + kv + reserve + activations
    assert result.headroom_bytes == 80 * GIB - (weights + kv + reserve + activations)
    assert result.fits


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_max_batch_is_exact(cache: str) -> None:
    gpu, context = 40 * GIB, 4096
    weights = LLAMA_3_8B_BF16
    growth_per_seq = (context - 2) * 8 * 128 * 2 if cache == "dynamic" else 0

    def peak(batch: int) -> int:
        # the prefill of the longest prompt, context - 1, when its activations are more than the growth copy
        at_end = (context - 1) * 131_072 + growth_per_seq
        at_prefill = (context - 1) * 131_072 + prefill(1, context - 1)
        return weights + batch * max(at_end, at_prefill)

    result = plan(request(batch=1, context=context, gpu_memory_bytes=gpu, cache=cache))
    assert peak(result.max_batch) <= gpu < peak(result.max_batch + 1)
    assert plan(request(batch=result.max_batch, context=context, gpu_memory_bytes=gpu, cache=cache)).fits
    assert not plan(
        request(batch=result.max_batch + 1, context=context, gpu_memory_bytes=gpu, cache=cache)
    ).fits


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_max_context_is_exact(cache: str) -> None:
    gpu, batch = 24 * GIB, 3
    result = plan(request(batch=batch, context=2, gpu_memory_bytes=gpu, cache=cache))
    best = result.max_context
    assert best is not None
    assert plan(request(batch=batch, context=best, gpu_memory_bytes=gpu, cache=cache)).fits
    assert not plan(request(batch=batch, context=best + 1, gpu_memory_bytes=gpu, cache=cache)).fits
    if cache == "static":  # linear: worked out by hand
        # the tokens written, each a token's KV and, in the longest prompt, its prefill's activations
        assert best - 1 == (gpu - LLAMA_3_8B_BF16) // (batch * (131_072 + PREFILL_ROW_TOKEN))


def test_quantized_max_context_is_exact() -> None:
    gpu = 20 * GIB
    best = plan(
        request(batch=4, context=2, gpu_memory_bytes=gpu, cache="quantized", kv_dtype="int4")
    ).max_context
    assert best is not None
    assert plan(request(batch=4, context=best, gpu_memory_bytes=gpu, cache="quantized", kv_dtype="int4")).fits
    next_one = request(batch=4, context=best + 1, gpu_memory_bytes=gpu, cache="quantized", kv_dtype="int4")
    assert not plan(next_one).fits


def test_weights_that_do_not_fit_give_zero_and_one_remedy() -> None:
    result = plan(request(geometry=get_preset("llama-3-70b"), gpu_memory_bytes=80 * GIB))
    assert not result.fits
    assert (result.max_batch, result.max_context, result.kv_blocks) == (0, 0, 0)
    assert [remedy.kind for remedy in result.remedies] == ["weights"]
    assert "shard the model" in format_text(result)


def test_remedies_when_kv_does_not_fit() -> None:
    # a 512-token prompt: its prefill's activations (3.64 GiB) are not what keeps it from fitting
    result = plan(
        request(
            batch=64,
            context=8192,
            prompt=512,
            gpu_memory_bytes=80 * GIB,
            reserve_bytes=None,
            reserve_fraction=0.1,
        )
    )
    assert not result.fits
    kinds = {remedy.kind: remedy for remedy in result.remedies}
    assert kinds["batch"].setting == result.max_batch and kinds["batch"].fits
    assert kinds["context"].setting == result.max_context and kinds["context"].fits
    assert kinds["quantized_kv"].fits
    assert kinds["sliding_window"].fits
    text = format_text(result)
    assert "NO" in text
    assert f"Lower the batch to {result.max_batch}" in text
    assert "--cache quantized" in text and "--cache static_sliding" in text
    assert plan(request()).remedies == ()
    # AND at the worst prompt, 8,191 tokens, the prefill's activations alone are 58.25 GiB: quantizing the
    # KV is offered, but does not fit (before they were estimated it did)
    worst = plan(
        request(batch=64, context=8192, gpu_memory_bytes=80 * GIB, reserve_bytes=None, reserve_fraction=0.1)
    )
    assert worst.prefill_activations_bytes == prefill(64, 8191)
    assert not {remedy.kind: remedy for remedy in worst.remedies}["quantized_kv"].fits


def test_to_json_has_the_figures_and_echoes_the_request() -> None:
    payload = to_json(plan(request(batch=2, context=100)))
    json.dumps(payload)  # serialisable as is
    for key in ("kv_bytes_per_token", "kv_bytes", "weights_bytes", "fits", "max_batch", "max_context"):
        assert key in payload
    assert payload["kv_bytes"] == 2 * 99 * 131_072
    assert payload["request"]["geometry"]["name"] == "llama-3-8b"
    assert payload["request"]["batch"] == 2 and payload["request"]["context"] == 100


def test_format_text_shows_gib() -> None:
    text = format_text(plan(request(batch=1, context=8193)))
    assert "1.00 GiB" in text  # 8192 x 131,072 B of KV
    assert "131,072 B" in text


def test_a_larger_prefill_is_priced_from_the_runs_prefill_where_it_tells() -> None:
    # GIVEN a bf16 Llama 3 8B run of 1 row, a 10-token prompt and a context of 100, that peaked at its last
    # decode step with 1 GiB beside its weights, KV and growth copy (one layer's K of 98 tokens)
    kv_token = 32 * 2 * 8 * 128 * 2
    growth = 98 * 8 * 128 * 2
    activations = GIB
    recorded = RecordedPeak(
        peak_bytes=LLAMA_3_8B_BF16 + 99 * kv_token + growth + activations,
        activations_bytes=activations,
        weights_bytes=LLAMA_3_8B_BF16,
        phase="decode",
        tokens=99,
        batch=1,
        context=100,
        prompt=10,
        cache="dynamic",
        kv_dtype="bf16",
        window=None,
        beams=1,
        quant_group_size=64,
        residual_length=128,
    )
    told = replace(recorded, prefill_activations_bytes=4 * GIB)  # its prefill held 4 GiB beside its KV

    def planned(rec: RecordedPeak, batch: int) -> PlanResult:
        return plan(
            request(
                batch=batch, context=100, prompt=10, recorded=rec, measured_weights_bytes=rec.weights_bytes
            )
        )

    # WHEN it is planned at 2 rows, from a run that tells its prefill's activations
    # THEN the prefill is the peak: the weights, 2 rows of the prompt's KV, and twice the prefill's 4 GiB
    result = planned(told, 2)
    assert result.peak_bytes == LLAMA_3_8B_BF16 + 2 * 10 * kv_token + 2 * 4 * GIB
    assert not [note for note in result.notes if "does not tell" in note]
    # WHEN the run does not tell them: the bound (its peak less its weights and prefill KV) stands, and a
    # note says what it holds; not for the run's own batch, whose prefill is within its peak
    bound = planned(recorded, 2)
    assert [note for note in bound.notes if "does not tell what it held beside its KV" in note]
    assert not [note for note in planned(recorded, 1).notes if "does not tell" in note]


# --- config.json --------------------------------------------------------------------------------------


def write_config(tmp_path: Path, config: object, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_config_json_of_llama_3_8b_reads_as_the_preset(tmp_path: Path) -> None:
    geom = geometry_from_config(write_config(tmp_path, LLAMA_3_8B_CONFIG))
    preset = llama_3_8b()
    assert geom.head_dim == 4096 // 32
    assert (geom.num_layers, geom.num_kv_heads, geom.intermediate_size) == (32, 8, 14336)
    assert param_count(geom) == param_count(preset) == 8_030_261_248
    assert geometry_from_config(tmp_path) == geom  # the folder works too


def test_a_config_in_the_hugging_face_cache_is_named_for_its_repository(tmp_path: Path) -> None:
    # GIVEN a config as huggingface_hub caches it: snapshots/REV/config.json, a link into blobs/
    repo = tmp_path / "models--meta-llama--Meta-Llama-3-8B"
    (repo / "blobs").mkdir(parents=True)
    blob = write_config(repo / "blobs", LLAMA_3_8B_CONFIG, "0f5a6b4e2a3c")  # a blob is named by its hash
    snapshot = repo / "snapshots" / "8cde5ca8380496c9a6cc7ef3a8b46a0372a1d920"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", blob.name))

    # WHEN it is planned, by the file or its folder THEN the model is the repository's: it was "blobs", the
    # folder of the file the link points to
    for given in (snapshot / "config.json", snapshot):
        assert geometry_from_config(given).name == "meta-llama/Meta-Llama-3-8B"
    # AND a config elsewhere keeps its folder's name, as given: a link to it is named for the link's folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").symlink_to(blob)
    assert geometry_from_config(tmp_path / "mine" / "config.json").name == "mine"


def test_config_defaults_and_text_config_nesting(tmp_path: Path) -> None:
    config = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "vocab_size": 100,
    }
    geom = geometry_from_config(write_config(tmp_path, config))
    assert (geom.num_kv_heads, geom.head_dim, geom.tie_word_embeddings) == (4, 16, False)

    nested = {
        "model_type": "llava",
        "tie_word_embeddings": True,
        "text_config": {**config, "num_key_value_heads": 2, "head_dim": 32},
    }
    geom = geometry_from_config(write_config(tmp_path, nested, "nested.json"))
    assert (geom.num_layers, geom.num_kv_heads, geom.head_dim, geom.tie_word_embeddings) == (2, 2, 32, True)


def test_config_sliding_window_only_when_enabled(tmp_path: Path) -> None:
    base = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "vocab_size": 100,
        "sliding_window": 4096,
    }
    assert geometry_from_config(write_config(tmp_path, base)).sliding_window == 4096
    disabled = write_config(tmp_path, {**base, "use_sliding_window": False}, "qwen.json")
    assert geometry_from_config(disabled).sliding_window is None


def test_config_missing_num_hidden_layers(tmp_path: Path) -> None:
    config = {key: value for key, value in LLAMA_3_8B_CONFIG.items() if key != "num_hidden_layers"}
    path = write_config(tmp_path, config)
    with pytest.raises(KvtraceError, match="missing field num_hidden_layers") as excinfo:
        geometry_from_config(path)
    assert str(excinfo.value).startswith(str(path))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"num_hidden_layers": "32"}'])
def test_bad_config_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KvtraceError, match=r"config\.json"):
        geometry_from_config(path)


def test_unreadable_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(KvtraceError, match=r"absent\.json"):
        geometry_from_config(tmp_path / "absent.json")


# --- parse_size ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * 2**30),
        ("80GB", 80 * 10**9),
        ("1.5e9", 1_500_000_000),
        ("12345", 12345),
        ("512 MiB", 512 * 2**20),
        ("11.12GiB", 1112 * 2**30 // 100),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["-1", "-2GiB", "", "lots", "80G", "1.2.3GB", "nan", "inf", "GiB", "1e", "1.5B", "1.5", "0.5b"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(KvtraceError):
        parse_size(text)


def test_parse_size_keeps_whole_bytes_and_names_the_flag() -> None:
    # a byte count in any spelling, whole: every byte kept
    assert (parse_size("1500B"), parse_size("1.5e3B"), parse_size("0.5KiB")) == (1500, 1500, 512)
    # a fraction of a byte is refused, not truncated to 1 byte ("1.5B" may mean 1.5 billion)
    with pytest.raises(KvtraceError, match=r"^--budget: a size in bytes must be a whole number, got '1.5B'"):
        parse_size("1.5B", "--budget")
    with pytest.raises(KvtraceError, match=r"^--gpu-memory: cannot read size '70M'"):
        parse_size("70M", "--gpu-memory")
    assert parse_size("0", "--gpu-memory") == 0
    with pytest.raises(KvtraceError, match=r"^--gpu-memory 0: a memory size must be positive$"):
        parse_size("0", "--gpu-memory", positive=True)


def test_a_device_memory_without_its_unit_is_refused_below_one_mib() -> None:
    from analyzers.planning.size_text import parse_device_memory

    # "24" meant 24 GiB: read as 24 bytes it planned a GPU of 0.02 KiB; refused, naming the flag and the fix
    with pytest.raises(KvtraceError) as refused:
        parse_device_memory("24", "--gpu-memory")
    assert str(refused.value) == (
        "--gpu-memory 24: a number without a unit is bytes, and 24 B is no device's memory: give its unit, "
        "e.g. --gpu-memory 24GiB"
    )
    with pytest.raises(KvtraceError, match=r"^--budget 1048575: a number without a unit is bytes"):
        parse_device_memory(" 1048575 ", "--budget")
    with pytest.raises(KvtraceError, match=r"^--budget 1e5: a number without a unit is bytes, and 100,000 B"):
        parse_device_memory("1e5", "--budget")
    # a unit typed is kept, however small (B included), and a bare number from 1 MiB on is bytes
    assert parse_device_memory("24GiB", "--gpu-memory") == 24 * 2**30
    assert parse_device_memory("24B", "--gpu-memory") == 24
    assert parse_device_memory("1048576", "--gpu-memory") == 2**20
    assert parse_device_memory("85899345920", "--gpu-memory") == 80 * 2**30
    with pytest.raises(KvtraceError, match=r"^--gpu-memory 0: a memory size must be positive$"):
        parse_device_memory("0", "--gpu-memory")


# --- the command --------------------------------------------------------------------------------------


def run_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    command = PlanCommand()
    parser = argparse.ArgumentParser(prog="kvtrace plan", description=PlanCommand.__doc__)
    command.add_arguments(parser)
    status = command.run(parser.parse_args(argv))
    return status, capsys.readouterr().out


def test_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run_command(
        ["--preset", "llama-3-8b", "--batch", "4", "--context", "2048", "--json"], capsys
    )
    payload = json.loads(out)
    assert status == 0
    assert payload["kv_bytes_per_token"] == 131_072
    assert payload["kv_bytes"] == 4 * 2047 * 131_072
    assert payload["weights_bytes"] == LLAMA_3_8B_BF16
    assert payload["fits"] is True
    assert payload["request"]["reserve_bytes"] == 8 * GIB  # default: 10% of 80 GiB
    assert {"max_batch", "max_context"} <= payload.keys()


def test_command_exit_1_when_it_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "llama-3-8b", "--gpu-memory", "24GB", "--reserve", "1GiB", "--context", "131072"]
    status, out = run_command(argv, capsys)
    assert status == 1
    assert "To make it fit:" in out


def test_command_quantized_defaults_to_int4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, LLAMA_3_8B_CONFIG)
    status, out = run_command(["--config", str(config), "--cache", "quantized", "--json"], capsys)
    assert status == 0
    assert json.loads(out)["request"]["kv_dtype"] == "int4"
    # and --kv-dtype int2 (nbits=2) is taken: a quarter byte a value
    args = ["--config", str(config), "--cache", "quantized", "--kv-dtype", "int2", "--json"]
    status, out = run_command(args, capsys)
    assert (status, json.loads(out)["kv_bytes_per_token"]) == (0, 32 * 2 * 8 * 128 // 4)


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "gpt-5"],
        ["--preset", "llama-3-8b", "--gpu-memory=-80GiB"],
        ["--preset", "llama-3-8b", "--reserve", "-0.1"],
        ["--preset", "llama-3-8b", "--batch", "-1"],
        ["--preset", "llama-3-8b", "--cache", "sliding"],
        ["--preset", "llama-3-8b", "--context", "10", "--prompt", "10"],
        ["--engine", "vllm", "--preset", "llama-3-8b", "--prompt", "5"],
        ["--config", "/nonexistent/config.json"],
    ],
)
def test_command_bad_input_is_a_kvtrace_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KvtraceError) as excinfo:
        run_command(argv, capsys)
    assert excinfo.value.exit_code == 2


def test_a_context_of_1_is_refused_like_a_prompt_of_1(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtrace.cli import main

    # GIVEN a context of 1: no room for a prompt of at least 1 token and the new token generate() makes
    for extra in ([], ["--prompt", "1"], ["--json"]):
        # WHEN planned, THEN it is refused in one line, exit status 2, as a prompt of 1 in it is
        assert main(["plan", "--preset", "llama-3-8b", "--context", "1", *extra]) == 2
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1
        assert "--context must be at least 2" in out.err
    with pytest.raises(KvtraceError, match="context must be at least 2"):
        request(context=1)
    # AND the shortest context, 2, is a 1-token prompt and 1 new token: the cache holds the prompt
    shortest = plan(request(context=2))
    assert (shortest.prompt_tokens, shortest.kv_tokens, shortest.kv_bytes) == (1, 1, 131_072)


def test_a_context_beyond_the_models_positions_is_planned_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Llama 3 8B's shape with Llama 2's 4,096 positions
    config = write_config(tmp_path, {**LLAMA_3_8B_CONFIG, "max_position_embeddings": 4096})
    # WHEN planned without --context, THEN the context is the model's 4,096, not 8,192, and the one note says
    # that the max context memory holds (an 80 GB device holds far more) is past the positions the model takes
    status, out = run_command(["--config", str(config), "--json"], capsys)
    payload = json.loads(out)
    assert (status, payload["request"]["context"]) == (0, 4096)
    longest = payload["max_context"]
    assert longest > 4096
    # the first says how the prefill's activations are estimated, the second why their prompt is not the KV's
    prefill_note, prompts_note, *notes = payload["notes"]
    assert prefill_note.startswith("prefill activations: generate() runs the 4,095-token prompt of 1 row")
    assert prompts_note.startswith("two prompts, each the worst case of its own figures: the KV figures are")
    assert notes == [
        f"max context is what memory holds at batch 1 ({longest:,} tokens); "
        f"{payload['request']['geometry']['name']} takes 4,096 positions "
        "(max_position_embeddings), the longest context to run it at"
    ]
    status, out = run_command(["--config", str(config)], capsys)
    assert f"  max context @ batch 1  {longest:,} (memory alone; the model takes 4,096 positions)\n" in out
    assert payload["request"]["geometry"]["max_position_embeddings"] == 4096
    assert payload["kv_bytes"] == 4095 * 131_072
    # AND a context beyond it is planned (transformers runs it; the figures hold) with a note saying so
    status, out = run_command(["--config", str(config), "--context", "8192", "--json"], capsys)
    payload = json.loads(out)
    assert (status, payload["kv_bytes"]) == (0, 8191 * 131_072)
    _, note, prompts_note = payload["notes"]
    assert note.startswith("the context of 8,192 tokens is beyond the 4,096 positions")
    assert prompts_note.startswith("two prompts, each the worst case of its own figures")
    assert "vLLM refuses such a max_model_len" in note
    status, out = run_command(["--config", str(config), "--context", "8192"], capsys)
    assert "  note: the context of 8,192 tokens is beyond the 4,096 positions" in out
    # AND the model's own 4,096 is not beyond it (the note is the max context's alone)
    status, out = run_command(["--config", str(config), "--context", "4096", "--json"], capsys)
    assert [note[:27] for note in json.loads(out)["notes"]] == [
        "prefill activations: genera",
        "two prompts, each the worst",
        "max context is what memory ",
    ]
    # AND a device that holds no more than the model's positions gets no note
    status, out = run_command(["--config", str(config), "--gpu-memory", "16GiB", "--json"], capsys)
    payload = json.loads(out)
    assert payload["max_context"] <= 4096 and [note[:20] for note in payload["notes"]] == [
        "prefill activations:",
        "two prompts, each th",
    ]


def test_planner_never_imports_torch() -> None:
    code = (
        "import sys, analyzers.planning.plan, analyzers.planning.presets, analyzers.planning.hf_config\n"
        "import analyzers.planning.param_count, analyzers.planning.run_defaults, kvtrace.commands.plan\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_a_beam_search_plans_whole_prompts_of_beams() -> None:
    # GIVEN 4 prompts of 3 beams (12 rows) on a GPU with room for the KV peak of 7 rows but not 8
    rows_room = plan(request(batch=3, beams=3, context=1000))
    # THEN the largest batch is whole prompts, 6 rows, and a quantized cache is not offered (a row's share of
    # the peak, the prefill's KV and activations, which follow the rows; before they were estimated, the KV
    # peak's)
    fixed = rows_room.weights_bytes + rows_room.reserve_bytes
    gpu = fixed + 7 * ((rows_room.peak_bytes - fixed) // 3)
    reserve = rows_room.reserve_bytes
    tight = plan(request(batch=12, beams=3, context=1000, gpu_memory_bytes=gpu, reserve_bytes=reserve))
    assert tight.max_batch == 6
    kinds = {remedy.kind for remedy in tight.remedies}
    assert "batch" in kinds and "quantized_kv" not in kinds
    with pytest.raises(KvtraceError, match="prompts x beams"):
        request(batch=4, beams=3)
    with pytest.raises(KvtraceError, match="quantized"):
        request(batch=2, beams=2, cache="quantized", kv_dtype="int4")
