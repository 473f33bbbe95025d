"""A vLLM start refused for lack of KV memory, priced in vLLM's own knobs. Pure: reads the engine files.

vLLM checks that one request of `max_model_len` tokens fits: `num_layers * cdiv(max_model_len,
block_size)` pages of `2 * block_size * kv_heads * head_dim * dtype` bytes with full attention, fewer where
layers slide (the window and the tokens in flight: analyzers.planning.vllm_specs, from engine.json's model
and config), against its KV memory less the null block. The refusal records vLLM's own figures: the bytes
one request needs (whole blocks), the bytes compared, its estimate of the largest max_model_len. Those are
the diagnosis's figures and the ground of its verdicts (the specs' where the refusal lacks them, or where
its bytes are not whole blocks of this geometry): a request takes as many blocks whatever their dtype or
the split of the heads over ranks, so fp8 and tensor_parallel_size are priced on vLLM's block count. The
remedies: max_model_len, kv_cache_memory_bytes / gpu_memory_utilization, max_num_batched_tokens (a
sliding model's), kv_cache_dtype fp8, tensor_parallel_size (KV heads split over ranks),
pipeline_parallel_size (layers split over stages, as vLLM splits them: the widest stage's blocks), and why
max_num_seqs does not enter this check.

Under `num_gpu_blocks_override` vLLM takes the override's blocks as the memory (`get_kv_cache_configs`):
the pool is that many blocks whatever kv_cache_memory_bytes, the utilization, the dtype or the split over
ranks or stages (each worker keeps the override's blocks), so none of those knobs helps. The remedies are
then a larger override (one request's blocks plus the null block) or none, where vLLM sizes the pool by the
memory again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from analyzers.engine import EngineRun
from analyzers.planning.vllm_parallel import (
    PP_CHOICES,
    TP_CHOICES,
    WorkerSplit,
    heads_page_bytes,
    override_keeps_blocks,
    pipeline_parallel_splits,
    smallest_split,
    tensor_parallel_splits,
)
from analyzers.planning.vllm_plan import (
    check_memory_bytes,
    kv_dtype_bytes,
    kv_heads_per_worker,
    page_size_bytes,
    readable_bytes,
)
from analyzers.planning.vllm_request_spec import RequestSpec, blocks_needed
from analyzers.planning.vllm_specs import KvGroups, engine_kv_groups
from kvtrace.errors import KvtraceError

__all__ = ["RefusedDiagnosis", "VllmRemedy", "diagnose_refused", "engine_geometry", "refused_start"]


@dataclass(frozen=True)
class VllmRemedy:
    """One change of a vLLM setting. `fits` None: the figure cannot be priced from this run (`sentence`
    says why)."""

    knob: str  # "max_model_len" | "kv_cache_memory_bytes" | "gpu_memory_utilization" | "kv_cache_dtype" | ...
    setting: Any
    fits: bool | None
    sentence: str


def host_refuses_fp8(remedy: VllmRemedy, config: dict[str, Any]) -> VllmRemedy:
    """`remedy` (kv_cache_dtype='fp8') as the recorded host would take it: vLLM's CPU build refuses an fp8
    cache without AVX-512 or AMX, or at a head size no multiple of 32, whatever it would hold; engine.json's
    `config.fp8_kv_refused` keeps vLLM's own message for that host (absent in runs recorded before it)."""
    refused = config.get("fp8_kv_refused")
    if not refused:
        return remedy
    return replace(remedy, fits=False, sentence=f"{remedy.sentence} vLLM refuses it on this host: {refused}")


@dataclass(frozen=True)
class RefusedDiagnosis:
    path: str
    message: str
    max_model_len: int
    block_size: int
    num_layers: int
    bytes_per_block: int  # all layers
    needed_bytes: int
    needed_blocks: int
    available_bytes: int
    estimated_max_model_len: int
    vllm_estimated_max_model_len: int | None
    remedies: tuple[VllmRemedy, ...]
    notes: tuple[str, ...] = ()
    num_gpu_blocks_override: int | None = None  # set: the pool's blocks, whatever the memory
    kv_groups: KvGroups | None = None  # how vLLM grouped the layers (full, sliding, hybrid), as recorded
    max_in_flight_tokens: int = 0  # what a sliding layer holds beyond its window
    kind: str = (
        "refused_start"  # "node_memory": the CPU pool asked more than its node had (vllm_node_refused)
    )
    requested_bytes: int | None = None  # node_memory: the KV space asked; `available_bytes` the node's free
    requested_by: str = ""  # node_memory: the knob that asked it ("kv_cache_memory_bytes=...")
    node_total_bytes: int | None = None  # node_memory: the node's memory
    max_num_seqs_bytes: int | None = None  # node_memory: max_num_seqs requests of max_model_len + null block


