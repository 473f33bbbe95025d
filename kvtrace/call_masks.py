"""Whether each recorded `generate()` call's prompts were padded, told once the recording's block is over.

A static cache's prefill over padded prompts makes, under sdpa attention, a bool mask over every position of
the cache, its copy in the compute dtype and K and V expanded to the query heads, which a prefill of unpadded
prompts skips: `kvtrace plan --from-run --cache static` prices them, and nothing in the run's memory says
whether the prompts were padded. Only the call's `attention_mask` does, and reading it costs twice what a
recorder may not spend: a host read of its values inside `generate()` waits for the device on the model's
thread (`tests/integration/test_tracker_syncs.py`), and a reduction made then and read later (on the writer
thread) is a tensor held in the very memory being measured (1 B on the CPU, a 512 B block on CUDA, which the
exact-figure tests saw). So a call keeps only a weak reference to its mask
(kvtrace.integrations.hf_generate's `CallStart.mask`), noted here at the call's first forward with the step
that forward begins (its prefill), and the masks are read after the block's last measurement (the exit
snapshot, the `end` sample), when a device sync and a reduction no longer fall in anything the run measures.
A mask the caller dropped before the block ended is told as unknown (null), never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["CallMasks"]


class CallMasks:
    """The recorded `generate()` calls, each as the step of its first forward and a weak reference to its
    `attention_mask` (None: it passed no mask tensor). `began` runs on the model's thread, once per call:
    one list append, no read of the mask."""

    def __init__(self) -> None:
        self._calls: list[tuple[int, Callable[[], Any] | None]] = []

    def began(self, step: int, mask: Callable[[], Any] | None) -> None:
        self._calls.append((step, mask))

    def manifest_calls(self) -> list[dict[str, Any]]:
        """The manifest's `generate_calls`, read once the block's measurements are over (it reads the masks
        still alive: one reduction and one device sync each); the references are dropped."""
        calls, self._calls = self._calls, []
        return [_call_entry(step, mask) for step, mask in calls]


def _call_entry(step: int, mask: Callable[[], Any] | None) -> dict[str, Any]:
    """One call: `step`, its prefill's; `padded` where it passed a mask tensor (null: not told)."""
    entry: dict[str, Any] = {"step": step}
    if mask is not None:
        entry["padded"] = _padded(mask())
    return entry


def _padded(mask: Any) -> bool | None:
    """Whether a call's 2D attention_mask masks a position out (a zero: its rows were padded to one length).
    None where the mask is gone (freed with the caller's last reference), is not a 2D mask of keep flags (a
    4D float mask adds -inf where it masks, its zeros keep), or cannot be read: the recording's end must
    never raise for it."""
    if mask is None:
        return None
    try:
        if mask.dim() != 2:
            return None
        return mask.numel() > 0 and not bool(mask.all())
    except Exception:
        return None
