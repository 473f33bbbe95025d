"""The model's weights over a recording: `weights.jsonl`, listed when `record()` starts, then what the model
takes and lets go inside the block.

`model.to(torch.bfloat16)`, `.half()`, `.float()`, `.to(device)`, `.cuda()` all go through `Module._apply`,
which gives every parameter and buffer a new storage and drops the old one (freed unless something else
holds it). A weights table written once would keep counting the old storages, and never the new ones. So
kvtrace's own `_apply`, set on the model's class for this instance only (as `model_forward.ForwardWrap` sets
`forward`: a deep copy or a pickle of the model carries nothing of kvtrace's), compares the model's storages
with those listed after each call, and appends what changed to `weights.jsonl`: an `added` line for each
new storage and a `freed` line for each listed one the allocator released, with the time and the step.

Nothing runs per step: a comparison reads every parameter once, as the `_apply` that prompted it did.
Changes made another way (a submodule's own `.to()`, a parameter assigned by hand) are found by one more
comparison at the block's end, logged at that time, and a warning says so. A storage the model let go that
something else still holds stays counted (it is still memory) and is watched through a raw weak reference:
a later comparison logs it freed once released.

What a storage is: a tensor wrapper subclass (torchao's quantized weights, DTensor) holds no data of its own,
so its inner tensors (`__tensor_flatten__`) are listed, named `<parameter>.<attribute>`. A tensor on the meta
device holds nothing and is left out. torch.ao's quantized modules (`quantize_dynamic`) keep their weight
packed in a C++ object that is neither a parameter nor a buffer: it is listed at its unpacked size (the int8
or float16 elements, per-channel scales and zero points, and the bias the packed object holds), with its
packed-params object's `id()` for an address (the packed data's own is not exposed). A tensor that cannot be
read is left out, never raised: the manifest's warnings say how many of each were not counted.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from kvtrace import format as fmt
from kvtrace.attr_patch import AttrPatch
from kvtrace.distributed import local_tensor
from kvtrace.json_writes import append_lines_whole
from kvtrace.kv_lines import iter_tensors
from kvtrace.kv_slots import expired, free_weak_ref, weak_ref_of

# What keeps a listed storage in sight: a raw weak reference to it (`kv_slots.weak_ref_of`), or for a packed
# weight a weak reference to its packed-params object
_Ref = int | weakref.ref[Any]
# A listed storage: its record and its reference
_Listed = tuple[fmt.WeightRecord, _Ref]
# Per-channel quantized weights keep a scale and a zero point per channel beside their elements
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


def _ref_of(holder: Any) -> _Ref:
    return weak_ref_of(holder) if isinstance(holder, torch.UntypedStorage) else weakref.ref(holder)


def _gone(ref: _Ref) -> bool:
    return ref() is None if isinstance(ref, weakref.ref) else bool(expired(ref))


def _drop(ref: _Ref) -> None:
    if not isinstance(ref, weakref.ref):
        free_weak_ref(ref)


def _packed_weights(model: Any) -> Iterator[tuple[str, Any, Any, Callable[[], Any]]]:
    """(name, packed object, module, unpack) of each torch.ao quantized module's packed weight: a Linear's
    `LinearPackedParams` (`_weight_bias`), a Conv's own (`_weight_bias`), an Embedding's (`_weight`)."""
    script_object = torch.ScriptObject
    for name, module in model.named_modules():
        for attr, method in (("_packed_params", "_weight_bias"), ("_packed_weight", "_weight")):
            packed = module.__dict__.get(attr)
            unpack = getattr(module, method, None)
            if isinstance(packed, script_object) and callable(unpack):
                yield f"{name}.{attr}" if name else attr, packed, module, unpack


def _packed_bytes(module: Any, weight: torch.Tensor) -> int:
    """What a packed weight holds: its elements at the packed dtype (a float16 Linear unpacks to float32),
    and per channel a scale and a zero point."""
    dtype = getattr(module, "dtype", None)
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else weight.element_size()
    nbytes = weight.numel() * itemsize
    if weight.is_quantized and weight.qscheme() in _PER_CHANNEL:
        for qparams in (weight.q_per_channel_scales(), weight.q_per_channel_zero_points()):
            nbytes += qparams.numel() * qparams.element_size()
    return nbytes


class ModelWeights:
    """Lists the model's weight storages into `weights.jsonl` (`write_start`) and follows them through the
    model's `_apply` (`install`/`uninstall`) and a last comparison at the end (`finish`)."""

    def __init__(
        self,
        model: Any,
        path: Path,
        clock: Callable[[], int],
        step: Callable[[], int],
        exclusions: Callable[[], set[int]],
    ) -> None:
        self.model = model
        self.path = path
        self._clock = clock
        self._step = step
        self._exclusions = exclusions  # storage addresses that are caches, not weights (module caches)
        self.held: dict[int, _Listed] = {}  # the model's storages, by address
        self.released: dict[int, _Listed] = {}  # let go by the model, still held by something else
        self.changes: list[tuple[int, int, int]] = []  # (step, storages added, storages freed) per comparison
        self.found_at_end = False  # the last comparison found changes no `_apply` of the model made
        self.error: str | None = None  # a comparison or a write that failed: the table stops there
        self.kept_elsewhere: tuple[int, int] | None = None  # (storages, bytes) `released` at the end
        self._unpacked: dict[int, tuple[weakref.ref[Any], fmt.WeightRecord]] = {}  # packed weights, by id
        self.packed = 0  # packed weights listed (the most any scan found)
        self.on_meta = 0  # parameters and buffers on the meta device, left out (the most any scan found)
        self.unread = 0  # tensors kvtrace could not read, left out (the most any scan found)
        self._patch: AttrPatch | None = None  # kvtrace's `_apply`, to put back
        self.active = False
        self.lines = 0  # lines in weights.jsonl, for the final manifest (readers check the file by it)
        # (freed, added, step) of the change whose lines could not be written (a full disk), the table's last
        self.unwritten: tuple[int, int, int] | None = None

    # -- the table ---------------------------------------------------------------------------------
    def write_start(self) -> None:
        with open(self.path, "w", encoding="utf-8") as fh:
            for addr, (record, storage) in self._scan().items():
                fh.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
                self.held[addr] = (record, _ref_of(storage))
        self.lines = len(self.held)  # a failed write refuses the recording's start

    def _scan(self) -> dict[int, tuple[fmt.WeightRecord, Any]]:
        """The model's weight storages now, by address, in the order they are named (tied weights once,
        under their first name; cache buffers, empty storages and meta tensors left out), each with what
        keeps it in sight (its storage, or a packed weight's packed-params object)."""
        exclude = self._exclusions()
        found: dict[int, tuple[fmt.WeightRecord, Any]] = {}
        on_meta = unread = 0

        def add(name: str, tensor: torch.Tensor) -> None:
            storage = tensor.untyped_storage()
            addr, nbytes = storage.data_ptr(), storage.nbytes()
            if addr in found or addr in exclude or nbytes == 0:
                return
            found[addr] = (self._record(name, addr, nbytes, tensor), storage)

        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        for name, tensor in named:
            try:
                if tensor.device.type == "meta":  # offloaded (accelerate) or never materialized: 0 B
                    on_meta += 1
                    continue
                # A tensor-parallel weight (DTensor): this rank's shard; a wrapper subclass: its inner tensors
                for inner_name, inner in iter_tensors(local_tensor(tensor), name):
                    add(inner_name, inner)
            except Exception:  # a tensor kvtrace cannot read never stops the recording: a warning counts it
                unread += 1
        # Each packed weight is unpacked once (a copy of its elements, let go at once: linear in its size),
        # before the profiler starts; later scans reuse its record while its packed object lives, so that
        # no copy shows in the trace as memory the model took.
        for name, packed, module, unpack in _packed_weights(self.model):
            try:
                seen = self._unpacked.get(id(packed))
                if seen is None or seen[0]() is not packed:
                    seen = self._unpacked[id(packed)] = (
                        weakref.ref(packed),
                        self._packed_record(name, packed, module, unpack),
                    )
                if id(packed) not in found:
                    found[id(packed)] = (seen[1], packed)
            except Exception:
                unread += 1
        self.on_meta, self.unread = max(self.on_meta, on_meta), max(self.unread, unread)
        self.packed = max(self.packed, len(self._unpacked))
        return found

    @classmethod
    def _packed_record(
        cls, name: str, packed: Any, module: Any, unpack: Callable[[], Any]
    ) -> fmt.WeightRecord:
        """A packed weight's record: its elements and its bias (held by the packed object), at its `id()`."""
        unpacked = unpack()
        weight, bias = unpacked if isinstance(unpacked, tuple) else (unpacked, None)
        nbytes = _packed_bytes(module, weight)
        if isinstance(bias, torch.Tensor):
            nbytes += bias.untyped_storage().nbytes()
        record = cls._record(name, id(packed), nbytes, weight)
        record.dtype = str(getattr(module, "dtype", weight.dtype)).removeprefix("torch.")
        return record

    @staticmethod
    def _record(name: str, addr: int, nbytes: int, tensor: torch.Tensor) -> fmt.WeightRecord:
        return fmt.WeightRecord(
            name=name,
            addr=addr,
            storage_bytes=nbytes,
            dtype=str(tensor.dtype).removeprefix("torch."),
            device=str(tensor.device),
            shape=list(tensor.shape),
        )

    def compare(self, at_end: bool = False) -> None:
        """Log what changed since the last comparison: the listed storages released (`freed`) before the
        new ones (`added`), since a new one may sit at a released one's address."""
        if self.error is not None:
            return
        try:
            current = self._scan()
            step = self._step()
            freed: list[fmt.WeightRecord] = []
            departed = 0
            for addr, (record, ref) in list(self.held.items()):
                if addr in current and not _gone(ref):
                    continue  # the same storage (two live storages never share an address)
                del self.held[addr]
                departed += 1
                if _gone(ref):
                    _drop(ref)
                    freed.append(record)
                else:
                    self.released[addr] = (record, ref)
            for addr, (record, ref) in list(self.released.items()):
                if _gone(ref):
                    del self.released[addr]
                    _drop(ref)
                    freed.append(record)
            added: list[fmt.WeightRecord] = []
            for addr, (record, storage) in current.items():
                if addr in self.held:
                    continue
                if addr in self.released:  # taken back: it was never logged freed
                    self.held[addr] = self.released.pop(addr)
                    continue
                self.held[addr] = (record, _ref_of(storage))
                added.append(record)
            if not freed and not added:
                return
            t_ns = self._clock()
            lines = [
                {**record.to_json(), "event": event, "t_ns": t_ns, "step": step}
                for event, records in (("freed", freed), ("added", added))
                for record in records
            ]
            try:
                # All or none: a cut line would make readers refuse the whole run
                append_lines_whole(self.path, lines)
            except OSError as exc:  # a full disk: the table stops before this change, the run goes on
                self.error = f"{self.path}: cannot write ({exc.strerror or exc})"
                self.unwritten = (len(freed), len(added), step)
                return
            self.lines += len(lines)
        except Exception as exc:  # the user's `.to()` goes on; the report says the table stops here
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.changes.append((step, len(added), len(freed)))
        if at_end and (added or departed):
            self.found_at_end = True

    def finish(self) -> None:
        """The last comparison (changes no `_apply` of the model made), then let go of the weak references."""
        self.compare(at_end=True)
        if self.released:
            self.kept_elsewhere = (
                len(self.released),
                sum(record.storage_bytes for record, _ref in self.released.values()),
            )
        for _record, ref in (*self.held.values(), *self.released.values()):
            _drop(ref)
        self.held.clear()
        self.released.clear()
        self._unpacked.clear()

    def warnings(self) -> list[str]:
        """What leaves the weights' figures off the memory as it was (for the manifest's `warnings`)."""
        warnings = []
        if self.unwritten is not None:
            freed, added, step = self.unwritten
            warnings.append(
                f"the model's weights changed at step {step} ({freed} storages freed, {added} added), and "
                f"those {freed + added} lines could not be written ({self.error}): weights.jsonl stops "
                "before that change (and logs no later one), so from then on the memory figures count the "
                "weights the model held before it"
            )
        elif self.error is not None:
            warnings.append(
                f"the model's weights could not be followed after a change ({self.error}): weights.jsonl "
                "stops there, and the memory figures may count weights the model no longer held"
            )
        if self.found_at_end:
            warnings.append(
                "the model's weights changed during the run other than by a .to()/.half()/.cuda() of the "
                "model passed to record() (a submodule's own, or parameters assigned): kvtrace found the "
                "change at the block's end, so the memory figures count the new weights from then only"
            )
        if self.unread:
            warnings.append(
                f"{self.unread} of the model's weight tensors could not be read (a tensor subclass kvtrace "
                "does not know): not counted as weights, so the weights' figures are short of them"
            )
        if self.on_meta:
            warnings.append(
                f"{self.on_meta} of the model's parameters and buffers are on the meta device (offloaded or "
                "not materialized): they hold no memory and are not counted as weights"
            )
        if self.packed:
            warnings.append(
                f"{self.packed} packed weights of torch.ao quantized modules are counted at their elements' "
                "size (with per-channel scales and zero points, and bias): the packed layout's padding and "
                "column offsets (a few bytes per output channel) are not counted"
            )
        if self.kept_elsewhere:
            count, nbytes = self.kept_elsewhere
            warnings.append(
                f"{count} weight storages ({nbytes:,} B) the model let go during the run were still held "
                "elsewhere when it ended (a reference to the old tensors, a copy of the state dict): they "
                "stay counted as weights"
            )
        return warnings

    # -- the hook on `_apply` ----------------------------------------------------------------------
    def install(self) -> None:
        model, watch = self.model, self
        bound = "_apply" in model.__dict__  # one set on the instance shadows the class's
        owner = model if bound else type(model)
        inner = model._apply if bound else type(model)._apply

        if bound:

            @functools.wraps(inner)
            def _apply(*args: Any, **kwargs: Any) -> Any:
                if not watch.active:
                    return inner(*args, **kwargs)
                try:
                    return inner(*args, **kwargs)
                finally:  # a conversion that raised part-way has replaced some storages already
                    watch.compare()

        else:

            @functools.wraps(inner)
            def _apply(module: Any, *args: Any, **kwargs: Any) -> Any:
                if module is not model or not watch.active:
                    return inner(module, *args, **kwargs)
                try:
                    return inner(module, *args, **kwargs)
                finally:
                    watch.compare()

        _apply.kvtrace_wrapper = True  # type: ignore[attr-defined]  # what a leak check looks for
        self.active = True
        self._patch = AttrPatch(owner, "_apply", _apply)

    def uninstall(self) -> None:
        """Put back the `_apply` kvtrace replaced, unless other code has set another one over it since."""
        self.active = False
        if self._patch is not None:
            self._patch.undo()
