"""The sliding-window remedy's window, found by bisection over the window sizes (each priced in one pass
over the layers) rather than by pricing every window below the context's, each in a pass per layer: the
same window, checked here against the peak's arithmetic written out, on hand-made layers. The arithmetic is
`kvtrace plan`'s (analyzers.planning.dynamic_kv): a prompt shorter than the window is stored as the prompt,
not as the window, until generation passes it."""

from __future__ import annotations

import pytest

from analyzers.planning.diagnose_window_remedies import sliding_cache_bytes, window_remedy

NEW = 1_000  # new tokens: generation passes every window below


def _peak(layer_tokens: list[float], window: int, prompt: int, new: int = NEW) -> int:
    """The peak written out: the prefill (every layer holding the prompt), and the first and last decode
    steps, in which layer i makes its new storage while the layers before it hold theirs (made this step)
    and those from it on their old ones: the prompt at the first step, the window (or the tokens written
    before, if fewer) at the last."""
    written = prompt + new - 1
    moments = [prompt * sum(layer_tokens)]
    steps = [(prompt, min(prompt + 1, window))] if new >= 2 else []
    if new >= 3:
        steps.append((min(written - 1, window), min(written, window)))
    for old, made in steps:
        for i, width in enumerate(layer_tokens):
            done = sum(layer_tokens[:i]) * made
            waiting = sum(layer_tokens[i:]) * old
            moments.append(done + waiting + width * made)
    return round(max(moments))


# A hybrid-width model: layers of 256 B a token, every third 1,024 B (wider heads)
LAYERS = [1024.0 if i % 3 == 0 else 256.0 for i in range(12)]
TOKEN = 4 * 1024 + 8 * 256


@pytest.mark.parametrize("window", [1, 7, 64, 500])
@pytest.mark.parametrize("prompt", [1, 40, 300])
def test_the_peak_is_the_arithmetic(window: int, prompt: int) -> None:
    held, prefill, peak = sliding_cache_bytes(LAYERS, window, prompt, NEW)
    assert held == window * TOKEN
    assert prefill == prompt * TOKEN
    assert peak == _peak(LAYERS, window, prompt)


@pytest.mark.parametrize("new", [1, 2, 3, 20])
def test_a_window_generation_never_passes_holds_the_tokens_written(new: int) -> None:
    # GIVEN a 40-token prompt and a window of 64: generation passes it only past 64 tokens written
    held, prefill, peak = sliding_cache_bytes(LAYERS, 64, 40, new)
    # THEN the cache holds what was written (the prompt at the prefill), never a window of 64
    assert held == (40 + new - 1) * TOKEN
    assert prefill == 40 * TOKEN
    assert peak == _peak(LAYERS, 64, 40, new) < 64 * TOKEN + 64 * 1024


@pytest.mark.parametrize("need", [1, 10_000, 200_000, 900_000, 3_000_000, 10**9])
@pytest.mark.parametrize("prompt", [1, 100, 700])
def test_the_window_chosen_is_the_largest_whose_peak_leaves_the_room_needed(need: int, prompt: int) -> None:
    # GIVEN 1 MiB of KV at this moment and a context of 600 tokens a shorter context would propose
    kv, target = 2**20, 600
    # WHEN the room needed is `need` bytes
    remedy = window_remedy(kv, LAYERS, target, prompt, NEW, need)
    # THEN the window is the largest of 2..600 whose peak leaves it, counted window by window; 2 if none
    # (transformers' sliding cache keeps every token at a window of 1: it never slides)
    fitting = [w for w in range(target, 1, -1) if kv - _peak(LAYERS, w, prompt) >= need]
    assert remedy.setting == (fitting[0] if fitting else 2)
    assert remedy.fits == bool(fitting)
