"""The remedies whose price is a sliding window's: for a cache whose every layer slides (a shorter prompt, a
smaller window: `windowed_remedies`), a hybrid cache's token of context (its sliding layers may hold the
prompt at the moment: `moment_bytes_per_token`), and the sliding window proposed to a cache that keeps every
token on some layers, priced as the all-sliding cache it would become with `kvtrace plan`'s arithmetic
(analyzers.planning.dynamic_kv), so that its figures are `plan --from-run RUN --cache sliding --window N`'s.
Pure, torch-free.

analyzers.planning.diagnose_remedies prices the usual remedies and calls these for a run's context and
window; beam search's rows are analyzers.planning.diagnose_cache_remedies'.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from analyzers.planning.diagnose_quantized_remedies import model_dtype_text, quantized_widening
from analyzers.planning.diagnosis import Remedy, fits
from analyzers.planning.dynamic_kv import dynamic_cache_kv
from analyzers.units import human_bytes
from kvtrace.llama import MIN_WINDOW

if TYPE_CHECKING:
    from analyzers.planning.diagnose_static_remedy import StaticCacheRun

__all__ = [
    "kind_widths",
    "layer_widths",
    "moment_bytes_per_token",
    "sliding_cache_bytes",
    "sliding_window_remedy",
    "window_remedy",
    "windowed_remedies",
]


# The smallest window a sliding DynamicCache slides at: transformers keeps `states[..., -window + 1:, :]`, so
# a window of 1 keeps every token (`demo` and `plan --cache sliding` refuse it)
SMALLEST_WINDOW = MIN_WINDOW


def windowed_remedies(
    kv: int, tokens: int, per_token: float, need: int | None, num_layers: int | None
) -> list[Remedy]:
    """Shorter context and smaller window for a cache whose every layer slides (Mistral's default
    DynamicCache). Such a layer keeps its last `tokens` in a storage one token longer, and makes its new K
    and V before freeing the old ones; but at prefill its storage is the whole prompt, which it lets go of
    only at its first decode step. KV at the moment above the window's own (every layer's window plus one
    layer's new one) is that prompt: a shorter prompt frees it token by token, a smaller window does not."""
    layers = num_layers or 1
    # the window's own at a decode step: each layer's storage of tokens + 1, one layer's new one beside
    window = tokens + 1
    above = max(kv - sliding_cache_bytes([per_token / layers] * layers, window, window, 2)[2], 0)
    out: list[Remedy] = []
    if above >= per_token:  # at least a token of prompt beyond the window
        holds = (
            "every sliding layer holds the whole prompt until its first decode step "
            f"({human_bytes(above)} of the {human_bytes(kv)} of KV at this moment is beyond the window)"
        )
        cut = math.ceil(need / per_token) if need is not None and need > 0 else None
        if cut is not None and cut * per_token <= above:
            saved = round(cut * per_token)
            text = f"A prompt {cut:,} tokens shorter frees {human_bytes(saved)} of KV: {holds}."
        else:
            saved = above
            short = f", less than the {human_bytes(need)} shortfall" if need is not None and need > 0 else ""
            text = f"A prompt no longer than the window frees {human_bytes(saved)} of KV{short}: {holds}."
        out.append(Remedy("context", None, saved, fits(saved, need), text))
        out.append(
            Remedy(
                "sliding_window",
                None,
                0,
                fits(0, need),
                "A smaller window does not shrink the prompt that every sliding layer holds until its first "
                f"decode step ({human_bytes(above)} of the KV at this moment): a shorter prompt does.",
            )
        )
        return out
    out.append(
        Remedy(
            "context",
            None,
            0,
            fits(0, need),
            f"The cache already keeps a sliding window ({tokens:,} tokens held) at this moment: a shorter "
            "context does not shrink it.",
        )
    )
    cut = math.ceil(need / per_token) if need is not None and need > 0 else max(tokens // 4, 1)
    window = tokens - cut
    if window >= 1:
        saved = round(per_token * cut)
        text = (
            f"A window of {window:,} tokens instead of {tokens:,} frees {human_bytes(saved)} of KV "
            f"({human_bytes(per_token)} per token across the batch)."
        )
    elif need is not None and need > 0:
        saved = round(per_token * (tokens - 1))
        text = (
            f"No smaller window fits: a window of 1 token frees {human_bytes(saved)} of KV, less than the "
            f"{human_bytes(need)} shortfall."
        )
    else:
        saved, text = 0, "The window holds 1 token: there is no smaller one."
    out.append(Remedy("sliding_window", window if window >= 1 else None, saved, fits(saved, need), text))
    return out


def kind_widths(d: dict[str, object], batch: int) -> tuple[float, float] | None:
    """(a sliding layer's, a full layer's) KV bytes of a token across the batch: each kind's own width
    (`kind_token_bytes`: Gemma 4's full layers are wider), else the layers' average for both (a run whose
    report has no kinds); None without either."""
    kinds, layer_token = d.get("kind_token_bytes"), d.get("layer_token_bytes")
    if isinstance(kinds, tuple) and len(kinds) == 2:
        return kinds[0] * batch, kinds[1] * batch
    if isinstance(layer_token, float):
        return layer_token * batch, layer_token * batch
    return None


def layer_widths(d: dict[str, object], batch: int, layers: int) -> list[float] | None:
    """Each KV layer's bytes of a token across the batch, in layer order: a sliding layer's width for the
    layers that slide (`sliding_layer_ids`), a full layer's for the others."""
    widths = kind_widths(d, batch)
    if widths is None:
        return None
    ids = d.get("sliding_layer_ids")
    sliding = set(ids) if isinstance(ids, tuple) else set()
    return [widths[0] if layer in sliding else widths[1] for layer in range(layers)]


def moment_bytes_per_token(d: dict[str, object], batch: int) -> tuple[float, int] | None:
    """(KV bytes a token of context costs across the batch, sliding layers that count) at the moment of a
    hybrid cache whose sliding layers hold more than their window then: the prompt at prefill, which a
    shorter one shrinks too. A sliding layer holding its window (or it and its new copy, mid-step) does not
    follow the context. Each kind is priced at its own width (Gemma 4's sliding layers are narrower than
    its full ones). None when no sliding layer does, or the figures are missing."""
    sliding, layers = d.get("sliding_layer_ids"), d.get("kv_layers")
    if d.get("windowed") or not isinstance(sliding, tuple) or not sliding:
        return None
    widths = kind_widths(d, batch)
    if widths is None or not isinstance(layers, int) or not layers:
        return None
    slide_one, full_one = widths
    held, window = d.get("layer_bytes"), d.get("window")
    if isinstance(held, dict) and held and isinstance(window, int) and window:
        at_window = (window, 2 * window)  # in tokens: its window, or it and its new copy mid-step
        following = [
            layer for layer in sliding if held.get(layer) and round(held[layer] / slide_one) not in at_window
        ]
    elif d.get("step_phase") == "prefill":  # no bytes by layer: at prefill every layer holds the prompt
        following = list(sliding)
    else:
        return None
    if not following:
        return None
    return full_one * (layers - len(sliding)) + slide_one * len(following), len(following)


def sliding_cache_bytes(
    layer_tokens: list[float], window: int, prompt: int, new: int, beams: bool = False
) -> tuple[int, int, int]:
    """(KV bytes at the last step's end, at the prefill, at its peak) of a DynamicCache whose layers all
    slide at `window`, `layer_tokens` each layer's bytes of one token across the batch, in layer order, for a
    `prompt`-token prompt and `new` new tokens, under beam search where `beams` (its step's end holds each
    window before the reorder compacts it): `kvtrace plan`'s arithmetic (analyzers.planning.dynamic_kv),
    each layer's K and V half its bytes. A prompt longer than the window is
    held whole by every layer until its first decode step, when each in turn makes its new window, the
    layers before it holding theirs; a window longer than the prompt is not stored until generation
    passes it (before, it was priced as stored from the prefill on: 81,920 B above the plan and the
    recording, see dynamic_kv)."""
    layers = [(True, width / 2, width / 2) for width in layer_tokens]
    kv = dynamic_cache_kv(layers, window, prompt, max(new, 1), beams)
    return round(kv.step_end), round(kv.prefill), round(kv.peak)


def window_remedy(
    kv: int,
    layer_tokens: list[float],
    target: int,
    prompt: int,
    new: int,
    need: int | None,
    model_window: int | None = None,
    sliding: int = 0,
    cross: int = 0,
    others: int = 0,
    run: StaticCacheRun | None = None,
    beams: bool = False,
) -> Remedy:
    """A sliding window for a cache that keeps every token on some layers: every layer sliding at the
    window, priced as that cache's peak (`sliding_cache_bytes`, plan's arithmetic), not as this moment's KV
    less the tokens beyond it; `layer_tokens` are each layer's bytes of a token across the batch, in layer
    order, for the run's `prompt` and `new` tokens (under beam search where `beams`).
    Where the run tells what it held beside its KV at its prefill and its cache updates (`run`), each of
    the sliding cache's KV figures goes beside its own moment's, as `kvtrace plan --from-run RUN --cache
    sliding` prices them (`_sliding_run_peak`); else its KV peak beside this moment's (an upper bound).
    `target` is the window a shorter context would propose; a hybrid model's `sliding` layers
    already keep `model_window`, which a larger window would grow: it is proposed at most that, i.e. its
    full layers sliding at the model's own window. With a shortfall, the largest window whose peak fits.
    `cross`: the cross-attention KV at this moment (an encoder's output, Mllama's image), which no window
    shrinks: held besides the window's, at every figure; `others` likewise, the KV of the caches beside the
    model's (an assistant model's draft cache), which a window on the model's cache leaves as it is."""
    hybrid = bool(sliding and model_window)
    start = min(target, model_window) if hybrid and model_window else target
    window = max(start, SMALLEST_WINDOW)
    cross += others

    def freed(size: int) -> tuple[int, str]:
        """(bytes a window of `size` frees at this moment, the moment the sliding run peaks at)."""
        if run is None or run.prefill_beside_bytes is None:
            return kv - (sliding_cache_bytes(layer_tokens, size, prompt, new, beams)[2] + cross), ""
        peak_bytes, when = _sliding_run_peak(
            run, kv, sliding_cache_bytes(layer_tokens, size, prompt, new, beams), cross
        )
        return run.moment_bytes - peak_bytes, when

    if need is not None and need > 0:
        # The largest window whose peak leaves the room needed, else the smallest. A peak never shrinks as
        # the window grows (each of its terms is a window or the prompt times bytes), so it is found by
        # bisection, not by pricing every window below the context's (a 128k-token one priced 128k windows)
        lowest, highest = SMALLEST_WINDOW - 1, window  # the largest known to fit (below the smallest: none)
        while lowest < highest:
            middle = (lowest + highest + 1) // 2
            if freed(middle)[0] >= need:
                lowest = middle
            else:
                highest = middle - 1
        window = max(lowest, SMALLEST_WINDOW)
    held, _, peak = sliding_cache_bytes(layer_tokens, window, prompt, new, beams)
    held, peak = held + cross, peak + cross
    lowered, when = freed(window)
    saved = max(lowered, 0)
    size = f"{window:,} token{'s' if window > 1 else ''}"
    if hybrid and window == model_window:
        full = len(layer_tokens) - sliding
        change = (
            f"Making its {full:,} full-attention layer{'s' if full != 1 else ''} slide at the model's own "
            f"window of {window:,} tokens (a larger sliding_window would grow its {sliding:,} sliding "
            f"layer{'s' if sliding != 1 else ''})"
        )
    elif hybrid:
        theirs = "sliding layers'" if sliding != 1 else "sliding layer's"
        change = (
            f"A sliding window of {size} on every layer (its {sliding:,} {theirs} too, down from "
            f"{model_window:,})"
        )
    else:
        change = f"A sliding window of {size} on every layer"
    why = "each layer makes its new K and V before freeing the old ones"
    if prompt > window:
        why += f", and every layer holds the whole {prompt:,}-token prompt until its first decode step"
    if cross - others:
        why += f"; with the {human_bytes(cross - others)} of cross-attention KV, which no window shrinks"
    if others:
        why += (
            f"; with the {human_bytes(others)} of KV in other caches (an assistant model's draft cache, an "
            "earlier call's), which a window on the model's cache leaves as it is"
        )
    text = (
        f"{change} holds {human_bytes(held)} of KV at most once generation passes {size}, "
        f"{human_bytes(peak)} at its peak ({why})"
    )
    shorter = "; a shorter prompt is what lowers it" if prompt > window else ""
    if when and run is not None:
        ran = run.moment_bytes - lowered
        text += f": the run would peak at {human_bytes(ran)} ({when}), "
        text += (
            f"{human_bytes(saved)} lower than this moment, at the cost of forgetting older tokens"
            if saved
            else f"no lower than this moment's {human_bytes(run.moment_bytes)}{shorter}"
        )
        text += f", as `kvtrace plan --from-run RUN --cache sliding --window {window}` prices it."
    elif saved:
        text += (
            f": {human_bytes(saved)} less than the {human_bytes(kv)} at this moment, at the cost of "
            "forgetting older tokens."
        )
    else:
        text += f": no less than the {human_bytes(kv)} of KV at this moment{shorter}."
    if need is not None and need > 0 and saved < need:
        text = f"No sliding window fits, even of {size}: {text[0].lower()}{text[1:]}"
        if when.startswith("at its prefill"):
            text += " A shorter prompt is what lowers its prefill."
    return Remedy("sliding_window", window, saved, fits(saved, need), text)


def _sliding_run_peak(
    run: StaticCacheRun, kv: int, sizes: tuple[int, int, int], cross: int
) -> tuple[int, str]:
    """(the bytes a run on the all-sliding cache would peak at, the moment it is) with each KV figure beside
    its own moment's memory, as `kvtrace plan --from-run RUN --cache sliding` prices them
    (analyzers.planning.recorded_growth): the prompt's KV, held whole on every layer until the first decode
    step, beside what the run held at its prefill; the cache's KV peak (a layer's new window made beside
    the prompt the later layers still hold) beside what it held at its KV peak, a cache update (where the
    run's KV never passed its final, at this moment's); the window beside this moment's. Before, the KV
    peak went beside this moment's (a decode step's end, its logits): the demo's Llama at a 76 MiB budget
    was told no window fits, where a window of 10 records 74.74 MiB. `sizes`: the sliding cache's KV
    (`sliding_cache_bytes`); its prefill holds the prompt, not a window longer than it."""
    assert run.prefill_beside_bytes is not None
    held, prompt_kv, kv_peak = sizes
    at_moment = run.moment_bytes - kv  # what this moment holds beside its KV, its activations and weights
    at_update = run.update_beside_bytes if run.update_beside_bytes is not None else at_moment
    moments = (
        (
            run.prefill_beside_bytes + prompt_kv,
            "at its prefill: the prompt's KV beside what the run held there",
        ),
        (at_update + kv_peak, "inside a cache update: the KV peak beside what the run held at its own"),
        (at_moment + held, "at a step's end: the window's KV beside what this moment holds besides its KV"),
    )
    peak_bytes, when = max(moments, key=lambda moment: moment[0])
    return peak_bytes + cross, when


def sliding_window_remedy(
    d: dict[str, object],
    kv: int,
    tokens: int,
    context: int,
    need: int | None,
    num_layers: int | None,
    kv_bits: int | None,
    others: int = 0,
) -> Remedy:
    """The sliding window for a cache that keeps every token on some layers: every layer sliding at
    (about) the shorter context's length, at most a hybrid model's own window (`window_remedy`). A
    quantized cache's run is priced at the model's dtype: transformers' QuantizedCache takes no sliding
    layers, so a window means a cache that keeps full precision. `others`: the KV of the caches beside the
    model's (an assistant's draft cache), which a window on the model's cache leaves as it is."""
    layers, batch = d.get("kv_layers") or num_layers, d["batch"]
    widths = layer_widths(d, batch, layers) if isinstance(layers, int) and isinstance(batch, int) else None
    if widths is None:
        why = "cannot be priced: the KV geometry of a layer is not recorded"
        return Remedy("sliding_window", None, None, None, f"Sliding window: {why}.")
    # imported here: diagnose_static_remedy imports this module's `layer_widths`
    from analyzers.planning.diagnose_static_remedy import StaticCacheRun

    widen = quantized_widening(d, kv_bits)
    window, sliding, beams = d.get("window"), d.get("sliding_layer_ids"), d.get("beams")
    fixed = d.get("cross_kv_bytes")
    prompt, new = _run_tokens(d, tokens)
    remedy = window_remedy(
        kv,
        [width * (widen or 1) for width in widths],
        tokens if need is not None and need > 0 else max(context, 1),
        prompt,
        new,
        need,
        window if isinstance(window, int) else None,
        len(sliding) if isinstance(sliding, tuple) else 0,
        fixed if isinstance(fixed, int) else 0,
        others,
        run if isinstance(run := d.get("static_run"), StaticCacheRun) else None,
        bool(d.get("rows_are_beams")) and isinstance(beams, int) and beams > 1,  # as plan's run: reordered
    )
    if widen is None:
        return remedy
    note = f" QuantizedCache takes no sliding layers: the window's cache keeps KV at {model_dtype_text(d)}."
    return replace(remedy, sentence=remedy.sentence + note)


def _run_tokens(d: dict[str, object], tokens: int) -> tuple[int, int]:
    """(prompt, new tokens) of the call the moment is in: the prompt its cache held after the prefill
    (`prompt_tokens`: an assisted generation's first forward holds a draft token more than the call's
    prompt), else the call's; new tokens up to the call's context, as `kvtrace plan --from-run` plans it,
    else up to the `tokens` held (0 tokens of prompt where neither is told)."""
    held, prompt, context = d.get("prompt_tokens"), d.get("run_prompt"), d.get("run_context")
    first = held if isinstance(held, int) and held > 0 else prompt if isinstance(prompt, int) else 0
    if isinstance(context, int) and context > first:
        return first, context - first
    return first, max(tokens - first, 0) + 1
