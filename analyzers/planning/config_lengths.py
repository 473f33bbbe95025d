"""The longest context a Hugging Face config's model takes, and the max_model_len vLLM serves it at when none
is given, read from the config.json as vLLM 0.32 derives them (`vllm/config/model.py`,
`_get_and_verify_max_len`; `derive_max_model_len_and_key` in
`vllm/transformers_utils/model_arch_config_convertor.py`). vLLM reads the config through transformers, so a
key the file leaves out is its config class's default: the one such default kept here is Phi-3's
`original_max_position_embeddings` (4,096), which decides a LongRoPE model's default. No torch.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["max_positions", "vllm_default_len"]


# Where configs give the longest context, as vLLM reads them (`derive_max_model_len_and_key`, vllm 0.32)
_MAX_LENGTH_KEYS = (
    "max_position_embeddings",  # most
    "n_positions",  # GPT-2
    "max_seq_len",  # MPT
    "seq_length",  # ChatGLM2
    "model_max_length",  # Command-R
    "max_target_positions",  # Whisper
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE kinds whose max_position_embeddings already counts their scaling: vLLM does not apply their factor
_PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def max_positions(fields: dict[str, Any], model_type: str = "") -> int | None:
    """The longest context a config's model takes, derived as vLLM 0.32 derives its limit on max_model_len
    (`vllm/config/model.py`, `_get_and_verify_max_len`): the smallest of the length keys it knows
    (`model_max_length`, when given, wins), times the RoPE scaling factor of the kinds that do not count it
    already (linear, dynamic; Gemma 3's is counted). None when the config gives no length: vLLM then takes
    any max_model_len typed. A value that is not a positive integer is not a length (skipped)."""
    lengths = [n for n in (_length(fields.get(key)) for key in _MAX_LENGTH_KEYS) if n is not None]
    if not lengths:
        return None
    longest = _length(fields.get("model_max_length")) or min(lengths)
    return math.floor(longest * _rope_factor(fields, model_type))


def vllm_default_len(fields: dict[str, Any], model_type: str = "") -> tuple[int, str]:
    """(max_model_len, where it comes from) that vLLM 0.32 takes when none is given (`_get_and_verify_max_len`
    with max_model_len None): the model's own length (`max_positions`), but a LongRoPE model's
    `original_max_position_embeddings` (its pretraining length, "to avoid performance degradation for
    shorter sequences", vLLM says), and 2048 x the RoPE factor for a config that gives no length (vLLM
    warns it assumes 2048). A sliding window caps it only under `disable_sliding_window`, which the plan
    does not take, and the tokenizer's `model_max_length` only for pooling models: neither here."""
    kinds = [kind for kind, _ in _rope_kinds(fields)]
    family_original = _LONGROPE_FAMILIES.get(model_type)
    if family_original is not None:  # transformers' Phi-3 config reads its older "su" and "yarn" as longrope
        kinds = ["longrope" if kind in ("su", "yarn") else kind for kind in kinds]
    original = _length(fields.get("original_max_position_embeddings")) or family_original
    if "longrope" in kinds and original is not None:
        return original, "the model's original_max_position_embeddings, vLLM's default for a LongRoPE model"
    factor = _rope_factor(fields, model_type)
    scaled = f" x its RoPE scaling factor {factor:g}" if factor != 1 else ""
    limit = max_positions(fields, model_type)
    if limit is None:
        return math.floor(2048 * factor), (
            f"the config gives no length: 2,048{scaled}, vLLM's fallback (LlamaConfig's default too; another "
            "family's config class may give its own: --max-model-len N plans it)"
        )
    named = "model_max_length" if _length(fields.get("model_max_length")) else _shortest_key(fields)
    return limit, f"the model's {named}{scaled}"


def _shortest_key(fields: dict[str, Any]) -> str:
    """The length key vLLM names (its `max_len_key`): the first of the smallest."""
    given = [(n, key) for key in _MAX_LENGTH_KEYS if (n := _length(fields.get(key))) is not None]
    return min(given, key=lambda pair: pair[0])[1]


# The config classes whose `original_max_position_embeddings` has a default (vLLM reads the attribute)
_LONGROPE_FAMILIES = {"phi3": 4096, "phi4_multimodal": 4096}


def _length(value: Any) -> int | None:
    """A length from a config's field: a positive finite number, floored; None for anything else."""
    usable = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return math.floor(value) if usable and math.isfinite(value) else None


def _rope_kinds(fields: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, parameters) of each RoPE a config gives (Gemma 3 nests one per layer type), as vLLM's
    `iter_rope_parameters` walks them; [] without RoPE parameters."""
    rope = fields.get("rope_parameters") or fields.get("rope_scaling")
    if not isinstance(rope, dict):
        return []
    nested = all(isinstance(value, dict) for value in rope.values())
    params = [value for value in rope.values() if value] if nested else [rope]
    return [(str(p.get("rope_type") or p.get("type") or "default"), p) for p in params]


def _rope_factor(fields: dict[str, Any], model_type: str) -> float:
    """The factor vLLM multiplies the config's length by: the last `factor` of a RoPE kind whose length
    does not count it already (linear, dynamic); 1 for Gemma 3, whose length counts it."""
    if "gemma3" in model_type:
        return 1.0
    factor: Any = 1.0
    for kind, params in _rope_kinds(fields):
        if kind not in _PRESCALED_ROPE:
            factor = params.get("factor", factor)
    usable = isinstance(factor, int | float) and not isinstance(factor, bool) and factor > 0
    return float(factor) if usable and math.isfinite(factor) else 1.0
