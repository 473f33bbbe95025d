"""The model's weights changing during a run (`model.to(torch.bfloat16)`, `.half()`, `.cuda()` inside the
block): weights.jsonl's `added` and `freed` lines, made into allocator events where the run's events lack
them, and the note that says when.

The weights listed at the start are the level before the first event (the trace starts after them). A
conversion inside the block allocates new storages and frees the old ones:

* without allocator events (profiler=False, or a trace without the model thread's memory events) the
  device's events are the KV log's, and the weights' lines add theirs, at their times;
* torch.profiler records the new storages' allocations (attribution then finds them by address,
  `analyzers.attribution`), but on CPU not the frees of blocks allocated before it started (Kineto warns
  "profiler results will not include the deallocation event"): such a free is added at the time the
  recorder saw it, or just before the first allocation that reuses its address, which it precedes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from analyzers.attribution import frees_storage, sizes_are_blocks, smallest_block
from analyzers.model import DeviceEvents, normal_device
from analyzers.units import human_bytes


@dataclass(frozen=True)
class WeightChange:
    """A weights.jsonl change line, on the analyzers' clock (µs)."""

    event: str  # "added" | "freed"
    name: str
    addr: int
    nbytes: int
    t_us: float
    device: str
    from_start: bool  # "freed": a storage listed at the start (allocated before any trace event)


def weight_changes(run: Any) -> list[WeightChange]:
    """The run's weight changes, in the order they happened, each freed storage told as one listed at the
    start or one added since."""
    added: set[tuple[str, int]] = set()
    changes = []
    for line in run.weight_changes:
        device = normal_device(line.device)
        key = (device, line.addr)
        if line.event == "added":
            added.add(key)
            from_start = False
        else:
            from_start = key not in added
            added.discard(key)
        changes.append(
            WeightChange(
                line.event, line.name, line.addr, line.storage_bytes, line.t_ns / 1000.0, device, from_start
            )
        )
    return changes


def add_weight_events(
    dev: DeviceEvents, changes: list[WeightChange], traced: bool, tolerance_us: float
) -> None:
    """Give `dev` the events of its weight changes that it lacks: all of them when its events are the KV
    log's (`traced` False: at the recorder's times, the frees first, since a new storage may take a freed
    one's address); in a trace, the frees of storages listed at the start that it does not show."""
    mine = [c for c in changes if c.device == dev.device]
    if not mine:
        return
    ts, delta = dev.ts_us, dev.delta_bytes
    at = dev.events_at(c.addr for c in mine)  # the events at each changed storage's address, in order

    def last_allocation(change: WeightChange) -> int | None:
        """The allocation of a storage the model took: the latest at its address by the time it was seen."""
        limit = change.t_us + tolerance_us
        taken = [i for i in at.get(change.addr, []) if ts[i] <= limit and delta[i] > 0]
        return taken[-1] if taken else None

    replacements = {(c.t_us, c.name): c for c in mine if c.event == "added"}
    inserts: list[tuple[int, float, int, int]] = []  # (before which original event, ts, addr, delta)
    for change in mine:
        signed = change.nbytes if change.event == "added" else -change.nbytes
        at_seen = int(np.searchsorted(ts, change.t_us, side="right"))
        events = [i for i in at.get(change.addr, []) if ts[i] <= change.t_us + tolerance_us]
        # A storage listed at the start was freed before its address's next occupant was made (a change
        # found at the block's end is logged then, long after the storage's free)
        reused = next((i for i in events if delta[i] > 0), None)
        if not traced:
            if change.event == "freed" and change.from_start and reused is not None:
                inserts.append((reused, float(ts[reused]), change.addr, signed))
            else:
                inserts.append((at_seen, change.t_us, change.addr, signed))
            continue
        if change.event == "added" or not change.from_start:
            continue  # allocated while the profiler ran: its allocation and free are in the trace
        if events and frees_storage(dev, int(-delta[events[0]]), change.nbytes):
            continue  # the trace's first event at its address is its free (CUDA reports those)
        if events and delta[events[0]] < 0 and not sizes_are_blocks(dev):
            # A CPU trace's free of it, at the size an earlier profiling session of the process left at this
            # address (torch's CPU reporter keeps the size of each block it saw allocated, and reports it
            # when a later block there goes): nothing else can go there before the storage held from the
            # start does, so the free is its own, at its own size (as `readers.kv_before_trace` does for KV)
            delta[events[0]] = -change.nbytes
            continue
        if sizes_are_blocks(dev):
            signed = -smallest_block(change.nbytes)  # the block the level before the first event counts
        # `_apply` frees each old storage as soon as its replacement (the storage of that name) is made
        replacement = replacements.get((change.t_us, change.name))
        made = last_allocation(replacement) if replacement is not None else None
        if made is not None and (reused is None or made < reused):
            inserts.append((made + 1, float(ts[made]), change.addr, signed))
        elif reused is not None:
            inserts.append((reused, float(ts[reused]), change.addr, signed))
        else:
            inserts.append((at_seen, change.t_us, change.addr, signed))
    if inserts:
        insert_events(dev, inserts)