def engine_geometry(run: EngineRun) -> tuple[int, int, int, int]:
    """(layers, kv heads per worker, head_dim, KV element bytes) from engine.json."""
    model, config = run.info.model, run.info.config
    fields = ("num_layers", "num_kv_heads", "head_dim")
    bad = [
        name
        for name in fields
        if isinstance(model.get(name), bool) or not isinstance(model.get(name), int) or model[name] < 1
    ]
    if bad:
        raise KvtraceError(f"{run.path}/engine.json: model field(s) {', '.join(bad)} missing or not positive")
    tp = int(config.get("tensor_parallel_size") or 1)
    heads = kv_heads_per_worker(int(model["num_kv_heads"]), max(tp, 1))
    dtype = str(model.get("dtype") or "bfloat16")
    element = kv_dtype_bytes(str(config.get("kv_cache_dtype") or "auto"), dtype)
    return int(model["num_layers"]), heads, int(model["head_dim"]), element


def refused_start(run: EngineRun) -> bool:
    """Whether the engine refused to start: its status says so, or engine.json records the refusal (a run
    whose block raised before the status was written)."""
    return run.info.status == "refused_start" or bool(run.info.refused)


def diagnose_refused(run: EngineRun) -> RefusedDiagnosis:
    info = run.info
    refused = info.refused or {}
    from analyzers.planning.vllm_node_refused import NODE_MEMORY, diagnose_node_refused

    if refused.get("kind") == NODE_MEMORY:  # on CPU, refused before the max_model_len check
        return diagnose_node_refused(run)
    config = info.config
    layers, heads, head_dim, element = engine_geometry(run)
    block = int(config.get("block_size") or info.block_size or 16)
    max_len = int(refused.get("max_model_len") or config.get("max_model_len") or 0)
    if max_len < 1 or block < 1:
        raise KvtraceError(f"{run.path}/engine.json: the refusal records no max_model_len or block size")
    page = page_size_bytes(heads, head_dim, element, block)
    groups, in_flight = engine_kv_groups(info.model, config)
    spec = RequestSpec(groups, in_flight, block, page * groups.layers_per_group)
    notes: list[str] = []
    available, pool = _check_memory(run, spec.bytes_per_block, notes)
    blocks, modelled = blocks_needed(refused, spec, max_len, notes)
    needed = blocks * spec.bytes_per_block
    estimate = spec.estimate(available, max_len) if available > 0 else 0
    vllm_estimate = refused.get("estimated_max_model_len")
    if isinstance(vllm_estimate, int) and not isinstance(vllm_estimate, bool) and vllm_estimate >= 0:
        if vllm_estimate != estimate and modelled:
            notes.append(f"vLLM estimated {vllm_estimate:,}; the KV specs give {estimate:,}")
        estimate = vllm_estimate  # vLLM's own bisection over its own specs: what it would accept
    override = config.get("num_gpu_blocks_override")
    remedies: list[VllmRemedy] = []
    if estimate >= 1:
        at_estimate = (
            f"one request then needs {readable_bytes(spec.needed(estimate))}, which fits in "
            f"{readable_bytes(available)}"
            if modelled
            else f"vLLM's own estimate of what fits in {readable_bytes(available)}"
        )
        remedies.append(
            VllmRemedy("max_model_len", estimate, True, f"max_model_len={estimate}: {at_estimate}.")
        )
    pool_needed = needed + spec.bytes_per_block  # one request plus the null block
    if override:
        remedies += _override_remedies(run, int(override), spec.bytes_per_block, needed, max_len, blocks)
    else:
        remedies.append(
            VllmRemedy(
                "kv_cache_memory_bytes",
                pool_needed,
                True,
                f"kv_cache_memory_bytes={pool_needed} ({readable_bytes(pool_needed)}: one request of "
                f"{max_len:,} tokens plus vLLM's null block, {readable_bytes(needed - available)} more than "
                f"now); each further request of that length needs {readable_bytes(needed)} more.",
            )
        )
        remedies.append(_utilization_remedy(run, pool_needed, pool))
    if modelled and groups.sliding_groups and not override and config.get("max_num_batched_tokens"):
        remedies.append(_batched_tokens_remedy(run, spec, available, max_len))
    if element > 1 and override:
        remedies.append(
            VllmRemedy(
                "kv_cache_dtype",
                "fp8",
                False,
                f"kv_cache_dtype='fp8' halves the bytes of a block, but num_gpu_blocks_override={override} "
                f"keeps the pool at {int(override):,} blocks: one request still needs "
                f"{blocks:,}, and {int(override) - 1:,} are left beside the null block.",
            )
        )
    elif element > 1:
        # a request takes as many blocks whatever their dtype: fp8 shrinks each block, not their count
        spec8 = replace(spec, bytes_per_block=spec.bytes_per_block // element)
        needed8 = blocks * spec8.bytes_per_block
        check8 = check_memory_bytes(pool, spec8.bytes_per_block)  # the same memory, a smaller null block
        fits8 = needed8 <= check8
        if fits8:
            tail = "which fits"
        elif modelled:
            tail = f"still too much; the largest max_model_len would be {spec8.estimate(check8, max_len)}"
        else:
            tail = "still too much"
        remedies.append(
            host_refuses_fp8(
                VllmRemedy(
                    "kv_cache_dtype",
                    "fp8",
                    fits8,
                    f"kv_cache_dtype='fp8' stores 1 byte an element instead of {element}: one request needs "
                    f"{readable_bytes(needed8)}, {tail} (quality: fp8 KV rounds keys and values).",
                ),
                config,
            )
        )
    remedies.append(
        VllmRemedy(
            "max_num_seqs",
            None,
            False,
            "max_num_seqs does not enter this check: vLLM refuses when even ONE request of max_model_len "
            "does not fit. A lower max_num_seqs only shrinks the profiled activations on a GPU, which this "
            "run cannot price.",
        )
    )
    if override:  # the override is each worker's blocks, whatever their bytes
        offered = pipeline_parallel_splits(info, groups.kind == "hybrid", page) is not None
        remedies += [
            VllmRemedy(knob, None, False, why) for knob, why in override_keeps_blocks(int(override), offered)
        ]
    else:
        remedies.append(_tensor_parallel_remedy(run, spec, head_dim, element, blocks, pool))
        staged = _pipeline_parallel_remedy(run, spec, page, blocks, pool)
        remedies += [staged] if staged is not None else []
    return RefusedDiagnosis(
        path=run.path,
        message=str(refused.get("message", "")),
        max_model_len=max_len,
        block_size=block,
        num_layers=layers,
        bytes_per_block=spec.bytes_per_block,
        needed_bytes=needed,
        needed_blocks=blocks,
        available_bytes=available,
        estimated_max_model_len=estimate,
        vllm_estimated_max_model_len=(
            int(refused["estimated_max_model_len"])
            if refused.get("estimated_max_model_len") is not None
            else None
        ),
        remedies=tuple(remedies),
        notes=tuple(notes),
        num_gpu_blocks_override=int(override) if override else None,
        kv_groups=groups,
        max_in_flight_tokens=in_flight,
    )


def _batched_tokens_remedy(run: EngineRun, spec: RequestSpec, available: int, max_len: int) -> VllmRemedy:
    """A smaller max_num_batched_tokens: a sliding layer holds the tokens in flight beside its window."""
    config = run.info.config
    now = int(config.get("max_num_batched_tokens") or 0)
    batches = spec.in_flight // now if now else 1
    floor = max(int(config.get("max_num_seqs") or 1), 1)  # vLLM refuses fewer tokens than sequences

    def fits(tokens: int) -> bool:
        return replace(spec, in_flight=batches * tokens).needed(max_len) <= available

    best = _largest_fitting(fits, floor, now - 1)
    if best is None:
        return VllmRemedy(
            "max_num_batched_tokens",
            None,
            False,
            f"max_num_batched_tokens: even {floor} (max_num_seqs, the least vLLM takes) leaves one request "
            f"more than {readable_bytes(available)}: what it holds besides the batch does not fit.",
        )
    held = replace(spec, in_flight=batches * best).blocks(max_len)
    return VllmRemedy(
        "max_num_batched_tokens",
        best,
        True,
        f"max_num_batched_tokens={best} (now {now}): a sliding layer holds its window and the tokens in "
        f"flight, so one request then takes {held:,} blocks ({readable_bytes(held * spec.bytes_per_block)}), "
        f"which fit in {readable_bytes(available)} (prefill runs in more chunks; chunked prefill must be on, "
        "vLLM's default).",
    )


def _largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest value in [low, high] that `fits` (monotone: smaller fits too), None if none does."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _override_remedies(
    run: EngineRun, override: int, bytes_per_block: int, needed: int, max_len: int, request_blocks: int
) -> list[VllmRemedy]:
    """A larger num_gpu_blocks_override, and none: vLLM then sizes the pool by kv_cache_memory_bytes (or the
    memory it profiles, which a refused start under an override does not record)."""
    blocks_needed = request_blocks + 1  # one request plus the null block
    remedies = [
        VllmRemedy(
            "num_gpu_blocks_override",
            blocks_needed,
            True,
            f"num_gpu_blocks_override={blocks_needed} (now {override}): one request of {max_len:,} tokens "
            f"takes {blocks_needed - 1:,} blocks, plus vLLM's null block "
            f"({readable_bytes(blocks_needed * bytes_per_block)} of KV, allocated whatever the memory); each "
            f"further request of that length needs {blocks_needed - 1:,} blocks more.",
        )
    ]
    configured = run.info.config.get("kv_cache_memory_bytes")
    if not configured:
        remedies.append(
            VllmRemedy(
                "num_gpu_blocks_override",
                None,
                None,
                "without num_gpu_blocks_override vLLM sizes the pool by the memory it profiles, which this "
                "run does not record (the override replaced it); one request needs "
                f"{readable_bytes(needed + bytes_per_block)} with the null block.",
            )
        )
        return remedies
    memory = int(configured)
    blocks = memory // bytes_per_block
    fits = needed <= check_memory_bytes(memory, bytes_per_block)
    verdict = (
        f"one request of {max_len:,} tokens takes {blocks_needed - 1:,} of the {max(blocks - 1, 0):,} beside "
        "the null block"
        if fits
        else f"still short of the {blocks_needed:,} one request of {max_len:,} tokens needs with the null "
        f"block: kv_cache_memory_bytes={blocks_needed * bytes_per_block} would hold them"
    )
    remedies.append(
        VllmRemedy(
            "num_gpu_blocks_override",
            None,
            fits,
            f"without num_gpu_blocks_override, vLLM sizes the pool by kv_cache_memory_bytes={memory} "
            f"({readable_bytes(memory)}): {blocks:,} blocks, {verdict}.",
        )
    )
    return remedies


