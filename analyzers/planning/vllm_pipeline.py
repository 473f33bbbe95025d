"""`kvtrace plan --engine vllm --pipeline-parallel-size N`: each stage's worker, as vLLM sizes it.

Under pipeline parallelism (read in vllm 0.32: `vllm/distributed/utils.py` `get_pp_indices`,
`vllm/v1/core/kv_cache_utils.py` `get_kv_cache_configs`) every stage's worker holds the weights and the KV of
its own decoder layers only:

1. the layers split evenly, the remainder going one each to the stages before the last, counted from the
   last but one backwards (`VLLM_PP_LAYER_PARTITION` sets the split by hand): 80 layers over 3 stages are
   27, 27 and 26;
2. the first stage holds the token embedding, the last the final norm and the lm_head (a tied lm_head is
   the embedding again, loaded there too), each rank of a stage its share as vLLM splits it
   (`vllm_rank_weights`: the vocabulary padded, the norms whole);
3. each worker profiles its own memory, so its KV space is its GPU's share less its own weights, and one
   block of its pool is a page of each of its own layers;
4. vLLM checks, worker by worker in stage order, that one request of max_model_len fits beside the null
   block (the first that fails stops the start), then keeps on every worker the fewest blocks of any.

So the stage with the most layers, or the embedding's, decides the pool: `binding_stage` says which one
binds. A hybrid model's (sliding + full layers) groups are formed over the whole model and projected onto each
worker, every group kept, some with fewer layers there: vLLM deals each kind's layers out to its groups in
turn (`layers[i::groups]`, so that each stage's share of a group stays even), and a worker's block is a page
of each layer of its largest projected group (`stage_block_layers`); a request still takes blocks in every
group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from analyzers.engine_stages import layer_text
from analyzers.planning.presets import ModelGeometry, dtype_bytes_for
from analyzers.planning.vllm_rank_weights import padded_vocab, rank_end_params, rank_layer_params
from analyzers.planning.vllm_specs import KvGroups, available_kv_bytes, check_memory_bytes, num_blocks
from kvtrace.errors import KvtraceError

if TYPE_CHECKING:
    from analyzers.planning.vllm_plan import VllmPlanRequest

__all__ = [
    "VllmStage",
    "binding_stage",
    "layer_range_text",
    "pipeline_note",
    "plan_stages",
    "stage_block_layers",
    "stage_layer_counts",
    "stage_weight_bytes",
    "stage_weights_bytes",
]


@dataclass(frozen=True)
class VllmStage:
    """One pipeline stage's worker (each of its tensor-parallel ranks alike)."""

    stage: int
    first_layer: int
    layers: int  # decoder layers, all holding KV
    block_layers: int  # pages in one block of this worker's pool: its layers, or its largest group's share
    weights_bytes: int | None  # None: unknown and not needed (kv_cache_memory_bytes sizes the pool)
    available_kv_bytes: int
    bytes_per_block: int
    num_blocks: int  # what its own memory gives, before vLLM keeps the fewest of all stages
    needed_bytes: int  # one request of max_model_len
    check_bytes: int  # available less the null block

    @property
    def starts(self) -> bool:
        return self.check_bytes > 0 and self.needed_bytes <= self.check_bytes


