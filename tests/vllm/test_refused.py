"""A vLLM start refused for lack of KV memory leaves a run with vLLM's own figures: inside
`kvtrace.record(dir)` with no model (vllm not even imported when the block starts), and under KVTRACE_DIR
with the engine in its own process."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.run_reader import read_run
from tests.vllm.scripts import REFUSED_MAX_MODEL_LEN, REFUSED_POOL_BYTES
from tests.vllm.workload import BLOCK_BYTES, BLOCK_SIZE, run_script


def _check_refused(run_dir: Path, message: str, process: str) -> dict[str, Any]:
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    refused = engine["refused"]
    assert engine["status"] == "refused_start" and engine["process"] == process
    # vLLM's own figures, read from its message independently of kvtrace's parser
    wanted = int(re.search(r"max seq len \((\d+)\)", message).group(1))  # type: ignore[union-attr]
    estimate = int(re.search(r"maximum model length is (\d+)", message).group(1))  # type: ignore[union-attr]
    assert refused["max_model_len"] == wanted == REFUSED_MAX_MODEL_LEN
    assert refused["estimated_max_model_len"] == estimate
    # the arithmetic: max_model_len in whole blocks; the pool less the null block vLLM holds back
    assert refused["needed_bytes"] == -(-REFUSED_MAX_MODEL_LEN // BLOCK_SIZE) * BLOCK_BYTES
    assert refused["available_bytes"] == REFUSED_POOL_BYTES - BLOCK_BYTES
    assert estimate == refused["available_bytes"] // BLOCK_BYTES * BLOCK_SIZE
    assert engine["config"]["kv_cache_memory_bytes"] == REFUSED_POOL_BYTES
    manifest = read_run(run_dir).manifest
    assert manifest["ended"]["status"] == "exception" and manifest["ended"]["type"] == "ValueError"
    return engine


def test_refused_inside_record_without_a_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "refused"
    model = str(tiny_model_dir)
    result = run_script("refused_record", model, str(run_dir), kvtrace_dir=None, multiprocess=False)
    assert result["type"] == "ValueError"
    _check_refused(run_dir, result["message"], "inproc")


def test_refused_under_kvtrace_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "refused-plugin"
    result = run_script("refused_plugin", str(tiny_model_dir), kvtrace_dir=run_dir, multiprocess=True)
    assert result["type"] == "RuntimeError"  # the front end only hears that the engine core died
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    _check_refused(run_dir, engine["refused"]["message"], "engine_core")


def test_refusal_watch_is_undone(tiny_model_dir: Path, tmp_path: Path) -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    import kvtrace
    from tests.vllm.workload import make_llm

    original = kv_cache_utils._check_enough_kv_cache_memory
    with pytest.raises(ValueError, match="estimated maximum model length is"), kvtrace.record(tmp_path / "r"):
        make_llm(
            tiny_model_dir, kv_cache_memory_bytes=REFUSED_POOL_BYTES, max_model_len=REFUSED_MAX_MODEL_LEN
        )
    assert kv_cache_utils._check_enough_kv_cache_memory is original
    assert json.loads((tmp_path / "r" / fmt.ENGINE).read_text())["status"] == "refused_start"


NODE_REFUSED_POOL_BYTES = 1 << 50  # 1 PiB: more than any memory node here has free


def test_a_pool_the_memory_node_cannot_hold_is_diagnosed_in_vllms_knobs(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import psutil
    from vllm.v1.worker.cpu_worker import CPUWorker

    import kvtrace
    from kvtrace.cli import main
    from tests.vllm.workload import MAX_MODEL_LEN, REQUESTS, make_llm

    # GIVEN a start whose kv_cache_memory_bytes the CPU worker refuses: more than its memory node has free
    original = CPUWorker.determine_available_memory
    run_dir = tmp_path / "node"
    with (
        pytest.raises(ValueError, match="less than requested memory for kv") as raised,
        kvtrace.record(run_dir, profiler=False),
    ):
        make_llm(tiny_model_dir, kv_cache_memory_bytes=NODE_REFUSED_POOL_BYTES)
    assert CPUWorker.determine_available_memory is original  # the watch is undone
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    refused = engine["refused"]
    assert engine["status"] == "refused_start" and refused["kind"] == "node_memory"
    assert refused["requested_kv_bytes"] == refused["kv_cache_memory_bytes"] == NODE_REFUSED_POOL_BYTES
    assert 0 < refused["node_available_bytes"] <= refused["node_total_bytes"] <= psutil.virtual_memory().total
    # vLLM's GiB figures, read from its message independently of the recorder
    free_gib = float(re.search(r"\((\d+\.\d+)/\d+\.\d+ GiB\)", str(raised.value)).group(1))  # type: ignore[union-attr]
    assert abs(refused["node_available_bytes"] / 2**30 - free_gib) < 1.0
    # one request of max_model_len: cdiv(256, 32) = 8 blocks of 64 KiB, by vLLM's own specs too
    one_request = -(-MAX_MODEL_LEN // BLOCK_SIZE) * BLOCK_BYTES
    assert refused["needed_bytes"] == one_request == 512 * 1024
    full_batch = REQUESTS * one_request + BLOCK_BYTES  # max_num_seqs of them + the null block: 65 blocks
    capsys.readouterr()
    # WHEN it is diagnosed
    assert main(["diagnose", str(run_dir), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    # THEN in vLLM's knobs, with the run's figures: asked vs free, one request and max_num_seqs of them
    assert diagnosis["engine"] == "vllm" and diagnosis["kind"] == "node_memory"
    assert diagnosis["requested_bytes"] == NODE_REFUSED_POOL_BYTES
    assert diagnosis["available_bytes"] == refused["node_available_bytes"]
    assert (diagnosis["needed_bytes"], diagnosis["needed_blocks"]) == (one_request, 8)
    assert diagnosis["max_num_seqs_bytes"] == full_batch == 65 * BLOCK_BYTES
    by_knob = {r["knob"]: r for r in diagnosis["remedies"]}
    pool = by_knob["kv_cache_memory_bytes"]
    assert (pool["setting"], pool["fits"]) == (full_batch, True)
    assert (by_knob["VLLM_CPU_KVCACHE_SPACE"]["setting"], by_knob["VLLM_CPU_KVCACHE_SPACE"]["fits"]) == (
        1,
        True,
    )
    for knob in ("gpu_memory_utilization", "max_model_len", "kv_cache_dtype", "max_num_seqs"):
        assert by_knob[knob]["fits"] is False
    assert main(["diagnose", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "more than the memory node had free" in text and f"kv_cache_memory_bytes={full_batch} " in text
    assert "Smaller batch" not in text and "[batch]" not in text  # not generate()'s remedies
    # AND its plan refuses the pool asked, as vLLM did, rather than count the blocks of 1 PiB: the node's
    # free memory caps kv_cache_memory_bytes (exit status 1, as for any start vLLM would refuse)
    free = refused["node_available_bytes"]
    assert main(["plan", "--engine", "vllm", "--from-run", str(run_dir), "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    assert plan["starts"] is False and plan["node_free_bytes"] == free
    (refusal,) = plan["refusals"]
    assert (
        f"memory node {refused['node']} had free" in refusal
        and f"kv_cache_memory_bytes={free} at most" in refusal
    )
    assert f"holds at most {free // BLOCK_BYTES:,} blocks" in refusal
    # AND the pool diagnose names plans as vLLM then builds it below: 65 blocks
    assert (
        main(["plan", "--engine", "vllm", "--from-run", str(run_dir), "--kv-cache-memory", str(full_batch)])
        == 0
    )
    assert re.search(r"KV blocks +65\n", capsys.readouterr().out)
    # AND the pool it names starts: max_num_seqs requests of max_model_len + the null block
    llm = make_llm(tiny_model_dir, kv_cache_memory_bytes=pool["setting"])
    assert llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks == 65
    llm.llm_engine.engine_core.shutdown()


def test_a_share_of_the_node_that_leaves_no_kv_space_is_planned_as_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvtrace
    from kvtrace.cli import main
    from tests.vllm.workload import make_llm

    # GIVEN a start without kv_cache_memory_bytes whose gpu_memory_utilization asks 0.1% of the node: less
    # than the process holds already, so vLLM's CPU worker has no KV space to ask, and refuses
    run_dir = tmp_path / "share"
    with (
        pytest.raises(ValueError, match="less than requested memory for kv"),
        kvtrace.record(run_dir, profiler=False),
    ):
        make_llm(tiny_model_dir, kv_cache_memory_bytes=None, gpu_memory_utilization=0.001)
    refused = json.loads((run_dir / fmt.ENGINE).read_text())["refused"]
    assert refused["kind"] == "node_memory" and refused["kv_cache_memory_bytes"] is None
    asked = refused["requested_cpu_memory_bytes"] - refused["consumed_bytes"]
    assert refused["requested_kv_bytes"] == asked < 0
    capsys.readouterr()
    # WHEN it is planned
    assert main(["plan", "--engine", "vllm", "--from-run", str(run_dir), "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    # THEN as the CPU worker sized it (no KV space), not as a GPU's profile: refused for the node, with
    # the blocks its free memory would hold
    free = refused["node_available_bytes"]
    assert plan["request"]["kv_cache_memory_bytes"] == 0 and plan["num_blocks"] == 0
    assert plan["starts"] is False and plan["node_free_bytes"] == free
    assert any(
        "left no KV space" in reason and f"holds at most {free // BLOCK_BYTES:,} blocks" in reason
        for reason in plan["refusals"]
    )
