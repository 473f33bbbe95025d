"""The remedies of rows that are beam search's beams: a smaller batch counted in prompts, fewer beams, and
the count of rows the memory is linear in that both price (`fewer_rows`, the batch's too). Pure, torch-free.
A cache's sliding-window remedies are analyzers.planning.diagnose_window_remedies', a quantized KV's
analyzers.planning.diagnose_quantized_remedies'.

analyzers.planning.diagnose_remedies prices the usual remedies and calls these when the run's rows are
beams.
"""

from __future__ import annotations

import math

from analyzers.planning.diagnosis import Remedy, fits
from analyzers.units import human_bytes

__all__ = ["at_batch_one", "beam_search_remedies", "fewer_rows"]


def beam_search_remedies(
    kv: int, prompts: int, beams: int, need: int | None, beyond_weights: int | None = None
) -> list[Remedy]:
    """A smaller batch counted in prompts (each holding `beams` rows), and fewer beams: KV is linear in
    both, and so, roughly, are the activations (`fewer_rows`)."""
    each = f"{beams} beams each"
    batch_target, batch_saved, batch_basis, _ = fewer_rows(kv, prompts, need, beyond_weights)
    beams_target, beams_saved, beams_basis, _ = fewer_rows(kv, beams, need, beyond_weights)
    per_prompt, per_beam = human_bytes(kv / prompts), human_bytes(kv / beams)
    if need is None:
        batch_text = (
            f"Each prompt dropped from the batch of {prompts} ({each}) frees {per_prompt} of KV."
            if prompts > 1
            else at_batch_one(each)
        )
        beams_text = f"Each beam dropped (num_beams={beams}, batch {prompts}) frees {per_beam} of KV."
    elif need <= 0:
        room = "the KV alone would leave room up to"
        batch_text = f"Batch {prompts} ({each}) already fits; {room} batch {batch_target}."
        beams_text = f"num_beams={beams} already fits; {room} {beams_target} beams."
    else:
        batch_text = _fewer_text(
            f"Batch {batch_target} instead of {prompts} ({each})",
            f"batch 1 ({each})",
            batch_target,
            batch_basis,
            batch_saved,
            per_prompt,
            need,
        )
        beams_text = _fewer_text(
            f"num_beams={beams_target} instead of {beams} (batch {prompts})",
            f"num_beams=1 (greedy search, batch {prompts})",
            beams_target,
            beams_basis,
            beams_saved,
            per_beam,
            need,
        )
    return [
        Remedy("batch", batch_target or None, batch_saved, fits(batch_saved, need), batch_text),
        Remedy("beams", beams_target or None, beams_saved, fits(beams_saved, need), beams_text),
    ]


def at_batch_one(each: str = "") -> str:
    """The batch remedy's sentence for a run at batch 1 (in prompts, of `each` beams under beam search):
    there is no sequence to drop, which the remedy's figures say too (no setting, nothing saved)."""
    said = f" ({each})" if each else ""
    return f"The run is at batch 1 already{said}: a smaller batch is no remedy."


def _fewer_text(change: str, one: str, target: int, basis: str, saved: int, per_one: str, need: int) -> str:
    """A beam-search count's sentence: `change` proposes `target`, `one` names a count of 1."""
    if basis == "kv" and target >= 1:
        return f"{change} frees {human_bytes(saved)} of KV, enough to fit."
    if basis == "kv":  # even 1 keeps `per_one` of KV, and what its activations would free is unknown
        return (
            f"By its KV alone, even {one} is not enough: it still holds {per_one} of KV; the activations "
            "shrink too, which this input cannot price (it has no weights figure, or no allocations beside "
            "the KV)."
        )
    if basis == "estimate":
        return (
            f"{change} likely fits: with the activations, which shrink too, the memory beyond the weights "
            f"falls by about {human_bytes(saved)}, more than the {human_bytes(need)} shortfall (an estimate: "
            "a part of that memory does not follow the rows)."
        )
    return (
        f"Even {one} does not fit: were all the memory beyond the weights to shrink with it, it would free "
        f"{human_bytes(saved)}, less than the {human_bytes(need)} shortfall."
    )


def fewer_rows(
    kv: int, count: int, need: int | None, beyond_weights: int | None, activations: int = 0
) -> tuple[int, int, str, int]:
    """(the setting to propose, bytes it frees, what those bytes are, KV bytes it frees) for a count the
    memory is linear in (batch, beams).

    The KV first, with the `activations` of the moment known to follow the rows (analyzers.planning.
    diagnose_rows: logits, attention's copies), which a smaller count frees in proportion too ("rows"; "kv"
    without them, see `_fewer`). When they cannot cover the shortfall even at 1, the moment's
    whole memory beyond the weights (`beyond_weights`: KV, activations, logits) prices it, since the
    activations shrink with the rows too: a row's share of it is an upper bound of what a row holds (some of
    it does not follow the rows: buffers, workspaces), so the count it finds is an estimate ("estimate"),
    and when even 1 is too many by it, no count fits ("bound", what going down to 1 would free at most).
    Without that figure (no weights recorded), or with one no larger than the KV (a run recorded without
    allocator events sees only the KV beyond the weights), the KV's answer stands."""
    if need is None or need <= 0:
        target, saved = _fewer(kv, count, need)
        return target, saved, "kv", saved
    rows = kv + max(activations, 0)
    target, saved = _fewer(rows, count, need)
    kv_saved = round(kv / count * (count - max(target, 1)))
    if target >= 1:
        return target, saved, "rows" if rows > kv else "kv", kv_saved
    if not beyond_weights or beyond_weights <= rows:
        return target, kv_saved, "kv", kv_saved
    whole_target = max(math.floor(count * (beyond_weights - need) / beyond_weights), 0)
    whole_saved = round(beyond_weights / count * (count - max(whole_target, 1)))
    return whole_target, whole_saved, "estimate" if whole_target >= 1 else "bound", kv_saved


def _fewer(kv: int, count: int, need: int | None) -> tuple[int, int]:
    """(the setting to propose, KV bytes it frees) for a count that KV is linear in (batch, beams): one
    fewer without a shortfall; else the largest count whose KV leaves room for it (0: even 1 is too many),
    freeing what going down to it, or to 1, saves (nothing when the run already fits)."""
    share = kv / count
    if need is None:
        return count - 1, round(share) if count > 1 else 0
    target = max(math.floor(count * (kv - need) / kv), 0)
    return target, 0 if need <= 0 else round(share * (count - max(target, 1)))
