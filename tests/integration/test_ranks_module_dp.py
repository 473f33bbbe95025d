"""Data parallelism of a hand-written decoder (ranks_module_dp.py) on 2 gloo ranks: no config, so the
manifests give no KV-head count to tell data from tensor parallelism by. Ranks holding different rows and
tokens are each running their own sequences; ranks holding the same cannot be told apart, and the group
says so instead of printing one reading's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_module_dp as model
import ranks_worker as worker

from kvtrace.cli import main
from kvtrace.run_reader import read_run

WORLD = 2
# One rank's arithmetic: every rank holds the whole model's KV: layers x K,V x KV heads x head_dim x fp32.
PER_TOKEN = model.LAYERS * 2 * model.KV_HEADS * model.HEAD_DIM * 4


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _seconds(run: Path) -> float:
    """A rank's generation time from its raw samples: the start sample to the last step's end."""
    samples = read_run(run).memory_samples
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    return (end - start) / 1e9


def test_ranks_with_different_rows_and_tokens_add_them_up_without_geometry(tmp_path, capsys):
    # GIVEN rank 0 with 2 rows of 6 + 4 tokens, rank 1 with 3 rows of 6 + 5, and no geometry in either run
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    facts = worker.launch_facts("module-dp-uneven", out, facts_dir, WORLD)
    assert [(f["rows"], f["tokens"]) for f in facts] == [(2, 10), (3, 11)]
    assert [f["kv_bytes"] for f in facts] == [PER_TOKEN * f["rows"] * f["tokens"] for f in facts]
    assert [f["kv_bytes"] for f in facts] == [7680, 12672]
    for rank in range(WORLD):
        assert "num_kv_heads" not in read_run(out / f"rank-{rank}").manifest["model"]

    # WHEN the group is reported
    data = _json(capsys, "report", str(out), "--no-export")

    # THEN its rows and token-rows are the ranks' sum, and its bytes per token each rank's own
    kv = data["kv"]
    token_rows = sum(f["rows"] * f["tokens"] for f in facts)
    assert kv["final_bytes"] == sum(f["kv_bytes"] for f in facts) == 20352
    assert (kv["tokens_held"], kv["batch"], kv["token_rows"]) == (11, 5, token_rows) == (11, 5, 53)
    assert kv["bytes_per_token_measured"] == kv["final_bytes"] / token_rows == PER_TOKEN == 384
    assert [r["kv"]["bytes_per_token_measured"] for r in data["ranks"]] == [PER_TOKEN] * WORLD
    assert any("hold different rows or tokens (data parallel" in note for note in data["notes"])

    # AND compare gives the job's tokens/s: the ranks' sum, each its rows x generated tokens over its time
    row = _json(capsys, "compare", str(out), str(out / "rank-0"))["runs"][0]
    # each row generated the prefill's token, then one per decode step
    rates = [
        f["rows"] * (f["tokens"] - model.PROMPT_LEN + 1) / _seconds(out / f"rank-{f['rank']}") for f in facts
    ]
    assert row["tokens_per_second"] == pytest.approx(sum(rates))
    assert row["batch"] == 5
    assert row["tokens_per_second_per_row"] == pytest.approx(sum(rates) / 5)


def test_ranks_with_the_same_rows_and_tokens_and_no_geometry_leave_the_reading_unknown(tmp_path, capsys):
    # GIVEN two data-parallel ranks of 2 rows of 6 + 4 tokens each, other tokens, and no geometry
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    facts = worker.launch_facts("module-dp-even", out, facts_dir, WORLD)
    assert [(f["rows"], f["tokens"], f["kv_bytes"]) for f in facts] == [(2, 10, PER_TOKEN * 20)] * WORLD

    # WHEN the group is reported
    data = _json(capsys, "report", str(out), "--no-export")

    # THEN the bytes are the ranks' sum and the tokens the fullest rank's, as either reading has them ...
    kv = data["kv"]
    assert kv["final_bytes"] == sum(f["kv_bytes"] for f in facts) == 15360
    assert kv["tokens_held"] == 10
    # ... but one rank's 2 rows (768 B a token) or both ranks' 4 (384 B), the runs cannot say: neither given
    assert (kv["batch"], kv["token_rows"], kv["bytes_per_token_measured"]) == (None, None, None)
    assert [(r["kv"]["batch"], r["kv"]["bytes_per_token_measured"]) for r in data["ranks"]] == [
        (2, PER_TOKEN)
    ] * WORLD
    note = next(n for n in data["notes"] if "cannot be told apart" in n)
    assert "each rank's cache holds 2 KV heads" in note
    # AND the text report says so too, and compare gives no tokens/s for the group (rank 0's or the sum)
    assert main(["report", str(out), "--no-export"]) == 0
    assert "cannot be told apart" in capsys.readouterr().out
    runs = _json(capsys, "compare", str(out), str(out / "rank-0"))["runs"]
    assert runs[0]["tokens_per_second"] is None and runs[1]["tokens_per_second"] is not None
