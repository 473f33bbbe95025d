"""`kvtrace plan --engine vllm`: KV blocks and maximum concurrency, computed as vLLM computes them.

vLLM (V1, read in vllm 0.32: `vllm/v1/core/kv_cache_utils.py`, `vllm/v1/kv_cache_interface.py`,
`vllm/v1/worker/gpu_worker.py`) sizes its KV pool in four steps, each mirrored by one function here:

1. available KV memory per worker (`available_kv_bytes`): `kv_cache_memory_bytes` when the user gives
   it; otherwise `total * gpu_memory_utilization` minus what the profile run measured: the weights, the
   peak of activations (torch's peak over a dummy forward of `max_num_batched_tokens`) and the memory
   outside torch (CUDA context, NCCL buffers);
2. the page of one layer (`page_size_bytes`): `2 (K and V) * block_size * kv_heads * head_dim * dtype
   bytes`, with `kv_heads` the heads this worker holds (`max(1, kv_heads // tensor_parallel_size)`) and
   the dtype of `kv_cache_dtype` (auto: the model's; fp8: 1 byte);
3. the blocks (`get_num_blocks`): `available // page_size // num_layers`;
4. what one request can need (`max_memory_usage_bytes`): `cdiv(max_model_len, block_size)` pages per
   layer for full attention; for layers that slide, the window and the tokens in flight (the blocks of
   each kind and the groups vLLM forms of them: analyzers.planning.vllm_specs). The engine refuses to
   start when that exceeds the available memory less one block of all layers (the "null block" the
   block pool keeps back; vLLM's message prints that reduced figure as "available"), and then estimates
   the largest max_model_len that fits in it by bisection (`estimate_max_model_len`). The log's "Maximum
   concurrency for N tokens per request" is `num_blocks / blocks one request holds` (`cdiv(N,
   block_size)` for full attention) and its "KV cache size" is `int(concurrency * N)` tokens.

`num_gpu_blocks_override` replaces steps 1 and 3 (`get_kv_cache_configs`): the pool is that many blocks
whatever the memory and the dtype, and vLLM takes `override * bytes_per_block` as the available memory, so
the start check and the estimate compare one request with the override's blocks less the null block.

Before any of that, vLLM checks the configuration, and refuses to start (`refusals`) when max_model_len
passes the positions the model takes (`vllm/config/model.py`, `_get_and_verify_max_len`), when the
tensor-parallel size does not divide the attention heads (`ModelConfig.verify_with_parallel_config`), or
when it neither divides the KV heads nor is a multiple of them (`QKVParallelLinear`, as the model loads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analyzers.planning.presets import ModelGeometry, dtype_bytes_for
from analyzers.planning.vllm_pipeline import VllmStage, binding_stage, pipeline_note, plan_stages
from analyzers.planning.vllm_rank_weights import rank_param_count, weights_note
from analyzers.planning.vllm_specs import (
    KvGroups,
    available_kv_bytes,
    blocks_per_request,
    check_memory_bytes,
    default_max_num_batched_tokens,
    kv_groups,
    max_concurrent_batches,
    model_kv_groups,
    num_blocks,
)
from analyzers.units import a_or_an
from kvtrace.errors import KvtraceError

__all__ = [
    "KV_CACHE_DTYPES",
    "VllmPlan",
    "VllmPlanRequest",
    "available_kv_bytes",
    "estimate_max_model_len",
    "estimate_max_model_len_of",
    "kv_dtype_bytes",
    "max_memory_usage_bytes",
    "max_model_len_refusal",
    "num_blocks",
    "page_size_bytes",
    "plan_vllm",
    "readable_bytes",
    "tensor_parallel_refusal",
]

# vLLM's `kv_cache_dtype` choices that change the bytes per element ("auto" keeps the model's dtype).
# vLLM 0.32's default (`CacheConfig.gpu_memory_utilization`, what `LLM(...)` and `vllm serve` use unset);
# 0.9 in earlier releases
GPU_MEMORY_UTILIZATION = 0.92
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16", "float32")
_MODEL_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4}


def kv_dtype_bytes(kv_cache_dtype: str, model_dtype: str = "bf16") -> int:
    """Bytes per KV element: fp8 variants store 1 byte, "auto" the model dtype's size."""
    if kv_cache_dtype.startswith("fp8"):
        return 1
    dtype = model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype
    if dtype not in _MODEL_DTYPE_BYTES:
        raise KvtraceError(f"unknown KV dtype {dtype!r}; choose one of: {', '.join(KV_CACHE_DTYPES)}")
    return _MODEL_DTYPE_BYTES[dtype]


