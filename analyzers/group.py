"""A run group's figures: each rank's report, the KV summed over ranks, and which rank to look at.

Definitions, so that a group's JSON reads the same whatever the parallelism:

* KV bytes (peak, final, allocated over the run, per layer K and V) are the sum over ranks: what the
  whole job holds. Peaks are summed as they are, although ranks may peak at different moments. A layer's
  row sums each rank's main cache: cache ids are each process's own, never matched across ranks.
* Token counts (tokens held, evicted tokens, batch) are the largest rank's: tensor-parallel ranks hold the
  same tokens, each for its own KV heads, so adding them up would count each token once per rank. Data
  parallel ranks (different rows or tokens, or all KV heads and whole attention weights) add them up. When
  the runs cannot tell which (`parallelism.group_reading`), the figures that depend on it are left unknown.
* A rank's arithmetic bytes per token counts the KV heads its cache tensors hold (a tensor-parallel rank
  holds a share of the model's); the group's is the sum over ranks.
* The group's memory peak (`peak_allocated_bytes`, `categories_at_peak`) is the peak rank's: the device
  that runs out first.
* The rank to diagnose (`focus`): the rank that ran out of memory, else the first rank that raised or
  died (a killed rank at the last line of its logs), else the rank that peaked. A rank without memory
  figures (no devices) is passed over for one that has them, and the reason says so.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from analyzers.attribution import attribute
from analyzers.compare import RunFigures, generated, run_figures
from analyzers.group_budget import budget_focus
from analyzers.group_stops import failed_first, failed_reason, stop_notes, stopped_words
from analyzers.model import MemorySource
from analyzers.parallelism import (
    Reading,
    group_reading,
    holds_all_kv_heads,
    mixed_head_counts,
    sharded_attention,
)
from analyzers.readers.run_group import RankRun, read_run_group
from analyzers.readers.sources import ProgressFn
from analyzers.summary import KvSummary, LayerSummary, Report, summarize

__all__ = [
    "GroupReport",
    "RankReport",
    "build_group_report",
    "focus_source",
    "group_figures",
    "load_group_focus",
]


@dataclass
class RankReport:
    rank: int
    world_size: int | None
    path: str
    status: str  # ok | exception | interrupted | running (the process died)
    local_rank: int | None
    hostname: str | None
    ended: dict[str, Any]
    source: MemorySource = field(repr=False)
    report: Report = field(repr=False)

    @property
    def device(self) -> str | None:
        main = self.report.main_device
        return main.device if main is not None else None

    @property
    def peak_allocated_bytes(self) -> int:
        main = self.report.main_device
        return main.peak_allocated_bytes if main is not None else 0


@dataclass
class GroupReport:
    path: str
    world_size: int | None
    ranks: list[RankReport]
    total: Report  # the group as one report: every rank's devices, KV summed over ranks
    peak_rank: int | None
    oom_rank: int | None
    failed_ranks: list[int]
    missing_ranks: list[int]
    focus_rank: int
    focus_reason: str  # "ran out of memory" | "raised <Type>" | "never finished" | "peaked"
    notes: list[str] = field(default_factory=list)
    replicas: bool = False  # data parallel: each rank its own sequences (see parallelism.group_reading)
    reading: Reading = "tensor"  # how token figures combine; "unknown": batch, token rows, tokens/s not given
    over_budget_ranks: list[int] = field(default_factory=list)  # would run out under the budget: group_budget
    unreadable: list[str] = field(default_factory=list)  # RunGroup.unreadable: ranks whose run is unreadable

    def rank(self, rank: int) -> RankReport:
        return next(r for r in self.ranks if r.rank == rank)


def _rank_report(run: RankRun) -> RankReport:
    source = attribute(run.source)
    report = summarize(source)  # a tensor-parallel rank's arithmetic counts the KV heads it holds
    manifest = run.manifest
    world_size = manifest.get("world_size")
    local_rank = manifest.get("local_rank")
    return RankReport(
        rank=run.rank,
        world_size=world_size if isinstance(world_size, int) else None,
        path=str(run.path),
        status=run.status,
        local_rank=local_rank if isinstance(local_rank, int) else None,
        hostname=manifest.get("hostname"),
        ended=dict(manifest.get("ended") or {}),
        source=source,
        report=report,
    )


def _replicated_heads(ranks: list[RankReport]) -> bool:
    """Tensor parallel with every rank holding all KV heads (copies): its attention weights are shares."""
    return _all_heads(ranks) and any(sharded_attention(r.report, r.source) for r in ranks)


def _all_heads(ranks: list[RankReport]) -> bool:
    return len(ranks) >= 2 and all(holds_all_kv_heads(r.report, r.source) for r in ranks)


def _sum_kv(kvs: list[KvSummary], reading: Reading = "tensor", ranks: list[int] | None = None) -> KvSummary:
    """KV figures of the ranks together. Bytes add up either way; tokens and rows do only for replicas
    (data parallel: the ranks' sequences are different ones), whose bytes per token are one rank's;
    tensor-parallel bytes per token are the sum of the ranks' own (`_tensor_per_token`). An unknown reading
    gives no batch, token rows nor bytes per token: one rank's and the sum differ.

    One row per layer: each rank's main cache (the one its tokens and batch describe), summed over the
    ranks. Cache ids are each process's own count (rank 0's second generate() call and rank 1's first can
    both be cache 2), so caches of different ranks are never matched by id; a row's `cache` is the ranks'
    main cache id where they all have the same, else None."""
    mains = {kv.main_cache for kv in kvs}
    common = mains.pop() if len(mains) == 1 else None
    layers: dict[int, LayerSummary] = {}
    for kv in kvs:
        for item in kv.per_layer:
            if kv.main_cache is not None and item.cache != kv.main_cache:
                continue  # a draft model's cache, an earlier generate()'s output: the rank's own report's
            into = layers.setdefault(item.layer, LayerSummary(item.layer, 0, 0, 0, 0, cache=common))
            into.k_bytes += item.k_bytes
            into.v_bytes += item.v_bytes
            into.evicted_tokens = max(into.evicted_tokens, item.evicted_tokens)
            into.tokens = max(into.tokens, item.tokens)
            into.k_tokens = max(into.k_tokens, item.k_tokens)
            into.v_tokens = max(into.v_tokens, item.v_tokens)
    methods = sorted({kv.measured_from for kv in kvs})
    tokens_held = max((kv.tokens_held for kv in kvs if kv.tokens_held is not None), default=None)
    batch = max((kv.batch for kv in kvs if kv.batch is not None), default=None)
    final = sum(kv.final_bytes for kv in kvs)
    # Each rank's main cache (an assistant model's draft cache is not the model's tokens' KV)
    main_final = sum(next((c.final_bytes for c in kv.caches if c.main), kv.final_bytes) for kv in kvs)
    token_rows = (tokens_held * batch) if tokens_held and batch else 0
    expected = (
        sum(kv.bytes_per_token_expected for kv in kvs if kv.bytes_per_token_expected is not None)
        if all(kv.bytes_per_token_expected is not None for kv in kvs)
        else None
    )
    evicted = max((kv.evicted_tokens for kv in kvs), default=0)
    replicas = reading == "data"
    if replicas:
        batch = sum(kv.batch or 0 for kv in kvs) or None
        token_rows = sum((kv.tokens_held or 0) * (kv.batch or 0) for kv in kvs)
        expected = kvs[0].bytes_per_token_expected
        evicted = sum(kv.evicted_tokens for kv in kvs)
    evictions = [kv.evictions for kv in kvs if kv.evictions]
    # Preallocated buffers on every rank: a slot's bytes (tensor parallel ranks share the slots, each
    # holding some heads; replicas each have their own rows)
    capacity_rows = capacity_tokens = None
    per_token = (main_final / token_rows) if token_rows else None
    if all(kv.capacity_rows and kv.capacity_tokens for kv in kvs):
        room_rows = [kv.capacity_rows or 0 for kv in kvs]
        capacity_rows = sum(room_rows) if replicas else max(room_rows)
        capacity_tokens = max(kv.capacity_tokens or 0 for kv in kvs)
        per_token = main_final / (capacity_rows * capacity_tokens) if main_final else None
    per_token_note = None
    if reading == "tensor" and capacity_rows is None and len(kvs) > 1:
        per_token, per_token_note = _tensor_per_token(kvs, ranks or list(range(len(kvs))), per_token)
    if reading == "unknown":
        batch = expected = per_token = capacity_rows = capacity_tokens = None
        token_rows = 0
    return KvSummary(
        peak_bytes=sum(kv.peak_bytes for kv in kvs),
        final_bytes=final,
        allocated_bytes_total=sum(kv.allocated_bytes_total for kv in kvs),
        evicted_tokens=evicted,
        per_layer=[layers[k] for k in sorted(layers)],
        measured_from=methods[0] if len(methods) == 1 else "+".join(methods),
        bytes_per_token_measured=per_token,
        bytes_per_token_expected=expected,
        tokens_held=tokens_held,
        batch=batch,
        token_rows=token_rows or None,
        capacity_rows=capacity_rows,
        capacity_tokens=capacity_tokens,
        capacity_of=kvs[0].capacity_of if capacity_rows else None,
        evictions={
            "events": sum(int(e["events"]) for e in evictions),
            "claimed_bytes": sum(int(e["claimed_bytes"]) for e in evictions),
            "freed_bytes": sum(int(e["freed_bytes"]) for e in evictions),
            "new_storage_bytes": sum(int(e.get("new_storage_bytes", 0)) for e in evictions),
            "released_bytes": sum(int(e.get("released_bytes", e["freed_bytes"])) for e in evictions),
            "per_layer": [],
            "freed_nothing": [],
        }
        if evictions
        else None,
        bytes_per_token_note=per_token_note,
    )


def _tensor_per_token(
    kvs: list[KvSummary], ranks: list[int], summed: float | None
) -> tuple[float | None, str | None]:
    """Tensor parallel: each rank holds its own KV heads of the same tokens, so the job's bytes per token
    is the sum of the ranks' own. The summed bytes over the fullest rank's tokens (`summed`) is the same
    figure while the ranks hold the same tokens, and less than it once one stopped early (a rank that died
    or raised holds fewer): then the ranks' own figures, and the note that says so. A rank with nothing
    measured leaves the sum unknown, and the note says which."""
    tokens = {kv.tokens_held for kv in kvs}
    unmeasured = [rank for rank, kv in zip(ranks, kvs, strict=True) if kv.bytes_per_token_measured is None]
    if len(tokens) == 1 and not unmeasured:
        return summed, None
    if unmeasured:
        names = ", ".join(str(rank) for rank in unmeasured)
        return None, f"rank {names} holds no KV to measure: the ranks' sum is unknown"
    own = "; ".join(
        f"rank {rank} {kv.bytes_per_token_measured:,.1f} over {kv.tokens_held or 0:,} tokens"
        for rank, kv in zip(ranks, kvs, strict=True)
    )
    return sum(kv.bytes_per_token_measured or 0.0 for kv in kvs), (
        f"the ranks' own figures summed ({own}): tensor-parallel ranks hold their own KV heads of the same "
        "tokens, and these stopped at different tokens"
    )


def _focus(ranks: list[RankReport], oom_rank: int | None, peak_rank: int | None) -> tuple[int, str]:
    if oom_rank is not None:
        return oom_rank, "ran out of memory"
    failed = [r for r in ranks if r.status != "ok"]
    # The first to fail by itself: the others often fail after it, waiting on a collective it never joined,
    # or are SIGTERMed by the launcher. Every failed rank stopped from outside (a time limit): the peak.
    ordered = failed_first(failed)
    if failed and not ordered:
        assert peak_rank is not None
        return peak_rank, f"peaked ({stopped_words(failed, len(ranks))})"
    if ordered:
        first = ordered[0]
        if first.report.devices or not any(r.report.devices for r in ranks):
            return first.rank, failed_reason(first)
        # A rank without memory figures (no allocator event, no weights, no KV) has nothing to diagnose: the
        # first failed rank that has them, else the one that peaked, saying why the first is not the one
        without = f"rank {first.rank} failed first ({failed_reason(first)}) but has no memory figures"
        with_figures = next((r for r in ordered if r.report.devices), None)
        if with_figures is not None:
            return with_figures.rank, f"{failed_reason(with_figures)} ({without})"
        measured = [r for r in ranks if r.report.devices]
        peaked = max(measured, key=lambda r: (r.peak_allocated_bytes, -r.rank))
        return peaked.rank, f"peaked ({without})"
    assert peak_rank is not None
    return peak_rank, "peaked"


def _total(
    path: str,
    ranks: list[RankReport],
    reading: Reading,
    reading_note: str | None,
    missing: list[int],
    peak: RankReport,
) -> Report:
    devices = [
        dataclasses.replace(dev, device=f"rank{r.rank}/{dev.device}")
        for r in ranks
        for dev in r.report.devices
    ]
    first = ranks[0].report
    ooms = [r for r in ranks if r.report.oom is not None]
    oom = {**ooms[0].report.oom, "rank": ooms[0].rank} if ooms else None  # type: ignore[dict-item]
    notes = [f"rank {r.rank}: {note}" for r in ranks for note in r.report.notes]
    if reading_note is not None:
        notes.append(reading_note)
    elif _replicated_heads(ranks):
        notes.append(
            "every rank holds all KV heads, but a share of the attention weights (tensor parallel, each rank "
            "a copy of the KV heads it needs): tokens and batch are one rank's, KV bytes the ranks' sum"
        )
    others = [r.rank for r in ranks if any(c.final_bytes and not c.main for c in r.report.kv.caches)]
    if others:
        names = ", ".join(str(r) for r in others)
        notes.append(
            f"rank {names} held more than one KV cache at the end: per-layer rows are each rank's main cache "
            "(its own report shows every cache)"
        )
    kv = _sum_kv([r.report.kv for r in ranks], reading, [r.rank for r in ranks])
    if missing and kv.bytes_per_token_measured is not None:
        # A rank with no run holds KV the sum lacks (tensor parallel: its KV heads), so the figures are the
        # present ranks', not the model's
        names = ", ".join(str(rank) for rank in missing)
        of = f"{len(ranks)} of {len(ranks) + len(missing)}"
        present = (
            f"measured and arithmetic summed over the {of} ranks present, not the model's: no run from "
            f"rank {names}"
        )
        kv.bytes_per_token_note = "; ".join(n for n in (present, kv.bytes_per_token_note) if n)
    return Report(
        source_kind="run_group",
        path=path,
        devices=devices,
        kv=kv,
        geometry=first.geometry,
        steps=max(r.report.steps for r in ranks),
        markers=sum(r.report.markers for r in ranks),
        oom=oom,
        notes=notes,
        budget=_group_budget(ranks),
        # The group's peak is the peak rank's (its main device's), so it counts what that rank's counts: a
        # rank without allocator events that did not peak leaves it measured (its own device says its unit)
        partial=peak.report.partial,
    )


def _group_budget(ranks: list[RankReport]) -> dict[str, Any] | None:
    """The budget the ranks were recorded with (each rank is one device): the first rank to cross it, in
    time, else the one with the least headroom; `rank` says which."""
    budgets = [(r, r.report.budget) for r in ranks if r.report.budget]
    if not budgets:
        return None
    crossed = [(r, b) for r, b in budgets if b.get("crossed")]
    if crossed:
        rank, budget = min(crossed, key=lambda rb: (rb[1].get("t") or float("-inf"), rb[0].rank))
    else:
        rank, budget = min(budgets, key=lambda rb: (rb[1].get("headroom_bytes") or 0, rb[0].rank))
    return {**budget, "rank": rank.rank}


def build_group_report(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> GroupReport:
    """Read, attribute and summarize every rank of the group at `path`."""
    group = read_run_group(path, progress=progress)
    ranks = [_rank_report(run) for run in group.ranks]
    peak = max(ranks, key=lambda r: (r.peak_allocated_bytes, -r.rank))
    ooms = [r for r in ranks if r.report.oom is not None]
    oom_rank = min(ooms, key=lambda r: (r.report.oom or {}).get("time") or 0.0).rank if ooms else None
    focus_rank, reason = _focus(ranks, oom_rank, peak.rank)
    reading, reading_note = group_reading(ranks)
    total = _total(str(group.path), ranks, reading, reading_note, group.missing_ranks, peak)
    mixed = mixed_head_counts([(r.rank, r.report) for r in ranks])
    report = GroupReport(
        path=str(group.path),
        world_size=group.world_size,
        ranks=ranks,
        total=total,
        peak_rank=peak.rank,
        oom_rank=oom_rank,
        failed_ranks=[r.rank for r in ranks if r.status != "ok"],
        missing_ranks=group.missing_ranks,
        focus_rank=focus_rank,
        focus_reason=reason,
        notes=group.notes + ([mixed] if mixed else []) + stop_notes(ranks) + total.notes,
        replicas=reading == "data",
        reading=reading,
        unreadable=group.unreadable,
    )
    return budget_focus(report)  # the budget each rank was recorded with: every rank that crosses it named


def load_group_focus(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    """The attributed source of the rank to look at (see `focus`), for callers that take one input."""
    return focus_source(build_group_report(path, progress=progress))


def focus_source(group: GroupReport) -> MemorySource:
    """The rank to look at's source; its `meta["run_group"]` says which rank of which group, and why."""
    focus = group.rank(group.focus_rank)
    focus.source.meta["run_group"] = {
        "path": group.path,
        "rank": focus.rank,
        "reason": group.focus_reason,
        "world_size": group.world_size,
    }
    return focus.source


