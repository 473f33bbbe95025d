"""Multiprocess vLLM (the engine core in its own process): the kvtrace plugin records it under KVTRACE_DIR,
with the same figures as vLLM's own, and `kvtrace report` reads the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from analyzers.units import human_bytes
from kvtrace import format as fmt
from kvtrace.run_reader import read_run
from tests.vllm.workload import (
    BLOCK_BYTES,
    BLOCK_SIZE,
    DTYPE_BYTES,
    HEAD_DIM,
    NEW_TOKENS,
    POOL_BYTES,
    PROMPT_TOKENS,
    REQUESTS,
    SIZE,
    checkpoint_shares,
    run_script,
)

ROOT = Path(__file__).resolve().parents[2]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def plugin_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The workload under KVTRACE_DIR, with the plugin's profiler on (KVTRACE_PROFILER=1)."""
    run_dir = tmp_path_factory.mktemp("vllm-mp") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVTRACE_PROFILER", "1")
        figures = run_script("multiprocess", str(tiny_model_dir), kvtrace_dir=run_dir, multiprocess=True)
    return {"dir": run_dir, **figures}


def test_the_engine_core_records_a_complete_run(plugin_run: dict[str, Any]) -> None:
    run = read_run(plugin_run["dir"])
    assert run.manifest["ended"]["status"] == "ok"  # finished at the engine's shutdown
    assert run.manifest["engine"]["process"] == "engine_core"
    assert run.manifest["pid"] != os.getpid()


def test_pool_and_preemptions_equal_vllms_own(plugin_run: dict[str, Any]) -> None:
    engine = json.loads((plugin_run["dir"] / fmt.ENGINE).read_text())
    # The KV tensors live in a worker process: read through vLLM's collective_rpc, storage counted once.
    assert engine["pool_source"] == "kv_tensors_rpc"
    assert engine["num_blocks"] == plugin_run["num_gpu_blocks"] == POOL_BYTES // BLOCK_BYTES
    assert engine["kv_cache_bytes"] == POOL_BYTES and len(engine["storage"]) == 1
    assert len(engine["layers"]) == SIZE.num_layers
    requests = _jsonl(plugin_run["dir"] / fmt.ENGINE_REQUESTS)
    preempted = [e for e in requests if e["event"] == "preempted"]
    assert plugin_run["preemptions"] > 0
    assert len(preempted) == plugin_run["preemptions"] == plugin_run["request_preemptions"]
    steps = _jsonl(plugin_run["dir"] / fmt.ENGINE_STEPS)
    assert sum(len(s["preempted"]) for s in steps) == plugin_run["preemptions"]
    # every request ran to its max_tokens (vLLM's finish reason "length"), logged by the engine core
    finished = [e for e in requests if e["event"] == "finished"]
    assert len(finished) == len({e["request_id"] for e in requests})
    assert {e.get("finish_reason") for e in finished} == {"length"}


def test_every_request_has_its_waiting_line(plugin_run: dict[str, Any]) -> None:
    # GIVEN the plugin's run, opened by the engine core's first step: the engine core takes in at least the
    # first request before that step (it steps only once it has one)
    requests = _jsonl(plugin_run["dir"] / fmt.ENGINE_REQUESTS)
    # THEN each of the workload's requests has its `waiting` line, its first, with vLLM's max_tokens (the
    # first request's was missing: 7 of 8, and `diagnose` could not tell how far it may grow)
    first = {}
    for e in requests:
        first.setdefault(e["request_id"], e)
    assert len(first) == REQUESTS
    assert {e["event"] for e in first.values()} == {"waiting"}
    waiting = [e for e in requests if e["event"] == "waiting"]
    assert len(waiting) == REQUESTS
    assert {(e["prompt_tokens"], e["max_tokens"], e["blocks"]) for e in waiting} == {
        (PROMPT_TOKENS, NEW_TOKENS, 0)
    }


def _report_json(run_dir: Path) -> dict[str, Any]:
    """`kvtrace report RUN --json` in a fresh interpreter (this one has vLLM's state), as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "report", str(run_dir), "--json", "--no-export"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def _cli_json(argv: list[str], ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """`kvtrace ARGV --json` in a fresh interpreter, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", *argv, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in ok, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def test_kvtrace_report_reads_it(plugin_run: dict[str, Any]) -> None:
    report = _report_json(plugin_run["dir"])
    assert report["kv"]["peak_bytes"] == POOL_BYTES


