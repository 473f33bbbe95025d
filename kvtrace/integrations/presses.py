"""NVIDIA kvpress eviction presses by name, for `kvtrace demo --press` and the kvpress tests.

kvpress pins `transformers<5.3`, so it lives in its own environment; kvtrace itself does not need it.
Presses evict in an attention forward hook after the cache update and rebind `layer.keys`/`values`;
kvtrace logs each rebinding as an eviction with tokens kept and evicted when the next layer's update
arrives (the last layer's at the end of the forward).
"""

from __future__ import annotations

from typing import Any

from kvtrace.errors import KvtraceError, MissingPart

PRESS_NAMES = (
    "streaming_llm",
    "knorm",
    "snapkv",
    "expected_attention",
    "tova",
    "pyramidkv",
    "adakv",
    "think",
    "decoding",
)


def make_press(name: str, compression: float, interval: int = 4, target_size: int = 64) -> Any:
    """A kvpress press; `decoding` compresses every `interval` decode steps down to `target_size` tokens."""
    try:
        import kvpress
    except ImportError:
        raise MissingPart(
            "--press needs NVIDIA's kvpress, which pins transformers<5.3: install it in its own environment "
            "(pip install kvpress) and run kvtrace from there"
        ) from None
    if not 0.0 <= compression < 1.0:
        raise KvtraceError(f"--compression must be in [0, 1), not {compression}")
    simple = {
        "streaming_llm": kvpress.StreamingLLMPress,
        "knorm": kvpress.KnormPress,
        "snapkv": kvpress.SnapKVPress,
        "expected_attention": kvpress.ExpectedAttentionPress,
        "tova": kvpress.TOVAPress,
        "pyramidkv": kvpress.PyramidKVPress,
        "think": kvpress.ThinKPress,
    }
    if name in simple:
        if name == "think":
            return simple[name](key_channel_compression_ratio=compression)
        return simple[name](compression_ratio=compression)
    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=compression))
    if name == "decoding":
        return kvpress.DecodingPress(
            base_press=kvpress.KnormPress(), compression_interval=interval, target_size=target_size
        )
    raise KvtraceError(f"unknown press {name!r}; choose from {', '.join(PRESS_NAMES)}")


def query_window(press: Any) -> int | None:
    """The tokens a press scores with at the end of its prefill's query, which that query must be longer
    than (kvpress's SnapKV, and PyramidKV and AdaKV over it, assert so: 64 by default); None for a press
    without one. ThinK's window takes what the query has, so it needs no length."""
    import kvpress

    scorer = press
    while not isinstance(scorer, kvpress.SnapKVPress):
        scorer = getattr(scorer, "press", None) or getattr(scorer, "base_press", None)
        if scorer is None:
            return None
    return int(scorer.window_size)
