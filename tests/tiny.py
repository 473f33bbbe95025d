"""The tiny Llama 3 shape the integration tests record: small enough for seconds on a CPU, with GQA."""

from __future__ import annotations

from kvtrace.llama import ModelSize

HEADS, HIDDEN = 4, 64
HEAD_DIM = HIDDEN // HEADS


def tiny_size(layers: int, kv_heads: int = 2) -> ModelSize:
    """Hidden 64, 4 query heads (head_dim 16), `kv_heads` KV heads, a 1000-token vocabulary."""
    return ModelSize(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_layers=layers,
        num_heads=HEADS,
        num_kv_heads=kv_heads,
        vocab_size=1000,
    )
