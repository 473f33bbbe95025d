"""Data parallelism on 2 gloo ranks: every rank the whole Hugging Face Llama, its own rows and prompt length
(rank 0: 2 rows of 6 + 3 tokens, rank 1: 3 rows of 8 + 3), so the ranks hold different token counts. What
the job does is what the ranks do together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_worker as worker

from kvtrace.cli import main
from kvtrace.format import read_run

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
GENERATED_PER_ROW = 1 + worker.DECODE_STEPS  # the prefill's token, then one per decode step


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("dp")
    out, facts_dir = root / "group", root / "facts"
    statuses = worker.launch("hf-dp-uneven", out, facts_dir, WORLD)
    logs = "".join((facts_dir / f"rank-{r}.log").read_text()[-3000:] for r in range(WORLD))
    assert statuses == [0] * WORLD, logs
    facts = [json.loads((facts_dir / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    assert [(f["rows"], f["tokens"]) for f in facts] == [(2, 9), (3, 11)]
    return out, facts


def _seconds(run: Path) -> float:
    """A rank's generation time from its raw samples: the start sample to the last step's end."""
    samples = read_run(run).memory_samples
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    return (end - start) / 1e9


def test_compare_counts_every_data_parallel_ranks_tokens_per_second(group, capsys):
    out, facts = group
    # WHEN the group is compared (beside its own rank 0)
    assert main(["compare", str(out), str(out / "rank-0"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    # THEN its tokens/s is the ranks' sum, each rank's rows x generated tokens over its own time
    rates = [f["rows"] * GENERATED_PER_ROW / _seconds(out / f"rank-{f['rank']}") for f in facts]
    assert row["tokens_per_second"] == pytest.approx(sum(rates))
    assert row["tokens_per_second"] > max(rates)  # not rank 0's alone
    # AND per row, the same over the 5 rows of both ranks; each row generated 4 tokens
    assert row["batch"] == 5
    assert row["tokens_per_second_per_row"] == pytest.approx(sum(rates) / 5)
    assert row["generated_tokens_per_row"] == GENERATED_PER_ROW == 4


def test_bytes_per_token_of_ranks_holding_different_tokens_divide_their_token_rows(group, capsys):
    out, facts = group
    whole_model = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4  # every rank holds all KV heads
    token_rows = sum(f["rows"] * f["tokens"] for f in facts)  # 2 x 9 + 3 x 11
    # WHEN the group is reported
    assert main(["report", str(out), "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN the JSON holds together: the final bytes are the token-rows held at one rank's bytes per token
    assert kv["final_bytes"] == sum(f["kv_bytes"] for f in facts) == whole_model * token_rows
    assert kv["token_rows"] == token_rows == 51
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == whole_model == 512
    assert (kv["tokens_held"], kv["batch"]) == (11, 5)  # the fullest rank's tokens, every rank's rows
    # AND the text says the same token-rows, not 11 tokens x 5 rows (which would be 27.50 KiB, not 25.50)
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "final 25.50 KiB" in text
    assert "bytes per token: measured 512.0 (51 tokens over 5 rows, up to 11 a row), arithmetic 512" in text


def test_a_single_rank_keeps_its_tokens_times_rows(group, capsys):
    out, facts = group
    rows, tokens = facts[1]["rows"], facts[1]["tokens"]
    assert main(["report", str(out / "rank-1"), "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert (kv["tokens_held"], kv["batch"], kv["token_rows"]) == (tokens, rows, tokens * rows) == (11, 3, 33)
    assert main(["report", str(out / "rank-1")]) == 0
    assert "measured 512.0 (11 tokens x 3 rows), arithmetic 512" in capsys.readouterr().out