def kv_heads_per_worker(num_kv_heads: int, tensor_parallel_size: int = 1) -> int:
    """vLLM's `ModelConfig.get_num_kv_heads`: the KV heads are split over the tensor-parallel ranks, and
    replicated when there are fewer heads than ranks."""
    return max(1, num_kv_heads // tensor_parallel_size)


def tensor_parallel_refusal(
    num_attention_heads: int, num_kv_heads: int, tensor_parallel_size: int, latent: bool = False
) -> str | None:
    """Why vLLM refuses to split this model over `tensor_parallel_size` ranks, None when it does not.

    Every rank holds whole attention heads: `verify_with_parallel_config` raises "Total number of
    attention heads (H) must be divisible by tensor parallel size (T)". The KV heads too, as the model
    loads (`QKVParallelLinear`, `divide`): T must divide them, or, with more ranks than KV heads, be a
    multiple of them (each head then replicated on T / KV ranks). A latent-attention model (MLA) caches
    one latent per token on every rank and has no KV heads to split."""
    tp = tensor_parallel_size
    if num_attention_heads % tp:
        return (
            f"the {num_attention_heads} attention heads cannot be split over tensor_parallel_size {tp} "
            f'(vLLM: "Total number of attention heads ({num_attention_heads}) must be divisible by tensor '
            f'parallel size ({tp}).")'
        )
    if latent:
        return None
    if tp < num_kv_heads and num_kv_heads % tp:
        return (
            f"the {num_kv_heads} KV heads cannot be split over tensor_parallel_size {tp} (vLLM asserts "
            f'"{num_kv_heads} is not divisible by {tp}" as it loads the model)'
        )
    if tp >= num_kv_heads and tp % num_kv_heads:
        return (
            f"tensor_parallel_size {tp} is not a multiple of the {num_kv_heads} KV heads, so they cannot be "
            f'replicated evenly over the ranks (vLLM asserts "{tp} is not divisible by {num_kv_heads}" as it '
            "loads the model)"
        )
    return None


def max_model_len_refusal(max_model_len: int, max_position_embeddings: int | None) -> str | None:
    """Why vLLM refuses `max_model_len` for a model that takes `max_position_embeddings` positions (None:
    the config gives no limit), None when it does not (`_get_and_verify_max_len`)."""
    if max_position_embeddings is None or max_model_len <= max_position_embeddings:
        return None
    return (
        f"max_model_len {max_model_len:,} is beyond the {max_position_embeddings:,} positions the model "
        f'takes (vLLM: "User-specified max_model_len ({max_model_len}) is greater than the derived '
        f'max_model_len"); it starts only with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, and then positions past '
        f"{max_position_embeddings:,} give NaN with RoPE or a CUDA out-of-bounds error with learned "
        "positions"
    )


def page_size_bytes(num_kv_heads: int, head_dim: int, dtype_bytes: int, block_size: int) -> int:
    """One block of one layer, K and V (`AttentionSpec.page_size_bytes`)."""
    return 2 * block_size * num_kv_heads * head_dim * dtype_bytes


def max_memory_usage_bytes(num_layers: int, page_size: int, block_size: int, max_model_len: int) -> int:
    """KV bytes one request of `max_model_len` tokens needs: whole blocks in every layer
    (`FullAttentionSpec.max_memory_usage_bytes`, summed over layers)."""
    return num_layers * math.ceil(max_model_len / block_size) * page_size


def estimate_max_model_len(
    available_bytes: int, num_layers: int, page_size: int, block_size: int, max_model_len: int
) -> int:
    """The largest length in [1, max_model_len] whose blocks fit, 0 if none, every layer full attention."""
    return estimate_max_model_len_of(
        available_bytes, page_size * num_layers, kv_groups(num_layers, 0, None), block_size, max_model_len, 0
    )


def estimate_max_model_len_of(
    available_bytes: int,
    bytes_per_block: int,
    groups: KvGroups,
    block_size: int,
    max_model_len: int,
    max_in_flight_tokens: int,
) -> int:
    """The largest length in [1, max_model_len] whose blocks (of every group, `bytes_per_block` each) fit,
    0 if none: vLLM's bisection, replayed exactly (so the answer is the number its error message prints)."""

    def fits(model_len: int) -> bool:
        blocks = blocks_per_request(groups, block_size, model_len, max_in_flight_tokens)
        return blocks * bytes_per_block <= available_bytes

    left, right = 1, max_model_len
    if not fits(left):
        return 0
    result = 1
    while left <= right:
        middle = (left + right) // 2
        if fits(middle):
            result, left = middle, middle + 1
        else:
            right = middle - 1
    return result


def _memory_blocks(available_bytes: int, page_size: int, num_layers: int) -> int:
    return num_blocks(available_bytes, page_size, num_layers) if available_bytes > 0 else 0


@dataclass(frozen=True, kw_only=True)
class VllmPlanRequest:
    """A vLLM deployment to size. kv_cache_memory_bytes, when given, replaces the profile arithmetic
    (it is what vLLM then uses, on GPU and CPU). weights_bytes None: computed from the geometry, what vLLM
    loads on one tensor-parallel rank (`vllm_rank_weights`); activation_peak_bytes and non_torch_bytes
    default to 0, which makes the blocks an upper bound (give them, or take them from a recorded run with
    --from-run). buffers_bytes: what vLLM builds beside the weights when it loads the model (the rotary
    cos/sin cache, packed copies of weights on CPU), which its profile counts with them; a recorded run's,
    else 0.
    num_gpu_blocks_override, when given, is the pool's block count whatever the memory (vLLM's knob).
    max_num_batched_tokens and async_scheduling size what a sliding layer holds (the tokens in flight);
    None: vLLM 0.32's defaults for `LLM(...)` on `device` ("cuda", or "cpu": no async scheduling)."""

    geometry: ModelGeometry
    model_dtype: str = "bf16"
    gpu_memory_bytes: int = 80 * 2**30
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    max_model_len: int = 8192
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    # Pipeline stages, each a worker holding its own layers (analyzers.planning.vllm_pipeline); the
    # layers of each (vLLM's VLLM_PP_LAYER_PARTITION; None: vLLM's even split) and the weights and buffers
    # each stage's worker holds (a recorded run's; None: computed from the geometry)
    pipeline_parallel_size: int = 1
    pp_layer_partition: tuple[int, ...] | None = None
    stage_weights_bytes: tuple[int, ...] | None = None
    weights_bytes: int | None = None
    buffers_bytes: int = 0
    activation_peak_bytes: int = 0
    non_torch_bytes: int = 0
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    max_num_batched_tokens: int | None = None
    async_scheduling: bool | None = None
    device: str = "cuda"
    # Requests running at once (what vLLM's max_num_seqs lets run), each of max_model_len tokens: whether
    # the pool holds that many together (`VllmPlan.batch_fits`); None: not asked
    batch: int | None = None
    # The flags the plan took at their default, neither typed nor a --from-run run's ("max_model_len",
    # "gpu_memory", ...): the JSON names them, as the transformers plan's `PlanRequest.defaults` does
    defaults: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for label, value in (
            ("max model length", self.max_model_len),
            ("block size", self.block_size),
            ("tensor parallel size", self.tensor_parallel_size),
            ("pipeline parallel size", self.pipeline_parallel_size),
            ("GPU memory", self.gpu_memory_bytes),
        ):
            if value < 1:
                raise KvtraceError(f"{label} must be at least 1, got {value}")
        if self.batch is not None and self.batch < 1:
            raise KvtraceError(f"batch must be at least 1, got {self.batch}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise KvtraceError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise KvtraceError(
                f"num_gpu_blocks_override must be at least 1, got {self.num_gpu_blocks_override}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise KvtraceError(f"GPU memory utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise KvtraceError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose one of: {', '.join(KV_CACHE_DTYPES)}"
            )
        optional_sizes: tuple[tuple[str, int | None], ...] = (
            ("weights", self.weights_bytes),
            ("vLLM's buffers", self.buffers_bytes),
            ("activation peak", self.activation_peak_bytes),
            ("non-torch memory", self.non_torch_bytes),
            ("kv_cache_memory_bytes", self.kv_cache_memory_bytes),
        )
        for label, size in optional_sizes:
            if size is not None and size < 0:
                raise KvtraceError(f"{label} cannot be negative, got {size}")
        kv_dtype_bytes(self.kv_cache_dtype, self.model_dtype)


@dataclass(frozen=True)
class VllmPlan:
    """The figures vLLM would compute for the request, per worker (tensor-parallel rank)."""

    request: VllmPlanRequest
    kv_heads_per_worker: int
    kv_dtype_bytes: int
    page_size_bytes: int  # one layer, one block
    bytes_per_block: int  # all layers, one block
    kv_bytes_per_token: int  # all layers, per worker
    weights_bytes: int | None  # None: unknown, and not needed (kv_cache_memory_bytes sizes the pool)
    available_kv_bytes: int
    num_blocks: int
    kv_tokens: int  # "GPU KV cache size: N tokens": int(max_concurrency * max_model_len)
    max_concurrency: float  # "Maximum concurrency for max_model_len tokens per request: X"
    needed_bytes: int  # one request of max_model_len
    check_bytes: int  # what vLLM compares it with: available less the null block
    starts: bool  # False: vLLM refuses to start (a refusal below, or "To serve at least one request ...")
    estimated_max_model_len: int | None  # when the KV memory is too small: vLLM's own estimate
    notes: tuple[str, ...]
    kv_groups: KvGroups  # how vLLM groups the layers: full attention, sliding, hybrid
    blocks_per_request: int  # blocks of the pool one request of max_model_len may hold
    max_num_batched_tokens: int  # the request's, or vLLM's default
    max_in_flight_tokens: int  # what a sliding layer holds beyond its window: batches in flight x the above
    # Why vLLM refuses the configuration before it sizes any memory (max_model_len, tensor parallel size)
    refusals: tuple[str, ...] = ()
    # A CPU run vLLM refused for its memory node: the node's free memory then, the ceiling of the KV space
    # (analyzers.planning.vllm_node_plan); None otherwise
    node_free_bytes: int | None = None
    # Under pipeline parallelism each stage's worker; the figures above are then the binding stage's
    # (`vllm_pipeline.binding_stage`), but num_blocks, the fewest of any stage, which every worker keeps
    stages: tuple[VllmStage, ...] = ()
    bound_stage: int | None = None  # the stage whose figures these are; None without pipeline parallelism
    # Requests of max_model_len tokens the pool holds at once: its blocks less the null block, whole
    # requests' blocks of them (`max_concurrency` is vLLM's log line, the null block counted, not floored)
    requests_at_once: int = 0
    # Whether the request's `batch` of them fit at once (None: no batch asked): when not, vLLM still starts
    # but runs fewer at full length, preempting or queueing the others
    batch_fits: bool | None = None


def plan_vllm(req: VllmPlanRequest) -> VllmPlan:
    geom = req.geometry
    heads = kv_heads_per_worker(geom.num_kv_heads, req.tensor_parallel_size)
    dtype_bytes = kv_dtype_bytes(req.kv_cache_dtype, req.model_dtype)
    page = page_size_bytes(heads, geom.head_dim, dtype_bytes, req.block_size)
    notes: list[str] = []
    if geom.mla is not None:  # `MLAAttentionSpec`: one latent per token (no separate V), on every rank
        page = req.block_size * (geom.mla.kv_lora_rank + geom.mla.qk_rope_head_dim) * dtype_bytes
        notes.append("latent attention: vLLM caches the latent (kv_lora_rank + qk_rope_head_dim per token)")
    override = req.num_gpu_blocks_override
    weights = req.weights_bytes
    if weights is None and geom.intermediate_size:
        # the parameters one rank holds, all in the model's dtype: vLLM builds its own layers, without the
        # buffers and float32 routers of transformers' (`param_count.weights_bytes`)
        weights = dtype_bytes_for(req.model_dtype, rank_param_count(geom, req.tensor_parallel_size))
        if req.kv_cache_memory_bytes is None and override is None:
            notes.append(weights_note(geom, req.tensor_parallel_size))
    memory: int | None  # what the memory alone would give; None: unknown, and not needed under an override
    if req.kv_cache_memory_bytes is not None:
        memory = req.kv_cache_memory_bytes
    elif weights is None:
        if override is None:
            raise ValueError("the weights cannot be sized: the geometry has no MLP size")
        memory = None
    else:
        memory = available_kv_bytes(
            req.gpu_memory_bytes,
            req.gpu_memory_utilization,
            weights + req.buffers_bytes,
            req.activation_peak_bytes,
            req.non_torch_bytes,
        )
        if override is None and not req.activation_peak_bytes and not req.non_torch_bytes:
            notes.append(
                "activation peak and non-torch memory not given (counted as 0): the blocks are an upper bound"
            )
    groups, unmodelled = model_kv_groups(geom)
    notes += [unmodelled] if unmodelled else []
    block_bytes = page * groups.layers_per_group  # one block of the pool: a page of each layer of a group
    batched, in_flight = _in_flight(req, groups, notes)
    if override is not None:
        # vLLM sizes the pool, its start check and its estimate by the override (get_kv_cache_configs)
        available = override * block_bytes
        by_memory = (
            ""
            if memory is None or req.pipeline_parallel_size > 1  # a stage's blocks: the stages' table
            else f"; the KV memory alone would give {_memory_blocks(memory, block_bytes, 1):,}"
        )
        size = f" ({readable_bytes(available)})" if req.pipeline_parallel_size == 1 else " on every stage"
        notes.append(
            f"num_gpu_blocks_override={override} sets the pool at {override:,} blocks{size} whatever the "
            f"memory and the dtype{by_memory}"
        )
    else:
        assert memory is not None
        available = memory
    blocks = num_blocks(available, block_bytes, 1) if available > 0 else 0
    per_request = blocks_per_request(groups, req.block_size, req.max_model_len, in_flight)
    needed = per_request * block_bytes
    check = check_memory_bytes(available, block_bytes)
    layers_held, bound_stage = geom.num_layers, None
    stages: tuple[VllmStage, ...] = ()
    if req.pipeline_parallel_size > 1:
        stages = plan_stages(req, page, groups, per_request, memory, weights is not None)
        bound = binding_stage(stages)
        block_bytes, available, weights = bound.bytes_per_block, bound.available_kv_bytes, bound.weights_bytes
        blocks, needed, check = min(s.num_blocks for s in stages), bound.needed_bytes, bound.check_bytes
        layers_held, bound_stage = bound.layers, bound.stage
        notes.append(pipeline_note(stages, bound, req))
    fits = check > 0 and needed <= check
    estimate = None
    if not fits and check > 0:
        estimate = estimate_max_model_len_of(
            check, block_bytes, groups, req.block_size, req.max_model_len, in_flight
        )
    refusals = tuple(
        reason
        for reason in (
            max_model_len_refusal(req.max_model_len, geom.max_position_embeddings),
            tensor_parallel_refusal(
                geom.num_attention_heads, geom.num_kv_heads, req.tensor_parallel_size, geom.mla is not None
            ),
        )
        if reason is not None
    )
    concurrency = blocks / per_request
    at_once = max(blocks - 1, 0) // per_request  # the block pool keeps its null block back from requests
    return VllmPlan(
        request=req,
        kv_heads_per_worker=heads,
        kv_dtype_bytes=dtype_bytes,
        page_size_bytes=page,
        bytes_per_block=block_bytes,
        kv_bytes_per_token=page * layers_held // req.block_size,
        weights_bytes=weights,
        available_kv_bytes=available,
        num_blocks=blocks,
        kv_tokens=int(concurrency * req.max_model_len),
        max_concurrency=concurrency,
        needed_bytes=needed,
        check_bytes=check,
        starts=fits and not refusals,
        estimated_max_model_len=estimate,
        notes=tuple(notes),
        kv_groups=groups,
        blocks_per_request=per_request,
        max_num_batched_tokens=batched,
        max_in_flight_tokens=in_flight,
        refusals=refusals,
        stages=stages,
        bound_stage=bound_stage,
        requests_at_once=at_once,
        batch_fits=None if req.batch is None else req.batch <= at_once,
    )


def _in_flight(req: VllmPlanRequest, groups: KvGroups, notes: list[str]) -> tuple[int, int]:
    """(max_num_batched_tokens, tokens in flight): the request's or vLLM's defaults, said in a note where a
    sliding layer's blocks depend on them."""
    batched = req.max_num_batched_tokens
    if batched is None:
        ranks = req.tensor_parallel_size * req.pipeline_parallel_size  # vLLM's CPU defaults: per rank
        batched = default_max_num_batched_tokens(
            req.device, req.gpu_memory_bytes, req.max_model_len, ranks if req.device == "cpu" else 1
        )
    overlap = req.async_scheduling if req.async_scheduling is not None else req.device != "cpu"
    batches = max_concurrent_batches(overlap, req.pipeline_parallel_size, req.device)
    in_flight = batches * batched
    if groups.window is not None:
        where = "CPU" if req.device == "cpu" else f"{a_or_an(readable_bytes(req.gpu_memory_bytes))} GPU"
        default = (
            f" (vLLM 0.32's default for LLM() on {where}; --max-num-batched-tokens sets it)"
            if req.max_num_batched_tokens is None
            else ""
        )
        stages = req.pipeline_parallel_size
        if stages > 1:
            plus = " and one more under async scheduling (vLLM's default on GPU)" if batches > stages else ""
            why = f"{batches} batches in flight (one in each of the {stages} pipeline stages{plus})"
        elif overlap:
            why = (
                "two batches in flight (async scheduling, vLLM's default on GPU; --no-async-scheduling: one)"
            )
        else:
            why = "one batch in flight (no async scheduling)"
        notes.append(
            f"sliding window {groups.window:,}: a request holds its last {groups.window - 1:,} tokens and "
            f"the {in_flight:,} in flight, {why} of max_num_batched_tokens {batched:,}{default}"
        )
    if groups.kind == "hybrid":
        padding = f", {groups.padding_layers} of them padding" if groups.padding_layers else ""
        notes.append(
            f"hybrid model: vLLM's hybrid KV cache manager (its default) groups the layers "
            f"{groups.layers_per_group} a group, {groups.full_groups} full and {groups.sliding_groups} "
            f"sliding group(s){padding}; a block is a page of each layer of a group "
            "(--disable-hybrid-kv-cache-manager would count every layer as full attention)"
        )
    return batched, in_flight


def readable_bytes(num_bytes: int | float) -> str:
    """Binary units, the unit chosen so the figure reads: never "0.0 GiB" for a small pool."""
    sign, size = ("-", -float(num_bytes)) if num_bytes < 0 else ("", float(num_bytes))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{sign}{size:.0f} B" if unit == "B" else f"{sign}{size:.2f} {unit}"
        size /= 1024
    return f"{sign}{size:.2f} TiB"
