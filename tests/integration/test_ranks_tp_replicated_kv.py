"""Tensor parallelism over more ranks than KV heads (vLLM and Megatron at TP 16 on Llama 3 70B, 8 KV heads):
each rank holds a copy of the KV heads its query heads need, here the model's only one. Every rank holds all
the model's KV heads, as in data parallelism, yet the ranks run the same rows: their sharded attention
weights (weights.jsonl) tell the two apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_worker as worker

from kvtrace.cli import main
from kvtrace.run_reader import read_run

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
TOKENS = worker.PROMPT_LEN + worker.DECODE_STEPS
GENERATED_PER_ROW = 1 + worker.DECODE_STEPS  # the prefill's token, then one per decode step
# One KV head on every rank: layers x K,V x 1 head x head_dim x fp32, per token of a row.
RANK_PER_TOKEN = worker.N_LAYERS * 2 * 1 * HEAD_DIM * 4


def _seconds(run: Path) -> float:
    """A rank's generation time from its raw samples: the start sample to the last step's end."""
    samples = read_run(run).memory_samples
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    return (end - start) / 1e9


def test_tensor_parallel_with_replicated_kv_heads_is_not_data_parallel(tmp_path, capsys):
    # GIVEN 2 ranks, each with half the query heads and a copy of the one KV head, on the same 2 rows
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    facts = worker.launch_facts("hf-tp-replicated-kv", out, facts_dir, WORLD)
    for rank_facts in facts:
        assert rank_facts["q_proj_shape"] == [worker.DIM // WORLD, worker.DIM]  # half the query heads
        assert rank_facts["shapes"] == [[worker.MAX_BATCH, 1, TOKENS, HEAD_DIM]] * 2 * worker.N_LAYERS
        assert rank_facts["kv_bytes"] == RANK_PER_TOKEN * TOKENS * worker.MAX_BATCH == 4608

    # WHEN the group is reported
    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kv = data["kv"]
    # THEN its rows are one rank's (the same rows on both), its bytes the two copies together
    assert (kv["tokens_held"], kv["batch"], kv["token_rows"]) == (TOKENS, worker.MAX_BATCH, 18)
    assert kv["final_bytes"] == sum(f["kv_bytes"] for f in facts) == 9216
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == WORLD * RANK_PER_TOKEN == 512
    assert not any("data parallel" in note for note in data["notes"])
    assert any("tensor parallel, each rank a copy of the KV heads" in note for note in data["notes"])
    assert main(["report", str(out), "--no-export"]) == 0
    assert "bytes per token: measured 512.0 (9 tokens x 2 rows), arithmetic 512" in capsys.readouterr().out

    # AND compare gives rank 0's tokens/s (every rank generates the same tokens), not the ranks' sum
    assert main(["compare", str(out), str(out / "rank-0"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    rank0_rate = worker.MAX_BATCH * GENERATED_PER_ROW / _seconds(out / "rank-0")
    assert row["tokens_per_second"] == pytest.approx(rank0_rate)
    assert row["batch"] == worker.MAX_BATCH
    assert row["tokens_per_second_per_row"] == pytest.approx(rank0_rate / worker.MAX_BATCH)
