"""Runs one vLLM scenario in a fresh interpreter and prints vLLM's own figures as one JSON line.

    python -m tests.vllm.scripts multiprocess MODEL_DIR     # KVTRACE_DIR set by the caller
    python -m tests.vllm.scripts tensor_parallel MODEL_DIR  # the same over 2 workers; KVTRACE_DIR too
    python -m tests.vllm.scripts refused_record MODEL_DIR RUN_DIR
    python -m tests.vllm.scripts refused_plugin MODEL_DIR   # KVTRACE_DIR set by the caller
    python -m tests.vllm.scripts fp8_record MODEL_DIR RUN_DIR
    python -m tests.vllm.scripts falcon_record MODEL_DIR RUN_DIR  # writes a multi-query Falcon to MODEL_DIR

A fresh interpreter because the engine runs in its own process (vLLM wants the `__main__` guard), and
because `refused_record` must start its recording before anything imported vllm (and a second engine in
the tests' process would tear down the distributed state the first one still uses).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.vllm.workload import BLOCK_BYTES, make_llm, metric, run_workload

REFUSED_POOL_BYTES = 16 * BLOCK_BYTES  # 480 usable tokens after the null block
REFUSED_MAX_MODEL_LEN = 512


def multiprocess(model_dir: str) -> dict[str, Any]:
    llm = make_llm(model_dir)
    run_workload(llm)
    figures = {
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "preemptions": metric(llm, "vllm:num_preemptions"),
        "request_preemptions": metric(llm, "vllm:request_num_preemptions"),
    }
    llm.llm_engine.engine_core.shutdown()  # the engine core finishes its run before we report
    return figures


def tensor_parallel(model_dir: str) -> dict[str, Any]:
    """The workload over 2 tensor-parallel workers (each one CPU core), each given the same KV memory:
    vLLM's figures of the pool each worker holds."""
    llm = make_llm(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp")
    run_workload(llm)
    figures = {
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "preemptions": metric(llm, "vllm:num_preemptions"),
    }
    llm.llm_engine.engine_core.shutdown()
    return figures


def refused(model_dir: str, run_dir: str | None) -> dict[str, Any]:
    import contextlib

    import kvtrace

    recording: Any = kvtrace.record(run_dir) if run_dir else contextlib.nullcontext()
    try:
        with recording:
            make_llm(model_dir, kv_cache_memory_bytes=REFUSED_POOL_BYTES, max_model_len=REFUSED_MAX_MODEL_LEN)
    except Exception as exc:  # in-process: vLLM's ValueError; multiprocess: the engine's start-up failure
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


def fp8_record(model_dir: str, run_dir: str) -> dict[str, Any]:
    """One short request recorded in-process with kv_cache_dtype='fp8', and vLLM's own facts of its pool."""
    import kvtrace
    from tests.vllm.workload import prompts, sampling

    llm = make_llm(model_dir, kv_cache_dtype="fp8")
    with kvtrace.record(run_dir, model=llm, profiler=False):
        llm.generate(prompts(1), sampling(2), use_tqdm=False)
    engine = llm.llm_engine
    tensors = engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.kv_caches
    return {
        "cache_dtype": engine.vllm_config.cache_config.cache_dtype,
        "num_gpu_blocks": engine.vllm_config.cache_config.num_gpu_blocks,
        "tensor_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        "tensor_bytes": [t.numel() * t.element_size() for t in tensors],
        "storage_bytes": sorted({t.untyped_storage().nbytes() for t in tensors}),
    }


def falcon_record(model_dir: str, run_dir: str) -> dict[str, Any]:
    """Two short requests of a multi-query Falcon recorded in-process, and vLLM's own facts of its pool."""
    from pathlib import Path

    import kvtrace
    from tests.vllm.workload import prompts, sampling, write_falcon_model

    llm = make_llm(write_falcon_model(Path(model_dir)), max_model_len=128)
    with kvtrace.record(run_dir, model=llm, profiler=False):
        llm.generate(prompts(2, 10), sampling(4), use_tqdm=False)
    core = llm.llm_engine.engine_core.engine_core
    kv_cache_config = core.scheduler.kv_cache_config
    tensors = core.model_executor.driver_worker.worker.model_runner.kv_caches
    return {
        "spec_kv_heads": [g.kv_cache_spec.num_kv_heads for g in kv_cache_config.kv_cache_groups],
        "num_blocks": kv_cache_config.num_blocks,
        "tensor_shapes": [list(t.shape) for t in tensors],
    }


if __name__ == "__main__":
    mode, model = sys.argv[1], sys.argv[2]
    if mode == "multiprocess":
        result = multiprocess(model)
    elif mode == "tensor_parallel":
        result = tensor_parallel(model)
    elif mode == "fp8_record":
        result = fp8_record(model, sys.argv[3])
    elif mode == "falcon_record":
        result = falcon_record(model, sys.argv[3])
    else:
        result = refused(model, sys.argv[3] if mode == "refused_record" else None)
    print("KVTRACE-RESULT " + json.dumps(result), flush=True)
