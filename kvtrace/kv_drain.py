"""Writing the KV log: `KvTracker`'s captured layer updates become JSON lines here, in one loop.

Why apart from the capture (issue 11): `KvTracker.update` only compares a layer and queues a tuple of facts,
so the model's thread neither formats nor writes a line for it; the lines are made when the recorder's
writer thread takes them (`take_lines`, every 0.1 s), or before any other event is logged, so the log keeps
its order. A storage released before the update that captures its release may have handed its address to a
storage captured earlier: its `freed` is logged first here, as the analyzers' replay by address needs.

Threads: the model's thread calls everything; the writer thread calls `take_lines` only. The capture
queue is appended by the model's thread without a lock (a list append is atomic) and drained by whole
prefixes (`queue[:n]`, then `del queue[:n]`), so no update is lost to a swap; everything that numbers or
appends lines holds `lock` (the methods marked `locked`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from kvtrace.kv_lines import CLOCK, KEY_JSON, SHAPE_JSON, quoted, shape_facts, slot_lines
from kvtrace.kv_slots import K_DATA, V_DATA, LayerState, free_weak_ref, released_slots

_NO_FREES: list[tuple[str, int, int]] = []  # drain's deferred frees of an update without `both_first`: none
_P = ParamSpec("_P")
_R = TypeVar("_R")


class _Locking(Protocol):
    """What `locked` needs of a tracker part: the lock, which each part declares (the tracker makes it)."""

    lock: threading.RLock


_S = TypeVar("_S", bound=_Locking)


def locked(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Run a method that numbers or appends lines under the tracker's lock (the writer thread drains)."""

    @functools.wraps(method)
    def locked(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class KvDrain:
    """Writing the log (a mixin of `KvTracker`, whose state it shares)."""

    lock: threading.RLock
    lines: list[str]
    _queue: list[tuple[Any, ...]]
    _templates: dict[tuple[Any, ...], tuple[str, str]]
    _layers: dict[tuple[int, int], LayerState]
    _freed_early: set[int]
    _seq: int

    def take_lines(self) -> list[str]:
        """The lines logged so far, the captured updates included; safe from the writer thread."""
        with self.lock:
            if self._queue:
                self._drain_locked(released=True)
            lines, self.lines = self.lines, []
        return lines

    def drain(self) -> None:
        """Log the captured updates, in the order they happened, with the time, step and phase of each."""
        if not self._queue:
            return
        with self.lock:
            self._drain_locked()

    def _drain_locked(self, released: bool = False) -> None:
        """Turn the captured updates into lines, in order. A storage released before the update that
        replaced it (the layer was rebound outside the update, see `capture`) may have handed its address
        to a new storage captured before that update (this layer's own, or an earlier layer's in the same
        step: light mode captures every layer at the forward's end). The log is replayed by address, so such
        a release's `freed` goes before that new storage's event, at its time.

        `released` (the writer thread's drain, every 0.1 s, which may fall between that new storage's
        capture and the update that captures the release): the slots are searched too for storages released
        but not yet captured (`released_slots`), before the queue's prefix is taken, so that a release
        captured meanwhile is in the batch. A new storage at one's address logs its `freed` first, and the
        slot's later capture (or poll) logs none. O(layers) per such drain, nothing on the model's thread."""
        unlogged = released_slots(self._layers, self._freed_early) if released else None
        queue = self._queue
        count = len(queue)  # a prefix: the model's thread may append meanwhile, after it
        batch = queue[:count]
        del queue[:count]
        append = self.lines.append
        templates = self._templates
        seq = self._seq
        # The facts that release a storage, per its address, the next to log last (the batch walked back)
        releases: dict[int, list[tuple[Any, ...]]] = {}
        early = self._freed_early
        for entry in reversed(batch):
            for f in (entry[9], entry[8]):
                if f is not None and f[11] and not (early and f[10] in early):
                    at = releases.get(f[8])
                    if at is None:
                        releases[f[8]] = [f]
                    else:
                        at.append(f)
        # Those made in this batch: a new storage at their address before they were made is not after them
        made_here = self._unlogged_in(batch, unlogged, releases) if unlogged else set()
        # An update's time, step and phase, formatted once for its lines (a planned step's layers share them)
        last: tuple[int, int, str] | None = None
        clock = ""
        for cid, layer, t_ns, step, phase_json, tokens, evicted, reason, k_facts, v_facts, pair in batch:
            if last is None or t_ns != last[0] or step != last[1] or phase_json != last[2]:
                last = (t_ns, step, phase_json)
                clock = CLOCK % last
            # with `pair` (both_first): the frees wait for both new storages; no list made otherwise
            later = [] if pair else _NO_FREES
            for key, f in ((K_DATA, k_facts), (V_DATA, v_facts)):
                if f is None:
                    continue
                (
                    kind,
                    addr,
                    nbytes,
                    view_offset,
                    shape,
                    dtype,
                    device,
                    itemsize,
                    prev_addr,
                    prev_size,
                    old_wref,
                    old_gone,
                    wref,
                ) = f
                lines = templates.get((cid, layer, key, dtype, device)) or self._slot_lines(
                    cid, layer, key, dtype, device
                )
                at = releases.get(addr)
                if at and at[-1][10] != wref:
                    # The next release at this address is not of the storage made here (the normal case: a
                    # later step replaces it) but of one released before this update made it: logged first.
                    gone = at.pop()
                    free_weak_ref(gone[10])
                    seq += 1
                    append(self._released_line(batch, gone) % (seq, clock, addr, gone[9]))
                if unlogged and old_wref and addr in unlogged:
                    held = unlogged[addr]
                    if held[3] == wref:  # its own event: a new storage here after it follows its release
                        made_here.discard(wref)
                    elif held[3] not in made_here:
                        # Released (by other code) before this storage was made at its address, and its slot's
                        # update, which captures that, is still to come: its `freed` now, once.
                        del unlogged[addr]
                        early.add(held[3])
                        seq += 1
                        append(
                            self._slot_lines(held[0], held[1], held[2], held[5], held[6])[1]
                            % (seq, clock, addr, held[4])
                        )
                shape_json, count = SHAPE_JSON.get(shape) or shape_facts(shape)
                first = key is K_DATA
                seq += 1
                append(
                    lines[0]
                    % (
                        seq,
                        clock,
                        kind,
                        addr,
                        nbytes,
                        view_offset,
                        shape_json,
                        count * itemsize,
                        tokens,
                        evicted if first else 0,
                        prev_addr,
                        quoted(reason) if first and evicted else '""',
                    )
                )
                if old_gone and early and old_wref in early:
                    early.discard(old_wref)  # logged by an earlier drain, before a new storage at its address
                    free_weak_ref(old_wref)
                elif old_gone:
                    at = releases[prev_addr]
                    if at and at[-1] is f:  # else logged already, before a new storage at its address
                        # released by the update itself (torch.cat growth): freed at its time
                        at.pop()
                        free_weak_ref(old_wref)
                        if pair and not (first and v_facts is not None and v_facts[1] == prev_addr):
                            later.append((lines[1], prev_addr, prev_size))
                        else:  # not deferred past a V storage made at its address
                            seq += 1
                            append(lines[1] % (seq, clock, prev_addr, prev_size))
            for template, prev_addr, prev_size in later:
                seq += 1
                append(template % (seq, clock, prev_addr, prev_size))
        self._seq = seq

    @staticmethod
    def _unlogged_in(
        batch: list[tuple[Any, ...]], unlogged: dict[int, tuple[Any, ...]], releases: dict[int, Any]
    ) -> set[int]:
        """Drop from `unlogged` the storages whose release `batch` captures (logged by its own rules); return
        the weak references of those left that `batch` made as new storages (their own event comes first)."""
        for addr, held in list(unlogged.items()):
            if any(f[10] == held[3] for f in releases.get(addr, ())):
                del unlogged[addr]
        wanted = {held[3] for held in unlogged.values()}
        facts = [f for entry in batch for f in (entry[8], entry[9]) if f is not None]
        return {f[12] for f in facts if f[10] and f[12] in wanted}

    def _released_line(self, batch: list[tuple[Any, ...]], gone: tuple[Any, ...]) -> str:
        """The `freed` line template of the slot whose captured facts `gone` are, found in `batch` (rare: a
        release logged before its own update, see `_drain_locked`)."""
        for entry in batch:
            if entry[8] is gone or entry[9] is gone:
                key = K_DATA if entry[8] is gone else V_DATA
                return self._slot_lines(entry[0], entry[1], key, gone[5], gone[6])[1]
        raise AssertionError("a release not in its batch")

    def _slot_lines(
        self, cid: int, layer: int, key: tuple[str, str], dtype: str, device: str
    ) -> tuple[str, str]:
        """A drained slot's event and freed line templates (`slot_lines`), made at its first line."""
        lines = self._templates.get((cid, layer, key, dtype, device))
        if lines is None:
            lines = self._templates[(cid, layer, key, dtype, device)] = slot_lines(
                layer, *KEY_JSON[key], dtype, device, cid, '"hf"'
            )
        return lines
