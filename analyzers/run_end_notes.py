"""The report's notes on how a recorded block ended: one that raised, where in its last step (the layers
whose updates reached the KV log), and a run still recording or stopped part-way.

Why apart from `analyzers.summary` (the figures): these are sentences from the manifest's `ended` and the
KV log's last step, the same in every renderer, and in diagnose's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from analyzers.run_stop import SIGTERM_SENDERS, interrupted_how, killed_after_sigterm

if TYPE_CHECKING:
    from analyzers.kv_cut_step import CutStep
    from analyzers.model import MemorySource


def raised_note(ended: dict[str, Any], stopped: str = "") -> str:
    """The note on a recorded block that raised (the manifest's `ended`, status `exception`); `stopped`:
    where in its last step it raised (`raised_step_text`), where the log tells."""
    message = str(ended.get("message") or "")
    if len(message) > 200:  # the whole message is in manifest.json
        message = message[:200].rsplit(" ", 1)[0] + "… (cut; whole in manifest.json)"
    raised = f"{ended.get('type') or 'an exception'}: {message}".rstrip(": ")
    if stopped:
        return f"the recorded block raised{stopped} ({raised})"
    return f"the recorded block raised {raised}: the figures cover the run up to then"


def _layer_list(layers: tuple[int, ...]) -> str:
    """Layer indices in runs: (0, 1, 2, 5) -> "layers 0-2, 5"; (3,) -> "layer 3"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"layer {text}" if len(layers) == 1 else f"layers {text}"


def _cut_layers(cut: CutStep) -> str:
    """Which layers' updates of a cut step reached the log and which did not, per cache where several."""
    named = len(cut.missing) > 1  # several caches cut: say whose layers
    parts = []
    for cache, missing in sorted(cut.missing.items()):
        reached = cut.reached.get(cache, ())
        if reached and missing:
            said = f"{_layer_list(reached)} reached the log, {_layer_list(missing)} did not"
        elif missing:  # a forward that raised before its first layer's update
            said = f"no layer's update reached the log ({_layer_list(missing)})"
        else:  # one that raised after its last layer's, or a prefill (no step before it to compare)
            said = f"{_layer_list(reached)} reached the log"
        parts.append(f"{f'cache {cache}: ' if named else ''}{said}")
    return "; ".join(parts)


def cut_step_note(cut: CutStep) -> str:
    """Which layers' updates of a cut last step reached the log, and which step's end the figures are."""
    whole = (
        f"the end of step {cut.whole_step}, the last whole step"
        if cut.whole_step is not None
        else "before it (no step came before it)"
    )
    return (
        f"its last step, {cut.step}, was cut between its layers' KV updates ({_cut_layers(cut)}): tokens "
        f"held, bytes per token and generated tokens are those at {whole}; the memory timeline shows what "
        f"of step {cut.step} was logged"
    )


def raised_step_text(cut: CutStep) -> str:
    """Where in its last step a block that raised in the model's forward stopped (`CutStep.raised`), and
    what the figures count of that step: " in step 4, whose forward never finished (...): ...", to follow the
    words that say what happened ("the recorded block ran out of memory (OutOfMemoryError)")."""
    counted = (
        f", so generated tokens and the step count end at step {cut.whole_step}, the last whole one"
        if cut.whole_step is not None
        else ", and no step came before it"
    )
    return (
        f" in step {cut.step}, whose forward never finished ({_cut_layers(cut)}): it generated no token"
        f"{counted}; the KV final and each layer's tokens are what was held when it stopped"
    )


def ended_notes(source: MemorySource) -> list[str]:
    """How a run's record ends, where it ends short: cut mid-line, still being recorded, its process dead,
    interrupted, raised, or out of memory (the report's OOM section has the allocator's figures); a last
    step cut between its layers' updates, or whose forward raised. [] for a run that finished and for
    other inputs."""
    notes: list[str] = []
    if source.meta.get("truncated"):
        notes.append("the run was interrupted: figures cover the events written before it stopped")
    ended = (source.meta.get("manifest") or {}).get("ended") or {}
    recording = source.meta.get("recording_pid")
    kv_log = source.meta.get("kv")
    cut: CutStep | None = kv_log.cut if kv_log is not None else None
    # The step the block's exception stopped in, where the log tells
    stopped = raised_step_text(cut) if cut is not None and cut.raised else ""
    up_to = stopped or ": the figures cover the run up to then"
    if ended.get("status") == "running" and recording is not None:
        by = f" by pid {recording}" if recording else ""
        notes.append(f"the run is still being recorded{by}: figures cover what it has written so far")
        if cut is not None:
            notes.append(cut_step_note(cut))
    elif ended.get("status") == "running":
        died = "the process died"
        if killed_after_sigterm(ended):  # its logs were whole when it was killed: every step is there
            died = f"killed while writing its end, after a SIGTERM from {SIGTERM_SENDERS}"
        last = cut_step_note(cut) if cut is not None else "read up to its last flushed step"
        notes.append(f"the run never finished ({died}): {last}")
    elif ended.get("status") == "interrupted":
        notes.append(f"the recorded block was {interrupted_how(ended)}{up_to}")
    elif ended.get("status") == "exception" and source.ooms:
        kind = ended.get("type") or "an exception"
        notes.append(f"the recorded block ran out of memory ({kind}){up_to}")
    elif ended.get("status") == "exception":
        notes.append(raised_note(ended, stopped))
    return notes