def _check_memory(run: EngineRun, bytes_per_block: int, notes: list[str]) -> tuple[int, int]:
    """(check, pool): the bytes vLLM compared one request with, and the KV memory it had. vllm 0.32's
    check_enough_kv_cache_memory compares with the KV memory less the null block; the recorder logs
    that figure as the refusal's `available_bytes`. Without it, the pool is kv_cache_memory_bytes (or the
    profile's available KV memory) and the check is the pool less one block."""
    info = run.info
    recorded = (info.refused or {}).get("available_bytes")
    configured = info.config.get("kv_cache_memory_bytes")
    override = info.config.get("num_gpu_blocks_override")
    if recorded is not None:
        check = int(recorded)
        if override:
            configured_text = f" whatever kv_cache_memory_bytes ({int(configured):,} B)" if configured else ""
            notes.append(
                f"num_gpu_blocks_override={override} set the pool at {int(override):,} blocks "
                f"({readable_bytes(int(override) * bytes_per_block)}){configured_text}: vLLM compared one "
                f"request with the {int(override) - 1:,} beside the null block ({check:,} B)"
            )
        elif configured and check_memory_bytes(int(configured), bytes_per_block) != check:
            notes.append(
                f"vLLM compared with {check:,} B; kv_cache_memory_bytes less one block would be "
                f"{check_memory_bytes(int(configured), bytes_per_block):,} B"
            )
        return check, check + bytes_per_block
    pool = configured or info.memory_profile.get("available_kv_bytes")
    if pool is None:
        raise KvtraceError(f"{run.path}: the refusal records no available KV memory")
    return check_memory_bytes(int(pool), bytes_per_block), int(pool)


