"""What a transformers `generate()` call keeps for every step beside the KV, and what dropping it frees.

With `return_dict_in_generate`, `output_scores`, `output_logits`, `output_attentions` and
`output_hidden_states` each make generate() keep a step's tensors until it returns: Llama 3's scores alone
are 128,256 float32 a row and step (0.5 MiB), so a long generation can hold more of them than KV, and the
report counts them as "other". The run's manifest says which a call kept (`generate_calls[].keeps`, from the
call's settings); the bytes are measured: the allocations live at the diagnosis's moment, neither KV nor
weights, that the call's steps made before the one before the moment's (not the run's first forward:
`counted_steps`). A step's work frees its own
temporaries within it, but what generate() carries to the next step (the grown `input_ids`, its attention
mask, and the loop's variables: the last step's logits, scores, sampling's probabilities) lives until the
next step replaces it, kept output or not; and what the moment's own step made cannot be told from its
temporaries. Both are left out: the figure is what dropping the outputs frees at least (a re-recording
without them peaked lower by that and one step's outputs more: tests/integration/
test_diagnose_kept_outputs.py).
Pure, torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analyzers.budget import step_at, step_starts
from analyzers.model import OTHER, MemorySource
from analyzers.planning.diagnose_stacks import live_allocations
from analyzers.planning.diagnosis import Remedy
from analyzers.timeline import DeviceTimeline
from analyzers.units import human_bytes

__all__ = [
    "KEPT_OUTPUTS",
    "KeptOutputs",
    "counted_steps",
    "held_by_steps",
    "kept_outputs",
    "kept_outputs_remedy",
    "peak_kept_note",
]

# generate()'s settings whose tensors it keeps for every step (kvtrace.integrations.hf_generate's, which the
# analyzers do not import)
KEPT_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
REMEDY = "kept_outputs"


@dataclass(frozen=True)
class KeptOutputs:
    """The outputs a call in progress at the moment keeps, and what its earlier steps still hold."""

    keeps: tuple[str, ...]  # its KEPT_OUTPUTS settings that are on
    call_step: int  # its first forward's step (its prefill)
    held_bytes: int  # live at the moment, made by those steps, neither KV nor weights
    allocations: int
    steps: range  # the steps counted: its own up to the one before the last before the moment's, not step 1


def kept_outputs(
    source: MemorySource, dev_index: int | None, upto: int, step: int | None
) -> KeptOutputs | None:
    """The generate() call of the moment (event `upto` of device `dev_index`, in `step`) where it keeps
    outputs; None where none does, or where the events cannot say which allocations are live (no addresses,
    no attribution)."""
    if step is None or dev_index is None or upto < 0:
        return None
    manifest = source.meta.get("manifest") or {}
    calls = manifest.get("generate_calls") if isinstance(manifest, dict) else None
    listed = calls if isinstance(calls, list) else []
    begun = [c for c in listed if isinstance(c, dict) and type(c.get("step")) is int and c["step"] <= step]
    if not begun:
        return None
    call = max(begun, key=lambda c: c["step"])
    named = call.get("keeps")
    keeps = tuple(k for k in KEPT_OUTPUTS if isinstance(named, list) and k in named)
    if not keeps:
        return None
    first = int(call["step"])
    counted = counted_steps(range(first, step - 1))
    held = held_by_steps(source, dev_index, upto, counted)
    if held is None:
        return None
    return KeptOutputs(keeps, first, held[0], held[1], counted)


def counted_steps(steps: range) -> range:
    """`steps` less the run's first forward (step 1), whose one-time buffers stay for the process's life
    (on CUDA a math library's workspace, allocated at the first matmul): never what a setting frees."""
    return range(max(steps.start, 2), steps.stop)


def held_by_steps(
    source: MemorySource, dev_index: int, upto: int, steps: range | set[int]
) -> tuple[int, int] | None:
    """(bytes, allocations) live after event `upto` of device `dev_index`, neither KV nor weights, that
    `steps` made (a step's allocations are those between its start and the next's: `step_starts`); None
    where the events cannot say which are live (no addresses, no attribution) or the run has no steps."""
    dev = source.devices[dev_index]
    if dev.category is None or not bool((dev.addr >= 0).any()):
        return None
    starts = step_starts(source)
    if not starts:
        return None
    start_us = np.array([ts for ts, _, _ in starts], dtype=np.float64)
    numbers = np.array([number for _, number, _ in starts], dtype=np.int64)
    live = live_allocations(dev, upto) & (dev.category[: upto + 1] == OTHER)
    at = np.searchsorted(start_us, dev.ts_us[: upto + 1].astype(np.float64), side="right") - 1
    made_in = np.where(at >= 0, numbers[np.clip(at, 0, None)], -1)
    chosen = live & np.isin(made_in, np.fromiter(steps, dtype=np.int64))
    return int(dev.delta_bytes[: upto + 1][chosen].sum()), int(chosen.sum())


def kept_outputs_remedy(kept: KeptOutputs, need: int | None) -> Remedy:
    """Dropping the call's kept outputs (each setting False, or return_dict_in_generate): it frees what the
    call's earlier steps hold beside the KV, at no cost to batch or context."""
    settings = ", ".join(f"{name}=False" for name in kept.keeps)
    saved = kept.held_bytes
    fits = None if need is None else saved >= need
    sentence = (
        f"generate(..., {settings}) frees {human_bytes(saved)}: the call that began at step "
        f"{kept.call_step} keeps every step's {_named(kept.keeps)} until it returns, and its "
        f"{_span(kept.steps)} still hold {kept.allocations:,} of them beside the KV and weights (the last "
        "step's and this one's are not counted, nor the run's first forward's, which may hold one-time "
        "buffers: at least this much is freed). Read what you need of them inside the loop instead (a "
        "LogitsProcessor, a streamer), or move them to the CPU as they come."
    )
    return Remedy(REMEDY, None, saved, fits, sentence)


def _span(steps: range) -> str:
    """`steps 2 to 22`, `step 5`."""
    if len(steps) == 1:
        return f"step {steps.start}"
    return f"steps {steps.start} to {steps[-1]}" if steps else "steps before"


def _named(keeps: tuple[str, ...]) -> str:
    words = [name.removeprefix("output_").replace("_", " ") for name in keeps]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def peak_kept_note(source: MemorySource, timelines: list[DeviceTimeline]) -> str | None:
    """The report's note on the outputs a generate() call kept at the peak of the device that peaked
    highest, counted there as "other"; None where no call of the run keeps any (most runs: nothing read
    beyond the manifest), or where they cannot be measured."""
    manifest = source.meta.get("manifest") or {}
    calls = manifest.get("generate_calls") if isinstance(manifest, dict) else None
    listed = calls if isinstance(calls, list) else []
    if not any(isinstance(c, dict) and c.get("keeps") for c in listed) or not timelines:
        return None
    dev_index = max(range(len(timelines)), key=lambda i: _peak_of(timelines[i]))
    timeline = timelines[dev_index]
    if not len(timeline.ts_us) or len(timeline.ts_us) != len(source.devices[dev_index]):
        return None  # a timeline that is not one point an event: its peak is no event's index
    index = int(np.argmax(timeline.allocated))
    step, _ = step_at(source, float(timeline.ts_us[index]))
    kept = kept_outputs(source, dev_index, index, step)
    if kept is None or kept.held_bytes <= 0:
        return None
    return (
        f"at the peak (step {step}) the generate() call that began at step {kept.call_step} held at least "
        f"{human_bytes(kept.held_bytes)} of the {_named(kept.keeps)} it keeps for every step "
        f"({', '.join(kept.keeps)}), counted as other: `kvtrace diagnose` prices dropping them"
    )


def _peak_of(timeline: DeviceTimeline) -> int:
    return int(timeline.allocated.max()) if len(timeline.allocated) else 0
