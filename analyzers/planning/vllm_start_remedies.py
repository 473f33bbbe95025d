"""What makes a vLLM plan start where its KV memory is too small for one request of max_model_len.

vLLM's own error names one way out (a smaller max_model_len, or a larger gpu_memory_utilization); a user
deciding between a shorter context, an fp8 cache, more of the GPU and a second GPU wants each priced.
Each remedy is the plan made again with one setting changed (`plan_vllm`), so its figures are the plan's
own arithmetic, not an estimate beside it. Planned for one pipeline stage and a pool the memory sizes;
a pool set by num_gpu_blocks_override is the user's number, not a memory question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from analyzers.planning.vllm_plan import (
    VllmPlan,
    VllmPlanRequest,
    plan_vllm,
    readable_bytes,
    tensor_parallel_refusal,
)

__all__ = ["StartRemedy", "start_remedies"]

MAX_UTILIZATION = 0.98  # beyond it nothing is left for the CUDA context and graphs vLLM's profile misses
TENSOR_PARALLEL_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class StartRemedy:
    flag: str  # the setting to change, as `vllm serve` takes it: "--kv-cache-dtype fp8"
    starts: bool  # whether vLLM starts with it (the other settings as planned)
    num_blocks: int  # the pool's blocks with it
    max_model_len: int  # the longest max_model_len that starts with it (the plan's, where it starts)
    text: str  # one line: what it changes, in the plan's own figures


def _kv_too_small(result: VllmPlan) -> bool:
    return result.check_bytes <= 0 or result.needed_bytes > result.check_bytes


def start_remedies(result: VllmPlan) -> tuple[StartRemedy, ...]:
    """The settings that let vLLM start a plan refused for its KV memory, each planned again; () when it
    starts, is refused for another reason, runs several pipeline stages or has its pool overridden."""
    req = result.request
    if (
        not _kv_too_small(result)
        or result.refusals
        or req.pipeline_parallel_size > 1
        or req.num_gpu_blocks_override is not None
    ):
        return ()
    remedies: list[StartRemedy] = []
    if result.estimated_max_model_len:
        length = result.estimated_max_model_len
        remedies.append(
            _remedy(
                f"--max-model-len {length}",
                replace(req, max_model_len=length),
                f"requests of at most {length:,} tokens, not {req.max_model_len:,}",
            )
        )
    if result.kv_dtype_bytes > 1:
        remedies.append(
            _remedy(
                "--kv-cache-dtype fp8",
                replace(req, kv_cache_dtype="fp8"),
                f"1 B a KV element, not {result.kv_dtype_bytes}: "
                f"{result.kv_bytes_per_token // result.kv_dtype_bytes:,} B a token",
            )
        )
    if req.kv_cache_memory_bytes is not None:
        wanted = result.needed_bytes + result.bytes_per_block  # one request, and the null block
        remedies.append(
            _remedy(
                f"--kv-cache-memory-bytes {wanted}",
                replace(req, kv_cache_memory_bytes=wanted),
                f"{readable_bytes(wanted)} of KV memory: one request and the null block",
            )
        )
    else:
        utilization = _utilization(result)
        if utilization is not None:
            remedies.append(utilization)
    # Each rank's weights computed from the geometry (what each loads is known), its KV memory the GPU's
    if req.weights_bytes is None and req.kv_cache_memory_bytes is None:
        parallel = _tensor_parallel(result)
        if parallel is not None:
            remedies.append(parallel)
    return tuple(remedies)


def _remedy(flag: str, request: VllmPlanRequest, what: str) -> StartRemedy:
    again = plan_vllm(request)
    starts = again.starts
    length = request.max_model_len if starts else (again.estimated_max_model_len or 0)
    if starts:
        said = (
            f"{what}; {again.num_blocks:,} blocks, one request of {request.max_model_len:,} tokens needs "
            f"{readable_bytes(again.needed_bytes)} of {readable_bytes(again.check_bytes)}: starts"
        )
    elif length:
        said = f"{what}; {again.num_blocks:,} blocks: still refused, the longest max_model_len {length:,}"
    else:
        said = f"{what}: still refused, not one block fits"
    return StartRemedy(flag, starts, again.num_blocks, length, said)


def _utilization(result: VllmPlan) -> StartRemedy | None:
    """The smallest gpu_memory_utilization, in hundredths, that starts the plan, up to MAX_UTILIZATION."""
    req = result.request
    short = result.needed_bytes - result.check_bytes  # bytes the pool lacks
    first = math.ceil((req.gpu_memory_utilization + short / req.gpu_memory_bytes) * 100 - 1e-9) / 100
    utilization = max(first, round(req.gpu_memory_utilization + 0.01, 2))
    while utilization <= MAX_UTILIZATION + 1e-9:
        remedy = _remedy(
            f"--gpu-memory-utilization {utilization:g}",
            replace(req, gpu_memory_utilization=utilization),
            f"{readable_bytes(math.ceil(req.gpu_memory_bytes * utilization))} of the GPU, not "
            f"{readable_bytes(math.ceil(req.gpu_memory_bytes * req.gpu_memory_utilization))}",
        )
        if remedy.starts:
            return remedy
        utilization = round(utilization + 0.01, 2)
    return None


def _tensor_parallel(result: VllmPlan) -> StartRemedy | None:
    """The fewest GPUs of tensor parallelism that start the plan, each the GPU planned."""
    req = result.request
    geom = req.geometry
    for size in TENSOR_PARALLEL_SIZES:
        if size <= req.tensor_parallel_size:
            continue
        refused = tensor_parallel_refusal(
            geom.num_attention_heads, geom.num_kv_heads, size, geom.mla is not None
        )
        if refused is not None:
            return None
        again = plan_vllm(replace(req, tensor_parallel_size=size))
        if again.starts:
            what = (
                f"{size} GPUs of {readable_bytes(req.gpu_memory_bytes)}, each holding "
                f"{readable_bytes(again.weights_bytes or 0)} of weights and {again.kv_bytes_per_token:,} B "
                "of KV a token"
            )
            return _remedy(f"--tensor-parallel-size {size}", replace(req, tensor_parallel_size=size), what)
    return None
