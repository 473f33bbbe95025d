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
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtrace import format as fmt
from kvtrace.attr_patch import AttrPatch
from kvtrace.distributed import local_tensor
from kvtrace.kv_slots import expired, free_weak_ref, weak_ref_of

# A listed storage: its record and a raw weak reference to it (`kv_slots.weak_ref_of`)
_Listed = tuple[fmt.WeightRecord, int]


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
        self._patch: AttrPatch | None = None  # kvtrace's `_apply`, to put back
        self.active = False

    # -- the table ---------------------------------------------------------------------------------
    def write_start(self) -> None:
        with open(self.path, "w", encoding="utf-8") as fh:
            for addr, (record, storage) in self._scan().items():
                fh.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
                self.held[addr] = (record, weak_ref_of(storage))

    def _scan(self) -> dict[int, tuple[fmt.WeightRecord, Any]]:
        """The model's parameter and buffer storages now, by address, in the order they are named (tied
        weights once, under their first name; cache buffers and empty storages left out)."""
        exclude = self._exclusions()
        found: dict[int, tuple[fmt.WeightRecord, Any]] = {}
        for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            tensor = local_tensor(tensor)  # a tensor-parallel weight (DTensor): this rank's shard
            storage = tensor.untyped_storage()
            addr = storage.data_ptr()
            if addr in found or addr in exclude or storage.nbytes() == 0:
                continue
            record = fmt.WeightRecord(
                name=name,
                addr=addr,
                storage_bytes=storage.nbytes(),
                dtype=str(tensor.dtype).removeprefix("torch."),
                device=str(tensor.device),
                shape=list(tensor.shape),
            )
            found[addr] = (record, storage)
        return found

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
                if addr in current and not expired(ref):
                    continue  # the same storage (two live storages never share an address)
                del self.held[addr]
                departed += 1
                if expired(ref):
                    free_weak_ref(ref)
                    freed.append(record)
                else:
                    self.released[addr] = (record, ref)
            for addr, (record, ref) in list(self.released.items()):
                if expired(ref):
                    del self.released[addr]
                    free_weak_ref(ref)
                    freed.append(record)
            added: list[fmt.WeightRecord] = []
            for addr, (record, storage) in current.items():
                if addr in self.held:
                    continue
                if addr in self.released:  # taken back: it was never logged freed
                    self.held[addr] = self.released.pop(addr)
                    continue
                self.held[addr] = (record, weak_ref_of(storage))
                added.append(record)
            if not freed and not added:
                return
            t_ns = self._clock()
            with open(self.path, "a", encoding="utf-8") as fh:
                for event, records in (("freed", freed), ("added", added)):
                    for record in records:
                        line = {**record.to_json(), "event": event, "t_ns": t_ns, "step": step}
                        fh.write(json.dumps(line, separators=(",", ":")) + "\n")
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
            free_weak_ref(ref)
        self.held.clear()
        self.released.clear()

    def warnings(self) -> list[str]:
        """What leaves the weights' figures off the memory as it was (for the manifest's `warnings`)."""
        warnings = []
        if self.error is not None:
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