def insert_events(dev: DeviceEvents, inserts: list[tuple[int, float, int, int]]) -> None:
    """Insert events (each before an original one; equal positions in the order given), keeping the
    allocator's running total, where the device has one, consistent with them."""
    inserts.sort(key=lambda row: row[0])  # stable: equal positions keep their order
    positions = np.asarray([row[0] for row in inserts], dtype=np.int64)
    deltas = np.asarray([row[3] for row in inserts], dtype=np.int64)
    n = len(dev)
    totals = dev.total_allocated
    if totals is not None and len(totals) == n and n:
        level_before = np.concatenate(([int(totals[0]) - int(dev.delta_bytes[0])], totals.astype(np.int64)))
        shift = np.zeros(n + 1, dtype=np.int64)
        np.add.at(shift, positions, deltas)
        running = 0
        inserted_totals = []
        for position, delta in zip(positions.tolist(), deltas.tolist(), strict=True):
            running += delta
            inserted_totals.append(int(level_before[position]) + running)
        adjusted = totals.astype(np.int64) + np.cumsum(shift)[:n]
        dev.total_allocated = np.insert(adjusted, positions, np.asarray(inserted_totals, dtype=np.int64))
    else:
        dev.total_allocated = None
    if dev.total_reserved is not None and len(dev.total_reserved) == n and n:
        dev.total_reserved = np.insert(
            dev.total_reserved, positions, dev.total_reserved[np.maximum(positions - 1, 0)]
        )
    else:
        dev.total_reserved = None
    times = np.asarray([row[1] for row in inserts], dtype=np.float64)
    dev.ts_us = np.insert(
        dev.ts_us.astype(np.float64) if dev.ts_us.dtype.kind != "f" else dev.ts_us, positions, times
    )
    dev.addr = np.insert(dev.addr, positions, np.asarray([row[2] for row in inserts], dtype=np.int64))
    dev.delta_bytes = np.insert(dev.delta_bytes, positions, deltas)
    for name in ("frame_id", "stated_category", "torch_category"):
        column = getattr(dev, name)
        if column is not None and len(column) == n:
            setattr(dev, name, np.insert(column, positions, -1))
    if dev.torch_moves is not None and len(dev.torch_moves):
        # a move stays just before the original event it preceded: the events inserted before it shift it
        moves = dev.torch_moves.copy()
        moves[:, 0] += np.searchsorted(np.sort(positions), moves[:, 0], side="right")
        dev.torch_moves = moves


def weights_changed_note(run: Any) -> str:
    """When the model's weights changed during the run, and how, for the report's notes."""
    moments: dict[int, dict[str, Any]] = {}
    for line in run.weight_changes:
        moment = moments.setdefault(line.t_ns, {"step": line.step, "added": [], "freed": []})
        moment[line.event].append(line)
    said = []
    for moment in moments.values():
        step = moment["step"]
        when = "before the first step" if step == 0 else f"at step {step}"
        parts = []
        for event, verb in (("freed", "freed"), ("added", "taken")):
            lines = moment[event]
            if lines:
                dtypes = "/".join(sorted({w.dtype for w in lines}))
                devices = "/".join(sorted({w.device for w in lines}))
                size = human_bytes(sum(w.storage_bytes for w in lines))
                parts.append(f"{len(lines)} {dtypes} storages on {devices} ({size}) {verb}")
        said.append(f"{when}: {' and '.join(parts)}")
    return (
        "the model's weights changed during the run (a .to(), .half() or .cuda() inside the block), "
        f"{'; '.join(said)}: the memory figures count the weights the model held at each moment "
        "(weights.jsonl)"
    )
