"""`kvtrace sweep`'s sliding caches keep the model's own window (a --config's `sliding_window`), or --window.

A sweep of a Mistral config with a 40-token window used to record its sliding caches at 16 tokens (the
demo's default for a Llama without a window), with nothing on the command line to change it and
`sliding_window: null` in every point's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyzers.units import a_or_an
from kvtrace.cli import main
from kvtrace.run_reader import read_run

LAYERS, KV_HEADS, HEAD_DIM, WINDOW = 2, 2, 16, 40
PROMPT, NEW_TOKENS = 30, 6
# One token of one row: K and V, every layer, every KV head, float32
TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4


def _mistral_config(folder: Path) -> Path:
    """A small Mistral config.json: every layer slides over a window of WINDOW tokens."""
    config = folder / "config.json"
    shape = {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": 5000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "sliding_window": WINDOW,
    }
    config.write_text(json.dumps(shape))
    return config


def _sweep(config: Path, out: Path, *flags: str) -> dict[str, dict]:
    argv = ["sweep", "--config", str(config), "--batch", "1", "--context", str(PROMPT)]
    assert main([*argv, "--new-tokens", str(NEW_TOKENS), "--out", str(out), "-q", *flags]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    return {row["cache"]: row for row in rows}


def test_a_sweep_of_a_config_with_a_window_keeps_that_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a config whose layers slide over 40 tokens, swept at a 30-token prompt and 6 new tokens
    config = _mistral_config(tmp_path)
    # WHEN its sliding caches are swept beside the dynamic one, with no --window
    rows = _sweep(config, tmp_path / "sweep", "--cache", "dynamic,sliding,static_sliding")
    # THEN every cache holds the 30 + 6 - 1 tokens written (the last new token is never fed back), all
    # inside the 40-token window: 35 x 512 B = 17,920 B, not the 16 x 512 B a 16-token window kept
    held = (PROMPT + NEW_TOKENS - 1) * TOKEN_BYTES
    assert held == 17_920
    assert {cache: row["kv_final_bytes"] for cache, row in rows.items()} == {
        "dynamic": held,
        "sliding": held,
        "static_sliding": held,
    }
    # AND each sliding point's manifest gives the window its cache kept, on every layer; the dynamic point's
    # model has none
    for cache in ("sliding", "static_sliding"):
        model = read_run(rows[cache]["run"]).manifest["model"]
        assert (model["sliding_window"], model["sliding_layers"]) == (WINDOW, LAYERS)
    assert read_run(rows["dynamic"]["run"]).manifest["model"]["sliding_window"] is None
    # AND the table says the window
    assert f"{a_or_an(str(WINDOW))}-token window" in capsys.readouterr().out


def test_sweep_window_flag_sets_the_sliding_caches_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the same config, swept with --window 8: a window the 30-token prompt passes
    config = _mistral_config(tmp_path)
    window = 8
    rows = _sweep(config, tmp_path / "sweep", "--cache", "sliding,static_sliding", "--window", str(window))
    # THEN the static sliding cache is its window's positions, and the dynamic one's storage the window - 1
    # tokens it keeps plus the one its last update appended (a view of the last window - 1 in it)
    assert rows["static_sliding"]["kv_final_bytes"] == window * TOKEN_BYTES
    assert rows["sliding"]["kv_final_bytes"] == (window - 1 + 1) * TOKEN_BYTES
    # AND both manifests give that window
    for row in rows.values():
        assert read_run(row["run"]).manifest["model"]["sliding_window"] == window
    # AND --window with no sliding cache to apply to is refused in one line, as `kvtrace demo` refuses it
    capsys.readouterr()
    argv = ["sweep", "--size", "tiny", "--cache", "dynamic", "--window", "8", "--out", str(tmp_path / "no")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kvtrace sweep: error: --window applies to --cache sliding or static_sliding, not dynamic"
    assert not (tmp_path / "no").exists()


def test_a_sweep_of_a_model_without_a_window_keeps_16_tokens(tmp_path: Path) -> None:
    # GIVEN the tiny Llama (no window in its config) swept with a sliding cache and no --window
    out = tmp_path / "sweep"
    argv = ["sweep", "--size", "tiny", "--batch", "1", "--context", "24", "--new-tokens", "2"]
    assert main([*argv, "--cache", "static_sliding", "--out", str(out), "-q"]) == 0
    (row,) = json.loads((out / "sweep.json").read_text())["rows"]
    # THEN its cache kept the documented default of 16 positions, and its manifest says so
    assert read_run(row["run"]).manifest["model"]["sliding_window"] == 16
    tiny_token = 4 * 2 * 2 * (128 // 8) * 4  # tiny: 4 layers x K,V x 2 KV heads x head_dim 16 x fp32
    assert row["kv_final_bytes"] == 16 * tiny_token
