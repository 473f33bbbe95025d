"""Turns observations of KV tensors into KV events, by comparing each storage with what was seen before.

Why a state diff and not a log of method calls: caches change in many ways (torch.cat growth, in-place
index_copy_, slicing to a view, eviction libraries rebinding `layer.keys` from a forward hook). Whoever
observes a layer (a patched cache method, the end-of-step scan, a custom-cache scan) hands its current
tensors here, with the cause it knows; the tracker decides what changed and emits one event per storage.

Frees are exact: each replaced storage is watched through a weak reference to the storage itself (not the
tensor: a view may outlive it), and `freed` is logged when the allocator has released it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kvtrace.format import KvEvent

# What a cause becomes when the storage changed (first) or stayed (second).
_CAUSE_EVENTS: dict[str, tuple[str, str]] = {
    "update": ("grown", "written"),
    "crop": ("cropped", "cropped"),
    "reset": ("reset", "reset"),
    "reorder": ("reordered", "reordered"),
    "offload": ("offloaded", "offloaded"),
    "prefetch": ("prefetched", "prefetched"),
    "scan": ("evicted", "written"),
    "track": ("replaced", "written"),
}


@dataclass
class _Slot:
    """What we last saw in one (cache, layer, k/v, part) slot."""

    addr: int
    storage_bytes: int
    shape: tuple[int, ...]
    version: int
    tensor_id: int
    ref: StorageWeakRef


@dataclass
class _Pending:
    """A storage that left the cache but may still be alive (a view, an autograd graph, the caller)."""

    ref: StorageWeakRef
    event: KvEvent


def iter_tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every plain tensor inside a cache attribute: quantized caches keep tuples (fp8: data, scale),
    tensor subclasses (quanto) or dicts of metadata (hqq)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        flatten = getattr(type(value), "__tensor_flatten__", None)
        if flatten is not None and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter:
            names, _ = cast(Any, value).__tensor_flatten__()  # a subclass hook torch.Tensor's stubs lack
            for name in names:
                yield from iter_tensors(getattr(value, name), f"{prefix}.{name}")
            return
        yield prefix, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from iter_tensors(item, f"{prefix}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_tensors(item, f"{prefix}.{key}")
    else:
        inner = getattr(value, "__dict__", None)
        if isinstance(inner, dict):  # e.g. an hqq quantized object holding W_q and meta tensors
            for key, item in inner.items():
                if isinstance(item, (torch.Tensor, dict, tuple, list)):
                    yield from iter_tensors(item, f"{prefix}.{key}")


def _version_of(tensor: torch.Tensor) -> int:
    """The in-place write counter; -1 for inference tensors (hqq quantizes under inference_mode), which
    have none: their in-place writes go unseen, their replacement does not."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


