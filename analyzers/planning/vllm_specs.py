"""What one request takes of vLLM's KV pool, layer kind by layer kind: full attention and sliding windows.

vLLM (V1, read in vllm 0.32) gives each attention layer a KV cache spec (`vllm/v1/kv_cache_interface.py`)
and groups the layers into KV cache groups that share one pool of blocks (`vllm/v1/core/kv_cache_utils.py`,
`get_kv_cache_groups`). A block of the pool is one page of every layer of the widest group, and a request
takes blocks in every group:

* `FullAttentionSpec`: `cdiv(max_model_len, block_size)` blocks;
* `SlidingWindowSpec` (`max_admission_blocks_per_request`): blocks for the last `window - 1` tokens plus
  the tokens scheduled but not yet settled (`VllmConfig.max_in_flight_tokens`: `max_num_batched_tokens` a
  batch, two batches in flight under async scheduling, vLLM's default on GPU, one on CPU), never more than
  `max_model_len`, plus one block because the window need not start at a block's first token:
  `cdiv(min(window - 1 + in_flight, max_model_len), block_size) + 1`. Past `max_model_len` that is one block
  MORE than full attention: a sliding model saves only when the window and the batch are short.

Every layer alike (all full, or all sliding over one window): one group of all layers. A hybrid model (some
layers slide, the others attend to everything) under the hybrid KV cache manager (vLLM's default wherever it
is supported) is split into groups of equal size (`_get_kv_cache_groups_uniform_page_size`): the size is
the smaller kind's count of layers (the larger's when it is under 1.5 times the smaller), each kind cut into
`cdiv(count, size)` groups, so a request takes the full blocks once per full group and the sliding blocks
once per sliding group, and a block is `size` pages. That holds where every layer's page is the same size;
layers of other widths (Gemma 4's full layers) are not modelled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from analyzers.engine import draft_kv_layers
from analyzers.planning.presets import ModelGeometry

__all__ = [
    "KvGroups",
    "available_kv_bytes",
    "blocks_per_request",
    "check_memory_bytes",
    "default_max_num_batched_tokens",
    "engine_kv_groups",
    "full_blocks",
    "kv_groups",
    "max_concurrent_batches",
    "model_kv_groups",
    "num_blocks",
    "sliding_blocks",
    "sliding_blocks_held",
    "sliding_peak_blocks",
]

GIB = 2**30


def full_blocks(max_model_len: int, block_size: int) -> int:
    """`FullAttentionSpec.max_memory_usage_bytes` in pages: every token of the longest request."""
    return math.ceil(max_model_len / block_size)


def sliding_blocks(window: int, block_size: int, max_in_flight_tokens: int, max_model_len: int) -> int:
    """`SlidingWindowSpec.max_admission_blocks_per_request`: the window's last `window - 1` tokens and the
    tokens in flight, at most max_model_len, plus the block the window may start inside."""
    return math.ceil(min(window - 1 + max_in_flight_tokens, max_model_len) / block_size) + 1


def sliding_blocks_held(slots: int, window: int, block_size: int, lag: int = 0) -> int:
    """Blocks a sliding layer's request holds, in the pool, once a decode step gave it `slots` tokens' KV
    slots: vLLM's `remove_skipped_blocks` has freed (to its null block) the whole blocks before the window of
    the settled tokens, `slots - 1 - lag` (`lag`: tokens still in flight, one under async scheduling)."""
    skipped = max(0, slots - 1 - lag - window + 1) // block_size
    return math.ceil(slots / block_size) - skipped


def sliding_peak_blocks(
    prompt: int, final: int, window: int, block_size: int, lag: int, admission: int
) -> int:
    """The most blocks a sliding layer's request of `prompt` tokens, grown to `final` KV tokens, holds at
    once when never preempted: its prefill (all of the prompt at most, never more than vLLM's admission cap
    `admission`: its window and a batch in flight), then each decode step (`sliding_blocks_held`). Past the
    window the held count repeats every block, so one block's worth of steps finds the most."""
    peak = min(math.ceil(min(prompt, final) / block_size), admission)
    lo, hi = prompt + 1, final
    if lo > hi:
        return peak
    edge = min(hi, window + lag)  # up to here nothing is skipped: the count only grows
    if edge >= lo:
        peak = max(peak, sliding_blocks_held(edge, window, block_size, lag))
    start = max(lo, window + lag + 1)
    for slots in range(start, min(hi, start + block_size - 1) + 1):
        peak = max(peak, sliding_blocks_held(slots, window, block_size, lag))
    return peak


