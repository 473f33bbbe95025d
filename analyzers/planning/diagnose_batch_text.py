"""The smaller-batch remedy's sentences (analyzers.planning.diagnose_remedies), by what priced it: the KV
alone, the KV and the activations whose sizes are batch-first (analyzers.planning.diagnose_rows), or an
estimate from a row's share of the memory beyond the weights (`fewer_rows`). Pure, torch-free.

Kept apart from the pricing so that what a batch frees reads as arithmetic there, and what the reader is
told (how sure the figure is, what is counted as fixed, what to record to be sure) reads as one text here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from analyzers.planning.diagnose_cache_remedies import at_batch_one
from analyzers.units import human_bytes

if TYPE_CHECKING:
    from analyzers.planning.decode_step_end import DecodeStepEnd

__all__ = ["fixed_beyond", "smaller_batch_text", "step_end_text"]

# Why a smaller batch's activations cannot be priced: the weights or what lies beyond the KV are not seen
_UNPRICED = "it has no weights figure, or no allocations beside the KV"


def smaller_batch_text(
    target: int,
    batch: int,
    saved: int,
    basis: str,
    kv_saved: int,
    kv: int,
    need: int,
    beyond: int | None,
    vectors: int = 0,
) -> str:
    """The batch remedy's sentence when there is a shortfall, by what priced it (`fewer_rows`); `beyond`
    is the memory beyond the weights less the `vectors` over the vocabulary that no batch shrinks."""
    if batch == 1:
        return at_batch_one()
    if basis == "kv" and target >= 1:
        return f"Batch {target} instead of {batch} frees {human_bytes(saved)} of KV, enough to fit."
    if basis == "rows":
        return (
            f"Batch {target} instead of {batch} frees {human_bytes(saved)}, enough to fit: "
            f"{human_bytes(kv_saved)} of KV and {human_bytes(saved - kv_saved)} of the activations that "
            "shrink with the rows (the logits, attention's copies: the allocations at this moment that are "
            "the batch times a model width long)."
        )
    shortfall = f"the {human_bytes(need)} shortfall"
    if basis == "kv":  # what the activations would free is unknown: no verdict on the whole peak
        return (
            f"Batch 1 frees {human_bytes(kv_saved)} of the {human_bytes(kv)} of KV, less than {shortfall}; "
            f"the activations shrink with the batch too, which this input cannot price ({_UNPRICED}): record "
            "batch 1 to know whether it fits."
        )
    assert beyond is not None
    besides = (
        f", less {human_bytes(vectors)} of vectors over the vocabulary no batch shrinks"
        if vectors > 0
        else ""
    )
    whole = (
        f"the {human_bytes(beyond + vectors)} beyond the weights{besides} ({human_bytes(beyond / batch)} a "
        "row: KV, activations)"
    )
    if basis == "estimate":
        return (
            f"Batch {target} instead of {batch} likely fits: its KV frees only {human_bytes(kv_saved)}, but "
            f"the activations shrink with the batch too, and {whole} falls by about {human_bytes(saved)}, "
            f"more than {shortfall} (an estimate: a part of that memory does not follow the batch; record "
            f"batch {target} to be sure)."
        )
    return (
        f"Even batch 1 does not fit: were all of {whole} to shrink with the batch, batch 1 would free "
        f"{human_bytes(saved)}, less than {shortfall}."
    )


def fixed_beyond(beyond: int | None, kv: int, acts: int) -> str:
    """What a batch remedy priced by its rows ("rows", `fewer_rows`) counts as fixed: the memory beyond the
    weights that is neither KV nor an allocation of a batch-first size, a part of which may shrink too."""
    fixed = beyond - kv - acts if beyond is not None else 0
    if fixed <= 0:
        return ""
    return (
        f" The other {human_bytes(fixed)} beyond the weights is counted as fixed (the recording gives sizes, "
        "not shapes): a lower bound of what it frees."
    )


def step_end_text(
    end: DecodeStepEnd, limit: int, batch: int, first: int, rows: int, falls: int, saved: int
) -> str:
    """The batch remedy's sentence where a decode step's end, not the prefill the run peaked at, decides
    the batch (analyzers.planning.decode_step_end): `limit` is the most that fits, `first` the batch the
    prefill alone would take, freeing `saved`, `rows` the one whose step's end fits too (0: none), the peak
    falling by `falls` there."""
    why = (
        "the run peaked at its prefill, and fewer rows can make a decode step's end the peak: its logits "
        f"processors' vectors over the vocabulary do not shrink with the batch (the run's decode steps held "
        f"{human_bytes(end.beside_bytes)} beside their weights and KV, {human_bytes(end.row_bytes)} of it "
        "batch-first, freed in proportion, as `kvtrace plan --from-run RUN --batch N` prices it)"
    )
    if rows < 1 or rows < first:
        at = max(rows, 1) if rows < 1 else first
        held = end.held_at(at)
        lead = (
            "Even batch 1 does not fit"
            if rows < 1
            else f"Batch {rows} instead of {batch} frees {human_bytes(falls)}, enough to fit"
        )
        return (
            f"{lead}: this prefill alone would fit batch {first}, but {why}; at batch {at} a step's end "
            f"would hold {human_bytes(held)}, {human_bytes(held - limit)} more than fits."
        )
    return (
        f" At batch {rows} the peak is a decode step's end, {human_bytes(end.held_at(rows))}: it falls by "
        f"{human_bytes(falls)}, not {human_bytes(saved)}, still enough; {why}."
    )
