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

Each call also keeps what it asked for (`max_length`, `max_new_tokens`) and where its prompt ends
(`prompt_end`), as its prefill's end sample tells them. That sample is written when the prefill ends, which a
process killed inside it (the kernel's OOM killer: SIGKILL, no teardown) never reaches, so the recorder
writes the calls begun so far into the manifest at each call's first forward (`begun`), before any of its KV.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["CallMasks"]


class CallMasks:
    """The recorded `generate()` calls, each as the step of its first forward, what it asked for and a weak
    reference to its `attention_mask` (None: it passed no mask tensor). `began` runs on the model's thread,
    once per call: one list append, no read of the mask."""

    def __init__(self) -> None:
        self._calls: list[tuple[dict[str, Any], Callable[[], Any] | None]] = []

    def began(
        self,
        step: int,
        mask: Callable[[], Any] | None,
        prompt_end: int | None = None,
        length: tuple[int, int | None] | None = None,
        keeps: tuple[str, ...] = (),
    ) -> None:
        """A call whose first forward is `step`; `prompt_end` and `length` (max_length, max_new_tokens) where
        the recorder knows them, as its prefill sample says them; `keeps`, the output_* settings whose
        tensors it holds for every step."""
        entry: dict[str, Any] = {"step": step}
        if keeps:
            entry["keeps"] = list(keeps)
        if prompt_end is not None:
            entry["prompt_end"] = prompt_end
        if length is not None:
            entry["max_length"] = length[0]
            if length[1] is not None:
                entry["max_new_tokens"] = length[1]
        self._calls.append((entry, mask))

    def begun(self) -> list[dict[str, Any]]:
        """The calls so far, as a manifest written while the block runs has them: no mask is read."""
        return [dict(entry) for entry, _ in list(self._calls)]

    def manifest_calls(self) -> list[dict[str, Any]]:
        """The manifest's `generate_calls`, read once the block's measurements are over (it reads the masks
        still alive: one reduction and one device sync each); the references are dropped."""
        calls, self._calls = self._calls, []
        return [_call_entry(entry, mask) for entry, mask in calls]


def _call_entry(entry: dict[str, Any], mask: Callable[[], Any] | None) -> dict[str, Any]:
    """One call: `step`, its prefill's, what it asked for; `padded` where it passed a mask tensor (null: not
    told)."""
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