def num_blocks(available_bytes: int, page_size: int, num_layers: int) -> int:
    """`get_num_blocks`: whole blocks of every layer that fit."""
    return max(int(available_bytes // page_size // num_layers), 0)


def check_memory_bytes(available_bytes: int, bytes_per_block: int) -> int:
    """What vLLM's start check compares one request with: the available memory less the null block."""
    return available_bytes - bytes_per_block


def available_kv_bytes(
    total_bytes: int,
    gpu_memory_utilization: float,
    weights: int,
    activation_peak: int,
    non_torch: int,
) -> int:
    """What the GPU worker leaves for KV (`Worker.determine_available_memory`): `requested_memory`
    (`ceil(total * gpu_memory_utilization)`) minus `non_kv_cache_memory`, which vLLM measures as what the
    process consumed (weights and memory outside torch) plus the transient peak of the profile run
    (activations; CUDA graphs too when VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS is set)."""
    requested = math.ceil(total_bytes * gpu_memory_utilization)
    return requested - (weights + activation_peak + non_torch)


def max_concurrent_batches(
    async_scheduling: bool, pipeline_parallel_size: int = 1, device: str = "cuda"
) -> int:
    """`VllmConfig.max_concurrent_batches`: a pipeline keeps a batch in each stage, and async scheduling
    overlaps one more under the V2 model runner (vLLM 0.32's default where Triton runs: GPUs; the CPU build
    runs the V1 runner, which overlaps two batches only without pipeline parallelism)."""
    if async_scheduling and device != "cpu":
        return pipeline_parallel_size + 1
    if async_scheduling and pipeline_parallel_size <= 1:
        return 2
    return pipeline_parallel_size


def default_max_num_batched_tokens(
    device: str, gpu_memory_bytes: int, max_model_len: int, tensor_parallel_size: int = 1
) -> int:
    """vLLM 0.32's default for `LLM(...)` (`EngineArgs.get_batch_defaults`, usage context LLM_CLASS): on CPU
    4096 per rank; on a GPU of 70 GiB or more 16384 (A100s excepted: 8192, which this cannot tell), else
    8192; never more than max_num_seqs (its own default: 256 per CPU rank, 1024 or 256 on GPU) times
    max_model_len. The API server's defaults are lower (2048 on CPU and small GPUs, 8192 on large ones)."""
    if device == "cpu":
        tokens, seqs = 4096 * tensor_parallel_size, 256 * tensor_parallel_size
    elif gpu_memory_bytes >= 70 * GIB:
        tokens, seqs = 16384, 1024
    else:
        tokens, seqs = 8192, 256
    return min(seqs * max_model_len, tokens)


@dataclass(frozen=True)
class KvGroups:
    """The KV cache groups of a model as vLLM forms them. `layers_per_group` pages make one block of the
    pool; a request takes `full_groups` times the full blocks and `sliding_groups` times the sliding ones."""

    kind: str  # "full" | "sliding" | "hybrid"
    layers_per_group: int
    full_groups: int
    sliding_groups: int
    window: int | None  # the sliding layers' window, None when none slides
    padding_layers: int  # groups' slots no layer fills (vLLM warns "Add N padding layers")


def kv_groups(num_layers: int, sliding_layers: int, window: int | None) -> KvGroups:
    """vLLM's grouping of `num_layers` attention layers of which `sliding_layers` slide over `window`."""
    if window is None or sliding_layers <= 0:
        return KvGroups("full", num_layers, 1, 0, None, 0)
    full = num_layers - sliding_layers
    if full <= 0:
        return KvGroups("sliding", num_layers, 0, 1, window, 0)
    smaller, larger = min(full, sliding_layers), max(full, sliding_layers)
    size = larger if larger < smaller * 1.5 else smaller
    full_groups, sliding_groups = math.ceil(full / size), math.ceil(sliding_layers / size)
    padding = (full_groups + sliding_groups) * size - num_layers
    return KvGroups("hybrid", size, full_groups, sliding_groups, window, padding)


def blocks_per_request(
    groups: KvGroups, block_size: int, max_model_len: int, max_in_flight_tokens: int
) -> int:
    """Blocks of the pool one request of `max_model_len` tokens may hold, all groups together (vLLM's
    `_max_memory_usage_bytes_from_groups` over the bytes of a block; its concurrency's divisor)."""
    blocks = groups.full_groups * full_blocks(max_model_len, block_size)
    if groups.sliding_groups:
        assert groups.window is not None
        blocks += groups.sliding_groups * sliding_blocks(
            groups.window, block_size, max_in_flight_tokens, max_model_len
        )
    return blocks


def engine_kv_groups(model: dict[str, Any], config: dict[str, Any]) -> tuple[KvGroups, int]:
    """(groups, tokens in flight) of a recorded engine.json's `model` and `config`: its `sliding_window` and
    `sliding_layers` (None: every layer), its max_num_batched_tokens and async_scheduling (not recorded:
    vLLM's default, off on CPU, on elsewhere). A run recorded before kvtrace kept the window reads as full
    attention. A speculative drafter's layers (`draft_kv_layers`) are grouped with the target's: a Gemma 2's
    2 sliding and 2 full layers make 2 groups, with a 1-layer draft model 3 (2 + 1 of one kind, cut in 2)."""
    layers = int(model.get("num_layers") or 0) + draft_kv_layers(model)
    window = _positive(model.get("sliding_window"))
    sliding = model.get("sliding_layers")
    count = (
        layers if not isinstance(sliding, int) or isinstance(sliding, bool) else min(max(sliding, 0), layers)
    )
    groups = kv_groups(layers, count, window)
    overlap = config.get("async_scheduling")
    if not isinstance(overlap, bool):
        overlap = config.get("device") != "cpu"
    batched = _positive(config.get("max_num_batched_tokens")) or 0
    stages = _positive(config.get("pipeline_parallel_size")) or 1
    device = "cpu" if config.get("device") == "cpu" else "cuda"
    return groups, max_concurrent_batches(overlap, stages, device) * batched


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_kv_groups(geom: ModelGeometry) -> tuple[KvGroups, str | None]:
    """vLLM's KV cache groups of the model (analyzers.planning.vllm_specs), and a note where its sliding
    layers cannot be modelled, which are then counted as full attention (a bound from above, by a block)."""
    window = geom.sliding_window
    sliding = geom.num_layers if geom.sliding_layers is None else geom.sliding_layers
    if window is None or sliding <= 0:
        return kv_groups(geom.num_layers, 0, None), None
    wider = geom.global_kv_heads is not None or geom.global_head_dim is not None
    if geom.mla is not None or (wider and sliding < geom.num_layers):
        why = "latent attention" if geom.mla is not None else "its full layers' pages are wider"
        note = (
            f"the sliding window ({window:,} tokens) is not modelled ({why}, which vLLM groups otherwise): "
            "every layer counted as full attention"
        )
        return kv_groups(geom.num_layers, 0, None), note
    return kv_groups(geom.num_layers, min(sliding, geom.num_layers), window), None
