"""Another model's KV cache that a run's profiler trace cannot show.

torch.profiler records the memory events of the thread that entered `record()` only. A second model
generating on another thread (the manifest's `other_caches_on_other_threads`) allocates its KV and its
activations there, so the trace has none of them, while the KV log, written by the cache's own hooks, has
every KV storage. On a CPU the profiler's reporter counts only the recorded thread's allocations (its
running total too): the log's storages of those caches are added to the device's events at the log's
times, and the peak, the memory by category and the budget hold their KV. That model's activations stay
unseen, and a note says so. A GPU's caching allocator gives each event its device-wide totals, which count
the other thread's blocks already: adding its storages would count them twice, so nothing is added, and the
note says its KV is in the KV section's figures only.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from analyzers.attribution import JOIN_TOLERANCE_US, trace_lead_us
from analyzers.model import DeviceEvents
from analyzers.readers.weight_changes import insert_events

Storage = tuple[int, int, int, int, int, str, int]  # analyzers.kv_log: addr, bytes, first_ns, freed_ns, ...


def caches_on_other_threads(manifest: dict[str, Any]) -> set[int]:
    """The manifest's `other_caches_on_other_threads`: another model's caches first used on a thread the
    profiler did not record (none for runs recorded before kvtrace said so)."""
    listed = manifest.get("other_caches_on_other_threads")
    if not isinstance(listed, list):
        return set()
    return {cid for cid in listed if isinstance(cid, int) and not isinstance(cid, bool) and cid > 0}


def adds_untraced_kv(dev: DeviceEvents) -> bool:
    """Whether `dev`'s events leave out another thread's allocations, running totals included (a CPU's), so
    that the KV log's storages can be added without counting anything twice."""
    return dev.device == "cpu" or dev.device.startswith("cpu:")


def _traced(dev: DeviceEvents, storages: list[Storage], lead_us: float) -> set[tuple[int, int]]:
    """(address, first sighting) of the storages whose allocation the trace holds: one of its address and
    size, at most the join's tolerance after the log saw it, and not freed before that (a storage of the
    cache used on the recording thread after all). Stricter than the join, which also takes an allocation
    freed just before the sighting: on a CPU, another thread's storage often takes an address the recording
    thread has just freed, and a tensor of the same size (the other cache's own) may have held it. The
    sightings are read on the trace's clock, `lead_us` later (`attribution.trace_lead_us`), as the join
    reads them: a trace a little ahead would otherwise put such a storage's allocation past the tolerance
    and have it added a second time."""
    wanted = np.fromiter({s[0] for s in storages}, dtype=np.int64)
    at = np.flatnonzero(np.isin(dev.addr, wanted))
    allocations: dict[int, list[int]] = {}
    frees: dict[int, list[int]] = {}
    for index in at.tolist():
        target = allocations if dev.delta_bytes[index] > 0 else frees
        target.setdefault(int(dev.addr[index]), []).append(index)
    ts, delta = dev.ts_us, dev.delta_bytes
    held: set[tuple[int, int]] = set()
    for addr, nbytes, first_ns, *_rest in storages:
        seen = first_ns / 1000.0 + lead_us
        released = frees.get(addr, [])
        for index in allocations.get(addr, ()):
            if ts[index] > seen + JOIN_TOLERANCE_US:
                break
            if int(delta[index]) != nbytes:
                continue
            after = bisect.bisect_right(released, index)
            if after == len(released) or ts[released[after]] >= seen:
                held.add((addr, first_ns))
                break
    return held


def add_untraced_kv(
    dev: DeviceEvents,
    kv_events: list[Any],
    storages: list[Storage],
    caches: set[int],
    ranges_lead_us: float | None = None,
) -> dict[int, int]:
    """Give a CPU device's events the storages of `caches` (another thread's) that its trace lacks: each
    allocated at the KV log's first sighting and freed at its `freed` line, in the log's order (a growth's
    new storage before the old one's free, as `analyzers.kv_log` replays them). Returns cache -> storages
    added. `ranges_lead_us`: the trace's lead kvtrace's step ranges measured (`attribution.RANGES_LEAD`)."""
    mine = [s for s in storages if s[6] in caches]
    if not mine or not adds_untraced_kv(dev):
        return {}
    # How far the trace's clock runs ahead of the log's, as the storages it surely holds prove it (the
    # other caches'); the listed caches' own where there are none (those it holds prove it as well)
    recorded = [s for s in storages if s[6] not in caches]
    skip = _traced(dev, mine, trace_lead_us(dev, recorded or mine, ranges_lead_us))
    rows: list[tuple[float, int, int]] = []  # (time, address, signed bytes), in the log's order
    live: dict[int, int] = {}  # address -> bytes, of the storages being added
    held: set[int] = set()  # addresses of their live storages left as they are (traced, or not a CPU's)
    added: dict[int, int] = {}
    for ev in kv_events:
        if ev.event == "freed":
            if ev.addr in live:
                rows.append((ev.t_ns / 1000.0, ev.addr, -live.pop(ev.addr)))
            held.discard(ev.addr)
        elif (
            ev.cache in caches
            and ev.addr
            and ev.addr not in live
            and ev.addr not in held
            and ev.event != "written"
        ):
            if (ev.addr, ev.t_ns) in skip or (ev.device or "cpu").split(":")[0] != "cpu":
                held.add(ev.addr)
                continue
            live[ev.addr] = ev.storage_bytes
            rows.append((ev.t_ns / 1000.0, ev.addr, ev.storage_bytes))
            added[ev.cache] = added.get(ev.cache, 0) + 1
    if rows:
        times = np.asarray([row[0] for row in rows], dtype=np.float64)
        positions = np.searchsorted(dev.ts_us, times, side="right").tolist()
        insert_events(dev, [(pos, *row) for pos, row in zip(positions, rows, strict=True)])
    return added


def untraced_note(caches: set[int], added: dict[int, int]) -> str:
    """What the memory figures hold of another model's caches that the trace has no event of."""
    named = ", ".join(str(cid) for cid in sorted(caches))
    several = len(caches) > 1
    its, it = ("their", "they") if several else ("its", "it")
    head = (
        f"the profiler's trace has no allocation of cache{'s' if several else ''} {named} (another "
        "model's, first used on another thread than the one that entered record(), whose memory events "
        "torch.profiler does not record)"
    )
    if added:
        count = sum(added.values())
        return (
            f"{head}: {its} KV ({count} storages, from the KV log, at the log's times) is added to the "
            "memory figures, but that model's activations are in none of them: the measured peak, its "
            "categories and the budget leave them out (the peak is a lower bound)"
        )
    return (
        f"{head}: the memory figures' KV leaves {its} KV out (the KV section's figures, from the KV log, "
        f"hold {it}), and the measured peak, its categories and the budget hold that model's memory only "
        "as the device's allocator totals count it, as other (a GPU's count every thread's blocks, at the "
        "recording thread's events)"
    )
