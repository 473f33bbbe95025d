"""The max_model_len `kvtrace plan --engine vllm` takes when none is typed: vLLM's own default.

vLLM 0.32 (`vllm/config/model.py`, `_get_and_verify_max_len`) serves, unless told otherwise, every position
the model's config gives (max_position_embeddings and its other names, times a linear or dynamic RoPE
factor; llama3, YaRN and LongRoPE configs count theirs already), a LongRoPE model's pretraining length,
and 2,048 where the config gives none. A plan that assumed a shorter length said vLLM starts where vLLM,
launched without --max-model-len, refuses to: Llama 3.1 8B on 24 GiB holds 8,192 tokens, not 131,072.
"""

from __future__ import annotations

from analyzers.planning.presets import ModelGeometry

__all__ = ["default_len_note", "default_max_model_len"]


def default_max_model_len(geometry: ModelGeometry) -> tuple[int, str] | None:
    """(vLLM's max_model_len for this model when none is given, where it comes from); None where the
    geometry does not know the model's length (a recorded run's engine.json, which does not keep it)."""
    if geometry.vllm_default_len is not None:
        return geometry.vllm_default_len, geometry.vllm_default_len_from or "the model's config"
    if geometry.max_position_embeddings is not None:  # a preset's: its config's, RoPE counted already
        return geometry.max_position_embeddings, "the model's max_position_embeddings"
    return None


def default_len_note(max_model_len: int, source: str) -> str:
    """The plan's note for a length it took as vLLM's default: the figure, why, and how to plan another."""
    return (
        f"max_model_len {max_model_len:,}, vLLM's default when none is given: {source}; --max-model-len N "
        "plans another length"
    )
