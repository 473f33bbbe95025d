"""The prefill's activations a plan from a preset or a config counts
(analyzers.planning.prefill_activations), worked out here by hand from transformers 5.25's Llama layer;
tests/integration/test_plan_prefill_activations.py checks the same arithmetic against the recorder."""

from __future__ import annotations

from dataclasses import replace

from analyzers.planning.plan import PlanRequest, format_text, plan, to_json
from analyzers.planning.prefill_activations import prefill_activations, unplanned_reason
from analyzers.planning.presets import ModelGeometry, get_preset

GIB = 2**30
# Llama 3.1 8B in bf16: 8,030,261,248 parameters at 2 B and its float32 RoPE table (2 x 64 x 4 B)
WEIGHTS = 8_030_261_248 * 2 + 2 * 64 * 4
KV_TOKEN = 32 * 2 * 8 * 128 * 2  # every layer's K and V of a token of a row, bf16: 131,072 B
# Its prefill a row and prompt token, at the last layer's MLP: the gate's activation, the up projection and
# their product (3 x 14,336), four hidden states of 4,096 (the embeddings, the layer's input, its residual,
# the normed input), rotary cos and sin (2 x 128), bf16, and generate()'s two int64 position tensors
ROW_TOKEN = 3 * 14_336 * 2 + 4 * 4096 * 2 + 2 * 128 * 2 + 2 * 8
assert ROW_TOKEN == 119_312


def llama_31_8b(**overrides: object) -> PlanRequest:
    fields: dict[str, object] = {"geometry": get_preset("llama-3.1-8b"), "gpu_memory_bytes": 80 * GIB}
    fields.update(overrides)
    return PlanRequest(**fields)  # type: ignore[arg-type]


def test_llama_31_8b_at_three_rows_of_131k_holds_43_69_gib_at_its_prefill() -> None:
    # GIVEN Llama 3.1 8B at batch 3 and a context of 131,072 on an 80 GiB GPU, the 10% reserve
    result = plan(llama_31_8b(batch=3, context=131_072))
    # THEN its worst prompt, 131,071 tokens, holds at the last layer's MLP 46,915,029,456 B (43.69 GiB) of
    # activations: each of the MLP's three intermediates is 3 x 131,071 x 14,336 x 2 B, 11.27 GB
    rows = 3 * 131_071
    assert rows * 14_336 * 2 == 11_274_203_136
    assert result.prefill_activations_bytes == rows * ROW_TOKEN == 46_915_029_456
    # AND its peak is the prefill's, beside the weights, the prompt's KV (the whole cache, 48 GiB) and the
    # 8 GiB reserve: 114.65 GiB, which does not fit (before: 72.29 GiB, the KV peak's, "fits" with 8.29 GiB
    # of headroom)
    kv = rows * KV_TOKEN
    reserve = 8 * GIB
    peak = WEIGHTS + kv + 46_915_029_456 + reserve
    assert (result.kv_at_peak_bytes, result.activations_bytes) == (kv, 46_915_029_456)
    assert result.peak_bytes == peak == 123_104_701_392
    assert f"{peak / GIB:.2f}" == "114.65" and not result.fits
    before = WEIGHTS + kv + reserve + 3 * 131_070 * 8 * 128 * 2  # the growth copy of one layer's K
    assert f"{(80 * GIB - before) / GIB:.2f}" == "8.29"
    assert result.headroom_bytes == 80 * GIB - peak
    # AND the largest batch and context that fit count it too: a row at 131,072 is 17.34 GiB of KV and
    # prefill; at 3 rows, each token of the context is 3 x (131,072 + 119,312) B
    assert result.max_batch == (80 * GIB - WEIGHTS - reserve) // (131_071 * (KV_TOKEN + ROW_TOKEN)) == 1
    assert result.max_context == 1 + (80 * GIB - WEIGHTS - reserve) // (3 * (KV_TOKEN + ROW_TOKEN)) == 81_540
    # AND the text names it, with its formula in a note
    text = format_text(result)
    assert (
        "  prefill activations    43.69 GiB (3 x 131,071 tokens, sdpa, at the peak, beside the prompt's"
        in text
    )
    assert "Its last layer's MLP holds 3 x R x 14,336" in text
    assert to_json(result)["prefill_activations_bytes"] == 46_915_029_456


