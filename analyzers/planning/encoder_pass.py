"""An encoder-decoder run's encoder pass (T5, BART), for `kvtrace plan --from-run RUN --encoder-tokens N`:
what the run held beside its weights while its encoder ran, and what that pass holds at another encoder
length and batch. Pure, no torch.

Why: the encoder runs once, before the decoder makes any KV, over the whole input at once; its attention
scores, masks and position biases are encoder x encoder a row and head, its hidden states encoder x width.
At a short input the decode steps' logits outweigh them, so a run's peak moment never shows them, yet at a
long one the pass is the peak: the tiny T5 of the tests at batch 2, planned from an 11-token input at 200,
said 1,379,180 B where its recording peaked at 3,400,536 inside the encoder pass (six 320,000 B tensors of
200 x 200 a row), -59.4%.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.planning.plan_types import PlanRequest
    from analyzers.summary import Report

__all__ = ["EncoderMoment", "encoder_pass_bytes", "encoder_pass_moments", "encoder_pass_note"]

# (bytes that grow with the encoder length squared, with it) of the allocations beside the weights and KV
# live at one moment of the encoder pass
EncoderMoment = tuple[int, int]


def encoder_pass_moments(
    source: MemorySource, report: Report, encoder_tokens: int | None
) -> tuple[EncoderMoment, ...] | None:
    """What the main device held beside its weights and KV after each of its events before the first KV
    allocation (the encoder pass, and generate()'s set-up before it), split by how each allocation grows
    with the encoder length `encoder_tokens`: a size a multiple of it and not of its square with it (hidden
    states, the ids: rows x enc x width), every other with its square (scores, masks, position biases:
    rows x heads x enc x enc x element). A size the run cannot place counts as squared, an upper bound: a
    multiple of both (a power-of-two input length cannot tell a hidden state from a score), or of neither
    (the allocator rounds a small one up: the tiny BART's 11 x 11 scores of 484 B were 512, its sdpa's
    scratch grew to 107,520 B at 200 tokens; a scalar). Moments another holds at least as much of in both
    parts are dropped. None where the run does not tell: no encoder length, no addresses or categories, no
    KV allocation."""
    from analyzers.model import KV, OTHER

    main = report.main_device
    if not encoder_tokens or main is None:
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if dev is None or dev.category is None or not len(dev) or not bool((dev.addr >= 0).any()):
        return None
    kv_made = np.flatnonzero((dev.category == KV) & (dev.delta_bytes > 0))
    if not len(kv_made):
        return None
    square = encoder_tokens * encoder_tokens
    live: dict[int, tuple[int, int]] = {}  # address -> (part, bytes) of the live allocations beside
    held = [0, 0]
    moments: set[EncoderMoment] = set()
    for addr, nbytes, category in zip(
        dev.addr[: kv_made[0]].tolist(),
        dev.delta_bytes[: kv_made[0]].tolist(),
        dev.category[: kv_made[0]].tolist(),
        strict=True,
    ):
        if nbytes > 0 and category == OTHER and addr >= 0:
            part = 1 if nbytes % encoder_tokens == 0 and nbytes % square else 0
            live[addr] = (part, nbytes)
            held[part] += nbytes
        elif nbytes < 0 and addr in live:
            part, freed = live.pop(addr)
            held[part] -= freed
        moments.add((held[0], held[1]))
    return tuple(
        sorted(
            m for m in moments
            if not any(o != m and all(a >= b for a, b in zip(o, m, strict=True)) for o in moments)
        )
    )  # fmt: skip


def encoder_pass_bytes(req: PlanRequest) -> int:
    """What the plan's encoder pass holds beside its weights, the most of any recorded moment of the run's
    (`RecordedPeak.encoder_pass`) grown to the plan: its squared part by (N / the run's encoder length)^2,
    its linear part by N / that, both by the encoder's rows (prompts: beams share one encoder pass)
    over the run's, none of them shrunk (fewer rows or tokens keep them as measured, an upper bound), and
    by a wider compute dtype's element over the run's. 0 where the run does not tell."""
    from analyzers.planning.presets import dtype_bytes_for

    rec = req.recorded
    if rec is None or not rec.encoder_pass or not rec.encoder_tokens:
        return 0
    tokens = max(req.effective_encoder_tokens / rec.encoder_tokens, 1.0)
    rows = max((req.batch / req.beams) / (rec.batch / rec.beams), 1.0)
    dtype = 1.0
    if rec.compute_dtype is not None:
        element = dtype_bytes_for(req.effective_compute_dtype, 1)
        dtype = max(element / dtype_bytes_for(rec.compute_dtype, 1), 1.0)
    scale = rows * dtype
    return max(
        math.ceil((square * tokens * tokens + linear * tokens) * scale) for square, linear in rec.encoder_pass
    )


def encoder_pass_note(req: PlanRequest) -> str | None:
    """What the plan's encoder pass costs, where the run tells it and it outgrows the run's."""
    rec = req.recorded
    held = encoder_pass_bytes(req)
    if rec is None or not held or not rec.encoder_pass:
        return None
    run_most = max(sum(moment) for moment in rec.encoder_pass)
    if held <= run_most:
        return None
    return (
        f"the encoder pass: {human_bytes(held)} beside the weights (no KV yet) at "
        f"{req.effective_encoder_tokens:,} encoder tokens and {req.batch // req.beams} rows, the run's "
        f"{human_bytes(run_most)} at {rec.encoder_tokens:,} grown, its attention's encoder x encoder "
        "tensors (and all it cannot tell apart) with the square of the length, its hidden states with the "
        "length, all with the rows (an upper bound); the plan's peak is at least that"
    )
