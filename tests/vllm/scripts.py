"""Runs one vLLM scenario in a fresh interpreter and prints vLLM's own figures as one JSON line.

    python -m tests.vllm.scripts multiprocess MODEL_DIR     # KVTRACE_DIR set by the caller
    python -m tests.vllm.scripts tensor_parallel MODEL_DIR [TP]  # the same over TP (2) workers; KVTRACE_DIR
                                                                   # too
    python -m tests.vllm.scripts pipeline_parallel MODEL_DIR [POOL_BYTES [JSON]]  # over 2 pipeline stages,
                                                        # each worker given POOL_BYTES; JSON: LLM overrides
    python -m tests.vllm.scripts refused_record MODEL_DIR RUN_DIR
    python -m tests.vllm.scripts refused_plugin MODEL_DIR   # KVTRACE_DIR set by the caller
    python -m tests.vllm.scripts fp8_record MODEL_DIR RUN_DIR
    python -m tests.vllm.scripts falcon_record MODEL_DIR RUN_DIR  # writes a multi-query Falcon to MODEL_DIR
    python -m tests.vllm.scripts raise_record MODEL_DIR RUN_DIR CALL  # the model raises in forward CALL
    python -m tests.vllm.scripts kill_record MODEL_DIR RUN_DIR CALL [HANG_S]  # the process SIGKILLs itself
                                                                        # there (after HANG_S in it)
    python -m tests.vllm.scripts term_record MODEL_DIR RUN_DIR CALL   # kill_record's, with SIGTERM
    python -m tests.vllm.scripts kill_record_pool MODEL_DIR RUN_DIR CALL POOL_BYTES  # kill_record's, its
                                                        # pool kv_cache_memory_bytes=POOL_BYTES
    python -m tests.vllm.scripts raise_plugin MODEL_DIR CALL [STALL_S]  # raise_record's, multiprocess;
                                                                        # KVTRACE_DIR set

A fresh interpreter because the engine runs in its own process (vLLM wants the `__main__` guard), and
because `refused_record` must start its recording before anything imported vllm (and a second engine in
the tests' process would tear down the distributed state the first one still uses).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

from tests.vllm.workload import BLOCK_BYTES, POOL_BYTES, make_llm, metric, run_workload

REFUSED_POOL_BYTES = 16 * BLOCK_BYTES  # 480 usable tokens after the null block
REFUSED_MAX_MODEL_LEN = 512
STALL_ENV = "KVTRACE_TEST_ENGINE_CORE_STALL_S"  # raise_plugin's STALL_S, for the engine core vLLM spawns


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


def tensor_parallel(model_dir: str, size: int = 2) -> dict[str, Any]:
    """The workload over `size` tensor-parallel workers (VLLM_CPU_OMP_THREADS_BIND gives their cores), each
    given the same KV memory: vLLM's figures of the pool each worker holds, and each worker's weights."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # _worker_weights goes to the workers pickled
    llm = make_llm(model_dir, tensor_parallel_size=size, distributed_executor_backend="mp")
    run_workload(llm)
    figures = {
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "preemptions": metric(llm, "vllm:num_preemptions"),
        "workers": llm.collective_rpc(_worker_weights),
    }
    llm.llm_engine.engine_core.shutdown()
    return figures


def _worker_weights(worker: Any) -> dict[str, Any]:
    """On each vLLM worker (a `collective_rpc`): its tensor-parallel rank and the weights it loaded, counted
    as the recorder counts the first worker's for engine.json (`weight_facts`)."""
    from vllm.distributed import get_tp_group

    from kvtrace.integrations.vllm_weights import weight_facts

    return {
        "rank": get_tp_group().rank_in_group,
        "weights_bytes": weight_facts(worker.model_runner.model)["weights_bytes"],
    }


