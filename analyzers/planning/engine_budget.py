"""A memory budget crossed by a serving engine's run, priced in the engine's own knobs. Pure: reads the engine
files' figures and the report's budget crossing (analyzers.budget), never torch.

An engine allocates its KV pool once, at its start, sized by its knobs: a shorter context or a smaller batch
does not shrink it. So a run whose peak exceeds a budget fits with a smaller pool. The pool is held at the
peak (it lives from the engine's start), so what its size does not change is the rest of the peak: weights,
activations and what the process held (`other_bytes` = peak - pool). The largest pool that fits is then
`room_bytes` = budget - other_bytes:

* transformers' continuous batching: `ContinuousBatchingConfig(num_blocks=N)` makes ceil(N x bytes_per_block
  / bytes_per_sector) data sectors plus two trash sectors (its `PagedAttentionMemoryHandler`), so the largest
  N whose pool fits the room follows. With num_blocks unset, transformers sizes the pool and the tensors that
  scale with it into `max_memory_percent` of the memory free after the model (the device total less what
  the process holds, at least `other_bytes`): a share of room / (device total - other_bytes) keeps them
  within the room.
* vLLM: `kv_cache_memory_bytes` is the pool's bytes (whole blocks); `gpu_memory_utilization` caps vLLM's whole
  use (weights, activation peak, pool) at that share of the GPU: budget / device total.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from analyzers.engine import EngineFigures, EngineRun, engine_figures
from analyzers.units import a_or_an, human_bytes

__all__ = ["EngineBudget", "KnobRemedy", "engine_budget", "run_engine_budget"]

TRASH_SECTORS = 2  # transformers' PagedAttentionCache: two trash sectors before the data sectors
NULL_BLOCKS = 1  # vLLM's null block (analyzers.planning.vllm_diagnose.NULL_BLOCKS)


@dataclass(frozen=True)
class KnobRemedy:
    """One setting of the engine's knob. `fits` None: not priced from this run (`sentence` says why)."""

    knob: str  # "num_blocks" | "max_memory_percent" | "kv_cache_memory_bytes" | "gpu_memory_utilization"
    setting: Any
    fits: bool | None
    sentence: str


