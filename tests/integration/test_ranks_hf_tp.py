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

from analyzers.load import load_tables
from kvtrace.cli import main
from kvtrace.run_reader import read_run

pytest.importorskip("transformers.distributed")

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
TOKENS = worker.PROMPT_LEN + worker.DECODE_STEPS
LOCAL_KV_HEADS = worker.N_KV_HEADS // WORLD
# A dynamic cache holds the tokens seen: layers x K,V x this rank's KV heads x head_dim x tokens x batch.
RANK_KV_BYTES = worker.N_LAYERS * 2 * LOCAL_KV_HEADS * HEAD_DIM * TOKENS * worker.MAX_BATCH * 4
# The whole model's parameters: embeddings and lm_head (untied), per layer q, k, v, o, the MLP's gate, up
# and down (intermediate 2 x DIM) and two norms, and the final norm.
KV_DIM = worker.N_KV_HEADS * HEAD_DIM
LAYER_PARAMETERS = 2 * worker.DIM * worker.DIM + 2 * worker.DIM * KV_DIM + 3 * worker.DIM * 2 * worker.DIM
WHOLE_PARAMETERS = (
    2 * worker.VOCAB * worker.DIM + worker.N_LAYERS * (LAYER_PARAMETERS + 2 * worker.DIM) + worker.DIM
)


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
        assert 0 < rank_facts["parameters"] < WHOLE_PARAMETERS  # a shard, not the whole model

    # The manifest counts the whole model and, beside it, the rank's own shard of its DTensor weights.
    for rank, rank_facts in facts.items():
        model = json.loads((out / f"rank-{rank}" / "manifest.json").read_text())["model"]
        assert (model["parameters"], model["parameters_per_rank"]) == (
            WHOLE_PARAMETERS,
            rank_facts["parameters"],
        )

    # The export's runs table carries both counts, per rank: the whole model's and the rank's shard
    runs = load_tables(out).runs.to_pylist()
    assert {r["rank"]: (r["parameters"], r["parameters_per_rank"]) for r in runs} == {
        rank: (WHOLE_PARAMETERS, rank_facts["parameters"]) for rank, rank_facts in facts.items()
    }

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

    # One rank's report says whose KV its figures are: rank 1 of 2, holding 1 of the model's 2 KV heads, the
    # heads its arithmetic counts (the rank's KV bytes over its tokens and rows).
    assert main(["report", str(out / "rank-1"), "--json"]) == 0
    rank_kv = json.loads(capsys.readouterr().out)["kv"]
    assert rank_kv["rank_heads"] == {
        "rank": 1,
        "world_size": WORLD,
        "kv_heads_held": LOCAL_KV_HEADS,
        "model_kv_heads": worker.N_KV_HEADS,
    }
    assert rank_kv["bytes_per_token_expected"] * TOKENS * worker.MAX_BATCH == facts[1]["kv_bytes"]
    assert main(["report", str(out / "rank-1")]) == 0
    text = capsys.readouterr().out
    assert (
        f"    rank 1 of {WORLD}: its cache holds {LOCAL_KV_HEADS} of the model's {worker.N_KV_HEADS} KV "
        "heads (a tensor-parallel share), which the arithmetic counts" in text
    )
    assert data["kv"]["rank_heads"] is None  # the group's figures are all ranks'

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
