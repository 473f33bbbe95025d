"""`kvtrace diagnose`'s shorter context for a quanto or HQQ QuantizedCache's run, priced at the KV peak of a
run to the shorter length, which may end on the step that requantizes. Figures worked out here from the
backends' layout (HQQ's and quanto's alike at int4: half a byte a value, a scale and a zero-point in the
compute dtype per group of the flattened tensor), never read back."""

from __future__ import annotations

from analyzers.planning.diagnose_quantized_remedies import quantized_context

# The tour's tiny Llama 3: 2 layers, 2 KV heads of 16, float32; 2 rows, an 8-token prompt, 19 tokens held
LAYERS, KV_HEADS, HEAD_DIM, FP32, ROWS, PROMPT, GROUP, RESIDUAL = 2, 2, 16, 4, 2, 8, 16, 3
SIDE = ROWS * KV_HEADS * HEAD_DIM  # values of one layer's K (or V) a token, every row: 64
QUANTIZED = SIDE // 2 + SIDE // GROUP * 2 * FP32  # one layer's K a token, int4 with its scales: 64 B
FULL = SIDE * FP32  # one layer's K a token in the residual: 256 B


def _moment(kv_bytes: int) -> dict[str, object]:
    return {
        "batch": ROWS, "prompt_tokens": PROMPT, "quantized_bits": 4, "compute_bits": 32,
        "quantized_layout": (GROUP, RESIDUAL), "kv_layers": LAYERS, "kv_bytes": kv_bytes,
        "token_elements": LAYERS * 2 * KV_HEADS * HEAD_DIM,
    }  # fmt: skip


def _growing(tokens: int, residual: int) -> int:
    """The KV of the last layer's residual cat of a step to `tokens`, `residual` of them unquantized
    after it: every layer's K and V, and that layer's old V of residual - 1 tokens beside the new."""
    return LAYERS * 2 * ((tokens - residual) * QUANTIZED + residual * FULL) + (residual - 1) * FULL


def _requantizing(tokens: int) -> int:
    """The KV of a step to `tokens` that requantizes: every layer still holding tokens - 1 (2 of them in
    the residual), and the first layer's new quantized K and V of `tokens` beside its old V (its old K's
    quantized part let go of), the plan's bound (`quantized_step_bytes`)."""
    held = LAYERS * 2 * ((tokens - 3) * QUANTIZED + 2 * FULL)
    return held + 2 * tokens * QUANTIZED - (tokens - 3) * QUANTIZED


def test_a_shorter_context_frees_what_the_kv_peak_holds_less() -> None:
    # GIVEN a run whose moment holds its KV peak, 6,656 B: the last step's (19 tokens, 2 in the residual)
    now = _growing(19, 2)
    assert now == 6_656
    # WHEN 1,500 B must go
    context, saved, text = quantized_context(_moment(now), 19, 1_500)
    # THEN it is 13 tokens (8 + 5, 2 in the residual), whose peak is its last step's, 5,120 B; not 17 (it
    # said 17 freed 2,048 B, the ends' difference: 17 tokens all quantized, 4,352 B), where the run ends
    # on the step that requantizes; nor 14 to 16, each a run through the requantizing step at 14 (5,952 B)
    assert (context, saved) == (13, now - _growing(13, 2)) == (13, 1_536)
    assert now - _requantizing(17) < 1_500 and now - _requantizing(14) < 1_500
    assert "14 tokens instead of 20" in text  # prompt + new tokens, as plan's --context


def test_a_shorter_context_never_frees_more_than_the_moment_holds() -> None:
    # GIVEN the moment holds less than the model's bound on the run's peak (its requantizing step at 17
    # tokens, 6,912 B): the moment's own KV, the end's 6,400 B
    end = LAYERS * 2 * (17 * QUANTIZED + 2 * FULL)
    assert _requantizing(17) == 6_912 and end == 6_400
    # WHEN 1,000 B must go: THEN what is freed counts from the moment's KV, down to 13 tokens' peak
    context, saved, _ = quantized_context(_moment(end), 19, 1_000)
    assert (context, saved) == (13, end - _growing(13, 2)) == (13, 1_280)