@dataclass(frozen=True)
class EngineBudget:
    """The budget against the engine's run: `crossed_by` is `pool` (the pool, allocated at the engine's start,
    took the device over it), `before` (the weights and what the process held already exceed it), `allocation`
    (an allocation at step `step`), or None when the run fits."""

    engine: str
    budget_bytes: int
    crossed: bool
    crossed_by: str | None
    step: int | None
    phase: str | None
    request_bytes: int | None
    request_category: str | None
    allocated_before_bytes: int | None
    allocated_after_bytes: int | None
    peak_bytes: int
    over_bytes: int  # peak - budget (negative: the headroom)
    pool_bytes: int
    other_bytes: int  # the peak less the pool: what the pool's size does not change
    room_bytes: int  # budget - other_bytes: the largest pool that fits
    peak_blocks_used: int
    partial: bool  # profiler=False: activations and other allocations unseen
    unseen_bytes: int  # held since before the trace (a vLLM engine's weights, engine.json), counted in
    remedies: tuple[KnobRemedy, ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["remedies"] = [asdict(r) for r in self.remedies]
        return data


def engine_budget(run: EngineRun, crossing: dict[str, Any], device_total: int | None) -> EngineBudget:
    """The budget of the report's crossing (analyzers.budget.BudgetCrossing.to_json) against the engine's
    pool; `device_total`: the recorded device's memory, for the knobs that take a share of it."""
    info = run.info
    figures = engine_figures(run)
    pool = int(info.kv_cache_bytes or 0)
    budget, peak = int(crossing["bytes"]), int(crossing["peak_bytes"])
    other = max(peak - pool, 0)
    room = budget - other
    crossed_by = None
    if crossing["crossed"]:
        request = crossing.get("request_bytes")
        if crossing.get("before_first_step") and request is None:
            crossed_by = "before"
        elif (
            crossing.get("before_first_step") and crossing.get("request_category") == "kv" and request == pool
        ):
            crossed_by = "pool"
        else:
            crossed_by = "allocation"
    # without its request log (`requests_missing`) what the requests needed is unknown: the peak is said
    demand = _demand(run) if figures.preemptions and run.requests_missing is None else None
    if info.name == "vllm":
        remedies = _vllm_remedies(run, budget, room, other, figures, demand, device_total)
    else:
        remedies = _hf_remedies(run, room, other, figures, demand, device_total)
    return EngineBudget(
        engine=info.name,
        budget_bytes=budget,
        crossed=bool(crossing["crossed"]),
        crossed_by=crossed_by,
        step=crossing.get("step"),
        phase=crossing.get("phase"),
        request_bytes=crossing.get("request_bytes"),
        request_category=crossing.get("request_category"),
        allocated_before_bytes=crossing.get("allocated_before_bytes"),
        allocated_after_bytes=crossing.get("allocated_after_bytes"),
        peak_bytes=peak,
        over_bytes=peak - budget,
        pool_bytes=pool,
        other_bytes=other,
        room_bytes=room,
        peak_blocks_used=figures.peak_blocks_used,
        partial=bool(crossing.get("partial")),
        unseen_bytes=int(crossing.get("unseen_bytes") or 0),
        remedies=tuple(remedies),
    )


def run_engine_budget(
    run: EngineRun, crossing: dict[str, Any] | None, manifest: dict[str, Any]
) -> EngineBudget | None:
    """`engine_budget` of a recorded run: its report's crossing, its manifest's device total. None where there
    is nothing to weigh: no budget, no memory events (the crossing names no device), no pool (a refused
    start). One function, so that `kvtrace diagnose` and the report page price the same remedies."""
    if crossing is None or crossing.get("device") is None:
        return None
    if run.info.status != "ok" or not run.info.kv_cache_bytes:
        return None
    total = (manifest.get("device") or {}).get("total_memory_bytes")
    return engine_budget(run, crossing, total if isinstance(total, int) else None)


class _Demand(NamedTuple):
    """What a preempting run's requests needed at once had none been taken out, in usable blocks, and how
    sure that is: `bound`, the worst case of the preemption diagnosis (`PoolDemand`); `recorded`, their
    demand on the run's own schedule; `shared`, blocks shared between requests (the bound counts them once
    per request); `lower`, requests left unfinished and counted at the lengths they had reached."""

    bound: int
    recorded: int
    shared: bool
    lower: bool


def _held(
    usable: int, used: int, largest: int, demand: _Demand | None = None, preempted: bool = False
) -> str:
    """What a pool of `usable` blocks holds of the run: its peak use, its largest request. A run that took
    requests out of its pool used all of it at its peak: what its requests needed at once had none been
    taken out is `demand`, said as the preemption diagnosis says a pool's verdict (`PoolDemand.verdict`)."""
    blocks = f"its {usable:,} usable block{'' if usable == 1 else 's'}"
    if demand is not None and usable >= largest:
        if demand.lower:
            reached = "counted at the lengths the unfinished ones without a max_tokens had reached"
            held = "hold" if usable >= demand.bound else "are fewer than"
            return f"{blocks} {held} the at least {demand.bound:,} its requests needed at once, {reached}"
        if usable >= demand.bound:
            return f"{blocks} hold the {demand.bound:,} its requests needed at once: none would be taken out"
        worst = f"the {demand.bound:,}-block worst case"
        if demand.shared:
            return (
                f"{blocks} are fewer than {worst} of its requests at once, which counts the blocks they "
                "shared once per request: whether some would still be taken out is not known from this run"
            )
        if usable >= demand.recorded:
            return (
                f"{blocks} hold the {demand.recorded:,} its requests needed together on the recorded "
                f"schedule but are fewer than {worst}: a larger pool admits more at once, so some may or may "
                "not still be taken out"
            )
        return (
            f"{blocks} are fewer than the {demand.recorded:,} its requests needed together on the recorded "
            "schedule: some would likely still be taken out of the pool"
        )
    if usable >= used and demand is None and preempted:
        return (
            f"{blocks} hold the {used:,} the run used at its peak, its whole pool: it took requests out, and "
            "what they needed at once is not known from this run"
        )
    if usable >= used:
        return f"{blocks} hold the {used:,} the run used at its peak"
    if usable >= largest:
        return (
            f"{blocks} are fewer than the {used:,} the run used at its peak: requests would wait for blocks "
            "or be taken out of the pool"
        )
    return f"{blocks} are fewer than the {largest:,} its largest request held: that request could not run"


def _demand(run: EngineRun) -> _Demand | None:
    """The preemption diagnosis's demand of a preempting run (`_Demand`); None where it gives none."""
    from analyzers.planning.unfinished_asks import in_engine_at_end
    from analyzers.planning.vllm_diagnose import diagnose_preemptions  # it imports this module

    diagnosis = diagnose_preemptions(run)
    pool = diagnosis.pool_demand
    if pool is None:
        return None
    lower = in_engine_at_end(run) > diagnosis.asked_requests
    return _Demand(pool.bound, pool.recorded_peak, pool.shared, lower)


def _left(other: int, room: int, smallest: int) -> str:
    """What the memory besides the pool leaves of the budget, against the `smallest` pool that can run."""
    if room <= 0:
        return f"the {human_bytes(other)} besides the pool exceed the budget on their own"
    return (
        f"the {human_bytes(other)} besides the pool leave {human_bytes(room)} of the budget, less than the "
        f"smallest pool that serves a request ({human_bytes(smallest)})"
    )


def _largest_request(run: EngineRun) -> int:
    """The most blocks one request held in the run."""
    return max((e.blocks for e in run.requests), default=0)


def _share(value: float) -> float:
    """`value` rounded down to 3 significant digits: a share no larger than the one priced."""
    if value <= 0:
        return 0.0
    scale = 10 ** (2 - math.floor(math.log10(value)))
    return math.floor(value * scale) / scale


def _hf_remedies(
    run: EngineRun,
    room: int,
    other: int,
    figures: EngineFigures,
    demand: _Demand | None,
    device_total: int | None,
) -> list[KnobRemedy]:
    """ContinuousBatchingConfig(num_blocks=...) and max_memory_percent (see the module docstring)."""
    info = run.info
    used = figures.peak_blocks_used
    per_block = int(info.bytes_per_block or 0)
    per_sector = int(info.bytes_per_sector or per_block)
    if not per_block or not per_sector:
        return [
            KnobRemedy("num_blocks", None, None, "num_blocks: not priced (engine.json has no block size)")
        ]
    sectors = room // per_sector - TRASH_SECTORS
    remedies: list[KnobRemedy] = []
    if sectors < 1:
        remedies.append(
            KnobRemedy(
                "num_blocks",
                None,
                False,
                f"num_blocks cannot help: {_left(other, room, (TRASH_SECTORS + 1) * per_sector)}.",
            )
        )
        return remedies
    blocks = sectors * per_sector // per_block
    pool = (math.ceil(blocks * per_block / per_sector) + TRASH_SECTORS) * per_sector
    remedies.append(
        KnobRemedy(
            "num_blocks",
            blocks,
            True,
            f"ContinuousBatchingConfig(num_blocks={blocks}) makes {a_or_an(human_bytes(pool))} pool "
            f"({pool:,} B, "
            f"two trash sectors included), peak {human_bytes(other + pool)}; "
            f"{_held(blocks, used, _largest_request(run), demand, figures.preemptions > 0)}.",
        )
    )
    if device_total and device_total > other:
        percent = _share(room / (device_total - other))
        remedies.append(
            KnobRemedy(
                "max_memory_percent",
                percent,
                True,
                f"Or leave num_blocks unset with max_memory_percent={percent:g} or less: transformers sizes "
                f"the pool and the tensors that grow with it into that share of the memory free on this "
                f"{human_bytes(device_total)} device after the model, at most {human_bytes(room)}.",
            )
        )
    return remedies


def _vllm_remedies(
    run: EngineRun,
    budget: int,
    room: int,
    other: int,
    figures: EngineFigures,
    demand: _Demand | None,
    device_total: int | None,
) -> list[KnobRemedy]:
    """kv_cache_memory_bytes and gpu_memory_utilization (see the module docstring)."""
    info = run.info
    used, preempted = figures.peak_blocks_used, figures.preemptions > 0
    largest = _largest_request(run)
    per_block = int(info.bytes_per_block or 0)
    remedies: list[KnobRemedy] = []
    blocks = room // per_block if per_block else 0
    if blocks <= NULL_BLOCKS:
        remedies.append(
            KnobRemedy(
                "kv_cache_memory_bytes",
                None,
                False,
                f"kv_cache_memory_bytes cannot help: {_left(other, room, (NULL_BLOCKS + 1) * per_block)}.",
            )
        )
    else:
        pool = blocks * per_block
        held = _held(blocks - NULL_BLOCKS, used, largest, demand, preempted)
        remedies.append(
            KnobRemedy(
                "kv_cache_memory_bytes",
                pool,
                True,
                f"kv_cache_memory_bytes={pool} ({human_bytes(pool)}: {blocks:,} blocks) brings the peak to "
                f"{human_bytes(other + pool)}; {held}.",
            )
        )
    total = info.memory_profile.get("total_device_bytes") or device_total
    if info.config.get("device") == "cpu" or not isinstance(total, int) or total <= 0:
        remedies.append(
            KnobRemedy(
                "gpu_memory_utilization",
                None,
                None,
                "gpu_memory_utilization: not priced here (no GPU total in this run; on CPU the KV space is "
                "kv_cache_memory_bytes or VLLM_CPU_KVCACHE_SPACE).",
            )
        )
        return remedies
    share = math.floor(budget / total * 100) / 100
    now = info.config.get("gpu_memory_utilization")
    # vLLM's pool is what the share leaves after the weights and activation peak it profiles: about the
    # peak less the pool measured here
    left = math.ceil(total * share) - other
    fits = share > 0 and left // per_block > NULL_BLOCKS if per_block else None
    if share <= 0:
        sentence = (
            f"gpu_memory_utilization cannot help: the budget is under 1% of the {human_bytes(total)} GPU."
        )
    else:
        sentence = (
            f"Or gpu_memory_utilization={share:.2f}{f' (now {now:g})' if now else ''} with "
            "kv_cache_memory_bytes unset: vLLM keeps its weights, activation peak and pool within that "
            f"share of the {human_bytes(total)} GPU, {human_bytes(math.ceil(total * share))}, leaving its "
            f"pool about {human_bytes(max(left, 0))}"
            + (
                f" ({left // per_block:,} blocks)."
                if fits
                else ": not two blocks, so vLLM would refuse to start."
            )
        )
    remedies.append(KnobRemedy("gpu_memory_utilization", share if share > 0 else None, fits, sentence))
    return remedies