_DTYPE_NAMES: dict[torch.dtype, str] = {}
_DEVICE_NAMES: dict[torch.device, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _device_name(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = str(device)
    return name


def storage_of(tensor: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage behind `tensor`; (0, 0) for tensors without real memory."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return 0, 0


class KvTracker:
    """Owns the last-seen state of every KV slot and emits `KvEvent`s through `emit`."""

    def __init__(self, emit: Callable[[KvEvent], None], clock: Callable[[], int]) -> None:
        self._emit = emit
        self._clock = clock
        self._slots: dict[tuple[int, int, str, str], _Slot] = {}
        self._tokens: dict[tuple[int, int], int] = {}
        self._pending: list[_Pending] = []
        self._seq = 0
        self.step = 0
        self.phase = ""

    def _event(self, **fields: Any) -> KvEvent:
        self._seq += 1
        return KvEvent(seq=self._seq, t_ns=self._clock(), step=self.step, phase=self.phase, **fields)

    def tokens(self, cache_id: int, layer: int) -> int:
        return self._tokens.get((cache_id, layer), 0)

    def observe(
        self,
        cache_id: int,
        layer: int,
        parts: dict[tuple[str, str], Any],
        cause: str,
        tokens: int,
        source: str = "hf",
        reason: str = "",
    ) -> None:
        """Compare the current tensors of one layer with the last seen ones; emit what changed.

        `parts` maps (kv, part) to the attribute's value (a tensor, a tuple of tensors, a quantized object,
        or None). `tokens` is how many tokens the layer holds now, per batch row.
        """
        prev_tokens = self._tokens.get((cache_id, layer), 0)
        self._tokens[(cache_id, layer)] = tokens
        evicted = max(0, prev_tokens - tokens) if cause in ("scan", "crop") else 0
        changed_kinds, same_kinds = _CAUSE_EVENTS.get(cause, ("replaced", "written"))
        seen: set[tuple[int, int, str, str]] = set()
        for (kv, part), value in parts.items():
            for name, tensor in iter_tensors(value, part):
                addr, nbytes = storage_of(tensor)
                if nbytes == 0:
                    continue
                key = (cache_id, layer, kv, name)
                seen.add(key)
                shape = tuple(tensor.shape)
                version = _version_of(tensor)
                old = self._slots.get(key)
                if old is not None and old.addr == addr:
                    if old.shape == shape and old.version == version and old.tensor_id == id(tensor):
                        continue
                    kind = same_kinds
                    if cause == "scan" and tokens < prev_tokens:
                        kind = "evicted"  # a view of the old storage: tokens gone, memory kept
                    prev_addr = addr
                else:
                    if old is None:
                        kind = "created"
                    elif (cause == "update" and nbytes <= old.storage_bytes) or (
                        cause == "scan" and tokens >= prev_tokens
                    ):
                        kind = "replaced"
                    else:
                        kind = changed_kinds
                    prev_addr = old.addr if old is not None else 0
                ref = (
                    old.ref
                    if old is not None and old.addr == addr
                    else StorageWeakRef(tensor.untyped_storage())
                )
                self._slots[key] = _Slot(addr, nbytes, shape, version, id(tensor), ref)
                self._emit(
                    self._event(
                        event=kind,
                        layer=layer,
                        kv=kv,
                        part=name,
                        addr=addr,
                        storage_bytes=nbytes,
                        view_offset=tensor.data_ptr() - addr if addr else 0,
                        shape=list(shape),
                        logical_bytes=tensor.numel() * tensor.element_size(),
                        dtype=_dtype_name(tensor.dtype),
                        device=_device_name(tensor.device),
                        tokens=tokens,
                        evicted_tokens=evicted if kv == "k" and part == "data" else 0,
                        prev_addr=prev_addr,
                        cache=cache_id,
                        source=source,
                        reason=reason if kind == "evicted" else "",
                    )
                )
                if old is not None and old.addr != addr:
                    # After the new storage's event, so the log shows both alive (the real transient peak),
                    # and before any later slot's event, which may reuse the freed address.
                    self._retire(key, old)
                    self.poll_frees()
        # Slots of this layer that vanished (reset, a quantized residual flushed to an empty tensor).
        for key in [k for k in self._slots if k[0] == cache_id and k[1] == layer and k not in seen]:
            old = self._slots.pop(key)
            self._retire(key, old)
            if cause in ("reset", "scan", "crop"):
                self._emit(
                    self._event(
                        event="reset" if cause == "reset" else "evicted",
                        layer=layer,
                        kv=key[2],
                        part=key[3],
                        addr=0,
                        storage_bytes=0,
                        tokens=tokens,
                        evicted_tokens=evicted if key[2] == "k" and key[3] == "data" else 0,
                        prev_addr=old.addr,
                        cache=cache_id,
                        source=source,
                    )
                )
        self.poll_frees()

    def masked(self, cache_id: int, layer: int, masked_entries: int, tokens: int) -> None:
        """Tokens hidden from attention in place (kvpress AdaKV's `masked_key_indices`): nothing is freed."""
        self._emit(
            self._event(
                event="masked",
                layer=layer,
                kv="k",
                part="data",
                addr=0,
                storage_bytes=0,
                tokens=tokens,
                cache=cache_id,
                reason=f"masking without removal: {masked_entries} (row, head, token) entries masked",
            )
        )

    def _retire(self, key: tuple[int, int, str, str], old: _Slot) -> None:
        """Watch a storage that left its slot until the allocator releases it."""
        freed = KvEvent(
            seq=0,
            t_ns=0,
            step=self.step,
            phase=self.phase,
            event="freed",
            layer=key[1],
            kv=key[2],
            part=key[3],
            addr=old.addr,
            storage_bytes=old.storage_bytes,
            cache=key[0],
        )
        self._pending.append(_Pending(old.ref, freed))

    def release_all(self) -> None:
        """At the end of a recording: stop holding slots, so storages freed later are still reported by a
        final `poll_frees` (after the caller dropped its cache)."""
        for key, slot in list(self._slots.items()):
            self._retire(key, slot)
        self._slots.clear()

    def poll_frees(self) -> None:
        """Log `freed` for every watched storage the allocator has released since the last poll."""
        if not self._pending:
            return
        still: list[_Pending] = []
        for pending in self._pending:
            if pending.ref.expired():
                pending.event.t_ns = self._clock()
                pending.event.step = self.step
                pending.event.phase = self.phase
                self._seq += 1
                pending.event.seq = self._seq
                self._emit(pending.event)
            else:
                still.append(pending)
        self._pending = still

    def live_slots(self) -> dict[tuple[int, int, str, str], int]:
        """Storage bytes now held per slot (for the manifest's end-of-run summary)."""
        return {key: slot.storage_bytes for key, slot in self._slots.items()}

    def pending_frees(self) -> int:
        return len(self._pending)
