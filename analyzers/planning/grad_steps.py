"""Forwards run with grad enabled: what autograd keeps of them for a backward that never comes.

A loop of one's own over `model(...)` without `torch.no_grad()` or `torch.inference_mode()` (generate()
disables grad itself) builds an autograd graph through the KV cache: every step's activations that a
backward would need stay held, and so do the cache's replaced storages (a DynamicCache's torch.cat makes new
K and V each step; the graph keeps the old), so memory grows with every step far beyond the KV's own. The
recorder marks each step whose forward ran with grad enabled (its sample's `grad`); what is held is measured
at the moment: the allocations live then, neither KV nor weights, that those steps made before the one
before the moment's (`kept_outputs.held_by_steps`: the last step's carry, the moment's own and the run's
first forward's are left out), and, for a cache that grows by copies, the KV live beyond what it stores at
the moment by arithmetic (tokens x rows x bytes a token). Pure, torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analyzers.model import MemorySource
from analyzers.planning.diagnosis import Remedy
from analyzers.planning.kept_outputs import counted_steps, held_by_steps
from analyzers.units import human_bytes

__all__ = ["GradHeld", "grad_held", "grad_note", "grad_steps", "no_grad_remedy"]

REMEDY = "no_grad"


@dataclass(frozen=True)
class GradHeld:
    """What the forwards run with grad enabled hold at a moment."""

    grad_steps: int  # steps up to the moment's whose forward ran with grad enabled
    steps: int  # steps up to the moment's
    activations_bytes: int  # live, neither KV nor weights, made by those steps before the last one
    activations: int
    kv_copies_bytes: int  # the KV live beyond what the cache stores at the moment's step, by arithmetic


def grad_steps(source: MemorySource) -> set[int]:
    """The steps whose forward ran with grad enabled: their end sample says `grad` (runs recorded before
    kvtrace wrote it say nothing: none)."""
    run = source.meta.get("run")
    samples = getattr(run, "memory_samples", None) or ()
    return {
        s["step"]
        for s in samples
        if isinstance(s, dict) and s.get("grad") is True and type(s.get("step")) is int and s["step"] > 0
    }


def grad_held(
    source: MemorySource,
    dev_index: int | None,
    upto: int,
    step: int | None,
    kv_bytes: int | None,
    kv_stored: int | None,
) -> GradHeld | None:
    """At the moment (event `upto` of device `dev_index`, in `step`): what the steps run with grad enabled
    hold; None where none of the steps up to it did. `kv_stored`: what the cache stores then by arithmetic
    (its tokens, rows and bytes a token), against the `kv_bytes` live."""
    if step is None or dev_index is None or upto < 0:
        return None
    with_grad = {s for s in grad_steps(source) if s <= step}
    if not with_grad:
        return None
    held = held_by_steps(source, dev_index, upto, set(counted_steps(range(1, step - 1))) & with_grad)
    activations, count = held if held is not None else (0, 0)
    copies = kv_bytes - kv_stored if kv_bytes is not None and kv_stored is not None else 0
    return GradHeld(len(with_grad), step, activations, count, max(copies, 0))


def no_grad_remedy(g: GradHeld, need: int | None) -> Remedy:
    """Running the forwards without grad: it frees what autograd holds of them, at no cost."""
    saved = g.activations_bytes + g.kv_copies_bytes
    fits = None if need is None else saved >= need
    parts = [f"{human_bytes(g.activations_bytes)} of their activations"] if g.activations_bytes else []
    if g.kv_copies_bytes:
        parts.append(f"{human_bytes(g.kv_copies_bytes)} of KV beyond what the cache stores (replaced copies)")
    sentence = (
        f"Run the forwards under torch.inference_mode() (or torch.no_grad()): {g.grad_steps:,} of the "
        f"{g.steps:,} steps up to this moment ran with grad enabled, so autograd keeps what they made for a "
        f"backward that never comes, {' and '.join(parts) or 'nothing the events can place'}: at least "
        f"{human_bytes(saved)} freed (the last step's, this one's and the first forward's are not "
        "counted). The other remedies price the KV as measured, those copies included."
    )
    return Remedy(REMEDY, None, saved, fits, sentence)


def grad_note(source: MemorySource, kv: Any) -> str | None:
    """The report's note on a run whose forwards ran with grad enabled, with what the KV measured at the end
    holds beyond the arithmetic (`kv`: the report's KvSummary); None where none did."""
    steps = grad_steps(source)
    if not steps:
        return None
    note = (
        f"{len(steps):,} step(s) ran their forward with grad enabled (no torch.no_grad() or "
        "torch.inference_mode()): autograd keeps what each made, the KV cache's replaced copies included, "
        "for a backward"
    )
    measured, expected = kv.bytes_per_token_measured, kv.bytes_per_token_expected
    if measured and expected and measured > expected:
        note += (
            f", so the KV measured is {measured / expected:.1f}x the arithmetic a token "
            f"({measured:,.1f} B against {expected:,} B)"
        )
    return note + ": `kvtrace diagnose` prices running them without grad"
