"""`kvtrace diagnose`'s fp8 remedy for a run whose cache kept a window of its own (a sliding cache on a
model whose config gives none): transformers' QuantizedCache(backend='fp8') keeps every token, so the fp8
run is priced over the whole context at its last step's last update, as `kvtrace plan --from-run RUN
--cache fp8` prices it (`fp8_update_bytes` for the update, `mask_beyond_window` for the mask a full
cache's step makes), not over the window the run's cache held. Pure, torch-free but for `slid_run`'s
reading of the run's timeline.

Before, the window's tokens priced it: the demo's Llama (8 rows, 20-token padded prompt, 64 new tokens,
window 16, fp32) was said to peak at about 74.1 MB on fp8, 6.00 MiB under its 76.67 MiB moment, where the
fp8 recording and the plan peaked at 84,634,640 B, above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from analyzers.planning.diagnosis import Remedy, fits
from analyzers.planning.fp8_update import fp8_update_bytes
from analyzers.planning.full_update import mask_beyond_window
from analyzers.planning.run_moments import last_update_beside_at
from analyzers.planning.run_padding import call_padded
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.planning.run_defaults import CallContext
    from analyzers.summary import Report

__all__ = ["SlidRun", "fp8_over_context", "own_window", "slid_run"]

_SCALE_BYTES = 2 * 4  # a float32 scale for a layer's K and one for its V


@dataclass(frozen=True)
class SlidRun:
    """What a run whose cache slid held at its last update, where a full cache's KV peak repeats."""

    beside_bytes: int  # beside the weights and KV at its last update (`last_update_beside_at`)
    window_keys: int  # the keys its last update attended over: the window's tokens held and the new one
    padded: bool | None  # whether its call's prompts were padded (None: not told)
    attn_implementation: str | None


def own_window(d: dict[str, object]) -> bool:
    """Whether the run's cache kept a window the model's config does not give (a QuantizedCache keeps every
    token of such a model)."""
    return bool(d.get("sliding_layers")) and not d.get("model_sliding_layers")


def slid_run(source: MemorySource, report: Report, call: CallContext | None) -> SlidRun | None:
    """The run's figures at its last update, for a recorded run (`kvtrace.record`) with a timeline whose
    last storage made was a decode step's; None otherwise."""
    run = source.meta.get("run")
    if source.kind != "run" or run is None or call is None or not report.kv.tokens_held:
        return None
    beside, _ = last_update_beside_at(source, report)
    if beside is None:
        return None
    attn = (report.geometry or {}).get("attn_implementation")
    padded = call_padded(run.manifest, call.step)
    return SlidRun(beside, report.kv.tokens_held + 1, padded, attn if isinstance(attn, str) else None)


def fp8_over_context(d: dict[str, object], own_kv: int, kv_bits: int, need: int | None) -> Remedy:
    """An fp8 cache for a run whose cache kept its own window: its peak is the larger of the last update over
    the call's context (what the run held beside its KV at its last update, every layer's 8-bit KV over the
    tokens fed with a float32 scale for each K and V, the updated layer's old and new 8-bit K and V, three
    float32 copies of its K or V, and the mask over every key) and the diagnosed moment with its KV at 8 bits
    over the context (at a prefill, the moment's own tokens). Unpriced, naming `kvtrace plan`, where the run
    does not tell those figures: a beam search (its last storage made is a reorder's copy), a run cut short,
    one without allocator events or a `SlidRun`."""
    priced = _priced(d, own_kv, kv_bits)
    if priced is None:
        text = (
            "fp8 KV cache: transformers' QuantizedCache keeps every token, where this run's cache kept a "
            "window the model's config does not give, so the tokens held here do not price it; "
            "`kvtrace plan --from-run RUN --cache fp8` does."
        )
        return Remedy("quantized_kv", 8, None, None, text)
    peak, tokens, kv8, copies, moment = priced
    lower = moment - peak
    side = "lower" if lower >= 0 else "higher"
    text = (
        "An fp8 KV cache (QuantizedCache(backend='fp8')) keeps every token, where this run's cache kept a "
        f"window: all {tokens:,} tokens fed are {human_bytes(kv8)} of KV at 8 bits, and each layer's "
        f"update dequantizes the layer's K and V through float32 ({human_bytes(copies)}: three float32 "
        "copies of its K or V at once) beside its old K and V and their new copy, which at the run's last "
        "update (as `kvtrace plan --from-run RUN --cache fp8` prices it) puts the fp8 run's peak at "
        f"{human_bytes(peak)}, {human_bytes(abs(lower))} {side} than this moment."
    )
    return Remedy("quantized_kv", 8, lower, fits(lower, need), text)


def _priced(d: dict[str, object], own_kv: int, kv_bits: int) -> tuple[int, int, int, int, int] | None:
    """(the fp8 run's peak, tokens fed, their 8-bit KV with its scales, one update's float32 copies, this
    moment's bytes), or None where the run does not tell them."""
    run, moment, beyond = d.get("slid_run"), d.get("moment_bytes"), d.get("beyond_weights_bytes")
    batch, layers, per_row = d.get("batch"), d.get("kv_layers"), d.get("token_elements")
    context, reached, kv = d.get("run_context"), d.get("run_reached"), d.get("kv_bytes")
    if not isinstance(run, SlidRun) or d.get("allocator_events") is not True:
        return None
    if not isinstance(moment, int) or not isinstance(beyond, int) or not isinstance(kv, int):
        return None
    if not isinstance(batch, int) or not batch or not isinstance(layers, int) or not layers:
        return None
    if not isinstance(per_row, int | float) or not per_row or not isinstance(context, int) or context < 2:
        return None
    beams = d.get("beams")
    if (isinstance(beams, int) and beams > 1) or (isinstance(reached, int) and reached < context):
        return None
    tokens = context - 1  # the last token is never fed
    kv8 = round(per_row * batch * tokens) + _SCALE_BYTES * layers
    layer = per_row * batch / layers  # K and V elements of a position of a layer, every row
    held, copies = fp8_update_bytes(layer, layer / 2, tokens)
    compute_bits = d.get("compute_bits")
    compute_bytes = compute_bits // 8 if isinstance(compute_bits, int) else 2
    mask = mask_beyond_window(
        run.attn_implementation, batch, tokens, run.window_keys, compute_bytes, run.padded
    )
    weights = moment - beyond
    in_update = weights + (kv - own_kv) + run.beside_bytes + kv8 + held + copies + mask
    if d.get("step_phase") == "prefill":  # the moment's tokens, the prompt's, at 8 bits
        at_moment = moment - own_kv + round(own_kv * 8 / kv_bits) + _SCALE_BYTES * layers
    else:  # a step's end holding the whole context's KV
        at_moment = moment - own_kv + kv8
    return max(in_update, at_moment), tokens, kv8, copies, moment
