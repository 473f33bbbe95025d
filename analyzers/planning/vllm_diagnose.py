"""Why a vLLM engine ran out of KV memory, priced in vLLM's own knobs. Pure: reads the engine files only.

Two cases, one function each:

* **A refused start** (`diagnose_refused`). vLLM checks that one request of `max_model_len` tokens fits:
  `num_layers * cdiv(max_model_len, block_size)` pages of `2 * block_size * kv_heads * head_dim * dtype`
  bytes (analyzers.planning.vllm_plan mirrors that code). We recompute the bytes needed, take the bytes
  available from the recorded refusal, replay vLLM's bisection for the largest max_model_len, and price
  each remedy: max_model_len, kv_cache_memory_bytes / gpu_memory_utilization, kv_cache_dtype fp8,
  tensor_parallel_size (KV heads split over ranks), and say why max_num_seqs does not enter this check.

* **A run that preempted** (`diagnose_preemptions`). vLLM preempts a running request when it cannot
  allocate the next block for a running request. The model used here, stated in the output: a request
  never holds more than `cdiv(prompt + output tokens, block_size)` blocks (its final length; a request
  preempted and resumed needs the same), at most `max_num_seqs` requests run at once, and the pool keeps
  one block aside (vLLM's null block). So if the usable blocks cover the sum of the `max_num_seqs` largest
  final demands, no allocation can fail, whatever the admission order, and nothing is preempted. Prefix
  sharing only lowers the real demand, so the figure is an upper bound that is exact for a batch of
  equal requests decoding together. From it: the blocks and bytes of KV memory to add, the largest
  max_num_seqs that avoids every preemption in the present pool, and whether fp8 KV (1 byte an element:
  twice the blocks for bf16 in the same memory) would. The demand on the recorded schedule (requests in
  flight per step, each at the length it had reached) is reported beside it, for reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from analyzers.engine import EngineRun, HeldRequest, blocks_for, engine_figures, held_at
from analyzers.planning.vllm_plan import (
    check_memory_bytes,
    estimate_max_model_len,
    kv_dtype_bytes,
    kv_heads_per_worker,
    max_memory_usage_bytes,
    page_size_bytes,
    readable_bytes,
)
from kvtrace.errors import KvtraceError

__all__ = [
    "NULL_BLOCKS",
    "PreemptionDiagnosis",
    "RefusedDiagnosis",
    "VllmRemedy",
    "diagnose_engine",
    "diagnose_preemptions",
    "diagnose_refused",
]

NULL_BLOCKS = 1  # vLLM's BlockPool keeps block 0 as the "null block"; requests never get it
_TP_CHOICES = (2, 4, 8, 16)


@dataclass(frozen=True)
class VllmRemedy:
    """One change of a vLLM setting. `fits` None: the figure cannot be priced from this run (`sentence`
    says why)."""

    knob: str  # "max_model_len" | "kv_cache_memory_bytes" | "gpu_memory_utilization" | "kv_cache_dtype" | ...
    setting: Any
    fits: bool | None
    sentence: str


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
    kind: str = "refused_start"


@dataclass(frozen=True)
class PreemptionDiagnosis:
    path: str
    num_blocks: int
    usable_blocks: int
    block_size: int
    bytes_per_block: int
    kv_cache_bytes: int
    preemptions: int
    preempted_tokens: int
    recomputed_tokens: int
    first_preemption_step: int
    held_at_first: tuple[HeldRequest, ...]
    requests: int
    max_num_seqs: int | None
    final_demand_blocks: dict[str, int]
    demand_bound_blocks: int  # the sum of the max_num_seqs largest final demands
    recorded_peak_demand_blocks: int
    recorded_peak_demand_step: int | None
    blocks_needed: int  # demand bound + the null block
    extra_blocks: int
    kv_cache_memory_bytes_needed: int
    extra_bytes: int
    max_num_seqs_without_preemption: int
    fp8_blocks: int | None
    remedies: tuple[VllmRemedy, ...]
    model: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    kind: str = "preemption"


def _geometry(run: EngineRun) -> tuple[int, int, int, int]:
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


def diagnose_refused(run: EngineRun) -> RefusedDiagnosis:
    info = run.info
    refused = info.refused or {}
    config = info.config
    layers, heads, head_dim, element = _geometry(run)
    block = int(config.get("block_size") or info.block_size or 16)
    max_len = int(refused.get("max_model_len") or config.get("max_model_len") or 0)
    if max_len < 1 or block < 1:
        raise KvtraceError(f"{run.path}/engine.json: the refusal records no max_model_len or block size")
    page = page_size_bytes(heads, head_dim, element, block)
    needed = max_memory_usage_bytes(layers, page, block, max_len)
    notes: list[str] = []
    available, pool = _check_memory(run, page * layers, notes)
    estimate = estimate_max_model_len(available, layers, page, block, max_len) if available > 0 else 0
    recorded_needed = refused.get("needed_bytes")
    if recorded_needed is not None and int(recorded_needed) != needed:
        notes.append(
            f"vLLM reported {int(recorded_needed):,} B needed; the geometry gives {needed:,} B "
            "(hybrid or padded KV specs are not modelled)"
        )
    remedies: list[VllmRemedy] = []
    if estimate >= 1:
        remedies.append(
            VllmRemedy(
                "max_model_len",
                estimate,
                True,
                f"max_model_len={estimate}: one request then needs "
                f"{readable_bytes(max_memory_usage_bytes(layers, page, block, estimate))}, which fits in "
                f"{readable_bytes(available)}.",
            )
        )
    pool_needed = needed + page * layers  # one request plus the null block
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
    remedies.append(_utilization_remedy(run, needed + page * layers, pool))
    if element > 1:
        page8 = page_size_bytes(heads, head_dim, 1, block)
        needed8 = max_memory_usage_bytes(layers, page8, block, max_len)
        check8 = check_memory_bytes(pool, page8 * layers)  # the same memory, a smaller null block
        fits8 = needed8 <= check8
        tail = (
            "which fits"
            if fits8
            else f"still too much; the largest max_model_len would be "
            f"{estimate_max_model_len(check8, layers, page8, block, max_len)}"
        )
        remedies.append(
            VllmRemedy(
                "kv_cache_dtype",
                "fp8",
                fits8,
                f"kv_cache_dtype='fp8' stores 1 byte an element instead of {element}: one request needs "
                f"{readable_bytes(needed8)}, {tail} (quality: fp8 KV rounds keys and values).",
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
    remedies.append(_tensor_parallel_remedy(run, layers, head_dim, element, block, max_len, pool))
    return RefusedDiagnosis(
        path=run.path,
        message=str(refused.get("message", "")),
        max_model_len=max_len,
        block_size=block,
        num_layers=layers,
        bytes_per_block=page * layers,
        needed_bytes=needed,
        needed_blocks=math.ceil(max_len / block),
        available_bytes=available,
        estimated_max_model_len=estimate,
        vllm_estimated_max_model_len=(
            int(refused["estimated_max_model_len"])
            if refused.get("estimated_max_model_len") is not None
            else None
        ),
        remedies=tuple(remedies),
        notes=tuple(notes),
    )


def _check_memory(run: EngineRun, bytes_per_block: int, notes: list[str]) -> tuple[int, int]:
    """(check, pool): the bytes vLLM compared one request with, and the KV memory it had. vllm 0.32's
    check_enough_kv_cache_memory compares with the KV memory less the null block; the recorder logs
    that figure as the refusal's `available_bytes`. Without it, the pool is kv_cache_memory_bytes (or the
    profile's available KV memory) and the check is the pool less one block."""
    info = run.info
    recorded = (info.refused or {}).get("available_bytes")
    configured = info.config.get("kv_cache_memory_bytes")
    if recorded is not None:
        check = int(recorded)
        if configured and check_memory_bytes(int(configured), bytes_per_block) != check:
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


