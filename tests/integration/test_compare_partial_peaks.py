"""A run without allocator events (profiler=False, profile_memory=False) has no measured peak: only the
weights and the KV cache were seen. `report` says so in its notes, and `compare` marks such a peak and
carries the report's notes (a block that raised), while a profiled run's figures stay as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import ModelSize, build_model, cache_keyword, make_cache

# hidden 64 (4 query heads of 16), 2 KV heads, 2 layers, a 1000-token vocabulary tied to the output
SIZE = ModelSize(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=1000
)
HEAD_DIM, BATCH, PROMPT, NEW = 16, 2, 9, 4
FLOAT32 = 4
RECORDINGS = {"profiled": {}, "no_profiler": {"profiler": False}, "no_memory": {"profile_memory": False}}


def _weights_bytes() -> int:
    """The model's parameters and buffers, from its shape: a tied embedding, per layer q, k, v, o, the MLP's
    gate, up and down and two norms, the final norm, and RoPE's inverse frequencies (head_dim / 2, and the
    llama3 scaling's originals as many)."""
    hidden, inter, kv_width = SIZE.hidden_size, SIZE.intermediate_size, SIZE.num_kv_heads * HEAD_DIM
    layer = hidden * hidden * 2 + hidden * kv_width * 2 + hidden * inter * 3 + hidden * 2
    return FLOAT32 * (SIZE.vocab_size * hidden + SIZE.num_layers * layer + hidden + 2 * (HEAD_DIM // 2))


# A static cache: every token generate() feeds (prompt + new - 1), allocated once, no transient copy.
KV_BYTES = SIZE.num_layers * 2 * SIZE.num_kv_heads * HEAD_DIM * (PROMPT + NEW - 1) * BATCH * FLOAT32


def _record(model: Any, out: Path, raise_after: bool = False, **options: object) -> None:
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))
    cache, extra = make_cache("static", model, BATCH, PROMPT + NEW)
    with torch.no_grad(), kvtrace.record(out, model=model, snapshots=False, **options):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            **{cache_keyword(): cache},
            **extra,
        )
        if raise_after:
            raise RuntimeError("stopped by the test")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("partial")
    model = build_model(SIZE)
    out = {name: root / name for name in [*RECORDINGS, "raised"]}
    for name, options in RECORDINGS.items():
        _record(model, out[name], **options)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        _record(model, out["raised"], raise_after=True)
    return out


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_report_of_a_run_without_the_profiler_says_its_peak_is_weights_and_kv(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run recorded with profiler=False and no budget (so no budget.partial either)
    report = _json(["report", str(runs["no_profiler"]), "--json", "--no-export"], capsys)
    # THEN its peak is the weights and the KV alone, and its notes say that is all it counts
    assert report["budget"] is None
    assert report["peak_allocated_bytes"] == _weights_bytes() + KV_BYTES
    assert report["categories_at_peak"]["other"] == 0
    (note,) = report["notes"]
    assert "profiler=False" in note and "the peak counts only the KV cache and the weights" in note
    # and a profiled run has no such note
    assert _json(["report", str(runs["profiled"]), "--json", "--no-export"], capsys)["notes"] == []


def test_compare_marks_a_peak_without_allocator_events(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(runs[name]) for name in RECORDINGS]
    profiled_report = _json(["report", paths[0], "--json", "--no-export"], capsys)
    # WHEN the profiled run is compared with the two recorded without allocator events
    rows = {row["label"]: row for row in _json(["compare", *paths, "--json"], capsys)["runs"]}
    # THEN the profiled peak is its report's, measured (above the weights and KV: activations, logits)
    profiled = rows["profiled"]
    assert profiled["peak_bytes"] == profiled_report["peak_allocated_bytes"] > _weights_bytes() + KV_BYTES
    assert (profiled["partial"], profiled["peak_counts"], profiled["notes"]) == (False, None, [])
    # and the other two count the weights and the KV cache only, flagged, with the report's reason
    for name, reason in (("no_profiler", "profiler=False"), ("no_memory", "profile_memory=False")):
        row = rows[name]
        assert row["peak_bytes"] == _weights_bytes() + KV_BYTES
        assert row["kv_peak_bytes"] == row["kv_final_bytes"] == profiled["kv_final_bytes"] == KV_BYTES
        assert (row["partial"], row["peak_counts"]) == (True, "weights + KV")
        assert len(row["notes"]) == 1 and reason in row["notes"][0], row["notes"]
    # AND the text and the HTML mark the cell, and give the notes
    assert main(["compare", *paths, "-o", str(tmp_path / "cmp.html")]) == 0
    table = capsys.readouterr().out
    peak_line = next(line for line in table.splitlines() if line.startswith("peak allocated"))
    measured, counted = human_bytes(profiled["peak_bytes"]), human_bytes(_weights_bytes() + KV_BYTES)
    marked = f"{counted} (weights + KV only)"
    assert re.split(r"\s{2,}", peak_line.strip()) == ["peak allocated", measured, marked, marked]
    assert "note: no_profiler: the run was recorded with profiler=False" in table
    page = (tmp_path / "cmp.html").read_text()
    assert page.count(" (weights + KV only)</td>") == 2
    assert "<p>note: no_memory: the run was recorded with profile_memory=False" in page


def test_compare_carries_the_note_of_a_block_that_raised(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _json(["compare", str(runs["profiled"]), str(runs["raised"]), "--json"], capsys)["runs"]
    raised = rows[1]
    assert any(
        note.startswith("the recorded block raised RuntimeError: stopped by the test")
        for note in raised["notes"]
    ), raised["notes"]
    assert raised["partial"] is False  # profiled: its peak is measured, up to the raise
    assert main(["compare", str(runs["profiled"]), str(runs["raised"])]) == 0
    assert (
        "note: raised: the recorded block raised RuntimeError: stopped by the test" in capsys.readouterr().out
    )