def _utilization_remedy(run: EngineRun, pool_needed: int, pool: int) -> VllmRemedy:
    """gpu_memory_utilization that leaves `pool_needed` bytes for KV, from the profile vLLM measured:
    available = ceil(total * utilization) - non-KV memory, so the non-KV memory is what the recorded
    utilization requested less the KV memory it had (`pool`)."""
    profile, config = run.info.memory_profile, run.info.config
    total = profile.get("total_device_bytes")
    util = config.get("gpu_memory_utilization")
    if config.get("device") == "cpu" or not total or util is None:
        return VllmRemedy(
            "gpu_memory_utilization",
            None,
            None,
            "gpu_memory_utilization: not priced here (no device total in this run; on CPU the KV space is "
            "kv_cache_memory_bytes or VLLM_CPU_KVCACHE_SPACE).",
        )
    non_kv = math.ceil(int(total) * float(util)) - pool
    wanted = math.ceil((pool_needed + non_kv) / int(total) * 100) / 100
    fits = wanted <= 1.0
    return VllmRemedy(
        "gpu_memory_utilization",
        wanted if fits else None,
        fits,
        (
            f"gpu_memory_utilization={wanted:.2f} (now {float(util):g}) leaves enough for one request."
            if fits
            else f"gpu_memory_utilization cannot help: even 1.0 of {readable_bytes(int(total))} leaves "
            f"less than {readable_bytes(pool_needed)} after {readable_bytes(non_kv)} of weights and "
            "activations."
        ),
    )


