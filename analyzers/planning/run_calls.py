"""What a recorded `generate()` call asked for, for `plan --from-run`: the length it was to reach
(`max_length`, and its `max_new_tokens` where that set it) and where its prompt ends in its cache
(`prompt_end`). Its prefill's end sample in memory_samples.jsonl says them; a process killed inside that
prefill (the kernel's OOM killer: SIGKILL) never wrote that sample, and the manifest's `generate_calls`,
which the recorder rewrites as each call begins, says them in its place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtrace.format import Run

__all__ = ["CallRequest", "call_request", "prompt_ends"]


@dataclass(frozen=True)
class CallRequest:
    """The length a generate() call was asked to reach."""

    max_length: int  # the sequence length it stops at, prompt included
    max_new_tokens: int | None  # its max_new_tokens, where that set max_length

    def said(self, prompt: int | None) -> str:
        """How the call asked for it: "its prompt of 8 + max_new_tokens=6"."""
        if self.max_new_tokens is not None:
            where = f"its prompt of {prompt} + " if prompt is not None else ""
            return f"{where}max_new_tokens={self.max_new_tokens}"
        return f"max_length={self.max_length}, or transformers' default of 20 new tokens"


def _said_of(record: dict[str, Any]) -> CallRequest | None:
    length: Any = record.get("max_length")
    new: Any = record.get("max_new_tokens")
    if type(length) is int and length > 1:
        return CallRequest(length, new if type(new) is int and new > 0 else None)
    return None


def _manifest_call(run: Run, step: int) -> dict[str, Any]:
    """The manifest's `generate_calls` entry of the call whose prefill is `step`; empty where none."""
    calls = run.manifest.get("generate_calls")
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict) and call.get("step") == step:
            return call
    return {}


def call_request(run: Run, step: int) -> CallRequest | None:
    """The request of the call whose prefill is `step`: its prefill sample's, else its manifest entry's (a
    process killed in that prefill); None for a run recorded before kvtrace wrote them, or a call whose
    input did not show its sequence."""
    for sample in run.memory_samples:
        if sample.get("phase") == "prefill" and sample.get("step") == step:
            said = _said_of(sample)
            if said is not None:
                return said
    return _said_of(_manifest_call(run, step))


def prompt_ends(run: Run) -> dict[int, int]:
    """Prefill step -> its generate() call's prompt end (the step's memory sample's `prompt_end`, else its
    manifest entry's: a prefill whose process was killed wrote no sample)."""
    ends: dict[int, int] = {}
    calls = run.manifest.get("generate_calls")
    for call in calls if isinstance(calls, list) else ():
        end: Any = call.get("prompt_end") if isinstance(call, dict) else None
        if type(end) is int and end > 0 and type(call.get("step")) is int:
            ends[call["step"]] = end
    for sample in run.memory_samples:
        end = sample.get("prompt_end")
        if sample.get("phase") == "prefill" and type(end) is int and end > 0:
            ends[sample["step"]] = end
    return ends
