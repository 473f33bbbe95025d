"""More GPUs for a vLLM run that preempted: the smallest tensor_parallel_size and pipeline_parallel_size
whose workers hold, in the same KV memory each, the blocks that avoid every preemption. Pure.

A request takes as many blocks whatever the split (a block is its tokens' KV on that worker: fewer KV heads
under tensor parallelism, fewer layers under pipeline parallelism), so the demand in blocks is the run's
(analyzers.planning.vllm_pool_demand); each worker is given the same kv_cache_memory_bytes (or, where vLLM
sized the pool by the memory it profiled, this run's pool: the weights that the split moves off each GPU
leave more) and vLLM keeps on every worker the fewest blocks of any: that memory over the largest worker's
block (analyzers.planning.vllm_parallel). The costliest change of all (more GPUs), so the diagnosis lists
these after the knobs of the same GPU.

Not priced where the run's block is not whole pages of its recorded geometry (a model whose pages vLLM
pads or widens); `pipeline_parallel_size` left out where vllm_parallel does not offer it, and said unknown
where layers slide: each stage keeps a batch in flight, which a sliding layer holds beside its window and
this run's demand does not count. `tensor_parallel_size` is said unknown where a speculative drafter's
layers share the pool: how vLLM splits a drafter's heads is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from analyzers.engine import EngineRun, draft_kv_layers
from analyzers.planning.vllm_parallel import (
    TP_CHOICES,
    WorkerSplit,
    heads_page_bytes,
    override_keeps_blocks,
    pipeline_parallel_splits,
    tensor_parallel_splits,
)
from analyzers.planning.vllm_plan import page_size_bytes, readable_bytes
from analyzers.planning.vllm_pool_demand import NULL_BLOCKS, PoolDemand
from analyzers.planning.vllm_refused import VllmRemedy, engine_geometry
from analyzers.planning.vllm_specs import KvGroups
from kvtrace.errors import KvtraceError

__all__ = ["WorkerPool", "parallel_remedies"]

_FREED = {
    "tensor_parallel_size": "sharded weights free more",
    "pipeline_parallel_size": "the weights split over the stages free more",
}


@dataclass(frozen=True)
class WorkerPool:
    """The run's pool as each of its workers holds it: the KV memory every worker is given and the bytes of
    a block on the worker with the largest one (the widest pipeline stage's)."""

    memory_bytes: int
    block_bytes: int
    block_size: int


def parallel_remedies(
    run: EngineRun, groups: KvGroups, demand: PoolDemand, pool: WorkerPool
) -> list[VllmRemedy]:
    """tensor_parallel_size, then pipeline_parallel_size where offered (the module docstring); none where
    the run's block is not whole pages of its geometry."""
    info = run.info
    override = info.config.get("num_gpu_blocks_override")
    geometry = _page_geometry(run, pool)
    if geometry is None:
        return []
    layer_page = geometry[0]
    staged = pipeline_parallel_splits(info, groups.kind == "hybrid", layer_page)
    if override:  # the override is each worker's blocks, whatever their bytes
        offered = staged is not None
        return [
            VllmRemedy(knob, None, False, why) for knob, why in override_keeps_blocks(int(override), offered)
        ]
    remedies = [_tensor_parallel(run, demand, pool, geometry)]
    if staged is not None:
        stages = _smallest(staged, demand, pool)
        if groups.sliding_groups and stages.fits:
            stages = _rerun_to_know(
                stages,
                "each stage keeps a batch in flight, which a sliding layer holds beside its window and this "
                "run's demand does not count",
            )
        remedies.append(stages)
    return remedies


def _page_geometry(run: EngineRun, pool: WorkerPool) -> tuple[int, int, int] | None:
    """(one layer's page on the run's workers, head_dim, KV element bytes) where the run's block is whole
    pages of engine.json's geometry (its KV heads a worker); None otherwise."""
    try:
        _, heads, head_dim, element = engine_geometry(run)
    except KvtraceError:  # a model without its geometry: the splits cannot be priced
        return None
    page = page_size_bytes(heads, head_dim, element, pool.block_size)
    if pool.block_bytes <= 0 or pool.block_bytes % page:
        return None
    return page, head_dim, element


def _rerun_to_know(remedy: VllmRemedy, why: str) -> VllmRemedy:
    """`remedy`, which would avoid every preemption, said unknown: `why` it may not."""
    rerun = f"rerun with {remedy.knob}={remedy.setting} to know."
    return replace(remedy, fits=None, sentence=f"{remedy.sentence} But {why}: {rerun}")


def _tensor_parallel(
    run: EngineRun, demand: PoolDemand, pool: WorkerPool, geometry: tuple[int, int, int]
) -> VllmRemedy:
    model, config = run.info.model, run.info.config
    kv_heads = int(model["num_kv_heads"])
    attention_heads = int(model.get("num_attention_heads") or kv_heads)
    tp_now = int(config.get("tensor_parallel_size") or 1)
    layer_page, head_dim, element = geometry
    block_layers = pool.block_bytes // layer_page
    splits = tensor_parallel_splits(
        attention_heads, kv_heads, tp_now, heads_page_bytes(head_dim, element, pool.block_size, block_layers)
    )
    if not splits:
        sizes = ", ".join(map(str, TP_CHOICES))
        return VllmRemedy(
            "tensor_parallel_size",
            None,
            False,
            f"tensor_parallel_size: vLLM takes none of {sizes} above the run's {tp_now} for the "
            f"{attention_heads} attention and {kv_heads} KV heads.",
        )
    remedy = _smallest(splits, demand, pool)
    if remedy.fits and draft_kv_layers(model):
        return _rerun_to_know(
            remedy,
            "a speculative drafter's layers share the pool, whose heads the split is not priced for here",
        )
    return remedy


def _smallest(splits: tuple[WorkerSplit, ...], demand: PoolDemand, pool: WorkerPool) -> VllmRemedy:
    """The smallest split whose workers' pool avoids every preemption; else the smallest that may (holding the
    recorded schedule's demand, or, the run having shared blocks, the most blocks), said unknown; else none,
    with the most blocks any split gives."""
    priced = []
    for split in splits:
        blocks = pool.memory_bytes // split.block_bytes
        fits, verdict = demand.verdict(blocks, split.setting)
        priced.append((split, blocks, fits, _sentence(split, blocks, verdict, demand, pool)))
    for split, _, fits, sentence in priced:
        if fits:
            return VllmRemedy(split.knob, split.size, True, sentence)
    unknown = [p for p in priced if p[2] is None]
    if unknown:
        split, _, _, sentence = min(
            unknown,
            key=lambda p: (
                (0, p[0].size) if p[1] - NULL_BLOCKS >= demand.recorded_peak else (1, -p[1], p[0].size)
            ),
        )
        return VllmRemedy(split.knob, split.size, None, sentence)
    split, _, _, sentence = max(priced, key=lambda p: (p[1], -p[0].size))
    return VllmRemedy(
        split.knob,
        None,
        False,
        f"{split.knob}: no size vLLM takes avoids every preemption. The most: {sentence}",
    )


def _sentence(split: WorkerSplit, blocks: int, verdict: str, demand: PoolDemand, pool: WorkerPool) -> str:
    return (
        f"{split.setting} {split.split}: a block is {readable_bytes(split.block_bytes)} on each, so the "
        f"same {readable_bytes(pool.memory_bytes)} of KV memory per GPU ({_FREED[split.knob]}) holds "
        f"{blocks:,} blocks ({max(blocks - NULL_BLOCKS, 0):,} usable; this run's requests need "
        f"{demand.bound:,} together at most), which {verdict}"
    )