def _pipeline_parallel_remedy(
    run: EngineRun, spec: RequestSpec, page: int, request_blocks: int, pool: int
) -> VllmRemedy | None:
    """pipeline_parallel_size: each stage's worker holds a page of its own layers a block, so one request
    takes as many blocks of fewer bytes; the widest stage of vLLM's split decides. None where it is not
    offered (analyzers.planning.vllm_parallel)."""
    splits = pipeline_parallel_splits(run.info, spec.groups.kind == "hybrid", page)
    if splits is None:
        return None
    staged = smallest_split(splits, lambda s: _holds_one_request(s, request_blocks, pool))
    if staged is not None:
        return VllmRemedy(
            staged.knob,
            staged.size,
            True,
            f"{staged.setting} {staged.split}: each needs "
            f"{readable_bytes(request_blocks * staged.block_bytes)} for one request (counting the same "
            f"{readable_bytes(pool)} of KV memory per GPU; the weights split over the stages free more).",
        )
    return VllmRemedy(
        "pipeline_parallel_size",
        None,
        False,
        f"pipeline_parallel_size: no split of the {run.info.model['num_layers']} layers over up to "
        f"{PP_CHOICES[-1]} GPUs brings one request under the available memory.",
    )


def _holds_one_request(split: WorkerSplit, request_blocks: int, pool: int) -> bool:
    """vLLM's start check on each worker of `split`: one request's blocks beside the null block."""
    return request_blocks * split.block_bytes <= check_memory_bytes(pool, split.block_bytes)


def _tensor_parallel_remedy(
    run: EngineRun, spec: RequestSpec, head_dim: int, element: int, request_blocks: int, pool: int
) -> VllmRemedy:
    model, config = run.info.model, run.info.config
    kv_heads = int(model["num_kv_heads"])
    # each rank holds fewer heads in a block; a request takes as many blocks
    splits = tensor_parallel_splits(
        int(model.get("num_attention_heads") or kv_heads),
        kv_heads,
        int(config.get("tensor_parallel_size") or 1),
        heads_page_bytes(head_dim, element, spec.block_size, spec.groups.layers_per_group),
    )
    split = smallest_split(splits, lambda s: _holds_one_request(s, request_blocks, pool))
    if split is not None:
        return VllmRemedy(
            split.knob,
            split.size,
            True,
            f"{split.setting} {split.split}: each needs {readable_bytes(request_blocks * split.block_bytes)}"
            f" for one request (counting the same {readable_bytes(pool)} of KV memory per GPU; sharded "
            "weights free more).",
        )
    return VllmRemedy(
        "tensor_parallel_size",
        None,
        False,
        f"tensor_parallel_size: no split of the {kv_heads} KV heads over up to {TP_CHOICES[-1]} GPUs that "
        "vLLM accepts brings one request under the available memory (KV heads are replicated past their "
        "count).",
    )