def _tensor_parallel_remedy(
    run: EngineRun, layers: int, head_dim: int, element: int, block: int, max_len: int, pool: int
) -> VllmRemedy:
    model, config = run.info.model, run.info.config
    tp_now = int(config.get("tensor_parallel_size") or 1)
    kv_heads = int(model["num_kv_heads"])
    attention_heads = int(model.get("num_attention_heads") or kv_heads)
    for tp in (t for t in _TP_CHOICES if t > tp_now and attention_heads % t == 0):
        page = page_size_bytes(kv_heads_per_worker(kv_heads, tp), head_dim, element, block)
        needed = max_memory_usage_bytes(layers, page, block, max_len)
        if needed <= check_memory_bytes(pool, page * layers):
            return VllmRemedy(
                "tensor_parallel_size",
                tp,
                True,
                f"tensor_parallel_size={tp} splits the {kv_heads} KV heads over {tp} GPUs: each needs "
                f"{readable_bytes(needed)} for one request (counting the same {readable_bytes(pool)} of KV "
                "memory per GPU; sharded weights free more).",
            )
    return VllmRemedy(
        "tensor_parallel_size",
        None,
        False,
        f"tensor_parallel_size: no split of the {kv_heads} KV heads over up to {_TP_CHOICES[-1]} GPUs "
        "brings one request under the available memory (KV heads are replicated past their count).",
    )


