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
    run_script,
)

ROOT = Path(__file__).resolve().parents[2]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def plugin_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("vllm-mp") / "run"
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


def test_kvtrace_report_reads_it(plugin_run: dict[str, Any]) -> None:
    report = _report_json(plugin_run["dir"])
    assert report["kv"]["peak_bytes"] == POOL_BYTES


def test_a_tensor_parallel_run_reads_as_one_workers_share(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the workload over 2 tensor-parallel workers (one core each), recorded by the plugin: engine.json
    # is the first worker's, whose pool holds half the model's KV heads
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    run_dir = tmp_path / "run"
    figures = run_script("tensor_parallel", str(tiny_model_dir), kvtrace_dir=run_dir, multiprocess=True)
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
