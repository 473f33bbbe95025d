"""`kvtrace compare`'s tokens/s counts what the model generated, not its forwards: prompt-lookup decoding
yields several tokens per forward, and beam search's rows are beams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.format import read_run
from kvtrace.llama import ModelSize, build_model

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10]  # repeats: prompt lookup finds drafts in it
NEW_TOKENS, BEAMS = 20, 3
DECODINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "lookup": {"prompt_lookup_num_tokens": 3},
    "beams": {"num_beams": BEAMS},
}


def _seconds(run: Path) -> float:
    """The recording's generation time from the raw samples: the start sample to the last step's end."""
    samples = read_run(run).memory_samples
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    return (end - start) / 1e9


def test_tokens_per_second_counts_generated_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN one model generating 20 tokens plainly, with prompt lookup, and with 3 beams
    model = build_model(ModelSize(128, 256, 4, 8, 2, vocab_size=1000, tie_embeddings=False))
    ids = torch.tensor([PROMPT])
    returned: dict[str, Any] = {}
    for name, extra in DECODINGS.items():
        with torch.no_grad(), kvtrace.record(tmp_path / name, model=model, profiler=False):
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, **extra
            )
        returned[name] = out
    runs = [str(tmp_path / name) for name in returned]

    # WHEN they are compared
    assert main(["compare", *runs, "--json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)["runs"]}

    # THEN each run generated the new tokens generate() returned per row, whatever its forwards
    for name, out in returned.items():
        row = rows[name]
        new_per_row = out.shape[1] - len(PROMPT)
        assert row["generated_tokens_per_row"] == new_per_row == NEW_TOKENS
        seconds = _seconds(tmp_path / name)
        assert row["tokens_per_second_per_row"] == pytest.approx(new_per_row / seconds)
        kv_rows = BEAMS if name == "beams" else 1  # beam search's cache holds one row per beam
        assert row["tokens_per_second"] == pytest.approx(new_per_row * kv_rows / seconds)
        assert row["rows_are_beams"] is (name == "beams")
    # prompt lookup did yield several tokens per forward: forwards alone would undercount it
    assert rows["lookup"]["steps"] < NEW_TOKENS
    assert any("beam search" in note for note in rows["beams"]["notes"])

    # AND the table labels both rates, and marks the beams
    assert main(["compare", *runs]) == 0
    table = capsys.readouterr().out
    assert "tokens/s per row (generation)" in table and "tokens/s, all rows (generation)" in table
    assert "(beams)" in next(line for line in table.splitlines() if line.startswith("tokens/s, all rows"))
