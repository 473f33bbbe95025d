"""Observing one layer's tensors (`KvTracker.observe`): end-of-step scans, crop, reset, custom caches.

Why apart from the per-update path: an observation hands over a whole layer, any of its parts, with the
cause it knows, so here the tracker orders what the layer made (a part's new tensor at the address of
another part's released one comes after that free: the log is replayed by address), finds the slots that
vanished, and makes frees wait where the caller says so (`frees_last`, `hold`). Each tensor is compared
with its slot by `KvCompare._see`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from kvtrace.kv_drain import locked
from kvtrace.kv_lines import FREED_LINE, KEY_JSON, NO_STORAGE_LINE, iter_tensors, key_json, quoted
from kvtrace.kv_slots import K_DATA, LayerState, Slot, expired, refresh_fast, storage_of


class KvObserve:
    """Observing a layer (a mixin of `KvTracker`, whose state it shares)."""

    lock: threading.RLock
    lines: list[str]
    step: int
    _phase_json: str
    _seq: int
    _clock: Callable[[], int]
    _on_evict: Callable[[int, str], None] | None
    _pending: list[tuple[int, int, str, str, int, int, int]]
    _freed_early: set[int]
    _frees_held: bool

    if TYPE_CHECKING:

        def drain(self) -> None: ...

        def _state(self, cache_id: int, layer: int) -> LayerState: ...

        def _see(
            self,
            slots: dict[tuple[str, str], Slot],
            cache_id: int,
            layer: int,
            key: tuple[str, str],
            tensor: torch.Tensor,
            tokens: int,
            evicted: int,
            reason_json: str,
            t_ns: int,
            cause: str,
            source_json: str,
            prev_tokens: int = -1,
            written: bool = False,
            rows: int = 0,
            say_rows: bool = False,
        ) -> bool: ...

        def _hold(self, wref: int, token: Hashable) -> None: ...

        def _retire(self, cache_id: int, layer: int, key: tuple[str, str], old: Slot) -> None: ...

        def poll_frees(self, t_ns: int = 0) -> None: ...

        def _poll_locked(self, t_ns: int) -> None: ...

    # -- every other observation (scans, crop, reset, custom caches) -------------------------------------
    @locked
    def observe(
        self,
        cache_id: int,
        layer: int,
        parts: dict[tuple[str, str], Any],
        cause: str,
        tokens: int,
        source: str = "hf",
        reason: str = "",
        evicted: int | None = None,
        evicted_reason: str = "",
        whole_layer: bool = True,
        rows: int = 0,
        written: bool = False,
        frees_last: bool = False,
        say_rows: bool = False,
        hold: Mapping[tuple[str, str], Hashable] | None = None,
    ) -> bool:
        """Compare the current tensors of one layer with the last seen ones; log what changed, and return
        whether anything of the layer did (frees of other storages found meanwhile aside).

        `parts` maps (kv, part) to the attribute's value (a tensor, a tuple of tensors, a quantized object,
        or None). `tokens` is how many tokens the layer holds now, per batch row. `evicted` overrides the
        evicted-token count (window evictions counted by the caller, with `evicted_reason`). Without
        `whole_layer`, `parts` are only some of the layer's slots (one `track()`): the others are left as
        they are, not taken for vanished. `rows`: the batch rows the tokens are held in, when the caller
        knows them (0: every row of the tensors); an event logs them where they are fewer than its tensor's
        (a preallocated buffer, partly used), or with `say_rows` always (said by a forward that does not say
        its tokens: the analyzers then know the rows were said). `written`: the caller knows the tensors
        were written, even if their version says not (an inference tensor's in-place write, which no
        version counter shows). `frees_last`: the tensors were rebound by other code, seen only afterwards,
        which made all the new ones before releasing an old one; its old storages are logged freed after all
        its new ones (an eviction press makes the kept K and V, then rebinds both; a module cache's layer
        keeps its old K and V in locals until it returns, `ModuleCaches.scan`), unless a new storage took
        an old one's address, which proves that one was released first. `hold`: slots whose old storage
        outlived later layers' new storages (module caches kept on a list until the step ends), each mapped
        to a token: its free waits for `release_held(token)`.

        Storages watched since an earlier observation and released by now are logged freed first, before
        this observation's new storages: they were released since that observation, and a hand-written
        loop releases the tensors it held (a local rebound to the next layer's) before it makes the new
        ones, maybe at the very same address, which the log's replay must see free first. Only the slot's
        own old storage is logged freed after its new one, which was made from it or while it was held.
        """
        self.drain()
        state = self._state(cache_id, layer)
        prev_tokens = state.tokens
        state.tokens = tokens
        if evicted is None:
            evicted = max(0, prev_tokens - tokens) if cause in ("scan", "crop") else 0
            evicted_reason = ""
        t_ns = self._clock()
        if self._pending:
            self._poll_locked(t_ns)
        logged = self._seq  # frees of other storages found by that poll aside
        source_json = quoted(source)
        slots = state.slots
        # Released storages of this layer by address: a new tensor at one's address logs its free first
        dead_at: dict[int, tuple[str, str]] = {}
        if any(expired(slot.wref) for slot in slots.values()):
            parts = self._givers_first(slots, parts)
            dead_at = {slot.addr: key for key, slot in slots.items() if expired(slot.wref)}
        seen: set[tuple[str, str]] = set()
        reason_json = quoted(evicted_reason) if evicted_reason else quoted(reason)
        self._frees_held = frees_last
        try:
            for (kv, part), value in parts.items():
                for name, tensor in iter_tensors(value, part):
                    key = (kv, name)
                    first = kv == "k" and part == "data"
                    if frees_last and self._pending:
                        found = storage_of(tensor)
                        if found is not None and any(item[4] == found[1] for item in self._pending):
                            self._poll_locked(t_ns)  # made where a held one was: that one was released first
                    if dead_at:
                        self._giver_freed(slots, dead_at, cache_id, layer, key, tensor, t_ns)
                    token = hold.get(key) if hold else None
                    old = slots.get(key) if token is not None else None
                    if old is not None:
                        self._frees_held = True  # its free, if released by now, waits past later layers
                    if self._see(
                        slots,
                        cache_id,
                        layer,
                        key,
                        tensor,
                        tokens,
                        evicted if first else 0,
                        reason_json,
                        t_ns,
                        cause,
                        source_json,
                        prev_tokens,
                        written=written,
                        rows=rows,
                        say_rows=say_rows,
                    ):
                        seen.add(key)
                    if old is not None:
                        self._frees_held = frees_last
                        self._hold(old.wref, token)
        finally:
            self._frees_held = False
        # Slots of this layer that vanished (reset, a quantized residual flushed to an empty tensor).
        for key in [k for k in slots if k not in seen] if whole_layer else ():
            old = slots.pop(key)
            self._retire(cache_id, layer, key, old)
            if cause in ("reset", "scan", "crop"):
                self._seq += 1
                first = key == K_DATA
                self.lines.append(
                    NO_STORAGE_LINE
                    % (
                        self._seq,
                        t_ns,
                        self.step,
                        self._phase_json,
                        "reset" if cause == "reset" else "evicted",
                        layer,
                        quoted(key[0]),
                        quoted(key[1]),
                        tokens,
                        evicted if first else 0,
                        old.addr,
                        cache_id,
                        source_json,
                        reason_json if cause == "reset" else '""',
                    )
                )
                if cause != "reset" and self._on_evict is not None:
                    self._on_evict(layer, key[0])
        refresh_fast(state)
        changed = self._seq != logged
        self.poll_frees(t_ns)
        return changed

    def _giver_freed(
        self,
        slots: dict[tuple[str, str], Slot],
        dead_at: dict[int, tuple[str, str]],
        cache_id: int,
        layer: int,
        key: tuple[str, str],
        tensor: torch.Tensor,
        t_ns: int,
    ) -> None:
        """Log freed, now, the released storage of another slot of this layer at `tensor`'s address, before
        `tensor`'s event: the replay by address must meet that free first. `_givers_first` orders the parts
        so that this rarely has to happen, but parts can give to each other both ways (DeepSeek-V4's
        `buffer_kv` taking `buffer_gate`'s address while `overlap_kv` takes `buffer_kv`'s). The slot's own
        later release (its next storage's event, or its retirement) then logs no second free."""
        found = storage_of(tensor)
        giver = dead_at.pop(found[1], None) if found is not None else None
        slot = slots.get(giver) if giver is not None and giver != key else None
        if slot is None or found is None or slot.addr != found[1] or not expired(slot.wref):
            return  # its own slot's address (`_see` logs that free), or a giver already logged
        if slot.wref in self._freed_early:
            return  # logged by the writer's drain already
        self._freed_early.add(slot.wref)
        kv_json, part_json = KEY_JSON.get(giver) or key_json(giver)  # type: ignore[arg-type]
        self._seq += 1
        self.lines.append(
            FREED_LINE
            % (
                self._seq,
                t_ns,
                self.step,
                self._phase_json,
                layer,
                kv_json,
                part_json,
                slot.addr,
                slot.storage_bytes,
                cache_id,
            )
        )

    @staticmethod
    def _givers_first(
        slots: dict[tuple[str, str], Slot], parts: dict[tuple[str, str], Any]
    ) -> dict[tuple[str, str], Any]:
        """`parts` with the slots whose released storage's address another slot's new tensor took moved
        first (V rebound before K: the new K sits where old V was). Their new storage and free are then
        logged before the taker's event, never a free after a creation at its address (the log is replayed
        by address), and in the order the layer made them, so the replay meets its true peak."""
        taken: dict[int, tuple[str, str]] = {}  # address -> the slot whose new tensor is there
        owners: dict[tuple[str, str], tuple[str, str]] = {}  # slot -> the part it is in
        for (kv, part), value in parts.items():
            for name, tensor in iter_tensors(value, part):
                owners[(kv, name)] = (kv, part)
                found = storage_of(tensor)
                if found is not None:
                    taken[found[1]] = (kv, name)
        givers: set[tuple[str, str]] = set()
        for key, slot in slots.items():
            at = taken.get(slot.addr)
            if at is None or at == key or not expired(slot.wref):
                continue
            if at[0] != key[0]:
                givers.update(k for k in parts if k[0] == key[0])
            elif key in owners and owners[key] != owners.get(at):
                # One auxiliary part's new tensor where another's old one was (DeepSeek-V4's compressed
                # entries where its drained buffer was): the giver's part first
                givers.add(owners[key])
        if not givers:
            return parts
        return {**{k: v for k, v in parts.items() if k in givers}, **parts}