def test_the_prefill_note_is_set_a_sentence_a_line() -> None:
    # GIVEN the plan above, whose prefill note was one line of some 1,100 characters, its first sentence 650
    result = plan(llama_31_8b(batch=3, context=131_072))
    (note,) = [n for n in result.notes if n.startswith("prefill activations: ")]
    # WHEN printed
    lines = format_text(result).splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  note: prefill activations: ")))
    said = [lines[start], *[line for line in lines[start + 1 :] if line.startswith("        ")][:4]]
    # THEN each sentence is a line under the first: the prompt and R, the moment and its bytes, whose layer
    # that is, what it assumes, what it leaves out
    assert said[0] == (
        "  note: prefill activations: generate() runs the 131,071-token prompt of 3 rows through the model "
        f"in one forward (R = {3 * 131_071:,} rows x tokens)."
    )
    assert said[1].startswith("        Its last layer's MLP holds 3 x R x 14,336 (the activation of the gate")
    assert said[1].endswith(
        f"in bf16: {46_915_029_456 / GIB:.2f} GiB beside the weights and every layer's KV of the prompt."
    )
    assert said[2] == (
        "        That is transformers 5.25's Llama layer as kvtrace measured it, whatever version the layout "
        "line names."
    )
    assert said[3].startswith("        Planned for sdpa attention (transformers' default")
    assert said[4].startswith("        Not in it: the last position's logits")
    assert max(len(line) for line in said) < 400
    # AND the lines are the --json note's words
    assert " ".join(line.strip() for line in said).removeprefix("note: ") == note


def test_a_short_prompt_leaves_the_peak_to_the_kv() -> None:
    # GIVEN a 1,024-token prompt and 131,072 tokens of context: the prefill's activations are the prompt's
    result = plan(llama_31_8b(batch=3, context=131_072, prompt=1024))
    assert result.prefill_activations_bytes == 3 * 1024 * ROW_TOKEN
    # THEN the peak is the last decode step's KV and growth copy, no activations beside it
    growth = 3 * 131_070 * 8 * 128 * 2
    assert result.kv_at_peak_bytes == result.kv_peak_bytes == 3 * 131_071 * KV_TOKEN + growth
    assert result.activations_bytes == 0
    assert result.peak_bytes == WEIGHTS + result.kv_peak_bytes + 8 * GIB
    assert "sdpa, below the peak; note)" in format_text(result)


# A Llama-style model small enough to count by hand: 2 layers, hidden 64, 4 heads of 16, 2 KV heads
SMALL = ModelGeometry("small", 2, 4, 2, 16, 64, 256, 1000, True)


def test_the_moments_counted_by_hand() -> None:
    rows = 2 * 100
    held = rows * (64 * 4 + 2 * 16 * 4 + 16)  # embeddings, cos and sin, positions (fp32)
    # the MLP: three of 256 beside the layer's input, residual and normed input
    mlp = prefill_activations(SMALL, "fp32", 2, 100)
    assert mlp is not None and mlp.moment == "mlp"
    assert mlp.peak_bytes == held + rows * (3 * 64 + 3 * 256) * 4
    # an MLP as narrow as a head: the rotary embedding's q four times beside input and normed input (its k and
    # v are the last layer's KV, which the plan counts with every layer's: before, counted here too)
    narrow = prefill_activations(replace(SMALL, intermediate_size=16), "fp32", 2, 100)
    assert narrow is not None and narrow.moment == "rotary"
    assert narrow.peak_bytes == held + rows * (2 * 64 + 4 * 64) * 4
    # one layer: its input is the embeddings
    single = prefill_activations(replace(SMALL, num_layers=1), "fp32", 2, 100)
    assert single is not None and single.peak_bytes == mlp.peak_bytes - rows * 64 * 4
    # eager in bf16: a mask a pair held; at the MLP, the layer's probabilities too (4 heads, 2 B a pair)
    pairs = 2 * 100 * 100
    held16 = rows * (64 * 2 + 2 * 16 * 2 + 16) + pairs * 2
    eager = prefill_activations(SMALL, "bf16", 2, 100, "eager")
    assert eager is not None and eager.moment == "scores"
    # at the softmax: input, normed input, the rotated q, K and V expanded to 4 heads, and 10 B a head and
    # pair (the masked scores, their float32 cast and float32 softmax)
    assert eager.peak_bytes == held16 + rows * (2 * 64 + 3 * 64) * 2 + pairs * 4 * 10
    # padded prompts under sdpa: a bool mask of every row, and at a layer's sdpa its bf16 copy, the rotated q
    # and the output, K and V expanded, and the float32 log-sum-exp a head and token
    padded = prefill_activations(replace(SMALL, intermediate_size=16), "bf16", 2, 100, padded=True)
    assert padded is not None and padded.moment == "mask"
    masked = rows * 2 * 64 * 2 + pairs * 2 + rows * 4 * 64 * 2 + 2 * 4 * 100 * 4
    assert padded.peak_bytes == rows * (64 * 2 + 2 * 16 * 2 + 16) + pairs + masked


