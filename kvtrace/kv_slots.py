"""One KV slot's last-seen state, and the comparison of a tensor with it: the per-tensor part of the
tracker's hot path (issue 11), kept apart from the events it feeds (`kvtrace.kv_tracker`).

A slot is one (cache, layer, k/v, part) position. It holds the tensor and its storage weakly, and the facts
an event repeats while the tensor object stays the same (shape, dtype, device, address), so a layer update
that made no new tensor costs one identity test and one version read. Storages are watched through torch's
raw weak references (an int, not a `StorageWeakRef` object): `weak_ref_of`, `expired`, `free_weak_ref`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

import torch

from kvtrace.kv_lines import SHAPE_JSON, device_json, dtype_json, shape_facts

K_DATA = ("k", "data")
V_DATA = ("v", "data")

# A tracked tensor's log part and the dim of its positions ("tracked": [batch, kv_heads, seq, head_dim],
# "tracked_bshd": [batch, seq, kv_heads, head_dim]; `module_cache_slots.TRACK_LAYOUTS` names them)
TRACKED_SEQ_DIMS: dict[str, int] = {"tracked": -2, "tracked_bshd": 1}

weak_ref_of: Callable[[Any], int] = cast(Any, torch.UntypedStorage)._weak_ref
expired = cast(Any, torch.UntypedStorage)._expired
free_weak_ref = cast(Any, torch.UntypedStorage)._free_weak_ref


class Slot:
    """What we last saw in one (cache, layer, k/v, part) slot: the tensor (weakly), its storage (weakly)
    and the facts an event repeats while the tensor object stays the same."""

    __slots__ = (
        "addr",
        "device",
        "dtype",
        "dtype_obj",
        "itemsize",
        "logical_bytes",
        "ptr",
        "shape",
        "shape_json",
        "storage_bytes",
        "tref",
        "version",
        "view_offset",
        "wref",
    )

    tref: Callable[[], Any]
    ptr: int
    version: int
    addr: int
    storage_bytes: int
    wref: int  # a raw weak reference to the storage (torch's StorageWeakRef without the object)
    view_offset: int
    shape: Any
    shape_json: str
    logical_bytes: int
    dtype: str
    dtype_obj: torch.dtype  # the tensor's own, compared by identity when a new tensor is seen
    device: str
    itemsize: int


def dead_ref() -> None:
    """A stand-in for the weak reference of a tensor that takes none: the slot's tensor reads as gone."""
    return None


class LayerState:
    """One (cache, layer): its slots, the tokens last logged, and its (K, V) slots when it holds exactly those
    (the fast path's one identity test per tensor)."""

    __slots__ = ("fast", "slots", "tokens")

    def __init__(self) -> None:
        self.slots: dict[tuple[str, str], Slot] = {}
        self.tokens = 0
        self.fast: tuple[Slot, Slot] | None = None  # (K, V) slots when the layer holds exactly those


def refresh_fast(state: LayerState) -> None:
    slots = state.slots
    k_slot, v_slot = slots.get(K_DATA), slots.get(V_DATA)
    state.fast = (k_slot, v_slot) if len(slots) == 2 and k_slot is not None and v_slot is not None else None


def released_slots(
    layers: dict[tuple[int, int], LayerState], logged: set[int] | frozenset[int] = frozenset()
) -> dict[int, tuple[Any, ...]]:
    """The storages that updated (K, V) slots still hold though the allocator has released them, by address:
    (cache, layer, key, raw weak reference, bytes, dtype JSON, device JSON). A storage is there between
    its release by other code (a layer rebound between two steps) and the capture of the slot's next
    update, which is still to come. Read on the writer thread while the model's thread captures: `capture`
    writes a slot's weak reference before its address and bytes, so they are read here the other way
    round, and a released weak reference comes with its own storage's address and bytes. Those whose weak
    reference is in `logged` (their `freed` is in the log already) are left out: a slot whose update never
    comes keeps its storage until it is retired, and a later new storage at its address must not log it
    twice."""
    found: dict[int, tuple[Any, ...]] = {}
    for (cache_id, layer), state in list(layers.items()):
        fast = state.fast
        if fast is None:
            continue
        for key, slot in ((K_DATA, fast[0]), (V_DATA, fast[1])):
            nbytes = slot.storage_bytes
            addr = slot.addr
            wref = slot.wref
            if expired(wref) and wref not in logged:
                found[addr] = (cache_id, layer, key, wref, nbytes, slot.dtype, slot.device)
    return found