def _replica_rates(group: GroupReport) -> dict[str, Any]:
    """Data parallel: every rank generates its own rows at once, so the job's tokens/s is the sum of the
    ranks' (each over its own wall time), and per row the same spread over all their rows. Generated tokens
    per row are the ranks' when they agree, else unknown as one figure."""
    made = [(r, m) for r, m in ((r, generated(r.source, r.report)) for r in group.ranks) if m is not None]
    if not made:
        return dict.fromkeys(("tokens_per_second", "tokens_per_second_per_row", "generated_tokens_per_row"))
    rate = sum(m.tokens_all_rows / m.seconds for _, m in made)
    rows = sum(r.report.kv.batch or 0 for r, _ in made)
    per_row = {m.tokens_per_row for _, m in made}
    return {
        "tokens_per_second": rate,
        "tokens_per_second_per_row": rate / rows if rows else None,
        "generated_tokens_per_row": per_row.pop() if len(per_row) == 1 else None,
        "rows_are_beams": any(m.rows_are_beams for _, m in made),
    }


def group_figures(group: GroupReport, label: str) -> RunFigures:
    """The group's row in `kvtrace compare`: KV summed over ranks, step by step (`kv_ranks`); the peak
    rank's peak and device figures (`peak_rank`), as `report` marks it.
    Tokens/s: tensor-parallel ranks generate the same tokens, so rank 0's figure is the job's; data-parallel
    ones each their own, so the job's is their sum."""
    base = group.ranks[0]
    figures = run_figures(base.source, group.total, label)
    if group.replicas:
        figures = dataclasses.replace(figures, **_replica_rates(group))
    elif group.reading == "unknown":  # rank 0's rate or the ranks' sum: which, the runs do not say
        figures = dataclasses.replace(
            figures, tokens_per_second=None, tokens_per_second_per_row=None, generated_tokens_per_row=None
        )
    logs = [kv for kv in (rank.source.meta.get("kv") for rank in group.ranks) if kv is not None]
    steps = tuple(sorted({step for kv_log in logs for step in kv_log.step_live}))
    # A rank with no event at a step (it died, or writes in place) still holds what it held before.
    by_step = dict.fromkeys(steps, 0)
    for kv_log in logs:
        held = 0
        for step in steps:
            live = kv_log.step_live.get(step)
            if live is not None:
                held = sum(live.values())
            by_step[step] += held
    return dataclasses.replace(
        figures,
        path=group.path,
        step_axis=steps,
        kv_by_step=tuple(by_step[s] for s in steps),
        notes=tuple(group.notes),
        kv_ranks=len(group.ranks),
        peak_rank=group.peak_rank if figures.peak_bytes is not None else None,
    )


def rank_figures(group: GroupReport, label: str) -> list[RunFigures]:
    """One row per rank, labelled `<label>/rank-<r>`, for comparing groups of the same world size: each
    its own KV and device (`peak_rank` the rank)."""
    rows = [(r.rank, run_figures(r.source, r.report, f"{label}/rank-{r.rank}")) for r in group.ranks]
    return [dataclasses.replace(f, peak_rank=rank if f.peak_bytes is not None else None) for rank, f in rows]