def test_a_window_reached_by_the_prompt_adds_its_mask() -> None:
    # GIVEN every layer sliding at a window of 64 (Mistral's kind), unpadded prompts under sdpa
    windowed = replace(SMALL, sliding_window=64)
    within = prefill_activations(windowed, "fp32", 2, 63)
    plain = prefill_activations(SMALL, "fp32", 2, 63)
    assert within is not None and plain is not None and within.peak_bytes == plain.peak_bytes  # skipped
    # THEN a prompt as long as the window makes its bool mask, one for every row and head: 100 x 100 B
    past = prefill_activations(windowed, "fp32", 2, 100)
    full = prefill_activations(SMALL, "fp32", 2, 100)
    assert past is not None and full is not None and past.peak_bytes == full.peak_bytes + 100 * 100


def test_a_model_the_estimate_does_not_cover_keeps_its_old_plan_and_says_so() -> None:
    # GIVEN a mixture of experts (Mixtral's kind): its routed MLPs are not a Llama layer's
    moe = replace(
        get_preset("llama-3.1-8b"), name="moe", moe_layers=32, experts=8, expert_intermediate_size=14336
    )
    assert unplanned_reason(moe) == "its mixture-of-experts layers"
    assert prefill_activations(moe, "bf16", 1, 1000) is None
    result = plan(llama_31_8b(geometry=moe, batch=1, context=8192))
    # THEN no prefill term, the KV peak as before, and a note why
    assert result.prefill_activations_bytes is None and result.activations_bytes == 0
    assert result.peak_bytes == result.weights_bytes + result.kv_peak_bytes + result.reserve_bytes
    assert any(note.startswith("prefill activations are not estimated for moe") for note in result.notes)


def test_gpt_neox_is_planned_where_its_mlp_outweighs_its_unmeasured_attention() -> None:
    # GIVEN GPT-NeoX's layout (an up/down gelu MLP: 2 tensors of intermediate_size a token at its peak) on the
    # small shape, its attention under sdpa not derived (its tiny model held 9.3 to 10.4 hidden states a
    # token)
    neox = replace(SMALL, mlp_matrices=2, ungated_mlp_widths=2, fused_qkv=True, attention_unmeasured=True)
    # THEN at 4 x hidden (NeoX's own ratio) its MLP's 8 hidden states a token outweigh it: planned, the up
    # projection and its activation beside the stream, the embeddings, cos and sin and positions
    four_x = prefill_activations(replace(neox, intermediate_size=4 * 64), "fp32", 2, 100)
    rows = 2 * 100
    assert four_x is not None and four_x.moment == "mlp"
    assert four_x.peak_bytes == rows * (64 * 4 + 2 * 16 * 4 + 16) + rows * (3 * 64 + 2 * 256) * 4
    # AND narrower it is not: the attention may peak, which the plan would not see
    narrow = replace(neox, intermediate_size=4 * 64 - 1)
    assert unplanned_reason(narrow) == "its attention beside an MLP this narrow (not measured)"
    assert prefill_activations(narrow, "fp32", 2, 100) is None


def test_a_dense_layer_before_the_moe_ones_is_weighed_with_the_kv_written_by_then() -> None:
    # GIVEN SMALL with three layers, the first dense (its MLP 256 wide), the others Qwen-style experts (16
    # wide, 2 a token), and a dynamic cache's prompt KV of 1,000 B a layer
    moe = replace(
        SMALL, num_layers=3, moe_layers=2, experts=4, expert_intermediate_size=16, experts_per_token=2,
        expert_routing="compute",
    )  # fmt: skip
    dense_first = replace(moe, layer_moe=(False, True, True))
    act = prefill_activations(dense_first, "fp32", 2, 100, layer_kv_bytes=(1000, 1000, 1000))
    # THEN its MLP peaks in layer 0: three of 256 beside its residual and normed input (its input is the
    # embeddings), the KV of the two layers after it not written yet
    rows = 2 * 100
    held = rows * (64 * 4 + 2 * 16 * 4 + 16)
    assert act is not None and (act.moment, act.layer, act.unwritten_kv_bytes) == ("mlp", 0, 2000)
    assert act.peak_bytes == held + rows * (2 * 64 + 3 * 256) * 4
    # AND where the config does not say which layers are dense, as in the last layer: the most it can hold
    unknown = prefill_activations(moe, "fp32", 2, 100, layer_kv_bytes=(1000, 1000, 1000))
    assert unknown is not None and unknown.moment == "mlp"
    assert (unknown.layer, unknown.unwritten_kv_bytes) == (2, 0)
    assert unknown.peak_bytes == held + rows * (3 * 64 + 3 * 256) * 4
