"""A vLLM start refused on CPU because the KV pool asked is more than the memory node has free. Pure.

vLLM's CPU worker sizes the pool before any check of max_model_len: `kv_cache_memory_bytes` as given (which
`VLLM_CPU_KVCACHE_SPACE` sets, in GiB), else `gpu_memory_utilization` of the node's memory less what the
process already holds; it refuses a pool larger than the node's free memory, or none at all
(kvtrace.integrations.vllm_node_refusal records the figures). What the pool is for decides how much to ask:
one request of max_model_len takes `cdiv(max_model_len, block_size)` blocks (the specs of
analyzers.planning.vllm_specs, or vLLM's own bytes where recorded), plus vLLM's null block, and max_num_seqs
such requests at once take max_num_seqs times that. The remedies are those two asks in the knob that set the
pool, checked against the node's free memory; max_model_len only where not even one request fits; and why
the knobs that shrink a block (kv_cache_dtype, tensor_parallel_size) or the batch (max_num_seqs) do not
lower what vLLM asks.
"""

from __future__ import annotations

import math
from typing import Any

from analyzers.engine import EngineRun
from analyzers.planning.vllm_plan import check_memory_bytes, page_size_bytes, readable_bytes
from analyzers.planning.vllm_refused import RefusedDiagnosis, VllmRemedy, engine_geometry
from analyzers.planning.vllm_request_spec import RequestSpec, blocks_needed
from analyzers.planning.vllm_specs import engine_kv_groups
from kvtrace.errors import KvtraceError

__all__ = ["NODE_MEMORY", "diagnose_node_refused"]

NODE_MEMORY = "node_memory"  # engine.json refused.kind (kvtrace.integrations.vllm_node_refusal)
_GIB = 1024**3


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def diagnose_node_refused(run: EngineRun) -> RefusedDiagnosis:
    info = run.info
    refused, config = info.refused or {}, info.config
    free = _int(refused.get("node_available_bytes"))
    asked = _int(refused.get("requested_kv_bytes"))
    if free is None or asked is None:
        raise KvtraceError(f"{run.path}/engine.json: the refusal records no node memory or no KV space asked")
    layers, heads, head_dim, element = engine_geometry(run)
    block = int(config.get("block_size") or info.block_size or 16)
    max_len = int(refused.get("max_model_len") or config.get("max_model_len") or 0)
    if max_len < 1:
        raise KvtraceError(f"{run.path}/engine.json: the refusal records no max_model_len")
    groups, in_flight = engine_kv_groups(info.model, config)
    spec = RequestSpec(
        groups, in_flight, block, page_size_bytes(heads, head_dim, element, block) * groups.layers_per_group
    )
    notes: list[str] = []
    blocks, modelled = blocks_needed(refused, spec, max_len, notes)
    per_block = spec.bytes_per_block
    needed = blocks * per_block
    seqs = max(int(config.get("max_num_seqs") or 1), 1)
    one_pool = needed + per_block  # one request of max_model_len and the null block
    full_pool = seqs * needed + per_block
    fits_one = one_pool <= free
    estimate = (
        max_len
        if fits_one
        else (spec.estimate(check_memory_bytes(free, per_block), max_len) if modelled else 0)
    )
    target = full_pool if full_pool <= free else one_pool
    explicit = _int(refused.get("kv_cache_memory_bytes"))
    env_gib = _int(refused.get("kv_cache_space_gib"))
    asked_by = _asked_by(explicit, env_gib, config)
    node = f"memory node {refused['node']}" if _int(refused.get("node")) is not None else "the memory node"
    remedies = [
        _pool_remedy(explicit, env_gib, asked, free, needed, one_pool, full_pool, seqs, max_len, node)
    ]
    remedies.append(_space_remedy(env_gib, free, target, full_pool, seqs, max_len, node))
    remedies.append(_utilization_remedy(run, explicit, target, free, node, asked_by))
    if not fits_one:
        remedies.append(
            VllmRemedy(
                "max_model_len",
                estimate if estimate >= 1 else None,
                estimate >= 1,
                (
                    f"max_model_len={estimate}: one request then fits in the {readable_bytes(free)} "
                    f"{node} has free, with a kv_cache_memory_bytes no larger than that."
                    if estimate >= 1
                    else f"max_model_len: not even one block fits in the {readable_bytes(free)} {node} "
                    "has free."
                ),
            )
        )
    else:
        remedies.append(
            VllmRemedy(
                "max_model_len",
                None,
                False,
                f"max_model_len does not enter this check: vLLM asks {_asked_text(asked)} whatever the "
                f"length; one request of {max_len:,} tokens needs only {readable_bytes(needed)}.",
            )
        )
    remedies += _block_knobs(_asked_text(asked), element)
    return RefusedDiagnosis(
        path=run.path,
        message=str(refused.get("message", "")),
        max_model_len=max_len,
        block_size=block,
        num_layers=layers,
        bytes_per_block=per_block,
        needed_bytes=needed,
        needed_blocks=blocks,
        available_bytes=free,
        estimated_max_model_len=estimate,
        vllm_estimated_max_model_len=None,
        remedies=tuple(remedies),
        notes=tuple(notes),
        kv_groups=groups,
        max_in_flight_tokens=in_flight,
        kind=NODE_MEMORY,
        requested_bytes=asked,
        requested_by=asked_by if explicit is not None else _auto_asked(refused, config),
        node_total_bytes=_int(refused.get("node_total_bytes")),
        max_num_seqs_bytes=full_pool,
    )