def stage_layer_counts(
    num_layers: int, pipeline_parallel_size: int, partition: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """Decoder layers of each stage, as vLLM's `get_pp_indices` splits them (`partition`: the
    VLLM_PP_LAYER_PARTITION it reads instead, checked as vLLM checks it)."""
    size = pipeline_parallel_size
    if partition is not None:
        if len(partition) != size:
            raise KvtraceError(
                f"the layer partition {','.join(map(str, partition))} has {len(partition)} stages, not the "
                f"pipeline parallel size {size}"
            )
        if sum(partition) != num_layers or min(partition) < 1:
            raise KvtraceError(
                f"the layer partition {','.join(map(str, partition))} must give each stage at least one "
                f"layer and add up to the model's {num_layers}"
            )
        return partition
    if num_layers < size:
        raise KvtraceError(
            f"pipeline parallel size {size} is more than the model's {num_layers} layers: a stage would "
            "hold none"
        )
    counts = [num_layers // size] * size
    for back in range(2, num_layers % size + 2):  # the remainder: the last but one stage, then backwards
        counts[-back] += 1
    return tuple(counts)


def stage_block_layers(geom: ModelGeometry, groups: KvGroups, counts: tuple[int, ...]) -> tuple[int, ...]:
    """Pages in one block of each stage's worker: all its layers where every layer is of one kind; for a
    hybrid model, the most layers any of vLLM's groups has on that stage (`_get_kv_cache_groups_uniform_
    page_size` deals each kind's layers, in order, to its groups in turn; `_get_kv_cache_bytes_per_block`
    takes the largest group's pages)."""
    if groups.kind != "hybrid":
        return counts
    slides = geom.layer_slides
    if slides is None or len(slides) != geom.num_layers:
        raise KvtraceError(
            f"{geom.name}: which of its layers slide is not known (its config gives no layer_types), and "
            "vLLM's groups under pipeline parallelism depend on it: give --config PATH with layer_types"
        )
    stage_of = [stage for stage, count in enumerate(counts) for _ in range(count)]
    largest = [0] * len(counts)
    for kind in (False, True):
        layers = [layer for layer, slides_ in enumerate(slides) if slides_ is kind]
        dealt = math.ceil(len(layers) / groups.layers_per_group)
        for group in range(dealt):
            held = [0] * len(counts)
            for layer in layers[group::dealt]:
                held[stage_of[layer]] += 1
            largest = [max(a, b) for a, b in zip(largest, held, strict=True)]
    return tuple(largest)


def stage_weights_bytes(
    geom: ModelGeometry, counts: tuple[int, ...], model_dtype: str, tensor_parallel_size: int
) -> tuple[int, ...]:
    """Each stage's weights on one of its tensor-parallel ranks (`stage_weight_bytes`)."""
    return tuple(
        stage_weight_bytes(geom, stage, len(counts), count, model_dtype, tensor_parallel_size)
        for stage, count in enumerate(counts)
    )


def stage_weight_bytes(
    geom: ModelGeometry, stage: int, stages: int, count: int, model_dtype: str, tensor_parallel_size: int
) -> int:
    """Stage `stage`'s weights, holding `count` layers, on one of its tensor-parallel ranks, as vLLM loads
    them (`vllm_rank_weights`): those layers' share of the rank's layer parameters (in proportion to their
    count: exact where the layers are alike, as Llama's), the first stage's embedding, the last stage's
    final norm and lm_head (the embedding's rows again when tied)."""
    embedding, final_norm, lm_head = rank_end_params(geom, tensor_parallel_size)
    held = rank_layer_params(geom, tensor_parallel_size) * count // geom.num_layers
    if geom.tie_word_embeddings and stages > 1:  # the last stage loads its own copy to tie it to
        rows = math.ceil(padded_vocab(geom.vocab_size) / tensor_parallel_size)
        lm_head += rows * (geom.embedding_size or geom.hidden_size)
    if stage == 0:
        held += embedding
    if stage == stages - 1:
        held += final_norm + lm_head
    return dtype_bytes_for(model_dtype, held)


def binding_stage(stages: tuple[VllmStage, ...]) -> VllmStage:
    """The stage whose figures the plan shows: the first that vLLM's start check refuses (it stops
    there), else the one with the fewest blocks (the pool every worker keeps)."""
    refused = [s for s in stages if not s.starts]
    return refused[0] if refused else min(stages, key=lambda s: (s.num_blocks, s.stage))


def layer_range_text(stage: VllmStage) -> str:
    """The stage's layers as `engine_stages.layer_text` writes a run's: `27-53`."""
    return layer_text(list(range(stage.first_layer, stage.first_layer + stage.layers)))


def plan_stages(
    req: VllmPlanRequest,
    page: int,
    groups: KvGroups,
    per_request: int,
    memory: int | None,
    sized: bool,
) -> tuple[VllmStage, ...]:
    """Each stage's worker sized as vLLM sizes it: its own weights out of its own memory (or the same
    kv_cache_memory_bytes on every worker), a block a page of each of its own layers."""
    geom = req.geometry
    if geom.layers_with_kv != geom.num_layers:
        raise KvtraceError(
            f"{geom.name}: pipeline parallelism of a model with layers that hold no KV (linear attention, "
            "shared KV) is not planned"
        )
    counts = stage_layer_counts(geom.num_layers, req.pipeline_parallel_size, req.pp_layer_partition)
    pages = stage_block_layers(geom, groups, counts)
    weights: tuple[int | None, ...]
    if req.stage_weights_bytes is not None:
        if len(req.stage_weights_bytes) != len(counts):
            raise KvtraceError(
                f"{len(req.stage_weights_bytes)} stages' weights for a pipeline of {len(counts)} stages"
            )
        weights = req.stage_weights_bytes
    elif sized and req.weights_bytes is None:
        weights = stage_weights_bytes(geom, counts, req.model_dtype, req.tensor_parallel_size)
    else:  # weights typed for the whole model on one GPU cannot be split by stage without the geometry
        weights = (None,) * len(counts) if req.weights_bytes is None else (req.weights_bytes,) * len(counts)
    stages = []
    first = 0
    for stage, (count, held, block_layers) in enumerate(zip(counts, weights, pages, strict=True)):
        block_bytes = page * block_layers
        if req.num_gpu_blocks_override is not None:
            available = req.num_gpu_blocks_override * block_bytes
        elif req.kv_cache_memory_bytes is not None or held is None:
            assert memory is not None
            available = memory
        else:
            extra = req.buffers_bytes if req.stage_weights_bytes is None else 0
            available = available_kv_bytes(
                req.gpu_memory_bytes,
                req.gpu_memory_utilization,
                held + extra,
                req.activation_peak_bytes,
                req.non_torch_bytes,
            )
        stages.append(
            VllmStage(
                stage=stage,
                first_layer=first,
                layers=count,
                block_layers=block_layers,
                weights_bytes=held,
                available_kv_bytes=available,
                bytes_per_block=block_bytes,
                num_blocks=num_blocks(available, block_bytes, 1) if available > 0 else 0,
                needed_bytes=per_request * block_bytes,
                check_bytes=check_memory_bytes(available, block_bytes),
            )
        )
        first += count
    return tuple(stages)


def pipeline_note(stages: tuple[VllmStage, ...], bound: VllmStage, req: VllmPlanRequest) -> str:
    """Which stage's worker the figures are, and why."""
    counts = [str(s.layers) for s in stages]
    split = f"{', '.join(counts[:-1])} and {counts[-1]}"
    how = "the split given" if req.pp_layer_partition is not None else "vLLM's even split"
    if not bound.starts:
        why = "the first whose start check fails: vLLM stops there"
    else:
        why = f"the fewest blocks, {bound.num_blocks:,}, which vLLM keeps on every stage"
    geom = req.geometry
    if req.stage_weights_bytes is not None:
        weights = "; each stage's weights as the run measured them"
    elif req.weights_bytes is not None:
        weights = "; the weights typed taken as each stage's worker's"
    elif geom.layer_shapes is not None or geom.moe_layers not in (0, geom.num_layers):
        weights = "; its layers differ, so their weights are split in proportion to their count (an estimate)"
    else:
        weights = ""
    if req.kv_cache_memory_bytes is None and req.num_gpu_blocks_override is None:
        weights += (
            "; the activation peak is taken alike for every stage (vLLM's last stage also profiles its "
            "sampler over max_num_seqs rows of the vocabulary: more there)"
        )
    return (
        f"pipeline parallel {len(stages)}: {split} layers on its stages ({how}); each stage's worker "
        f"holds its own layers' KV and weights (the first the embedding, the last the lm_head){weights}; the "
        f"figures are stage {bound.stage}'s (layers {layer_range_text(bound)}), {why}"
    )
