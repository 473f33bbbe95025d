"""The notes a `kvtrace plan --from-run` carries where a setting is not the run's: where the GPU memory
comes from (a recorded budget, an OOM's per-process cap), a window the config lacks, another transformers'
layout, a context too short for the run's prompt. Pure text, no arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analyzers.planning.run_defaults import RunDefaults


def config_window_note(run: RunDefaults, cache: str) -> str:
    """What a typed --cache of a kind that keeps every token plans of a run whose cache slid at a window
    the model's config lacks."""
    return (
        f"the run's cache slid at a window of {run.geometry.sliding_window} tokens, which the model's config "
        f"does not give: --cache {cache} plans the model's layers as its config has them"
    )


def budget_note(budget: int, run: RunDefaults) -> str:
    """Where the GPU memory of a plan from a run with a recorded budget comes from."""
    from analyzers.units import human_bytes

    device = (
        f"not its GPU's {human_bytes(run.gpu_memory_bytes)}"
        if run.gpu_memory_bytes is not None
        else f"it ran on {run.device}"
    )
    return (
        f"the GPU memory is the budget the run was recorded with, {human_bytes(budget)} (gpu_memory, in its "
        f"manifest's options; {device}): --gpu-memory plans another"
    )


def limit_note(limit: int, run: RunDefaults) -> str:
    """Where the GPU memory of a plan from a run that ran out under a per-process cap comes from."""
    from analyzers.units import human_bytes

    device = (
        f", not its GPU's {human_bytes(run.gpu_memory_bytes)}" if run.gpu_memory_bytes is not None else ""
    )
    return (
        f"the GPU memory is the per-process limit the run ran out under, {human_bytes(limit)} (its OOM "
        f"message's '{human_bytes(limit)} allowed', to two decimals: "
        f"torch.cuda.set_per_process_memory_fraction){device}: --gpu-memory plans another"
    )


def layout_note(run: RunDefaults, typed: str, layout: tuple[int, int], measured: bool) -> str:
    """What a --transformers other than the run's own changes of a plan from it."""
    weights = (
        f"its weights the geometry's as {typed} builds them, not the {run.weights_bytes:,} B measured"
        if not measured
        else "its weights the measured ones"
    )
    return (
        f"--transformers {typed} is not the run's ({run.transformers_version or 'unnamed'}): the cache is "
        f"laid out as {layout[0]}.{layout[1]} lays it out, {weights}; the activations are the run's"
    )


def run_prompt_at(run: RunDefaults, context: int) -> tuple[int | None, str | None]:
    """The prompt a plan from `run` at a typed --context (and no --prompt) assumes, and a note when it is
    not the run's. The run's prompt while the context leaves it room for a new token: --context then
    changes the new tokens alone, one setting, as the plan's own 'max context' and remedy price it (the
    planner's worst prompt, context less one or two tokens, would also lengthen the prefill, whose
    activations follow it). A context too short for that prompt plans the worst prompt for it, an upper
    bound over the prompts it can hold."""
    if run.prompt is None or run.prompt < context:
        return run.prompt, None
    return None, (
        f"--context {context} leaves no room for the run's prompt of {run.prompt} tokens and a new token: "
        "planned at the worst prompt for that context (--prompt plans another)"
    )
