"""Layers of two kinds priced each at its own width: Gemma 4's sliding layers are narrower (`head_dim`) than
its full ones (`global_head_dim`), and once a sliding layer holds its window only the full layers follow
the context, so a token of context costs the full layers' width, not the average over all layers. And why
a sliding layer's measured bytes per token exceeds the arithmetic: transformers keeps its last window-1
tokens as a view of a storage of window positions.

Every figure is the arithmetic: layers x 2 (K, V) x KV heads x head_dim x 4 bytes (fp32) x tokens x rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import transformers

from analyzers.units import human_bytes
from kvtrace.cli import main
from tests.tiny import record_generate

WINDOW, KV_HEADS, HEAD_DIM, ROWS, PROMPT = 8, 2, 16, 2, 11
SIDE = ROWS * KV_HEADS * HEAD_DIM * 4  # a sliding layer's K (or V) of one token, both rows, fp32: 256 B


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


def _gemma4(wide: int) -> Any:
    """A tiny Gemma 4 of 4 layers: sliding (window 8, 2 KV heads x 16), full (2 KV heads x `wide`), twice."""
    return transformers.Gemma4TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, global_head_dim=wide, vocab_size=1000,
        vocab_size_per_layer_input=1000, hidden_size_per_layer_input=8, sliding_window=WINDOW,
        max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("wide", "new", "sliding_positions"),
    [
        (2 * HEAD_DIM, 6, (WINDOW, WINDOW)),
        (2 * HEAD_DIM, 2, (WINDOW, PROMPT)),
        (HEAD_DIM, 6, (WINDOW, WINDOW)),
        (HEAD_DIM, 2, (PROMPT + WINDOW, PROMPT)),
    ],
    ids=["full-wider-at-window", "full-wider-prompt", "equal-widths-at-window", "equal-widths-prompt"],
)
def test_a_shorter_context_is_priced_at_each_layer_kinds_width(
    wide: int,
    new: int,
    sliding_positions: tuple[int, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a tiny Gemma 4 generating `new` tokens after an 11-token prompt on 2 rows, its full layers
    # twice as wide as its sliding ones, or as wide
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_gemma4(wide)).eval()
    record_generate(model, tmp_path / "run", batch=ROWS, prompt=PROMPT, new_tokens=new, profiler=False)
    # WHEN it is diagnosed (at its KV peak, no budget)
    diagnosis = _json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
    tokens = diagnosis["tokens_held"]
    assert tokens == PROMPT + new - 1
    # THEN at that moment the sliding layers 0 and 2 hold their window (8 positions) after decode steps; at
    # the first decode step (new=2) layer 2 still holds the prompt, and layer 0 too (beside its new window)
    # where its update is the peak's; each at the sliding width
    held = {layer["layer"]: layer["kv_bytes"] for layer in diagnosis["top_layers"]}
    assert (held[0], held[2]) == tuple(2 * positions * SIDE for positions in sliding_positions)
    prompt_layers = sum(positions != WINDOW for positions in sliding_positions)
    # AND a token of context costs the 2 full layers at their width, plus the sliding layers holding the
    # prompt at their own: 2 KiB (6 new) and 2.5 KiB (2 new) when the full layers are twice as wide
    full_side = ROWS * KV_HEADS * wide * 4
    per_token = 2 * 2 * full_side + prompt_layers * 2 * SIDE
    context = next(r for r in diagnosis["remedies"] if r["kind"] == "context")
    # (no budget: the shortest context, the prompt and one new token, as plan's --context counts it)
    assert context["setting"] == PROMPT + 1
    assert context["saved_bytes"] == per_token * (tokens - PROMPT)
    assert f"({human_bytes(per_token)} per token across the batch" in context["sentence"]
    # AND the window remedy makes the full layers slide at the model's window: it holds each layer's window
    # at its width, and peaks at a first decode step (every layer holding the 11-token prompt) as one layer
    # makes its new window: layer 0 while none has let the prompt go, or layer 1 (when wider) while layer 0
    # holds its window and layers 2 and 3 the prompt
    widths = [2 * SIDE, 2 * full_side, 2 * SIDE, 2 * full_side]  # a token of each layer, both rows
    window_held = WINDOW * sum(widths)
    first = PROMPT * sum(widths) + WINDOW * widths[0]
    second = WINDOW * widths[0] + PROMPT * sum(widths[1:]) + WINDOW * widths[1]
    peak = max(first, second)  # 40,448 B full-wider (layer 1's); 26,624 B equal widths (layer 0's)
    window = next(r for r in diagnosis["remedies"] if r["kind"] == "sliding_window")
    assert window["setting"] == WINDOW
    assert f"holds {human_bytes(window_held)} of KV at most" in window["sentence"]
    assert f"{human_bytes(peak)} at its peak" in window["sentence"]
    assert window["saved_bytes"] == max(diagnosis["kv_bytes"] - peak, 0)


def _starcoder2() -> Any:
    """A tiny StarCoder2 whose 4 layers all slide at 8 (2 KV heads x 16)."""
    return transformers.Starcoder2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, vocab_size=1000, sliding_window=WINDOW, max_position_embeddings=256,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("family", "new", "positions", "sliding"),
    [("starcoder2", 6, WINDOW, 4), ("starcoder2", 1, PROMPT, 4), ("gemma4", 6, WINDOW, 2)],
    ids=["starcoder2-decoded", "starcoder2-prefill", "gemma4"],
)
def test_the_report_says_why_sliding_layers_measure_more_than_the_arithmetic(
    family: str, new: int, positions: int, sliding: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a model whose sliding layers (window 8) hold a view of their last 7 tokens in a storage of
    # 8 positions after a decode step, or of the 11-token prompt after the prefill alone
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = _starcoder2() if family == "starcoder2" else _gemma4(2 * HEAD_DIM)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    record_generate(model, tmp_path / "run", batch=ROWS, prompt=PROMPT, new_tokens=new, profiler=False)
    # WHEN it is reported
    kv = _json(["report", str(tmp_path / "run"), "--json", "--no-export", "-q"], capsys)["kv"]
    # THEN a sliding layer's measured bytes per token (storage over tokens) exceeds its arithmetic by its
    # spare positions, and the note says so with that figure
    tokens = WINDOW - 1
    spare = sliding * (2 * positions * SIDE / (tokens * ROWS) - 2 * SIDE / ROWS)  # 146.3 B, 4 layers at 8
    assert kv["bytes_per_token_measured"] - kv["bytes_per_token_expected"] == pytest.approx(spare)
    said = "window-1 = 7" if positions == WINDOW else "7"
    expected = (
        f"sliding layers hold {said} tokens in storages of {positions} positions on {sliding} layers: their "
        f"spare positions are {spare:,.1f} of the measured bytes per token"
    )
    assert kv["bytes_per_token_note"].startswith(expected)
    # AND the text report gives it under the bytes per token line
    assert main(["report", str(tmp_path / "run"), "--no-export", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if "bytes per token: measured" in line)
    assert lines[at + 1].strip() == f"({kv['bytes_per_token_note']})"


def test_a_cache_without_sliding_layers_has_no_window_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tiny Llama (every layer keeps every token)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, vocab_size=1000,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    record_generate(model, tmp_path / "run", batch=ROWS, prompt=PROMPT, new_tokens=3, profiler=False)
    # WHEN it is reported THEN its measured figure is the arithmetic, with no note
    kv = _json(["report", str(tmp_path / "run"), "--json", "--no-export", "-q"], capsys)["kv"]
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == 2 * 2 * SIDE / ROWS
    assert kv["bytes_per_token_note"] is None