def _final_demand(run: EngineRun, block: int) -> dict[str, int]:
    """Blocks each request needs at its final length: prompt + output tokens (at least what it held)."""
    demand: dict[str, int] = {}
    for e in run.requests:
        need = max(blocks_for(e.prompt_tokens + e.output_tokens, block), e.blocks, e.dropped_blocks)
        demand[e.request_id] = max(demand.get(e.request_id, 0), need)
    return demand


def _recorded_demand(run: EngineRun, block: int) -> tuple[int, int | None]:
    """Peak over steps of what the requests in flight (admitted, not finished) would have held had none
    been preempted, each at the length it had reached (blocks for prompt + output so far)."""
    tokens: dict[str, int] = {}
    peak, peak_step = 0, None
    by_step: dict[int, list[Any]] = {}
    for e in run.requests:
        by_step.setdefault(e.step, []).append(e)
    for step in sorted(by_step):
        for e in by_step[step]:
            tokens[e.request_id] = max(tokens.get(e.request_id, 0), e.prompt_tokens + e.output_tokens)
        # a request finishing in this step still held its blocks while the step ran
        total = sum(blocks_for(t, block) for t in tokens.values())
        if total > peak:
            peak, peak_step = total, step
        for e in by_step[step]:
            if e.event == "finished":
                tokens.pop(e.request_id, None)
    return peak, peak_step


def _largest_seqs(demands: list[int], usable: int) -> int:
    """Largest m such that the m largest demands fit together in `usable` blocks."""
    total, count = 0, 0
    for need in sorted(demands, reverse=True):
        if total + need > usable:
            break
        total += need
        count += 1
    return count