def _stage_kv(worker: Any) -> dict[str, Any]:
    """On each vLLM worker (a `collective_rpc`): its ranks, its stage's layers and the KV it holds (the KV
    heads of its rank, the blocks and the bytes), from its kv_cache_config and its tensors."""
    from vllm.distributed import get_pp_group, get_tp_group

    config = worker.model_runner.kv_cache_config
    tensors = worker.model_runner.kv_caches
    return {
        "ranks": [get_pp_group().rank_in_group, get_tp_group().rank_in_group],
        "kv_heads": sorted({group.kv_cache_spec.num_kv_heads for group in config.kv_cache_groups}),
        "num_blocks": config.num_blocks,
        "layers": sorted(name for group in config.kv_cache_groups for name in group.layer_names),
        "kv_cache_tensor_bytes": sum(t.size for t in config.kv_cache_tensors),
        "storage_bytes": sum(
            {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
        ),
    }


def _allocate_stage_inputs(worker: Any) -> None:
    """On each vLLM worker (a `collective_rpc`): a later stage's buffer for the activations the stage
    before sends, as vLLM's start-up profiling pass allocates it. vLLM 0.32's CPU worker skips that pass
    under enforce_eager (`CPUModelRunner.warming_up_model` returns at once), and the second stage's first
    step then fails (`assert self.intermediate_tensors is not None`, gpu_model_runner.py)."""
    from vllm.distributed import get_pp_group

    runner = worker.model_runner
    if not get_pp_group().is_first_rank and runner.intermediate_tensors is None:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )


def pipeline_parallel(model_dir: str, pool_bytes: int, **overrides: Any) -> dict[str, Any]:
    """The workload over 2 pipeline-parallel stages (each one CPU core), each worker given `pool_bytes` of
    KV memory (and `overrides`, a remedy to check): vLLM's figures of the shared pool and of each stage's
    worker."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # _stage_kv goes to the workers pickled
    settings: dict[str, Any] = {"kv_cache_memory_bytes": pool_bytes, "pipeline_parallel_size": 2, **overrides}
    llm = make_llm(model_dir, distributed_executor_backend="mp", **settings)
    llm.collective_rpc(_allocate_stage_inputs)
    run_workload(llm)
    figures = {
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "preemptions": metric(llm, "vllm:num_preemptions"),
        "stages": llm.collective_rpc(_stage_kv),
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


def _on_forward(llm: Any, call: int, action: Any) -> None:
    """`action()` inside the engine's `call`th model forward from now (a forward hook on the first decoder
    layer: vLLM runs the model once per engine step)."""
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    calls = [0]

    def hook(module: Any, args: Any, output: Any) -> None:
        calls[0] += 1
        if calls[0] == call:
            action()

    runner.model.model.layers[0].register_forward_hook(hook)


def raise_record(model_dir: str, run_dir: str, call: int) -> dict[str, Any]:
    """Four requests of one full block of prompt each, recorded in-process, the model raising in its
    CALLth forward: vLLM's exception, as the recorded block let it go on."""
    import kvtrace
    from tests.vllm.workload import BLOCK_SIZE, prompts, sampling

    llm = make_llm(model_dir)

    def fail() -> None:
        raise RuntimeError(f"forward {call} failed")

    _on_forward(llm, call, fail)
    try:
        with kvtrace.record(run_dir, model=llm, profiler=False):
            llm.generate(prompts(4, BLOCK_SIZE), sampling(8), use_tqdm=False)
    except RuntimeError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


def _raise_in_forward(worker: Any, call: int) -> None:
    """On vLLM's worker (a `collective_rpc`): its model raises in its `call`th forward from now."""
    calls = [0]

    def hook(module: Any, args: Any, output: Any) -> None:
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError(f"forward {call} failed")

    worker.model_runner.model.model.layers[0].register_forward_hook(hook)


def _stall_after_sigterm_default(stall_s: float) -> None:
    """Once vLLM's `run_engine_core` has told the front end that the engine died and put SIGTERM back to its
    default action, and before it shuts the engine down, the engine core stalls `stall_s`: the front end's
    shutdown SIGTERMs it there and it dies at once. A loaded machine loses that race now and then; this
    loses it every time. Installed before the engine core starts: a forked one inherits it, a spawned one
    (vLLM's CPU platform spawns) imports this module again (as `__mp_main__`) where STALL_ENV says so."""
    import time

    from vllm.v1.engine.utils import SignalCallback

    stop = SignalCallback.stop  # run_engine_core's next call after restoring SIGTERM's default action

    def stop_then_stall(self: Any) -> None:
        stop(self)
        time.sleep(stall_s)

    SignalCallback.stop = stop_then_stall  # type: ignore[method-assign]


