"""The recorded run a plan starts from, as a request of its own (`run_request`), and whether a plan keeps the
run's cache and weights (`same_cache_as_run`): shared by the pricing of a recorded peak (`recorded_growth`)
and its notes (`recorded_notes`). Pure, no torch."""

from __future__ import annotations

from dataclasses import replace

from analyzers.planning.plan_types import PlanRequest, RecordedPeak

__all__ = ["run_request", "same_cache_as_run"]


def same_cache_as_run(req: PlanRequest) -> bool:
    """Whether the request keeps the recorded run's cache (kind, KV dtype, window, beams, quantization) and
    weights, whose peak moment then stays where the run's was: only its batch, context or prompt differ.
    Compared field by field: the run's beams with the plan's batch need not make a valid request."""
    rec = req.recorded
    if rec is None:
        return False
    run = (rec.cache, rec.kv_dtype, rec.window, rec.beams, rec.quant_group_size, rec.residual_length)
    planned = (req.cache, req.kv_dtype, req.window, req.beams, req.quant_group_size, req.residual_length)
    return planned == run and req.measured_weights_bytes == rec.weights_bytes


def run_request(req: PlanRequest, rec: RecordedPeak) -> PlanRequest:
    """The request of the recorded run itself: the plan's model, weights and memory, the run's settings."""
    return replace(
        req,
        batch=rec.batch,
        context=rec.context,
        prompt=rec.prompt,
        cache=rec.cache,
        kv_dtype=rec.kv_dtype,
        window=rec.window,
        beams=rec.beams,
        quant_group_size=rec.quant_group_size,
        residual_length=rec.residual_length,
        measured_weights_bytes=rec.weights_bytes,
        encoder_tokens=rec.encoder_tokens if rec.encoder_tokens is not None else req.encoder_tokens,
    )
