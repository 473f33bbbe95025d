"""More GPUs for vLLM's KV: the tensor- and pipeline-parallel sizes vLLM takes for a recorded model, and the
bytes of one block of the pool on each worker under them. Pure: reads engine.json's model and config.

Every worker is given the same KV memory (kv_cache_memory_bytes is per worker) and keeps the same block
ids, so a split that shrinks each worker's block gives every worker more blocks in the same memory:

* `tensor_parallel_size`: each rank holds `max(1, kv_heads // tp)` KV heads of every layer, the sizes
  vLLM accepts only (`tensor_parallel_refusal`: whole attention heads a rank, whole KV heads or even
  replicas of them), so a block is that many heads' pages;
* `pipeline_parallel_size`: each stage's worker holds a page of its own layers a block, split as vLLM
  splits them (`stage_layer_counts`), and the widest stage, the fewest blocks, decides. Not offered where
  the run already has stages (its engine.json is the first stage's), its layers are grouped by kind (a
  hybrid model's groups are projected onto each stage otherwise) or a speculative drafter shares the pool.

`num_gpu_blocks_override` fixes the blocks on each worker whatever its memory or its block's bytes, so
neither split gives it more (`override_keeps_blocks`). The diagnoses of a refused start
(analyzers.planning.vllm_refused) and of a run that preempted (analyzers.planning.vllm_preempt_parallel)
each ask their own question of these splits: one request of max_model_len, or the run's demand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from analyzers.engine import EngineInfo, draft_kv_layers
from analyzers.engine_stages import pipeline_size
from analyzers.planning.vllm_pipeline import stage_layer_counts
from analyzers.planning.vllm_plan import kv_heads_per_worker, page_size_bytes, tensor_parallel_refusal

__all__ = [
    "PP_CHOICES",
    "TP_CHOICES",
    "WorkerSplit",
    "heads_page_bytes",
    "override_keeps_blocks",
    "pipeline_parallel_splits",
    "smallest_split",
    "tensor_parallel_splits",
]

TP_CHOICES = (2, 4, 8, 16)
PP_CHOICES = (2, 4, 8)


@dataclass(frozen=True)
class WorkerSplit:
    """One size of a parallel knob and what each worker then holds of a block."""

    knob: str  # "tensor_parallel_size" | "pipeline_parallel_size"
    size: int
    block_bytes: int  # one block of the pool on each worker (the widest stage's under pipeline parallelism)
    split: str  # in words: "splits the 2 KV heads over 2 GPUs"

    @property
    def setting(self) -> str:
        return f"{self.knob}={self.size}"


def tensor_parallel_splits(
    num_attention_heads: int, num_kv_heads: int, tp_now: int, page_bytes: Callable[[int], int]
) -> tuple[WorkerSplit, ...]:
    """Each tensor_parallel_size above the run's `tp_now` that vLLM accepts for the model's heads, smallest
    first; `page_bytes(kv heads a rank)`: the bytes of a block on a rank holding that many heads."""
    splits = []
    for tp in TP_CHOICES:
        if tp <= tp_now or tensor_parallel_refusal(num_attention_heads, num_kv_heads, tp) is not None:
            continue
        heads = kv_heads_per_worker(num_kv_heads, tp)
        kv = f"{num_kv_heads} KV head{'s' * (num_kv_heads > 1)}"
        split = (
            f"splits the {kv} over {tp} GPUs"
            if tp <= num_kv_heads
            else f"replicates the {kv} over {tp} GPUs, {heads} on each"
        )
        splits.append(WorkerSplit("tensor_parallel_size", tp, page_bytes(heads), split))
    return tuple(splits)


def heads_page_bytes(head_dim: int, element: int, block_size: int, block_layers: int) -> Callable[[int], int]:
    """`page_bytes` for `tensor_parallel_splits`: `block_layers` pages of a layer's heads, K and V."""
    return lambda heads: page_size_bytes(heads, head_dim, element, block_size) * block_layers


def pipeline_parallel_splits(
    info: EngineInfo, hybrid: bool, layer_page: int
) -> tuple[WorkerSplit, ...] | None:
    """Each pipeline_parallel_size of `PP_CHOICES` up to the model's layers, smallest first, a block on each
    worker `layer_page` bytes (one layer's page) times the widest stage's layers; None where it is not
    offered (the module docstring): the run already has stages, `hybrid` layer groups, or a drafter."""
    layers = info.model.get("num_layers")
    if pipeline_size(info) > 1 or hybrid or draft_kv_layers(info.model):
        return None
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 2:
        return None
    splits = []
    for stages in (s for s in PP_CHOICES if s <= layers):
        widest = max(stage_layer_counts(layers, stages))
        splits.append(
            WorkerSplit(
                "pipeline_parallel_size",
                stages,
                layer_page * widest,
                f"puts at most {widest} of the {layers} layers on each GPU",
            )
        )
    return tuple(splits)


def smallest_split(splits: Iterable[WorkerSplit], fits: Callable[[WorkerSplit], bool]) -> WorkerSplit | None:
    """The first (smallest) of `splits` that `fits`, None if none does."""
    return next((split for split in splits if fits(split)), None)


def override_keeps_blocks(override: int, pipeline: bool) -> tuple[tuple[str, str], ...]:
    """(knob, why it gives no block more) of each split under num_gpu_blocks_override: tensor parallelism,
    and pipeline parallelism where offered (`pipeline`)."""
    knobs = (("tensor_parallel_size", "the KV heads"), ("pipeline_parallel_size", "the layers"))
    return tuple(
        (
            knob,
            f"{knob}: splitting {what} shrinks each GPU's blocks, but num_gpu_blocks_override={override} "
            f"keeps {override:,} blocks on each.",
        )
        for knob, what in knobs[: 1 + pipeline]
    )
