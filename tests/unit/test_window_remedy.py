"""The sliding-window remedy's window, found by bisection over the window sizes (each priced in one pass
over the layers) rather than by pricing every window below the context's, each in a pass per layer: the
same window, checked here against the peak's arithmetic written out, on hand-made layers."""

from __future__ import annotations

import pytest

from analyzers.planning.diagnose_cache_remedies import sliding_cache_bytes, window_remedy


def _peak(layer_tokens: list[float], window: int, prompt: int) -> int:
    """The peak as the docstring of `sliding_cache_bytes` says it: layer i making its new window, the layers
    before it holding theirs (window tokens), those from it on still the prompt (or the window, if longer)."""
    longest = max(prompt, window)
    moments = []
    for i, width in enumerate(layer_tokens):
        done = sum(layer_tokens[:i]) * window
        waiting = sum(layer_tokens[i:]) * longest
        moments.append(done + waiting + width * window)
    return round(max(moments))


# A hybrid-width model: layers of 256 B a token, every third 1,024 B (wider heads)
LAYERS = [1024.0 if i % 3 == 0 else 256.0 for i in range(12)]


@pytest.mark.parametrize("window", [1, 7, 64, 500])
@pytest.mark.parametrize("prompt", [0, 40, 300])
def test_the_peak_is_the_arithmetic(window: int, prompt: int) -> None:
    held, peak = sliding_cache_bytes(LAYERS, window, prompt)
    assert held == window * (4 * 1024 + 8 * 256)
    assert peak == _peak(LAYERS, window, prompt)


@pytest.mark.parametrize("need", [1, 10_000, 200_000, 900_000, 3_000_000, 10**9])
@pytest.mark.parametrize("prompt", [0, 100, 700])
def test_the_window_chosen_is_the_largest_whose_peak_leaves_the_room_needed(need: int, prompt: int) -> None:
    # GIVEN 1 MiB of KV at this moment and a context of 600 tokens a shorter context would propose
    kv, target = 2**20, 600
    # WHEN the room needed is `need` bytes
    remedy = window_remedy(kv, LAYERS, target, prompt, need)
    # THEN the window is the largest of 2..600 whose peak leaves it, counted window by window; 2 if none
    # (transformers' sliding cache keeps every token at a window of 1: it never slides)
    fitting = [w for w in range(target, 1, -1) if kv - _peak(LAYERS, w, prompt) >= need]
    assert remedy.setting == (fitting[0] if fitting else 2)
    assert remedy.fits == bool(fitting)
