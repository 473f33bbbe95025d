"""The KV geometry of a model (layers, KV heads, head dim, dtype), read from whatever config it carries."""

from __future__ import annotations

from typing import Any


def model_geometry(model: Any) -> dict[str, Any] | None:
    """Geometry of a Hugging Face model (`model.config`) or Meta's reference model (`model.params`)."""
    if model is None:
        return None
    geometry: dict[str, Any] = {"class": type(model).__name__}
    config = getattr(model, "config", None)
    if config is not None:
        config = getattr(config, "get_text_config", lambda: config)()
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
        geometry.update(
            num_layers=getattr(config, "num_hidden_layers", None),
            num_attention_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=getattr(config, "vocab_size", None),
            sliding_window=getattr(config, "sliding_window", None),
            model_type=getattr(config, "model_type", None),
        )
    else:
        params = getattr(model, "params", None)
        if params is not None and hasattr(params, "n_layers"):
            heads = params.n_heads
            geometry.update(
                num_layers=params.n_layers,
                num_attention_heads=heads,
                num_kv_heads=params.n_kv_heads or heads,
                head_dim=params.dim // heads,
                hidden_size=params.dim,
                vocab_size=params.vocab_size,
                max_seq_len=getattr(params, "max_seq_len", None),
                max_batch_size=getattr(params, "max_batch_size", None),
            )
    try:
        first = next(model.parameters())
        geometry["dtype"] = str(first.dtype).removeprefix("torch.")
        geometry["parameters"] = sum(p.numel() for p in model.parameters())
    except (StopIteration, AttributeError, TypeError):
        pass
    return geometry
