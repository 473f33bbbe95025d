"""transformers' QuantizedCache in bytes (analyzers.planning.quantized_cache), on hand-counted cases, and
the rows per prompt a beam-search reorder shows (kvtrace.integrations.hf_caches.rows_per_prompt)."""

from __future__ import annotations

import pytest

from analyzers.planning.diagnose_quantized_remedies import quantized_context
from analyzers.planning.quantized_cache import quantized_cache_bytes, residual_tokens
from kvtrace.integrations.hf_caches import rows_per_prompt


@pytest.mark.parametrize(
    ("tokens", "prompt", "residual"),
    [
        (16, 16, 0),  # the prefill quantizes the whole prompt
        (55, 16, 39),  # one unquantized token per decode step after it
        (16 + 127, 16, 127),  # the longest residual: residual_length - 1
        (16 + 128, 16, 0),  # the 128th token is due: everything quantized, the residual emptied
        (16 + 130, 16, 2),
        (55, None, 54),  # the prompt unknown: the worst case, all but one token (at least one quantized)
        (300, None, 127),
        (1, None, 0),
    ],
)
def test_residual_tokens(tokens: int, prompt: int | None, residual: int) -> None:
    assert residual_tokens(tokens, 128, prompt) == residual


def _moment(**overrides: object) -> dict[str, object]:
    """What `kvtrace diagnose` knows of the tour's quanto int4 run at its end: a tiny Llama 3 (3 layers, 2
    KV heads of 16, float32), 2 rows, a 12-token prompt and 8 new tokens, 19 held; groups of 64 (its
    scales' shape), no requantization seen (the residual length is transformers' 128)."""
    moment: dict[str, object] = {
        "batch": 2,
        "kv_layers": 3,
        "layer_tokens": {0: 19, 1: 19, 2: 19},
        "token_elements": 3 * 2 * 2 * 16,
        "compute_bits": 32,
        "quantized_bits": 4,
        "quantized_layout": (64, None),
        "prompt_tokens": 12,
    }
    moment.update(overrides)
    return moment


def test_a_shorter_context_of_a_quantized_run_frees_its_residuals_full_precision_tokens() -> None:
    # GIVEN the run's 19 tokens: the prompt's 12 in int4, quanto's layout (a layer's K of 2 x 2 x 12 x 16
    # values: 384 B packed, 12 groups of a float32 scale and shift, 96 B), and 7 in the float32 residual
    values = 2 * 2 * 12 * 16
    packed = 3 * 2 * (values // 2 + values // 64 * 2 * 4)
    token = 3 * 2 * 2 * 2 * 16 * 4  # a residual token, every layer's K and V, both rows
    assert packed + 7 * token == 13_632  # the cache's own storages after generate()
    # and its KV peak, the last step's: the last layer's residual cat makes its new V beside the old of 6
    old_v = 2 * 2 * 16 * 4  # one layer's V a token, both rows
    peak = packed + 7 * token + 6 * old_v
    assert peak == 15_168  # the recording's KV peak
    # WHEN a quarter fewer tokens are priced: 15, the 4 dropped all in the residual (3 left in it)
    context, saved, text = quantized_context(_moment(), 19, None) or (0, 0, "")
    # THEN they free 4 full-precision tokens and the old V's 4 (it was the run's average, 2.80 KiB, 717 B a
    # token, then the ends' 6,144 B), which a recording with 4 new tokens peaks lower by: 8,000 B
    assert (context, saved) == (15, 4 * (token + old_v)) == (15, peak - (packed + 3 * token + 2 * old_v))
    # (the sentence counts context as `kvtrace plan` does, prompt + new tokens: one more than the 15 held)
    assert "residual_length=128" in text and "7 of them now, 3 at a context of 16" in text
    assert text.startswith("A context of 16 tokens instead of 20 (prompt + new tokens")
    # and a need is met by the longest context that frees it: 2 tokens for 2 residual tokens' worth
    assert quantized_context(_moment(), 19, 2 * token)[:2] == (17, 2 * (token + old_v))  # type: ignore[index]
    # and below the prompt, the prompt's tokens free their packed bytes: 8 tokens hold the 8 packed only
    eight = 3 * 2 * (2 * 2 * 8 * 16 // 2 + 2 * 2 * 8 * 16 // 64 * 2 * 4)
    assert quantized_context(_moment(), 19, peak - eight)[:2] == (8, peak - eight)  # type: ignore[index]


def test_a_shorter_context_is_not_priced_so_for_an_fp8_cache() -> None:
    # fp8's QuantizedCache keeps every token at 8 bits, no residual: the run's average prices it
    assert quantized_context(_moment(quantized_bits=8), 19, None) is None


def test_quantized_cache_bytes() -> None:
    # 4 rows x 4 layers x K,V x 32 elements = 1024 fp32 elements a position: int4 half a byte each, an fp32
    # scale and zero-point per 64 of them, the residual's 4 B each
    held = quantized_cache_bytes(55, 39, data_per_token=512, scale_per_token=128, full_per_token=4096)
    assert (held.quantized_tokens, held.data_bytes, held.scale_bytes) == (16, 8192, 2048)
    assert held.residual_bytes == 39 * 4096 and held.total_bytes == 169_984


@pytest.mark.parametrize(
    ("sources", "beams"),
    [
        ([0, 0, 0, 3, 3, 3], 3),  # beam search's first step: every beam copies its prompt's first row
        ([1, 0, 2, 3, 5, 4], 2),
        ([0, 1, 2, 3], 1),  # nothing mixes
        ([3, 3, 0, 1], 4),  # rows from anywhere: one block
    ],
)
def test_rows_per_prompt(sources: list[int], beams: int) -> None:
    assert rows_per_prompt(sources) == beams
