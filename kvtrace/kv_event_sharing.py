"""Equal values of a KV log's events held once as it is read (`read_run`). Stdlib only.

A long run's log is read into one `KvEvent` a line, all kept for the whole command, and the JSON decoder
makes every value anew: the same "prefill", "float32" and "cpu" strings, the same step clock, sizes and
shapes a million times over. Most of an event's memory was such copies (a 4,000-token light run of 32
layers: 512,000 events, ~0.9 KiB each). Here each value an event holds is swapped for the first equal one
read, so that the events share it; the figures computed from them are the same.

Shared `shape` lists must never be changed in place (no analyzer does; copy one to reorder it).
"""

from __future__ import annotations

from collections.abc import Callable

from kvtrace.format import KvEvent

# The most distinct values of a kind kept for sharing: a real log has a few thousand (one size and clock a
# step); a damaged or crafted one of endless distinct values stops adding at this, and reads as before.
_DISTINCT = 1 << 16


class SharedValues:
    """One read's tables of the values its events share (see the module's docstring)."""

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}
        self._ints: dict[int, int] = {}
        self._shapes: dict[tuple[int, ...], list[int]] = {}
        # addresses of the storages live so far: a storage's lines (created, grown, its `freed`, the next
        # one's `prev_addr`) share its address; a `freed` line takes it out, so this holds the live ones
        self._addrs: dict[int, int] = {}

    def share(self, event: KvEvent) -> None:
        """Swap `event`'s values for the equal ones read before (in place). Its fields are checked
        (`run_checks`): strings, ints, and a shape that is a list of ints."""
        texts = self._texts
        take_text: Callable[[str, str], str] = texts.setdefault if len(texts) < _DISTINCT else texts.get
        event.phase = take_text(event.phase, event.phase)
        event.event = kind = take_text(event.event, event.event)
        event.kv = take_text(event.kv, event.kv)  # json's one-character strings are shared, msgspec's not
        event.part = take_text(event.part, event.part)
        event.dtype = take_text(event.dtype, event.dtype)
        event.device = take_text(event.device, event.device)
        event.source = take_text(event.source, event.source)
        if event.reason:
            event.reason = take_text(event.reason, event.reason)
        ints = self._ints
        take_int: Callable[[int, int], int] = ints.setdefault if len(ints) < _DISTINCT else ints.get
        event.t_ns = take_int(event.t_ns, event.t_ns)
        event.step = take_int(event.step, event.step)
        event.storage_bytes = take_int(event.storage_bytes, event.storage_bytes)
        event.logical_bytes = take_int(event.logical_bytes, event.logical_bytes)
        event.tokens = take_int(event.tokens, event.tokens)
        if event.view_offset:
            event.view_offset = take_int(event.view_offset, event.view_offset)
        if event.evicted_tokens:
            event.evicted_tokens = take_int(event.evicted_tokens, event.evicted_tokens)
        shape = event.shape
        key = tuple(shape)
        held = self._shapes.get(key)
        if held is not None:
            event.shape = held
        elif len(self._shapes) < _DISTINCT:
            self._shapes[key] = shape
        addrs = self._addrs
        addr = event.addr
        if event.prev_addr:
            event.prev_addr = addrs.get(event.prev_addr, event.prev_addr)
        if kind == "freed":
            event.addr = addrs.pop(addr, addr)
        else:
            live = addrs.get(addr)
            if live is not None:
                event.addr = live
            elif len(addrs) < _DISTINCT:
                addrs[addr] = addr
