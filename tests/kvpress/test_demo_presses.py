"""`kvtrace demo --press` with the presses that score with a window of the prompt's last tokens.

kvpress's SnapKV (and PyramidKV, and AdaKV over SnapKV) asserts that the prefill's query is longer than its
64-token window; the demo's built-in prompts are about 20 tokens, so `kvtrace demo --press snapkv` ended in
"internal error ... AssertionError: Query length 20 should be greater than the window size 64".
Runs in kvpress's own environment (see .ci/run); elsewhere it skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest

kvpress = pytest.importorskip("kvpress")

from kvtrace.cli import main  # noqa: E402
from kvtrace.run_reader import read_run  # noqa: E402

WINDOW = kvpress.SnapKVPress().window_size  # kvpress's default, which the demo keeps
LAYERS = 4  # the demo's --size tiny
FAST = ["--size", "tiny", "--batch", "4", "--new-tokens", "2", "--no-profiler", "--no-report"]


def _pyramid_kept(width: int, ratio: float) -> list[int]:
    """Tokens each layer keeps under PyramidKV (its documented budget, beta 20), or SnapKV's where the
    pyramid does not fit the query (kvpress falls back to it)."""
    beta = kvpress.PyramidKVPress().beta
    capacity = WINDOW + width * (1 - ratio)
    min_num = (capacity - WINDOW) / beta
    max_num = (capacity - WINDOW) * 2 - min_num
    if max_num >= width - WINDOW:
        max_num = width - WINDOW
        min_num = (capacity - WINDOW) * 2 - max_num
    if not width >= max_num >= min_num >= WINDOW:
        return [max(1, round(width * (1 - ratio)))] * LAYERS
    steps = (max_num - min_num) / (LAYERS - 1)
    return [round(max_num - layer * steps) for layer in range(LAYERS)]


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv"])
def test_the_demo_runs_window_presses_on_its_own_prompts(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # WHEN the demo runs a window press with its own prompts and the default compression, 0.5
    out = tmp_path / "run"
    assert main(["demo", *FAST, "--press", name, "--out", str(out)]) == 0
    # THEN it says why its prompts are longer than the built-in ones
    assert f"scores with the prompt's last {WINDOW} tokens" in capsys.readouterr().out
    # AND its prefill wrote a query longer than the window on every layer (from the raw log)
    events = read_run(out).kv_events
    written = {e.layer: e.tokens for e in events if e.step == 1 and e.event == "created" and e.kv == "k"}
    assert sorted(written) == list(range(LAYERS))
    width = written[0]
    assert width > WINDOW and set(written.values()) == {width}
    evicted = [e for e in events if e.step == 1 and e.event == "evicted" and e.kv == "k" and e.part == "data"]
    if name == "snapkv":
        # each layer kept int(width x (1 - 0.5)) tokens, kvpress's rule for a scorer press
        assert [(e.layer, e.tokens, e.evicted_tokens) for e in evicted] == [
            (layer, int(width * 0.5), width - int(width * 0.5)) for layer in range(LAYERS)
        ]
    elif name == "pyramidkv":
        assert [(e.layer, e.tokens) for e in evicted] == list(enumerate(_pyramid_kept(width, 0.5)))
    else:
        # AdaKV hides entries per head instead of evicting: masked, and every layer still holds the query
        masked = {e.layer for e in events if e.step == 1 and e.event == "masked"}
        assert masked == set(range(LAYERS)) and not evicted


def test_the_demo_refuses_a_prompt_shorter_than_the_presss_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a prompt of a few tokens, far shorter than SnapKV's window
    out = tmp_path / "run"
    argv = ["demo", *FAST, "--press", "snapkv", "--prompt", "Hello there", "--out", str(out)]
    # WHEN the demo is asked to run SnapKV on it THEN one line, status 2, naming the length needed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kvtrace demo: error: --press snapkv"), err
    assert f"needs a prompt of at least {WINDOW + 1} tokens" in err and "pass a longer --prompt" in err
    assert not out.exists()
