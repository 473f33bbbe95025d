"""A Hugging Face Llama sharded by its own tensor-parallel plan (`tp_plan="auto"`, DTensor weights) on 2 gloo
ranks on CPU: each rank's KV is the cache tensors it holds, half the KV heads, and the group's is their sum.

transformers' `from_pretrained(..., tp_plan="auto")` refuses to run without `accelerate` (not a kvtrace
dependency): the worker takes the same path from a config, `prepare_distribute_model` (the device mesh
over the process group) then `maybe_distribute_model` (the model's `base_model_tp_plan`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_worker as worker

from kvtrace.cli import main
from kvtrace.run_reader import read_run

pytest.importorskip("transformers.distributed")

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
TOKENS = worker.PROMPT_LEN + worker.DECODE_STEPS
LOCAL_KV_HEADS = worker.N_KV_HEADS // WORLD
# A dynamic cache holds the tokens seen: layers x K,V x this rank's KV heads x head_dim x tokens x batch.
RANK_KV_BYTES = worker.N_LAYERS * 2 * LOCAL_KV_HEADS * HEAD_DIM * TOKENS * worker.MAX_BATCH * 4


def test_hf_tensor_parallel_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    statuses = worker.launch("hf-tp", out, facts_dir, WORLD)
    assert statuses == [0] * WORLD, "".join(
        (facts_dir / f"rank-{r}.log").read_text()[-3000:] for r in range(2)
    )
    facts = {r: json.loads((facts_dir / f"rank-{r}.json").read_text()) for r in range(WORLD)}
    for rank_facts in facts.values():
        assert rank_facts["weight_type"] == "DTensor"  # the model really is sharded
        assert (
            rank_facts["shapes"]
            == [[worker.MAX_BATCH, LOCAL_KV_HEADS, TOKENS, HEAD_DIM]] * 2 * worker.N_LAYERS
        )
        assert rank_facts["kv_bytes"] == RANK_KV_BYTES

    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    for entry in data["ranks"]:
        assert entry["status"] == "ok" and entry["world_size"] == WORLD
        assert entry["kv"]["final_bytes"] == facts[entry["rank"]]["kv_bytes"]
        assert entry["kv"]["tokens_held"] == TOKENS and entry["kv"]["batch"] == worker.MAX_BATCH
        # a rank's arithmetic counts the KV heads it holds: half the model's
        rank_per_token = worker.N_LAYERS * 2 * LOCAL_KV_HEADS * HEAD_DIM * 4
        assert entry["kv"]["bytes_per_token_expected"] == rank_per_token
        assert entry["kv"]["bytes_per_token_measured"] == rank_per_token
    assert data["kv"]["final_bytes"] == sum(f["kv_bytes"] for f in facts.values()) == WORLD * RANK_KV_BYTES
    # Summed over ranks, the bytes per token are the whole model's arithmetic (all KV heads).
    whole_model = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4
    assert data["kv"]["bytes_per_token_expected"] == whole_model
    assert data["kv"]["bytes_per_token_measured"] == whole_model

    # The weights table holds each rank's own shard of a DTensor weight, not the global shape.
    for rank in range(WORLD):
        run = read_run(out / f"rank-{rank}")
        k_proj = next(w for w in run.weights if w.name == "model.layers.0.self_attn.k_proj.weight")
        assert k_proj.shape == [LOCAL_KV_HEADS * HEAD_DIM, worker.DIM]
        assert k_proj.storage_bytes == LOCAL_KV_HEADS * HEAD_DIM * worker.DIM * 4


def test_hf_data_parallel_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN two ranks that each run the whole model on their own sequences (rank r: r + 1 rows)
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    facts = worker.launch_facts("hf-dp", out, facts_dir, WORLD)
    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # THEN the bytes add up, and a token costs what it costs on one rank, all KV heads: the rows are the
    # ranks' together
    whole_model = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4
    rows = sum(f["rows"] for f in facts)
    assert data["kv"]["final_bytes"] == sum(f["kv_bytes"] for f in facts) == whole_model * TOKENS * rows
    assert data["kv"]["bytes_per_token_expected"] == data["kv"]["bytes_per_token_measured"] == whole_model
    assert data["kv"]["batch"] == rows and data["kv"]["tokens_held"] == TOKENS
    assert any("data parallel" in note for note in data["notes"])
