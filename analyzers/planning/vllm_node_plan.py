"""`kvtrace plan --engine vllm --from-run RUN` of a CPU start vLLM refused for its memory node's lack. Pure.

vLLM's CPU worker (`CPUWorker.determine_available_memory`) refuses a KV space larger than its memory node has
free, or none at all, before any block is counted (kvtrace.integrations.vllm_node_refusal records both
figures). The plan's arithmetic sizes a pool from the KV space alone, so without this check it printed the
blocks of the space asked (17 billion of them, for a 1 PiB ask) as if vLLM would start. The node's free
memory as recorded at the refusal is the ceiling: a KV space above it is refused in the words of `kvtrace
diagnose` (analyzers.planning.vllm_node_refused), which sizes the space worth asking.
"""

from __future__ import annotations

from dataclasses import replace

from analyzers.planning.vllm_plan import VllmPlan, readable_bytes

__all__ = ["with_node_memory"]


def with_node_memory(plan: VllmPlan, node_free_bytes: int, node: int | None, run: str) -> VllmPlan:
    """The plan, refused where its KV space (`available_kv_bytes`, kv_cache_memory_bytes on CPU) is none or
    more than the `node_free_bytes` memory node `node` had free when vLLM refused `run`; the free memory is
    kept in `node_free_bytes` either way. A num_gpu_blocks_override does not spare the check: the worker
    measures the space before the override replaces it."""
    asked = plan.request.kv_cache_memory_bytes
    if asked is None:
        asked = plan.available_kv_bytes
    plan = replace(plan, node_free_bytes=node_free_bytes)
    if 0 < asked <= node_free_bytes:
        return plan
    where = f"memory node {node}" if node is not None else "the memory node"
    free = f"the {readable_bytes(node_free_bytes)} {where} had free when {run} was refused"
    if asked <= 0:
        why = f"gpu_memory_utilization of the node, less what the process held, left no KV space of {free}"
    else:
        why = f"the KV pool asked ({readable_bytes(asked)}) is more than {free}"
    reason = (
        f'{why} (its CPU worker: "less than requested memory for kv"); that free memory holds at most '
        f"{node_free_bytes // plan.bytes_per_block:,} blocks of {readable_bytes(plan.bytes_per_block)}, "
        f"kv_cache_memory_bytes={node_free_bytes} at most; `kvtrace diagnose {run}` sizes the pool "
        "worth asking"
    )
    return replace(plan, starts=False, refusals=(*plan.refusals, reason))