def _asked_text(asked: int) -> str:
    """The KV space asked, as the sentences say it: none where the process held more than the share asked."""
    return readable_bytes(asked) if asked > 0 else "no KV space"


def _auto_asked(refused: dict[str, Any], config: dict[str, Any]) -> str:
    """How gpu_memory_utilization asked the KV space on CPU: its share of the node less the process's."""
    share = _int(refused.get("requested_cpu_memory_bytes")) or 0
    consumed = _int(refused.get("consumed_bytes"))
    held = f", less the {readable_bytes(consumed)} the process held" if consumed is not None else ""
    util = config.get("gpu_memory_utilization")
    return f"gpu_memory_utilization={util}: {readable_bytes(share)} of the node{held}"


def _asked_by(explicit: int | None, env_gib: int | None, config: dict[str, Any]) -> str:
    if env_gib is not None:
        return f"VLLM_CPU_KVCACHE_SPACE={env_gib}"
    if explicit is not None:
        return f"kv_cache_memory_bytes={explicit}"
    util = config.get("gpu_memory_utilization")
    return f"gpu_memory_utilization={util} of the node, less what the process held"


def _pool_remedy(
    explicit: int | None,
    env_gib: int | None,
    asked: int,
    free: int,
    needed: int,
    one_pool: int,
    full_pool: int,
    seqs: int,
    max_len: int,
    node: str,
) -> VllmRemedy:
    """kv_cache_memory_bytes sized for what the pool is for: max_num_seqs requests of max_model_len where the
    node holds them, else one."""
    env = "; unset VLLM_CPU_KVCACHE_SPACE, which overrides it" if env_gib is not None else ""
    now = (f"now {readable_bytes(asked)}" if explicit is not None else "now unset") + env
    if full_pool <= free:
        return VllmRemedy(
            "kv_cache_memory_bytes",
            full_pool,
            True,
            f"kv_cache_memory_bytes={full_pool} ({readable_bytes(full_pool)}, {now}): "
            f"max_num_seqs={seqs} requests of max_model_len {max_len:,} at once "
            f"({seqs} x {readable_bytes(needed)}) plus vLLM's null block, within the "
            f"{readable_bytes(free)} {node} has free.",
        )
    if one_pool <= free:
        most = check_memory_bytes(free, one_pool - needed) // needed
        return VllmRemedy(
            "kv_cache_memory_bytes",
            one_pool,
            True,
            f"kv_cache_memory_bytes={one_pool} ({readable_bytes(one_pool)}, {now}): one request of "
            f"max_model_len {max_len:,} plus vLLM's null block; the {readable_bytes(free)} {node} has free "
            f"holds {most:,} such requests at once, not max_num_seqs={seqs} ({readable_bytes(full_pool)}).",
        )
    return VllmRemedy(
        "kv_cache_memory_bytes",
        None,
        False,
        f"kv_cache_memory_bytes: even one request of max_model_len {max_len:,} needs "
        f"{readable_bytes(one_pool)} with vLLM's null block, more than the {readable_bytes(free)} {node} "
        "has free.",
    )