def raise_plugin(model_dir: str, call: int, stall_s: float = 0.0) -> dict[str, Any]:
    """`raise_record`'s workload with the engine in its own process, recorded by the plugin: what the front
    end got (vLLM reports the engine core dead). `stall_s`: see `_stall_after_sigterm_default`."""
    from tests.vllm.workload import BLOCK_SIZE, prompts, sampling

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the hook goes to the worker as a pickled function
    if stall_s:
        os.environ[STALL_ENV] = str(stall_s)
        _stall_after_sigterm_default(stall_s)
    llm = make_llm(model_dir)
    llm.collective_rpc(_raise_in_forward, args=(call,))
    try:
        llm.generate(prompts(4, BLOCK_SIZE), sampling(8), use_tqdm=False)
    except Exception as exc:
        result = {"type": type(exc).__name__, "message": str(exc)}
    else:
        result = {"type": None, "message": ""}
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()  # the engine core finishes its run before we report
    return result


def kill_record(
    model_dir: str,
    run_dir: str,
    call: int,
    hang_s: float = 0.0,
    signal_name: str = "SIGKILL",
    pool_bytes: int | None = None,
) -> dict[str, Any]:
    """The workload (it preempts) recorded in-process, the process killing itself (SIGKILL) in the model's
    CALLth forward. The forward before it waits 0.2 s, so that the step before reaches the files at its end
    (a step's end writes the logs when the last write is 0.1 s old): the run holds exactly the steps before
    CALL. `hang_s`: CALL's forward hangs that long before the kill, and the forward before waits not (the
    writer thread writes the logs every 0.1 s meanwhile). `signal_name`: another signal to send (SIGTERM,
    a scheduler's). `pool_bytes`: the pool's kv_cache_memory_bytes, where not the workload's."""
    import signal
    import time

    import kvtrace

    def hang_then_kill() -> None:
        time.sleep(hang_s)
        os.kill(os.getpid(), getattr(signal, signal_name))

    llm = make_llm(model_dir, **({"kv_cache_memory_bytes": pool_bytes} if pool_bytes else {}))
    if not hang_s:
        _on_forward(llm, call - 1, lambda: time.sleep(0.2))
    _on_forward(llm, call, hang_then_kill)
    with kvtrace.record(run_dir, model=llm, profiler=False):
        run_workload(llm)
    return {"killed": False}


if __name__ == "__mp_main__" and os.environ.get(STALL_ENV):  # vLLM's engine core, spawned
    _stall_after_sigterm_default(float(os.environ[STALL_ENV]))

if __name__ == "__main__":
    mode, model = sys.argv[1], sys.argv[2]
    if mode == "multiprocess":
        result = multiprocess(model)
    elif mode == "tensor_parallel":
        result = tensor_parallel(model, int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    elif mode == "pipeline_parallel":
        pool = int(sys.argv[3]) if len(sys.argv) > 3 else POOL_BYTES
        result = pipeline_parallel(model, pool, **(json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}))
    elif mode == "fp8_record":
        result = fp8_record(model, sys.argv[3])
    elif mode == "falcon_record":
        result = falcon_record(model, sys.argv[3])
    elif mode == "raise_record":
        result = raise_record(model, sys.argv[3], int(sys.argv[4]))
    elif mode == "raise_plugin":
        result = raise_plugin(model, int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
    elif mode == "kill_record":
        hang_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
        result = kill_record(model, sys.argv[3], int(sys.argv[4]), hang_s)
    elif mode == "kill_record_pool":
        result = kill_record(model, sys.argv[3], int(sys.argv[4]), pool_bytes=int(sys.argv[5]))
    elif mode == "term_record":
        result = kill_record(model, sys.argv[3], int(sys.argv[4]), signal_name="SIGTERM")
    else:
        result = refused(model, sys.argv[3] if mode == "refused_record" else None)
    print("KVTRACE-RESULT " + json.dumps(result), flush=True)