def storage_of(tensor: torch.Tensor) -> tuple[Any, int, int] | None:
    """A tensor's storage, its address and bytes; None without one (meta, fake) or when empty."""
    try:
        storage = tensor.untyped_storage()
        addr = storage.data_ptr()
        nbytes = storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None
    return (storage, addr, nbytes) if nbytes else None


def capture(slot: Slot, tensor: torch.Tensor, written: bool = False) -> tuple[Any, ...] | None:
    """Compare a tensor with its slot and bring the slot up to date; return what its event needs, or None
    when nothing changed (or it has no storage): (event, storage address, storage bytes, view offset,
    shape, dtype JSON, device JSON, item size, previous address, previous bytes, raw weak reference to the
    previous storage when it left the slot (else 0), whether that storage is already released, raw weak
    reference to the storage now held: the same int as the facts that replace it will hold as the previous
    one's). `written`: the tensor was written even if its version says not (a compiled graph's in-place
    write).

    A new storage at the previous one's address is a new storage all the same when that one is released:
    code outside the cache's update rebound the layer (a logits processor's copies), the old storage died,
    and the allocator handed its address to the next update (the CUDA caching allocator's common case).
    Its facts then have that address as both the new and the previous one, and the previous released."""
    try:
        version = tensor._version
    except RuntimeError:  # an inference tensor: in-place writes are invisible
        version = -1
    if slot.tref() is tensor:
        if version == slot.version and version != -1 and not written:
            return None
        if tensor.data_ptr() == slot.ptr:  # written in place (static caches)
            slot.version = version
            addr = slot.addr
            return (
                "written",
                addr,
                slot.storage_bytes,
                slot.view_offset,
                slot.shape,
                slot.dtype,
                slot.device,
                slot.itemsize,
                addr,
                0,
                0,
                False,
                slot.wref,
            )
    try:  # `storage_of`, inline: once per new tensor, cold between model steps (issue 11)
        storage = tensor.untyped_storage()
        addr = storage.data_ptr()
        nbytes = storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None
    if not nbytes:
        return None
    dtype = tensor.dtype
    if dtype is not slot.dtype_obj:
        # A new tensor of another dtype: torch.cat promotes, so a cache the caller made bfloat16 between
        # two generate() calls is float32 again after its next update. One identity test per new tensor;
        # the device is read again only here: an update's torch.cat needs both on one device, and moves
        # (offload, prefetch, a caller's `.to()` between calls) are observed apart.
        set_dtype(slot, dtype, tensor.device)
    try:
        slot.tref = weakref.ref(tensor)
    except TypeError:
        slot.tref = dead_ref
    slot.version = version
    slot.ptr = ptr = tensor.data_ptr()
    slot.view_offset = ptr - addr
    slot.shape = shape = tensor.shape
    slot.shape_json = ""  # worked out when an event needs it (`shape_of`)
    prev_addr, prev_bytes = slot.addr, slot.storage_bytes
    if addr == prev_addr and not expired(slot.wref):  # a new tensor over the same storage (a view): written
        return (
            "written",
            addr,
            nbytes,
            ptr - addr,
            shape,
            slot.dtype,
            slot.device,
            slot.itemsize,
            addr,
            0,
            0,
            False,
            slot.wref,
        )
    old_wref = slot.wref
    slot.wref = wref = weak_ref_of(storage)
    slot.addr, slot.storage_bytes = addr, nbytes
    return (
        "replaced" if nbytes <= prev_bytes else "grown",
        addr,
        nbytes,
        ptr - addr,
        shape,
        slot.dtype,
        slot.device,
        slot.itemsize,
        prev_addr,
        prev_bytes,
        old_wref,
        expired(old_wref),
        wref,
    )


def set_dtype(slot: Slot, dtype: torch.dtype, device: torch.device) -> None:
    """A slot's dtype facts (JSON, item size, the object compared) and device, from its tensor's own."""
    slot.dtype_obj = dtype
    slot.itemsize = dtype.itemsize
    slot.dtype = dtype_json(dtype)
    slot.device = device_json(device)


