"""`kvtrace diagnose`'s remedy for a run whose weights alone exceed the device: smaller weights.

Why apart: every other remedy shrinks what the inference adds (KV, activations, kept outputs), and none of
them can make a run fit whose weights are already over the budget before its first step; a list of "not
enough" KV remedies then hides the cause. This one names it, prices the weights at fewer bits (the bytes
a parameter takes scale with its dtype) and points to `kvtrace plan --from-run --dtype`, which plans the
whole run again at that dtype (its KV and activations follow the compute dtype too).
"""

from __future__ import annotations

from analyzers.planning.diagnosis import Remedy
from analyzers.units import human_bytes

__all__ = ["weights_remedy"]

# Fewer bits tried in order, the first that leaves room for the shortfall offered: (bits, plan's --dtype)
_SMALLER = ((16, "bf16"), (8, "fp8"), (4, "int4"))
_NAMES = {32: "fp32", 16: "16-bit", 8: "8-bit", 4: "4-bit"}


def size_arg(nbytes: int) -> str:
    """A size as `--gpu-memory` reads it back exactly: the largest binary unit that divides it."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def weights_remedy(
    weights: int, limit: int | None, shortfall: int | None, bits: int | None, run: str | None
) -> Remedy | None:
    """The `weights` remedy where the `weights` bytes alone reach `limit` (the budget, or the device at an
    OOM), else None. `bits`: the weights' dtype bits (None: unknown, priced by no dtype); `shortfall`: what
    the moment lacks; `run`: the run directory, for the plan command it names (None: not a run)."""
    if not weights or limit is None or weights < limit:
        return None
    head = (
        f"The weights alone ({human_bytes(weights)}) reach the {human_bytes(limit)} budget: no KV remedy "
        "can make this run fit."
    )
    tail = " Else shard the model across more GPUs, or use a larger device."
    options = [(b, name) for b, name in _SMALLER if bits is not None and b < bits]
    if not options:
        return Remedy("weights", None, None, False, f"{head}{tail.replace(' Else s', ' S')}")
    need = shortfall or 0
    chosen = options[-1]
    for option in options:
        after = weights * option[0] // bits  # type: ignore[operator]  # options is empty without bits
        if weights - after >= need and after < limit:
            chosen = option
            break
    fewer, dtype = chosen
    assert bits is not None
    saved = weights - weights * fewer // bits
    fits = saved >= need and weights - saved < limit
    verdict = (
        f"more than the {human_bytes(shortfall)} shortfall (a lower bound: the activations shrink with the "
        "compute dtype too)"
        if fits and shortfall
        else f"not enough for the {human_bytes(shortfall)} shortfall"
        if shortfall
        else "within the budget"
        if fits
        else "still not within the budget"
    )
    where = run or "RUN"
    plan = f"`kvtrace plan --from-run {where} --gpu-memory {size_arg(limit)} --dtype {dtype}` plans it whole"
    sentence = (
        f"{head} {dtype} weights ({fewer} bits a parameter for the run's {bits}) save {human_bytes(saved)}, "
        f"{verdict}; {plan}.{tail}"
    )
    return Remedy("weights", fewer, saved, fits, sentence)
