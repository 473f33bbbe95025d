"""`kvtrace diagnose`'s remedy for a run whose weights alone exceed the device: smaller weights.

Why apart: every other remedy shrinks what the inference adds (KV, activations, kept outputs), and none of
them can make a run fit whose weights are already over the budget before its first step; a list of "not
enough" KV remedies then hides the cause. This one names it, prices the weights at fewer bits (the bytes
a parameter takes scale with its dtype) and points to `kvtrace plan --from-run --dtype`, which plans the
whole run again at that dtype (its KV and activations follow the compute dtype too).
"""

from __future__ import annotations

from collections.abc import Sequence

from analyzers.planning.diagnosis import Remedy
from analyzers.planning.run_kv_facts import DTYPE_BITS
from analyzers.units import human_bytes
from kvtrace.format import WeightRecord

__all__ = ["size_arg", "weights_bits", "weights_remedy"]

# Fewer bits tried in order, the first that leaves room for the shortfall offered: (bits, plan's --dtype)
_SMALLER = ((16, "bf16"), (8, "fp8"), (4, "int4"))
# The KV reader's dtype bits, and uint8: how bitsandbytes stores packed 4-bit weights
_DTYPE_BITS = {**DTYPE_BITS, "uint8": 8}


def size_arg(nbytes: int) -> str:
    """A size as `--gpu-memory` reads it back exactly: the largest binary unit that divides it."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def weights_bits(weights: Sequence[WeightRecord], compute_bits: int | None) -> int | None:
    """Bits a parameter of the weights takes: those of the dtype holding most of the run's weight bytes
    (int8 where a quantizer stored them so), else the model's compute dtype's; None where neither is known."""
    by_dtype: dict[str, int] = {}
    for weight in weights:
        by_dtype[weight.dtype] = by_dtype.get(weight.dtype, 0) + weight.storage_bytes
    if by_dtype:
        dtype = max(by_dtype, key=lambda name: by_dtype[name])
        return _DTYPE_BITS.get(dtype.removeprefix("torch."), compute_bits)
    return compute_bits


def weights_remedy(
    weights: int,
    limit: int | None,
    limit_name: str,
    shortfall: int | None,
    bits: int | None,
    run: str | None,
) -> Remedy | None:
    """The `weights` remedy where the `weights` bytes alone reach `limit` (`limit_name`: "budget", or the
    device's memory or the process's cap at an OOM), else None. `bits`: the weights' bits a parameter
    (None: unknown, priced by no dtype); `shortfall`: what the moment lacks (None: unknown, and `fits` too);
    `run`: the run directory, for the plan command it names (None: not a run)."""
    if not weights or not limit or weights < limit:
        return None
    head = (
        f"The weights alone ({human_bytes(weights)}) reach the {human_bytes(limit)} {limit_name}: no KV "
        "remedy can make this run fit."
    )
    tail = " Else shard the model across more GPUs, or use a larger device."
    options = [(b, name) for b, name in _SMALLER if bits is not None and b < bits]
    if bits is None or not options:
        return Remedy(
            "weights", None, None, None if bits is None else False, f"{head}{tail.replace(' Else s', ' S')}"
        )
    need = shortfall or 0
    chosen = options[-1]
    for option in options:
        after = weights * option[0] // bits
        if weights - after >= need and after < limit:
            chosen = option
            break
    fewer, dtype = chosen
    saved = weights - weights * fewer // bits
    covers = saved >= need and weights - saved < limit
    fits = None if shortfall is None else covers
    if shortfall is None:
        verdict = f"the weights then {'under' if covers else 'still over'} the {limit_name}"
    elif covers:
        verdict = (
            f"more than the {human_bytes(shortfall)} shortfall (a lower bound: the activations shrink with "
            "the compute dtype too)"
        )
    else:
        verdict = f"not enough for the {human_bytes(shortfall)} shortfall"
    where = run or "RUN"
    plan = f"`kvtrace plan --from-run {where} --gpu-memory {size_arg(limit)} --dtype {dtype}` plans it whole"
    sentence = (
        f"{head} {dtype} weights ({fewer} bits a parameter for the run's {bits}) save {human_bytes(saved)}, "
        f"{verdict}; {plan}.{tail}"
    )
    return Remedy("weights", fewer, saved, fits, sentence)
