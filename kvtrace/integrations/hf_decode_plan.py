"""A decode step's end on its shortest path (issue 11): the layers of a cache whose last step kvtrace has just
compared, logged in one loop, with what the general path (`HfCacheHooks.step_end` -> `KvTracker.update` ->
`capture`) would log.

On a model with 2 or 4 layers each step's fixed work is shared by few updates, and the general path's
decisions per layer (its kind, cross-attention parts, the count it expects, a call with ten arguments) cost
more than the comparison itself. A `DecodePlan` decides those once per cache, at the end of a step that
logged every layer: each layer is transformers' `DynamicLayer` or `StaticLayer` itself, with one K and one V
slot. At each later step, `log_planned` re-checks per layer what code outside the cache's update may change
(the layer object's class, its tensors' class, the slot pair) and leaves a layer that breaks the plan, with
all after it, to the general path (`HfCacheHooks.step_end(first_layer=)`), which takes them as it always
did.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kvtrace.kv_slots import K_DATA, V_DATA, LayerState, Slot, capture, expired, weak_ref_of

if TYPE_CHECKING:
    from kvtrace.kv_tracker import KvTracker

_TENSOR = torch.Tensor


class DecodePlan:
    """A cache's layers as the plan found them: per layer its index, state and class, and whether it is
    static (written in place)."""

    __slots__ = ("cid", "ref", "rows")

    def __init__(
        self,
        ref: Callable[[], Any],
        cid: int,
        rows: tuple[tuple[int, LayerState, Any, bool], ...],
    ) -> None:
        self.ref = ref  # weakly: a plan never keeps a cache alive
        self.cid = cid
        self.rows = rows  # per layer: (its index, its state, its class, whether it is static)


def plan_for(
    ref: Callable[[], Any], cid: int, cache: Any, states: dict[tuple[int, int], LayerState]
) -> DecodePlan | None:
    """A plan for `cache`, whose last step every layer of has just logged; None where a layer is of another
    kind (sliding, quantized, a subclass) or not a plain K/V pair in the log."""
    import transformers.cache_utils as cu

    dynamic, static = getattr(cu, "DynamicLayer", None), getattr(cu, "StaticLayer", None)
    layers = getattr(cache, "layers", None)
    if not isinstance(dynamic, type) or not layers:
        return None
    rows: list[tuple[int, LayerState, Any, bool]] = []
    for index, layer in enumerate(layers):
        kind = type(layer)
        state = states.get((cid, index))
        if (kind is not dynamic and kind is not static) or state is None or state.fast is None:
            return None
        rows.append((index, state, kind, kind is static))
    return DecodePlan(ref, cid, tuple(rows))


def log_planned(tracker: KvTracker, plan: DecodePlan, layers: Any, new_tokens: int) -> int:
    """Log each layer of the plan's cache that a forward of `new_tokens` tokens per row changed, as
    `HfCacheHooks.step_end` would; the number of layers taken: all of them, or the index of the first the
    plan does not fit (that one and those after it are the general path's: `step_end(first_layer=)`), 0
    when the cache has another number of layers."""
    rows = plan.rows
    if len(layers) != len(rows):
        return 0
    cid = plan.cid
    queue = tracker._queue
    # One time for the step's layers: logged together at its end, in layer order (their `seq`)
    t_ns = tracker._clock()
    step, phase_json = tracker.step, tracker._phase_json
    layer: Any
    for (index, state, kind, is_static), layer in zip(rows, layers, strict=True):
        fast = state.fast
        if fast is None or type(layer) is not kind:
            return index
        keys, values = layer.keys, layer.values
        if type(keys) is not _TENSOR or type(values) is not _TENSOR:
            return index
        k_slot, v_slot = fast
        before = state.tokens
        if is_static:
            # Written in place: its count is the tracker's own (reading the layer's is a device sync)
            window = getattr(layer, "sliding_window", None) or layer.max_cache_len
            tokens = min(before + new_tokens, int(window))
            evicted = before + new_tokens - tokens
            k_facts = capture(k_slot, keys)
            v_facts = capture(v_slot, values)
        else:
            shape = keys.shape
            if len(shape) < 2:
                return index
            tokens = shape[-2]
            if k_slot.tref() is keys and v_slot.tref() is values:
                if tokens == before:
                    continue  # a layer this forward did not reach
                return index
            if tokens != before + new_tokens:
                return index  # changed by more than its update: the general path says so
            evicted = 0
            k_facts = _new_tensor(k_slot, keys, shape) or capture(k_slot, keys)
            v_facts = _new_tensor(v_slot, values, values.shape) or capture(v_slot, values)
        state.tokens = tokens
        if k_facts is None and v_facts is None:
            continue
        reused = tracker._pending_addrs
        if reused and (
            (k_facts is not None and k_facts[1] in reused) or (v_facts is not None and v_facts[1] in reused)
        ):
            tracker.poll_frees()  # as `KvTracker.update`: a watched storage released before these were made
        queue.append((cid, index, t_ns, step, phase_json, tokens, evicted, "window", k_facts, v_facts, False))
        if k_facts is not None and k_facts[10] and not k_facts[11]:
            tracker._watch(cid, index, K_DATA, k_facts)
        if v_facts is not None and v_facts[10] and not v_facts[11]:
            tracker._watch(cid, index, V_DATA, v_facts)
    return len(rows)


def _new_tensor(slot: Slot, tensor: torch.Tensor, shape: Any) -> tuple[Any, ...] | None:
    """`capture`'s answer for the common case, a new tensor over a new storage of the slot's dtype (a
    dynamic layer's torch.cat); None, with the slot untouched, for anything else (`capture` takes it)."""
    if slot.tref() is tensor:
        return None
    try:
        version = tensor._version
        storage = tensor.untyped_storage()
        addr = storage.data_ptr()
        nbytes = storage.nbytes()
    except (RuntimeError, NotImplementedError):  # an inference tensor, one without storage
        return None
    prev_addr = slot.addr
    if not nbytes or addr == prev_addr or tensor.dtype is not slot.dtype_obj:
        return None
    slot.tref = weakref.ref(tensor)
    slot.version = version
    slot.ptr = ptr = tensor.data_ptr()
    slot.view_offset = offset = ptr - addr
    slot.shape = shape
    slot.shape_json = ""
    prev_bytes, old_wref = slot.storage_bytes, slot.wref
    slot.wref = wref = weak_ref_of(storage)
    slot.addr, slot.storage_bytes = addr, nbytes
    return (
        "replaced" if nbytes <= prev_bytes else "grown",
        addr,
        nbytes,
        offset,
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