def test_the_engine_cores_profiler_is_read_as_missing_the_workers_memory(plugin_run: dict[str, Any]) -> None:
    # GIVEN KVTRACE_PROFILER=1: torch.profiler runs in the engine core, where the plugin records, while vLLM's
    # CPU build runs the model in a worker process of its own (its MultiprocExecutor, even for one worker)
    run_dir = plugin_run["dir"]
    assert fmt.profiler_traces(run_dir), "the plugin wrote no profiler trace"
    assert json.loads((run_dir / fmt.ENGINE).read_text())["pool_source"] == "kv_tensors_rpc"
    # WHEN reported
    report = _report_json(run_dir)
    # THEN the memory figures are the KV log's, the pool held through the run, not the engine core's few
    # traced allocations (it read "peak 32 B", KV 0 B at the peak, beside a 1 MiB pool), and a note says why
    (device,) = report["devices"]
    assert device["peak_allocated_bytes"] == POOL_BYTES
    assert device["categories_at_peak"]["kv"] == POOL_BYTES
    assert any(note.startswith("vLLM ran the model in its worker process") for note in report["notes"])


def test_a_tensor_parallel_run_reads_as_one_workers_share(tensor_parallel_run: dict[str, Any]) -> None:
    # GIVEN the workload over 2 tensor-parallel workers (one core each), recorded by the plugin: engine.json
    # is the first worker's, whose pool holds half the model's KV heads
    run_dir, figures = tensor_parallel_run["dir"], tensor_parallel_run
    worker_token = SIZE.num_layers * 2 * (SIZE.num_kv_heads // 2) * HEAD_DIM * DTYPE_BYTES
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    assert engine["config"]["tensor_parallel_size"] == 2
    assert engine["num_blocks"] == figures["num_gpu_blocks"] == POOL_BYTES // (worker_token * BLOCK_SIZE)

    # WHEN it is reported
    report = _report_json(run_dir)

    # THEN its bytes per token, measured and by arithmetic, are the worker's (it had the model's whole
    # 2 KV heads in the arithmetic: twice the measured), and a note says so, with the 2 workers' total
    kv = report["kv"]
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == worker_token
    (note,) = [n for n in report["notes"] if n.startswith("tensor parallel 2:")]
    assert f"holding {SIZE.num_kv_heads // 2} of the model's {SIZE.num_kv_heads} KV heads" in note
    assert note.endswith(f"{human_bytes(2 * POOL_BYTES)} in all")


def test_compare_sums_a_tensor_parallel_runs_workers_pools(tensor_parallel_run: dict[str, Any]) -> None:
    # GIVEN the 2-worker run beside the one-worker vLLM sample: engine.json gives the first worker's pool
    run_dir = tensor_parallel_run["dir"]
    sample = ROOT / "sample_traces" / "vllm_preempt"
    sample_pool = json.loads((sample / fmt.ENGINE).read_text())["kv_cache_bytes"]
    # WHEN compared
    runs = _cli_json(["compare", str(run_dir), str(sample), "-q"])["runs"]
    # THEN the KV figures are both workers' pools, at every engine step, as a run group's are its ranks'
    # (they were the first worker's alone), and the device figures say they are that worker's
    tp, one = runs
    assert (tp["kv_final_bytes"], tp["kv_peak_bytes"], tp["kv_ranks"]) == (2 * POOL_BYTES, 2 * POOL_BYTES, 2)
    assert set(tp["kv_by_step"].values()) == {2 * POOL_BYTES}
    assert tp["peak_rank"] == (0 if tp["peak_bytes"] is not None else None)
    assert (one["kv_final_bytes"], one["kv_ranks"], one["peak_rank"]) == (sample_pool, 1, None)
    (note,) = [n for n in tp["notes"] if n.startswith("tensor parallel 2:")]
    assert note.startswith(
        f"tensor parallel 2: the KV figures are the 2 workers' pools summed ({human_bytes(2 * POOL_BYTES)}"
    )
    # AND the text labels its rows and cells so
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "compare", str(run_dir), str(sample), "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("KV final (all ranks)")]
    assert f"{human_bytes(2 * POOL_BYTES)} (2 workers)" in row


def test_a_pipeline_parallel_run_reads_as_the_first_stages_share(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the workload over 2 pipeline stages (one core each), recorded by the plugin, each worker given
    # half the workload's pool: each holds the KV of 2 of the 4 layers, in the workload's 16 blocks (the
    # scheduler's one pool of block ids), so it preempts
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    run_dir = tmp_path / "run"
    stage_pool = POOL_BYTES // 2
    figures = run_script(
        "pipeline_parallel", str(tiny_model_dir), str(stage_pool), kvtrace_dir=run_dir, multiprocess=True
    )
    stage_layers = [range(0, SIZE.num_layers // 2), range(SIZE.num_layers // 2, SIZE.num_layers)]
    stage_token = len(stage_layers[0]) * 2 * SIZE.num_kv_heads * HEAD_DIM * DTYPE_BYTES  # 1 KiB
    blocks = stage_pool // (stage_token * BLOCK_SIZE)
    assert figures["num_gpu_blocks"] == blocks == POOL_BYTES // BLOCK_BYTES and figures["preemptions"] > 0
    for stage, layers in zip(figures["stages"], stage_layers, strict=True):  # vLLM's own, on each worker
        assert stage["layers"] == [f"model.layers.{i}.self_attn.attn" for i in layers]
        assert stage["num_blocks"] == blocks and stage["storage_bytes"] == stage_pool

    # THEN engine.json's pool is the first stage's worker's (the scheduler's config is a copy of its), and
    # each stage's layers, KV and weights are there, with the checkpoint's parameters (it had the first
    # stage's alone: 1,436,672 of 2,617,600)
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    assert engine["config"]["pipeline_parallel_size"] == 2
    assert [layer["layer"] for layer in engine["layers"]] == list(stage_layers[0])
    assert engine["num_blocks"] == blocks and engine["bytes_per_block"] == stage_token * BLOCK_SIZE
    assert engine["kv_cache_bytes"] == stage_pool
    params, stage_weights = checkpoint_shares(tiny_model_dir, stage_layers)
    assert engine["model"]["num_params"] == params
    assert engine["memory_profile"]["weights_bytes"] == stage_weights[0]
    recorded = [(s["layers"], s["kv_cache_bytes"], s["weights_bytes"]) for s in engine["pipeline_stages"]]
    assert recorded == [
        (list(layers), stage_pool, w) for layers, w in zip(stage_layers, stage_weights, strict=True)
    ]

    # WHEN it is reported
    report = _report_json(run_dir)

    # THEN its bytes per token, measured and by arithmetic, are the first stage's (the arithmetic had all
    # 4 layers: twice the measured), and a note says so, with each stage's share and the whole pool
    kv = report["kv"]
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == stage_token
    (note,) = [n for n in report["notes"] if n.startswith("pipeline parallel 2:")]
    assert f"layers 0-1 of the model's {SIZE.num_layers}" in note
    shares = f"{human_bytes(stage_pool)} (layers 0-1), {human_bytes(stage_pool)} (layers 2-3)"
    assert f"{shares} over the same {blocks} blocks, {human_bytes(2 * stage_pool)} in all" in note

    # AND `plan --from-run` plans that worker as vLLM sized it (it planned all 4 layers a block: 8 blocks,
    # and said vLLM would refuse the run it had started)
    plan = _cli_json(["plan", "--engine", "vllm", "--from-run", str(run_dir)])
    assert (plan["num_blocks"], plan["kv_bytes_per_token"], plan["starts"]) == (blocks, stage_token, True)

    # AND `diagnose` prices the pool that avoids every preemption by the stage's blocks (8 requests of
    # cdiv(40 + 48 - 1, 32) = 3 blocks, and the null block), and says the setting is each worker's
    diagnosis = _cli_json(["diagnose", str(run_dir)], ok=(0, 1))
    remedy = {r["knob"]: r for r in diagnosis["remedies"]}["kv_cache_memory_bytes"]
    needed = REQUESTS * -(-(PROMPT_TOKENS + NEW_TOKENS - 1) // BLOCK_SIZE) + 1
    assert remedy["setting"] == needed * stage_token * BLOCK_SIZE and remedy["fits"]
    assert "is per worker: each of the 2 workers (2 pipeline stages) is given it" in remedy["sentence"]


def test_an_uneven_pipeline_is_planned_by_its_widest_stage(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the workload over 3 pipeline stages: vLLM splits the 4 layers 1, 2, 1 (the remainder to the
    # stage before the last), each worker given 16 blocks of the 2-layer stage: that stage's memory gives
    # 16 blocks, the others' 32, and vLLM keeps 16 on every worker, so it preempts
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0")
    run_dir = tmp_path / "run"
    layer_token = 2 * SIZE.num_kv_heads * HEAD_DIM * DTYPE_BYTES  # 512 B: one layer's K and V
    counts = [1, 2, 1]
    pool = 16 * 2 * layer_token * BLOCK_SIZE
    stages = json.dumps({"pipeline_parallel_size": 3})
    figures = run_script(
        "pipeline_parallel", str(tiny_model_dir), str(pool), stages, kvtrace_dir=run_dir, multiprocess=True
    )
    assert figures["num_gpu_blocks"] == 16 and figures["preemptions"] > 0
    assert [len(stage["layers"]) for stage in figures["stages"]] == counts
    assert [stage["storage_bytes"] for stage in figures["stages"]] == [
        16 * n * layer_token * BLOCK_SIZE for n in counts
    ]

    # WHEN it is planned from the run, and from the model's config with the same settings
    plan = _cli_json(["plan", "--engine", "vllm", "--from-run", str(run_dir)])
    typed = _cli_json(
        [
            "plan",
            "--engine",
            "vllm",
            "--config",
            str(tiny_model_dir),
            "--pipeline-parallel-size",
            "3",
            "--kv-cache-memory",
            str(pool),
            "--block-size",
            str(BLOCK_SIZE),
            "--max-model-len",
            "256",
        ]
    )

    # THEN both plan vLLM's 16 blocks, by the 2-layer stage (the first stage's 1 layer planned 32 blocks,
    # twice what vLLM kept), each stage's own blocks as its memory gives them
    for planned in (plan, typed):
        assert planned["num_blocks"] == figures["num_gpu_blocks"] and planned["starts"]
        assert (planned["bound_stage"], planned["kv_bytes_per_token"]) == (1, 2 * layer_token)
        assert [s["layers"] for s in planned["stages"]] == counts
        assert [s["num_blocks"] for s in planned["stages"]] == [32, 16, 32]

    # AND `diagnose` prices the pool that avoids every preemption by that stage's blocks (8 requests of
    # cdiv(40 + 48 - 1, 32) = 3 blocks, and the null block: 25 blocks of 2 layers), which vLLM confirms
    diagnosis = _cli_json(["diagnose", str(run_dir)], ok=(0, 1))
    remedy = {r["knob"]: r for r in diagnosis["remedies"]}["kv_cache_memory_bytes"]
    needed = REQUESTS * -(-(PROMPT_TOKENS + NEW_TOKENS - 1) // BLOCK_SIZE) + 1
    assert remedy["setting"] == needed * 2 * layer_token * BLOCK_SIZE and remedy["fits"]
    assert "priced by stage 1's worker's" in remedy["sentence"]
    rerun = run_script(
        "pipeline_parallel",
        str(tiny_model_dir),
        str(remedy["setting"]),
        stages,
        kvtrace_dir=None,
        multiprocess=True,
    )
    assert rerun["num_gpu_blocks"] == needed and rerun["preemptions"] == 0


def test_a_hybrid_pipeline_stage_holds_one_layer_of_each_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a tiny Gemma 3 (12 layers, 5 sliding over 64 tokens then 1 full, twice) over 2 stages of 6 layers,
    # each worker given 1 MiB: vLLM forms its groups over the whole model, 2 layers a group, and deals each
    # kind's layers to them in turn: full (5, 11), sliding (0, 6), (1, 7), (2, 8), (3, 9), (4, 10); so each
    # stage holds one layer of every group and its block is one page, 32 x 2 x 2 x 64 x 2 B = 16 KiB: 64
    # blocks (cut in pairs of neighbours, a stage would hold 2 layers of a group: 32 KiB, 32 blocks)
    from tests.vllm.workload import write_gemma3_model

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model = write_gemma3_model(tmp_path / "gemma3")
    run_dir = tmp_path / "run"
    page = BLOCK_SIZE * 2 * SIZE.num_kv_heads * HEAD_DIM * DTYPE_BYTES
    pool, stages = 2**20, json.dumps({"pipeline_parallel_size": 2})
    figures = run_script(
        "pipeline_parallel", str(model), str(pool), stages, kvtrace_dir=run_dir, multiprocess=True
    )
    assert figures["num_gpu_blocks"] == pool // page == 64 and figures["preemptions"] > 0

    # WHEN it is planned from the run, and from the model's config with the workload's settings
    plan = _cli_json(["plan", "--engine", "vllm", "--from-run", str(run_dir)])
    typed = _cli_json(
        [
            "plan", "--engine", "vllm", "--config", str(model), "--pipeline-parallel-size", "2",
            "--kv-cache-memory", str(pool), "--block-size", str(BLOCK_SIZE), "--max-model-len", "256",
            "--max-num-batched-tokens", "512", "--no-async-scheduling",
        ]
    )  # fmt: skip

    # THEN both plan vLLM's 64 blocks of one page, and its "KV cache size: 309 tokens" (64 blocks over the 53
    # one request of 256 tokens may hold: 8 full, and 5 sliding groups of cdiv(63 + 512 in flight, capped at
    # 256, by 32) + 1 = 9)
    for planned in (plan, typed):
        assert (planned["num_blocks"], planned["bytes_per_block"]) == (64, page)
        assert [s["block_layers"] for s in planned["stages"]] == [1, 1]
        assert planned["blocks_per_request"] == 8 + 5 * 9 and planned["kv_tokens"] == 64 * 256 // 53 == 309

    # AND diagnose prices the pool that avoids every preemption in those blocks, which vLLM confirms
    diagnosis = _cli_json(["diagnose", str(run_dir)], ok=(0, 1))
    remedy = {r["knob"]: r for r in diagnosis["remedies"]}["kv_cache_memory_bytes"]
    assert remedy["setting"] % page == 0 and remedy["fits"]
    rerun = run_script(
        "pipeline_parallel", str(model), str(remedy["setting"]), stages, kvtrace_dir=None, multiprocess=True
    )
    assert rerun["num_gpu_blocks"] == remedy["setting"] // page and rerun["preemptions"] == 0


def test_a_tensor_and_pipeline_parallel_run_reads_as_one_workers_share(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the workload over 2 pipeline stages of 2 tensor-parallel workers (4 workers on the 2 cores),
    # recorded by the plugin, each worker given a quarter of the workload's pool: each holds 1 of the 2 KV
    # heads of its stage's 2 of the 4 layers, in the workload's 16 blocks, so it preempts
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0|1")
    run_dir = tmp_path / "run"
    tp, pp = 2, 2
    worker_pool = POOL_BYTES // (tp * pp)
    parallel = json.dumps({"pipeline_parallel_size": pp, "tensor_parallel_size": tp})
    figures = run_script(
        "pipeline_parallel",
        str(tiny_model_dir),
        str(worker_pool),
        parallel,
        kvtrace_dir=run_dir,
        multiprocess=True,
    )
    stage_layers = [range(0, SIZE.num_layers // pp), range(SIZE.num_layers // pp, SIZE.num_layers)]
    worker_heads = SIZE.num_kv_heads // tp
    worker_token = len(stage_layers[0]) * 2 * worker_heads * HEAD_DIM * DTYPE_BYTES  # 512 B
    blocks = worker_pool // (worker_token * BLOCK_SIZE)
    assert figures["num_gpu_blocks"] == blocks == POOL_BYTES // BLOCK_BYTES and figures["preemptions"] > 0
    # vLLM's own, on each worker in rank order (the tensor-parallel rank the faster)
    ranks = [[stage, rank] for stage in range(pp) for rank in range(tp)]
    assert [worker["ranks"] for worker in figures["stages"]] == ranks
    for worker, (stage, _) in zip(figures["stages"], ranks, strict=True):
        assert worker["layers"] == [f"model.layers.{i}.self_attn.attn" for i in stage_layers[stage]]
        assert worker["kv_heads"] == [worker_heads]
        assert worker["num_blocks"] == blocks and worker["storage_bytes"] == worker_pool

    # THEN engine.json's pool, layers and weights are the first worker's (stage 0, rank 0: half the heads
    # of the first stage's layers), `pipeline_stages` has one entry a stage (not a worker), and the
    # checkpoint's parameters are whole
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    assert (engine["config"]["tensor_parallel_size"], engine["config"]["pipeline_parallel_size"]) == (tp, pp)
    assert [layer["layer"] for layer in engine["layers"]] == list(stage_layers[0])
    assert {layer["shape"][1] for layer in engine["layers"]} == {worker_heads}  # LBHNC: a block's heads
    assert engine["num_blocks"] == blocks and engine["bytes_per_block"] == worker_token * BLOCK_SIZE
    assert engine["kv_cache_bytes"] == worker_pool and len(engine["storage"]) == 1
    params, rank_weights = checkpoint_shares(tiny_model_dir, stage_layers, tp=tp)
    assert engine["model"]["num_params"] == params
    assert engine["memory_profile"]["weights_bytes"] == rank_weights[0]
    recorded = [(s["layers"], s["kv_cache_bytes"], s["weights_bytes"]) for s in engine["pipeline_stages"]]
    assert recorded == [
        (list(layers), worker_pool, w) for layers, w in zip(stage_layers, rank_weights, strict=True)
    ]

    # WHEN it is reported
    report = _report_json(run_dir)

    # THEN its bytes per token, measured and by arithmetic, are the worker's; the pipeline note gives the
    # whole pool, stages x ranks, and the tensor-parallel note its stage's ranks (it said the 2 ranks'
    # 512 KiB were the whole, where the 4 workers hold 1 MiB)
    kv = report["kv"]
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == worker_token
    (staged,) = [n for n in report["notes"] if n.startswith(f"pipeline parallel {pp}:")]
    shares = f"{human_bytes(worker_pool)} (layers 0-1), {human_bytes(worker_pool)} (layers 2-3)"
    assert f"{shares} on each of its {tp} tensor-parallel workers over the same {blocks} blocks" in staged
    assert staged.endswith(f"{human_bytes(pp * tp * worker_pool)} in all")
    (split,) = [n for n in report["notes"] if n.startswith(f"tensor parallel {tp}:")]
    assert f"holding {worker_heads} of the model's {SIZE.num_kv_heads} KV heads" in split
    assert split.endswith(
        f"each of its pipeline stage's {tp} workers holds a pool of this size, "
        f"{human_bytes(tp * worker_pool)} a stage"
    )
    (weights,) = [n for n in report["notes"] if "engine.json)" in n]
    whose = "the first pipeline stage's first worker's share of the weights"
    assert weights.startswith(f"{whose} ({human_bytes(rank_weights[0])}, engine.json)")

    # AND `plan --from-run` plans that worker as vLLM sized it
    plan = _cli_json(["plan", "--engine", "vllm", "--from-run", str(run_dir)])
    assert (plan["num_blocks"], plan["kv_bytes_per_token"], plan["starts"]) == (blocks, worker_token, True)
    assert [s["num_blocks"] for s in plan["stages"]] == [blocks] * pp

    # AND `compare` counts the 4 workers' pools, each stage's share on each of its ranks, as that note does
    row = _cli_json(["compare", str(run_dir), str(run_dir), "-q"])["runs"][0]
    assert (row["kv_final_bytes"], row["kv_ranks"]) == (pp * tp * worker_pool, pp * tp)
    assert set(row["kv_by_step"].values()) == {pp * tp * worker_pool}

    # AND `diagnose` prices the pool that avoids every preemption by the worker's blocks (8 requests of
    # cdiv(40 + 48 - 1, 32) = 3 blocks, and the null block), given to each of the 4 workers, which vLLM
    # confirms
    diagnosis = _cli_json(["diagnose", str(run_dir)], ok=(0, 1))
    remedy = {r["knob"]: r for r in diagnosis["remedies"]}["kv_cache_memory_bytes"]
    needed = REQUESTS * -(-(PROMPT_TOKENS + NEW_TOKENS - 1) // BLOCK_SIZE) + 1
    assert remedy["setting"] == needed * worker_token * BLOCK_SIZE and remedy["fits"]
    assert f"each of the {tp * pp} workers ({pp} pipeline stages of {tp}) is given it" in remedy["sentence"]
    rerun = run_script(
        "pipeline_parallel",
        str(tiny_model_dir),
        str(remedy["setting"]),
        parallel,
        kvtrace_dir=None,
        multiprocess=True,
    )
    assert rerun["num_gpu_blocks"] == needed and rerun["preemptions"] == 0