def with_rows(line: str, rows: int, shape: Any, always: bool = False) -> str:
    """An event line with `rows` added, where they are fewer than the tensor's batch dim: the rows a
    preallocated buffer's forward used (Meta's `cache_k[:bsz]`), whose tokens are per row of those.
    `always`: added where they are all its rows too (said by a forward that does not say its tokens)."""
    if not shape or rows > shape[0] or (rows == shape[0] and not always):
        return line
    return f'{line[:-1]},"rows":{rows}}}'


def seq_room(tensor: torch.Tensor, seq_dim: int) -> int:
    """Positions a row of `tensor` has room for along `seq_dim` in its storage: the stride of the nearest dim
    laid out outside its positions over theirs, never past the storage's end. A view cut to the tokens
    written of one preallocated tensor (`kv[l, 0, :, :, :pos]` of [layers, 2, batch, kv_heads, max_seq,
    head_dim]) has room for max_seq however short it is, which its shape alone does not say; a tensor of its
    own, or a view with no dim laid out outside its positions, has its length. Reads strides, no values."""
    if tensor.dim() < 2:
        return 0
    dim = seq_dim % tensor.dim()
    length = int(tensor.shape[dim])
    strides = tensor.stride()
    step = strides[dim]
    outer = [stride for i, stride in enumerate(strides) if i != dim and stride > step and tensor.shape[i]]
    if step <= 0 or not outer:
        return length
    try:
        elements = tensor.untyped_storage().nbytes() // tensor.element_size() - tensor.storage_offset()
    except (RuntimeError, NotImplementedError):
        return length
    return max(length, min(min(outer) // step, elements // step))


def row_room(tensor: torch.Tensor) -> int:
    """Batch rows the tensor a view is cut from has room for: the size of the base tensor's dim laid out as
    the view's batch dim (dim 0), the same stride. A view cut to the rows in use of one preallocated tensor
    (`kv[l, 0, :bsz, :pos]` of [layers, 2, max_batch, max_seq, kv_heads, head_dim]) has room for max_batch
    however few rows it shows, which neither its shape nor its strides say; a tensor of its own, or a view
    whose batch dim is no dim of its base (reshaped), has its own rows. Reads shapes and strides only."""
    rows = int(tensor.shape[0]) if tensor.dim() >= 1 else 0
    base = getattr(tensor, "_base", None)
    if base is None or tensor.dim() < 3:
        return rows
    stride = tensor.stride(0)
    sizes = [int(size) for size, step in zip(base.shape, base.stride(), strict=True) if step == stride]
    return max([rows, *(size for size in sizes if size > 1)])


def with_room(line: str, tensor: torch.Tensor, part: str) -> str:
    """A tracked tensor's event line with `capacity_tokens` added where its storage has room for more
    positions a row than its length (`seq_room`), and `capacity_rows` where the tensor it is cut from has
    more rows than it shows (`row_room`): the analyzers then know a preallocated tensor's max_seq and
    max_batch behind views cut to the tokens and rows written, and price a token as its bytes over that
    room. Other parts, and tensors as long and as wide as their room, are left as they are (the fields'
    absence: its length, its rows)."""
    seq_dim = TRACKED_SEQ_DIMS.get(part)
    if seq_dim is None or tensor.dim() < 2:
        return line
    if seq_dim == 1 and tensor.dim() < 3:  # as `ModuleCaches._observe_tracked` reads its tokens
        seq_dim = -2
    room = seq_room(tensor, seq_dim)
    if room > tensor.shape[seq_dim]:
        line = f'{line[:-1]},"capacity_tokens":{room}}}'
    rows = row_room(tensor)
    if rows > tensor.shape[0]:
        line = f'{line[:-1]},"capacity_rows":{rows}}}'
    return line


def shape_of(slot: Slot) -> str:
    """A slot's shape JSON, filling it (and its logical bytes) after a capture left it to be worked out."""
    if not slot.shape_json:
        slot.shape_json, count = SHAPE_JSON.get(slot.shape) or shape_facts(slot.shape)
        slot.logical_bytes = count * slot.itemsize
    return slot.shape_json