def diagnose_preemptions(run: EngineRun) -> PreemptionDiagnosis:
    info = run.info
    figures = engine_figures(run)
    if figures.first_preemption_step is None:
        raise ValueError("the run has no preemption")
    block = int(info.block_size or info.config.get("block_size") or 16)
    num_blocks = int(info.num_blocks or 0)
    bytes_per_block = int(info.bytes_per_block or 0)
    kv_bytes = int(info.kv_cache_bytes or num_blocks * bytes_per_block)
    usable = num_blocks - NULL_BLOCKS
    demand = _final_demand(run, block)
    max_seqs = info.config.get("max_num_seqs")
    running_at_most = min(int(max_seqs), len(demand)) if max_seqs else len(demand)
    bound = sum(sorted(demand.values(), reverse=True)[:running_at_most])
    recorded_peak, recorded_step = _recorded_demand(run, block)
    needed_blocks = bound + NULL_BLOCKS
    needed_bytes = needed_blocks * bytes_per_block
    seqs = _largest_seqs(list(demand.values()), usable)
    element = kv_dtype_bytes(str(info.config.get("kv_cache_dtype") or "auto"), info.kv_dtype or "bfloat16")
    fp8_blocks = num_blocks * element if element > 1 else None
    remedies: list[VllmRemedy] = [
        VllmRemedy(
            "kv_cache_memory_bytes",
            needed_bytes,
            True,
            f"kv_cache_memory_bytes={needed_bytes} ({readable_bytes(needed_bytes)}: "
            f"{needed_blocks:,} blocks, {max(needed_blocks - num_blocks, 0):,} more, "
            f"+{readable_bytes(max(needed_bytes - kv_bytes, 0))}) avoids every preemption of this run.",
        )
    ]
    if seqs >= 1:
        now = f" (now {max_seqs})" if max_seqs else ""
        remedies.append(
            VllmRemedy(
                "max_num_seqs",
                seqs,
                True,
                f"max_num_seqs={seqs}{now}: the {seqs} largest requests fit together in the "
                f"{usable:,} usable blocks, so none is preempted (the others wait instead).",
            )
        )
    else:
        remedies.append(
            VllmRemedy("max_num_seqs", None, False, "max_num_seqs: even one request does not fit the pool.")
        )
    if fp8_blocks is not None:
        fits8 = fp8_blocks - NULL_BLOCKS >= bound
        remedies.append(
            VllmRemedy(
                "kv_cache_dtype",
                "fp8",
                fits8,
                f"kv_cache_dtype='fp8' halves the bytes per block ({element} → 1 byte an element): the same "
                f"{readable_bytes(kv_bytes)} holds {fp8_blocks:,} blocks, which "
                + ("avoids every preemption." if fits8 else f"is still short of {needed_blocks:,}."),
            )
        )
    model = (
        f"each request needs at most cdiv(prompt + output tokens, {block}) blocks; at most "
        f"{running_at_most} run together (max_num_seqs {max_seqs}, {len(demand)} requests); "
        f"{NULL_BLOCKS} block is vLLM's null block"
    )
    notes: list[str] = []
    if recorded_peak and recorded_peak < bound:
        notes.append(
            f"on the recorded schedule the demand peaked at {recorded_peak:,} blocks; a larger pool admits "
            f"more requests at once, so the suggestion covers the worst case of {bound:,}"
        )
    return PreemptionDiagnosis(
        path=run.path,
        num_blocks=num_blocks,
        usable_blocks=usable,
        block_size=block,
        bytes_per_block=bytes_per_block,
        kv_cache_bytes=kv_bytes,
        preemptions=figures.preemptions,
        preempted_tokens=figures.preempted_tokens,
        recomputed_tokens=figures.recomputed_tokens,
        first_preemption_step=figures.first_preemption_step,
        held_at_first=tuple(held_at(run, figures.first_preemption_step)),
        requests=len(demand),
        max_num_seqs=int(max_seqs) if max_seqs else None,
        final_demand_blocks=demand,
        demand_bound_blocks=bound,
        recorded_peak_demand_blocks=recorded_peak,
        recorded_peak_demand_step=recorded_step,
        blocks_needed=needed_blocks,
        extra_blocks=max(needed_blocks - num_blocks, 0),
        kv_cache_memory_bytes_needed=needed_bytes,
        extra_bytes=max(needed_bytes - kv_bytes, 0),
        max_num_seqs_without_preemption=seqs,
        fp8_blocks=fp8_blocks,
        remedies=tuple(remedies),
        model=model,
        notes=tuple(notes),
    )


def diagnose_engine(run: EngineRun) -> RefusedDiagnosis | PreemptionDiagnosis | None:
    """The engine's own diagnosis, or None when there is nothing engine-specific to explain (the pool
    never preempted and the start was not refused)."""
    if run.info.status == "refused_start" or run.info.refused:
        return diagnose_refused(run)
    if engine_figures(run).first_preemption_step is not None:
        return diagnose_preemptions(run)
    return None