def _space_remedy(
    env_gib: int | None, free: int, target: int, full_pool: int, seqs: int, max_len: int, node: str
) -> VllmRemedy:
    """VLLM_CPU_KVCACHE_SPACE, whole GiB: the least that holds `target`, if the node has it free."""
    gib = max(math.ceil(target / _GIB), 1)
    now = f"now {env_gib}" if env_gib is not None else "unset"
    holds = "max_num_seqs" if target == full_pool else "one request"
    if gib * _GIB <= free:
        return VllmRemedy(
            "VLLM_CPU_KVCACHE_SPACE",
            gib,
            True,
            f"VLLM_CPU_KVCACHE_SPACE={gib} ({now}; whole GiB, it sets kv_cache_memory_bytes): {gib} GiB "
            f"holds {holds} ({seqs if target == full_pool else 1} of max_model_len {max_len:,}: "
            f"{readable_bytes(target)}) within the {readable_bytes(free)} {node} has free.",
        )
    return VllmRemedy(
        "VLLM_CPU_KVCACHE_SPACE",
        None,
        False,
        f"VLLM_CPU_KVCACHE_SPACE ({now}) counts whole GiB: {gib} GiB, the least that holds {holds} "
        f"({readable_bytes(target)}), is more than the {readable_bytes(free)} {node} has free; use "
        "kv_cache_memory_bytes.",
    )


def _utilization_remedy(
    run: EngineRun, explicit: int | None, target: int, free: int, node: str, asked_by: str
) -> VllmRemedy:
    """gpu_memory_utilization, which on CPU asks a share of the node's memory less what the process holds:
    priced where it sized the pool (no kv_cache_memory_bytes) and the refusal recorded the process's share."""
    refused, config = run.info.refused or {}, run.info.config
    util = config.get("gpu_memory_utilization")
    total = _int(refused.get("node_total_bytes"))
    consumed = _int(refused.get("consumed_bytes"))
    if explicit is not None:
        return VllmRemedy(
            "gpu_memory_utilization",
            None,
            False,
            f"gpu_memory_utilization does not size the pool while {asked_by} is set "
            "(vLLM's CPU worker takes the explicit size).",
        )
    if not total or consumed is None or util is None:
        return VllmRemedy(
            "gpu_memory_utilization",
            None,
            None,
            "gpu_memory_utilization: not priced (the refusal records no node total).",
        )
    wanted = math.ceil((consumed + target) / total * 100) / 100
    fits = math.ceil(total * wanted) - consumed <= free
    return VllmRemedy(
        "gpu_memory_utilization",
        wanted if fits else None,
        fits,
        f"gpu_memory_utilization={wanted:.2f} (now {float(util):g}) asks "
        f"{readable_bytes(math.ceil(total * wanted))} of {node}'s {readable_bytes(total)}, "
        f"{readable_bytes(consumed)} of which the process held: "
        f"{'within' if fits else 'more than'} the {readable_bytes(free)} it has free.",
    )


def _block_knobs(asked: str, element: int) -> list[VllmRemedy]:
    """The knobs that shrink a block or the batch: they change what a pool holds, not the bytes asked."""
    fp8 = (
        f"kv_cache_dtype='fp8' stores 1 byte an element instead of {element}: a pool holds twice the tokens, "
        f"but vLLM still asks {asked}."
        if element > 1
        else f"kv_cache_dtype: the KV is 1 byte an element already; vLLM asks {asked} whatever it."
    )
    return [
        VllmRemedy("kv_cache_dtype", None, False, fp8),
        VllmRemedy(
            "max_num_seqs",
            None,
            False,
            f"max_num_seqs does not size the pool: vLLM asks {asked} whatever it (it says "
            "how much is worth asking: the kv_cache_memory_bytes above).",
        ),
        VllmRemedy(
            "tensor_parallel_size",
            None,
            False,
            f"tensor_parallel_size: each rank's worker sizes its pool the same way ({asked}), on its "
            "own node.",
        ),
    ]
