"""transformers' QuantizedCache in bytes (analyzers.planning.quantized_cache), on hand-counted cases, and
the rows per prompt a beam-search reorder shows (kvtrace.integrations.hf_caches.rows_per_prompt)."""

from __future__ import annotations

import pytest

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
