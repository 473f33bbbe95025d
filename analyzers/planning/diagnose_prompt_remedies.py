"""What a shorter generation, a shorter prompt or a prefill in chunks buys at a diagnosis's moment, priced
with the run's own figures (analyzers.planning.diagnose_remedies ranks them with the others). Pure,
torch-free.

A context is named as `kvtrace plan --from-run --context` takes it, prompt + new tokens, against the run's
own context as plan counts it (what its call reached, or the length it asked for where it was cut short:
run_defaults' `call_context`), and never below the prompt and one new token: the prompt is the user's
input, which no generate() setting shortens. Before, a shorter context was the tokens held at the moment
less a quarter (no budget) or less the shortfall's tokens, which at a prefill peak advised a context
shorter than the prompt (a 12-token prompt and 20 new tokens peaking at its prefill: "A context of 10
tokens instead of 13", where plan said 32 and refused 10).

* At a decode moment, a shorter context frees the KV of the tokens the moment no longer holds, a token's
  KV across the batch each; without a budget, the shortest context (the prompt and one new token) is
  priced, what the new tokens held then.
* At a prefill moment, fewer new tokens free nothing: the moment comes before any new token. What follows
  the prompt there is its KV and the prefill's activations that grow with it (hidden states, the MLP's
  intermediates, attention), measured from the run's prefill steps (run_moments' `PrefillSplit.moments`) and
  shrunk as `kvtrace plan --from-run --prompt` shrinks them (recorded_terms' `shorter_prefill`): a shorter
  prompt frees both, and the sentence says it is the user's choice. transformers' chunked prefill
  (`generate(..., prefill_chunk_size=N)`) keeps the prompt and runs it N tokens a forward: its activations
  follow N, while its last chunk holds the whole prompt's KV (and a dynamic cache's growth copy of a
  layer's), the mask a chunk after the first takes (N x prompt: sdpa's bool mask and its copy in the compute
  dtype, eager's mask and scores) and, where the model has fewer KV heads than query heads, K and V
  expanded to them over the prompt (sdpa takes `enable_gqa` only without a mask): all added to the
  prefill's most, an upper bound (they are not all live at once).
* Without a budget the prompt and the chunk size are priced where the prefill stops being the run's peak,
  the most the run held outside that prefill step (its decode steps, as recorded: an upper bound for a
  shorter prompt's), below which neither buys more; with one, the longest prompt and the largest power of
  two that leave room for the shortfall, the rest of the run included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from analyzers.planning.diagnosis import CONTEXT_COUNTED, Remedy, fits
from analyzers.planning.plan_types import PrefillMoment
from analyzers.planning.recorded_terms import moments_grown, shorter_prefill
from analyzers.units import human_bytes

__all__ = ["PrefillPeak", "context_remedy", "prefill_remedies"]

_FLASH = (
    "flash_attention_2",
    "flash_attention_3",
    "kernels-community/flash-attn",
)  # varlen: no mask, no copies


@dataclass(frozen=True)
class PrefillPeak:
    """What a moment inside a whole prefill step holds that a shorter prompt or a chunked prefill changes,
    measured from the run (analyzers.planning.diagnose_prefill builds it)."""

    moments: tuple[PrefillMoment, ...]  # the run's prefill moments (run_moments' `PrefillSplit.moments`)
    held_bytes: int  # of their prompt bytes, those a prefill step still holds at its end
    rest_bytes: int  # the most the device held outside this prefill step (0: no event outside it)
    allocated_bytes: int  # at the moment
    attn_implementation: str | None  # the manifest's: eager, sdpa, flash_attention_2...
    expansion_bytes: int  # one layer's K and V expanded to the query heads, a token and row (0: no GQA)
    compute_bytes: int  # an element of the model's compute dtype
    pair_bytes: int  # eager's mask and one layer's scores, a row and (query, key) pair
    # the moment's own split as `moments`' (run_moments' `PrefillSplit.moment_at`), which a shorter prompt
    # shrinks; None: not told, the most of `moments` shrinks
    at: PrefillMoment | None = None


def context_remedy(
    d: dict[str, object], tokens: int, per_token: float, need: int | None, held_too: str
) -> Remedy:
    """The shorter context at the moment described by `d` (the Diagnosis fields), whose cache holds `tokens`
    a row, a token of it costing `per_token` across the batch (`held_too`: what that price counts, said in
    its parentheses)."""
    prompt = _prompt(d, tokens)
    context = _run_context(d, tokens)
    earlier = _earlier(tokens, context, d.get("run_reached"), d.get("run_live"))
    counted = f"({CONTEXT_COUNTED})"
    price = f"{human_bytes(per_token)} per token across the batch{held_too}"
    if d.get("step_phase") == "prefill" or (prompt is not None and tokens <= prompt):
        # a prefill holds its prompt (the tokens held, where the log does not say it otherwise)
        return Remedy("context", None, 0, fits(0, need), _at_prefill(prompt or tokens, context, counted, d))
    floor = prompt or 1  # tokens the cache holds at the shortest context
    room = tokens - floor  # tokens a shorter context takes off this moment
    if need is None:
        saved = round(per_token * room)
        if prompt is None:  # how short it can get, the log does not say
            text = (
                f"Each token of context fewer frees {price} at this moment, down to the prompt, which the "
                f"log does not tell; the {tokens:,} tokens held then are "
                f"{human_bytes(per_token * tokens)} of KV (a context of {context:,}, {counted})."
            )
            return Remedy("context", None, None, None, text)
        text = (
            f"A context of {floor + 1:,} tokens instead of {context:,} {counted}, the {prompt:,}-token "
            f"prompt and one new token, frees {human_bytes(saved)} of KV at this moment, its {room:,} new "
            f"tokens' ({price}); each token of context fewer frees one token's, down to that. The prompt's "
            f"{human_bytes(per_token * prompt)} stays."
        )
        return Remedy("context", floor + 1, saved, None, text + earlier)
    if need <= 0:
        more = math.floor(-need / per_token)
        text = (
            f"The run's context of {context:,} {counted} already fits; the KV alone would leave room for "
            f"{context + more:,} ({price})."
        )
        return Remedy("context", context, 0, fits(0, need), text)
    cut = math.ceil(need / per_token)
    if cut <= room:
        shorter = tokens + 1 - cut
        saved = round(per_token * cut)
        text = (
            f"A context of {shorter:,} tokens instead of {context:,} {counted} frees {human_bytes(saved)} of "
            f"KV ({price})."
        )
        return Remedy(
            "context",
            shorter,
            saved,
            fits(saved, need),
            text + earlier,
        )
    saved = round(per_token * room)
    if prompt is None:
        every = human_bytes(per_token * tokens)
        text = f"No shorter context fits: all {tokens:,} tokens of KV are only {every} ({price})."
        return Remedy("context", None, saved, False, text)
    text = (
        f"No shorter context fits: even {floor + 1:,} tokens (the {prompt:,}-token prompt and one new token) "
        f"instead of {context:,} {counted} frees only {human_bytes(saved)} of KV ({price}); the prompt's "
        f"{human_bytes(per_token * prompt)} stays."
    )
    return Remedy("context", None, saved, False, text + earlier)


def prefill_remedies(
    d: dict[str, object], per_token: float, need: int | None, held_too: str = ""
) -> list[Remedy]:
    """At a prefill moment, a shorter prompt and a chunked prefill: priced from the activations the run's
    prefill moments tell apart where they do (`d["prefill_peak"]`), else a shorter prompt by its KV alone,
    a lower bound (a prefill its OOM cut short, a run without allocator events); none at another moment, nor
    where the prefill ran in chunks (`d["prefill_chunk"]`: the context's sentence says so)."""
    tokens = d.get("tokens_held")
    if d.get("step_phase") != "prefill" or not isinstance(tokens, int) or per_token <= 0:
        return []
    prompt = _prompt(d, tokens) or tokens
    peak = d.get("prefill_peak")
    if prompt < 2 or isinstance(d.get("prefill_chunk"), int):
        return []
    if not isinstance(peak, PrefillPeak):
        return [_kv_prompt_remedy(prompt, per_token, need, held_too)]
    at_moment, reached = _moment_token(d, tokens, per_token)
    return [
        _prompt_remedy(d, peak, prompt, at_moment, need, reached),
        _chunk_remedy(d, peak, prompt, per_token, need),
    ]


def _moment_token(d: dict[str, object], tokens: int, per_token: float) -> tuple[float, str]:
    """(the KV a prompt token costs at this moment across the batch, what that counts): `per_token`, every
    KV layer's, unless the moment is inside a whole prefill step that had not reached its last KV layers
    yet (a hybrid whose last masked sliding layer peaks before its last, full layer writes: Gemma 2, GPT-OSS),
    where a shorter prompt frees the KV of the layers holding it then, `tokens` each. Before, it priced a
    token at every layer's: 4 KiB where the 3 layers reached held 3 KiB, the saving 5 KiB over the
    recording of the shorter prompt. Not for a step an OOM cut (its remedies price the whole step) nor
    beside a draft or cross-attention cache (the moment's bytes by layer count theirs too)."""
    held, layers = d.get("layer_bytes"), d.get("kv_layers")
    if d.get("step_cut") or d.get("other_cache_kv_bytes") or d.get("cross_kv_bytes"):
        return per_token, ""
    if not isinstance(held, dict) or not isinstance(layers, int) or tokens <= 0:
        return per_token, ""
    live = [nbytes for nbytes in held.values() if isinstance(nbytes, int) and nbytes > 0]
    if not live or len(live) >= layers or sum(live) / tokens >= per_token:
        return per_token, ""
    return sum(live) / tokens, f" (the {len(live):,} of {layers:,} KV layers the step had reached)"


def _kv_prompt_remedy(prompt: int, per_token: float, need: int | None, held_too: str) -> Remedy:
    """A shorter prompt priced by its KV alone, where the run does not tell the prefill's activations apart:
    those that follow the prompt shrink too, so its figure is a lower bound."""
    price = f"{human_bytes(per_token)} per token across the batch{held_too}"
    unmeasured = (
        "the prefill's activations that follow the prompt shrink too, which the run does not measure here (a "
        "lower bound)"
    )
    yours = (
        "The prompt is your input, not a generate() setting: this means truncating it or sending it in parts."
    )
    if need is None or need <= 0:
        text = f"A shorter prompt frees its KV at this prefill, {price}; {unmeasured}. {yours}"
        return Remedy("prompt", None, None, None, text)
    cut = math.ceil(need / per_token)
    if cut < prompt:
        saved = round(per_token * cut)
        text = (
            f"A prompt of {_tokens(prompt - cut)} instead of {prompt:,} frees {human_bytes(saved)} of KV at "
            f"this prefill ({price}); {unmeasured}. {yours}"
        )
        return Remedy("prompt", prompt - cut, saved, fits(saved, need), text)
    saved = round(per_token * (prompt - 1))
    text = (
        f"No shorter prompt's KV alone covers the shortfall: even 1 token instead of {prompt:,} frees "
        f"{human_bytes(saved)} of KV ({price}); {unmeasured}. {yours}"
    )
    return Remedy("prompt", None, saved, None, text)


def _prompt_remedy(
    d: dict[str, object],
    peak: PrefillPeak,
    prompt: int,
    per_token: float,
    need: int | None,
    reached: str = "",
) -> Remedy:
    """A shorter prompt: its KV and the prefill's activations that follow it, as `plan --from-run --prompt`
    shrinks them (eager's mask and scores with the prompt squared), the rest of the run as it was."""
    squared = any(m[3] for m in peak.moments)

    def at(shorter: int) -> int:  # the prefill's peak at a prompt of `shorter` tokens
        freed = shorter_prefill(peak.moments, peak.held_bytes, 1.0, shorter / prompt, squared, peak.at)
        return peak.allocated_bytes - round(per_token * (prompt - shorter)) - freed

    acts = moments_grown(peak.moments, 1.0, 1.0, squared)

    def cost_to(shorter: int) -> str:
        """What each token cut, from the prompt down to `shorter`, frees on average: the prefill's moments
        do not all grow with the prompt alike, so the average over the cut priced, not over the prompt."""
        token = (peak.allocated_bytes - at(shorter)) / (prompt - shorter)
        return (
            f"each prompt token cut frees {human_bytes(token)} there, {human_bytes(per_token)} of KV across "
            f"the batch{reached} and {human_bytes(token - per_token)} of the prefill's activations that "
            f"follow the prompt (measured: of the {human_bytes(acts)} it held beside the weights and KV)"
        )

    found = _longest(at, prompt - 1, _target(peak, need))
    if found is None:
        cost = cost_to(1)
        least, saved = _at_least(at, peak)
        if need is not None and need > 0:
            text = (
                f"No shorter prompt fits: even 1 token instead of {prompt:,} leaves {human_bytes(least)}"
                f"{_rest_said(peak, need)}; {cost}."
            )
            return Remedy("prompt", None, saved, False, text)
        text = (
            f"A shorter prompt: {cost}; even 1 token keeps this prefill the run's peak, at "
            f"{human_bytes(least)}."
        )
        return Remedy("prompt", None, saved, fits(saved, need), text)
    saved = peak.allocated_bytes - max(at(found), peak.rest_bytes)
    cost = cost_to(found)
    new = _new_tokens(d, prompt)
    planned = (
        f" (`kvtrace plan --from-run RUN --prompt {found} --context {found + new}` plans it)" if new else ""
    )
    # what this prefill frees, and what the run's peak falls by: less where the prefill falls below the rest
    # of the run (the peak is then that). Before, the sentence said the second "at this prefill", beside a
    # price a token that times the tokens cut is the first (64.49 KiB beside 5 x 15.23 KiB)
    freed = peak.allocated_bytes - at(found)
    if freed > saved:
        frees = (
            f"frees {human_bytes(freed)} at this prefill and lowers the run's peak by {human_bytes(saved)}, "
            f"to the {human_bytes(peak.rest_bytes)} it holds outside this prefill"
        )
    else:
        frees = f"frees {human_bytes(saved)} at this prefill{_where(peak, need)}"
    text = (
        f"A prompt of {_tokens(found)} instead of {prompt:,} {frees}: {cost}. The prompt is your input, not "
        f"a generate() setting: this means truncating it or sending it in parts{planned}."
    )
    return Remedy("prompt", found, saved, fits(saved, need), text)


def _at_least(at: Callable[[int], int], peak: PrefillPeak) -> tuple[int, int]:
    """(the prefill's peak at its least, 1 token a prompt or a chunk, never below what the run held beside
    it; what that saves): the branch where no shorter setting fits."""
    least = max(at(1), peak.rest_bytes)
    return least, max(peak.allocated_bytes - least, 0)


def _chunk_remedy(
    d: dict[str, object], peak: PrefillPeak, prompt: int, per_token: float, need: int | None
) -> Remedy:
    """transformers' chunked prefill: the prompt run `chunk` tokens a forward (`generate(...,
    prefill_chunk_size=chunk)`), priced as the module's docstring says, an upper bound."""
    rows, layers = d.get("batch"), d.get("kv_layers")
    if not isinstance(rows, int) or not rows or not isinstance(layers, int) or not layers:
        return Remedy("prefill_chunk", None, None, None, "Chunked prefill: the KV geometry is not recorded.")
    if d.get("sliding_layers") or d.get("model_sliding_layers"):
        why = "its sliding layers would hold a window beside each chunk, which this run does not measure"
        return Remedy("prefill_chunk", None, None, None, f"Chunked prefill: not priced: {why}.")
    told = any(m[3] for m in peak.moments)  # eager's mask and scores, told apart at the run's prefill
    kv = d.get("kv_bytes")
    prompt_kv = round(per_token * prompt)
    gap = max(prompt_kv - kv, 0) if isinstance(kv, int) else 0  # the moment's step not past every layer
    layer_copy = math.ceil(prompt_kv / layers)  # a dynamic cache's growth copy of a layer, at the last chunk
    attention = peak.attn_implementation
    flash = attention in _FLASH
    expanded = 0 if flash else rows * prompt * peak.expansion_bytes
    # a chunk's mask a row and (query, key) pair: sdpa's bool and its copy in the compute dtype; eager's mask
    # and scores, in its moments where told (grown there with the chunk), else priced here, as for a run
    # that does not say its attention
    pair = 0 if flash or told else (1 + peak.compute_bytes if attention == "sdpa" else peak.pair_bytes)

    # The last chunk holds about the prompt's whole KV in every layer (`gap`), so it peaks at the most of all
    # the moments at the chunk's length, this one's among them: not at this moment's own (a shorter prompt's
    # figure, whose earlier layers hold less KV), nor this moment less the most's shrink (another's)
    own = peak.moments if peak.at is None else (peak.at,)
    every = (*peak.moments, *own)

    def at(chunk: int) -> int:
        shrunk = 0  # one chunk of the whole prompt: the run's prefill
        if chunk < prompt:
            kept = moments_grown(every, 1.0, chunk / prompt, False, peak.held_bytes)
            shrunk = moments_grown(own, 1.0, 1.0) - kept
        return peak.allocated_bytes - shrunk + gap + layer_copy + expanded + rows * chunk * prompt * pair

    base, whole = at(0), moments_grown(peak.moments, 1.0, 1.0, told)
    held = (
        f"the prompt's {human_bytes(prompt_kv)} of KV, which the last chunk holds, and a layer's growth copy"
    )
    if expanded:
        held += f", K and V expanded to the query heads over the prompt ({human_bytes(expanded)})"
    if not flash:
        held += ", the mask a later chunk takes over chunk x prompt"
    how = (
        f"what follows the prompt of the {human_bytes(whole)} the prefill held beside its weights and KV "
        f"follows the chunk instead, about {human_bytes((at(prompt) - base) / prompt)} a chunk token, beside "
        f"{held} ({human_bytes(base)} in all with the weights, an upper bound)"
    )
    found = _longest(at, prompt - 1, _target(peak, need))
    if found is None:
        least, saved = _at_least(at, peak)
        if need is not None and need > 0:
            text = (
                f"No chunked prefill fits: even generate(..., prefill_chunk_size=1) peaks at "
                f"{human_bytes(least)}{_rest_said(peak, need)}: {how}."
            )
            return Remedy("prefill_chunk", None, saved, False, text)
        text = (
            f"A chunked prefill (generate(..., prefill_chunk_size=N)) keeps the {prompt:,}-token prompt: "
            f"{how}; even at N=1 this prefill stays the run's peak, at {human_bytes(least)}."
        )
        return Remedy("prefill_chunk", None, saved, fits(saved, need), text)
    chunk = 1 << (found.bit_length() - 1)  # a power of two: prefill_chunk_size's usual values
    new_peak = max(at(chunk), peak.rest_bytes)
    saved = max(peak.allocated_bytes - new_peak, 0)
    text = (
        f"A chunked prefill, generate(..., prefill_chunk_size={chunk:,}), keeps the {prompt:,}-token prompt "
        f"and peaks at {human_bytes(new_peak)} at most, {human_bytes(saved)} less{_where(peak, need)}: {how}."
    )
    return Remedy("prefill_chunk", chunk, saved, fits(saved, need), text)


def _longest(at: Callable[[int], int], most: int, target: int | None) -> int | None:
    """The largest n in 1..`most` whose `at(n)` (growing with n) is at most `target`; None: not even 1."""
    if target is None or most < 1 or at(1) > target:
        return None
    low, high = 1, most
    while low < high:
        middle = (low + high + 1) // 2
        if at(middle) <= target:
            low = middle
        else:
            high = middle - 1
    return low


def _target(peak: PrefillPeak, need: int | None) -> int | None:
    """The most the prefill may hold: the moment less the shortfall, where the rest of the run is within it
    (None: it is not, no prefill remedy fits); without a shortfall (no budget, or one the run fits), the rest
    of the run, below which the prefill is no longer its peak."""
    if need is None or need <= 0:
        return peak.rest_bytes
    target = peak.allocated_bytes - need
    return target if peak.rest_bytes <= target else None


def _where(peak: PrefillPeak, need: int | None) -> str:
    """Why that setting, without a shortfall: the prefill stops being the run's peak there."""
    if need is not None and need > 0:
        return ""
    return f", where this prefill stops being the run's peak ({human_bytes(peak.rest_bytes)} outside it)"


def _rest_said(peak: PrefillPeak, need: int | None) -> str:
    """Where the rest of the run is what stays over the budget, that said."""
    if need is None or need <= 0 or peak.rest_bytes <= peak.allocated_bytes - need:
        return ""
    return f" (the run's other steps reach {human_bytes(peak.rest_bytes)} as recorded, over the budget too)"


def _at_prefill(prompt: int, context: int, counted: str, d: dict[str, object]) -> str:
    """A shorter context's sentence at a prefill moment: it frees nothing there."""
    rows = d.get("batch")
    across = f" x {rows:,} rows" if isinstance(rows, int) and rows > 1 else ""
    chunk = d.get("prefill_chunk")
    if isinstance(chunk, int):
        what = f"a shorter prompt or smaller chunks (this prefill ran {chunk:,} tokens at a time)"
    elif isinstance(d.get("prefill_peak"), PrefillPeak):
        what = "a shorter prompt or a chunked prefill ([prompt], [prefill_chunk])"
    else:
        what = "a shorter prompt or a chunked prefill (generate(..., prefill_chunk_size=N))"
    return (
        f"Fewer new tokens free nothing here: this moment is the prefill of the {prompt:,}-token prompt"
        f"{across}, before the first new token, so any context from {prompt + 1:,} (the prompt and one new "
        f"token) to the run's {context:,} {counted} peaks here too; what lowers it is {what}."
    )


def _tokens(count: int) -> str:
    """ "1 token", "983 tokens"."""
    return f"{count:,} token{'s' if count != 1 else ''}"


def _earlier(tokens: int, context: int, reached: object = None, live: object = False) -> str:
    """Where the moment held fewer tokens than the run's last step, that said: the context frees what the
    moment held beyond it. A run cut short (`reached`, as plan counts a context, below `context`) is named
    against the length its call asked for, as plan plans it: said so, not a last step it never ran."""
    if isinstance(reached, int) and reached < context:
        held = f" This moment held {tokens:,} tokens a row; the" if tokens + 1 < reached else " The"
        got = (
            f"run, still being recorded, has reached {reached - 1:,} tokens a row so far, of the "
            if live
            else f"run stopped at {reached - 1:,} tokens a row, short of the "
        )
        return (
            f"{held} {got}{context - 1:,} its call asked for, which the context is named against (as "
            "`kvtrace plan --from-run` plans it)."
        )
    if tokens + 1 >= context:
        return ""
    return f" This moment held {tokens:,} tokens a row, before the run's last step held {context - 1:,}."


def _prompt(d: dict[str, object], tokens: int) -> int | None:
    """The prompt of the moment's call, where the moment holds it: plan's (its prefill sample says it), else
    the tokens the log's last prefill up to the moment left (an assistant model's forwards may count)."""
    for said in (d.get("run_prompt"), d.get("prompt_tokens")):
        if isinstance(said, int) and 0 < said <= tokens:
            return said
    return None


def _run_context(d: dict[str, object], tokens: int) -> int:
    """The run's context as `plan --from-run` counts it, where the moment is in the call it plans; else the
    moment's tokens and the one generate() never feeds back."""
    context = d.get("run_context")
    return context if isinstance(context, int) and context > tokens else tokens + 1


def _new_tokens(d: dict[str, object], prompt: int) -> int:
    """The run's new tokens (its context less its prompt), 0 where not told."""
    context = d.get("run_context")
    return context - prompt if isinstance(context, int) and context > prompt else 0
