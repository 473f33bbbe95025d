"""Remedies at an OOM that fragmentation caused: what "fits" can promise there. Pure, torch-free.

At such an OOM the bytes were there (reserved but unallocated, plus what the allocator could still
reserve) but no free block held the request. A remedy that frees bytes (a smaller batch, a shorter
context, a window, fp8...) covers the shortfall on paper, yet the run it makes allocates other sizes, and
nothing says the allocator will reuse its fragments any better: a real run at the batch that covered the
shortfall ran out again, with more stranded (sample_traces/h200: batch 266 ran out with 1.30 GiB reserved
but unallocated, the batch 261 its shortfall called enough with 1.53 GiB, the dynamic cache's torch.cat
leaving each layer's previous block one token short of the next). So "fits" means here: frees the
shortfall plus every byte stranded at the failure, enough even if the allocator reuses none of them; the
setting that covers the shortfall alone is still given, as the one the fragments decide. The allocator's
expandable segments, the remedy aimed at the cause, goes first among those that fit.

Without a snapshot there is no largest free block, only PyTorch's message's reserved-but-unallocated
figure: where it and what could still be reserved reach the request, fragmentation may have caused the OOM
(`fragmentation_possible`), not surely. The remedies are priced past those bytes all the same, since a user
who follows PyTorch's own hint ("If reserved but unallocated memory is large try ... expandable_segments")
wants a "fits" that holds whether or not they were stranded; the sentences call them reserved but
unallocated rather than stranded, and say that a snapshot would tell.

analyzers.planning.diagnose_remedies prices every remedy twice, against each need, and this module merges
the two: the sure price where it fits, else the tight one, marked not enough.

Blocks cached free in CUDA graphs' private pools are no such bytes: only their graphs can use them. PyTorch's
message (torch 2.4 on) names them apart and counts them as allocated, and so does the diagnosis
(`private_pools_note`); a snapshot tells them apart by its segments' `segment_pool_id`, and the diagnosis
counts them so there too, none of them the largest free block.

The expandable-segments remedy itself (`allocator_remedies`) is priced here too, at the bytes reserved but
unallocated that it could recover, whatever the cache.
"""

from __future__ import annotations

import re
from dataclasses import replace

from analyzers.planning.diagnosis import Remedy, fits
from analyzers.units import human_bytes

__all__ = [
    "FRAGMENTS_REMEDY",
    "allocator_remedies",
    "priced_past_fragments",
    "private_pools_note",
    "stranded_bytes",
]

FRAGMENTS_REMEDY = "expandable_segments"  # the allocator setting that lets segments grow in place
_ENOUGH = "enough to fit"
# A knob a sentence names its setting by (a model's own buffers, beam search), rather than the kind's word
_KNOB = re.compile(r"\b(max_[a-z_]+|num_beams)=")
_SETTING_WORDS = {
    "batch": "Batch {:,}",
    "beams": "num_beams={:,}",
    "context": "A context of {:,} tokens",
    "prompt": "A prompt of {:,} tokens",
    "prefill_chunk": "prefill_chunk_size={:,}",
    "sliding_window": "A window of {:,} tokens",
}


def private_pools_note(private_pools: int, allocated: int, from_snapshot: bool = False) -> str:
    """The note on an OOM with bytes cached free in private pools, as PyTorch's message names them or, with
    a snapshot, as its segments' `segment_pool_id` tells them apart: where they are counted, why they do not
    count as free, and what releases them (the pool keeps its blocks until the graphs captured into it are
    destroyed)."""
    pools = human_bytes(private_pools)
    graphs = 'CUDA graphs: torch.compile\'s mode="reduce-overhead", torch.cuda.graph'
    if from_snapshot:
        counted = (
            f"the snapshot's segments owned by private pools (segment_pool_id other than (0, 0); {graphs}) "
            f"hold {pools} in free blocks, counted as allocated here as PyTorch's OOM message counts them"
        )
        without = f"Without them, allocated is {human_bytes(allocated - private_pools)} (the live blocks)"
    else:
        counted = (
            f"PyTorch's message counts {pools} cached free in private pools ({graphs}) as allocated, and so "
            "does this diagnosis"
        )
        without = (
            f"torch.cuda.memory_allocated() leaves them out: about {human_bytes(allocated - private_pools)}"
        )
    recovers = "expandable_segments does not recover them either"
    if from_snapshot:
        recovers += ", nor is any of them the largest free block"
    return (
        f"{counted}: only their own graphs can use those blocks, so they could not serve the request and are "
        f"not among the reserved but unallocated bytes ({recovers}); they are released only with the graphs "
        "that own them (fewer captured graphs, e.g. fewer distinct input shapes, or compiling without CUDA "
        f"graphs). {without}"
    )


def stranded_bytes(d: dict[str, object]) -> int:
    """The bytes reserved but unallocated at an OOM that fragmentation caused, or may have caused (no
    largest free block to tell: `fragmentation_possible`) (the Diagnosis fields `d`), which a remedy that
    frees bytes must free on top of the shortfall to be sure; 0 where fragmentation did not cause it, or
    there is no shortfall to cover."""
    need, stranded = d.get("shortfall_bytes"), d.get("reserved_unallocated_bytes")
    caused = d.get("fragmented") is True or d.get("fragmentation_possible") is True
    if not caused or not isinstance(need, int) or not isinstance(stranded, int):
        return 0
    return stranded if need > 0 and stranded > 0 else 0


def priced_past_fragments(
    safe: list[Remedy], tight: list[Remedy], need: int, stranded: int, sure: bool = True
) -> list[Remedy]:
    """Merge the remedies priced against `need` + `stranded` (`safe`) and against `need` alone (`tight`),
    the same remedies in the same order (priced from the same moment: only their figures differ). `sure`:
    fragmentation caused the OOM (False: it may have; no largest free block tells)."""
    if [r.kind for r in safe] != [r.kind for r in tight]:  # not expected; then the sure prices alone
        return [_merged(remedy, None, need, stranded, sure) for remedy in safe]
    return [_merged(s, t, need, stranded, sure) for s, t in zip(safe, tight, strict=True)]


def _merged(safe: Remedy, tight: Remedy | None, need: int, stranded: int, caused: bool) -> Remedy:
    frag = human_bytes(stranded)
    # Bytes a snapshot shows stranded; without one, only that they were reserved but unallocated
    held = "stranded in fragments" if caused else "reserved but unallocated"
    if safe.kind == FRAGMENTS_REMEDY:  # it recovers the stranded bytes themselves: priced on the shortfall
        aimed = tight or safe
        cause = (
            f"this OOM's cause: fragmentation (no free block held the request, though {frag} was reserved "
            "but unallocated)"
            if caused
            else f"what may have caused this OOM: fragmentation ({frag} was reserved but unallocated, enough "
            "for the request with what could still be reserved; without a snapshot, recorded with "
            "snapshots=True, no largest free block says whether one held it)"
        )
        return replace(
            aimed,
            sentence=aimed.sentence + f" It is aimed at {cause}; what it recovers depends on the allocator.",
        )
    if safe.saved_bytes is None:
        return safe
    if safe.fits:
        sure = f"enough even if none of the {frag} {held} is reused"
        whole = human_bytes(need + stranded)
        unused = f"the {whole} needed if none of the {frag} {held} is reused"
        sentence = safe.sentence.replace(f"the {whole} shortfall", unused)
        sentence = sentence.replace(_ENOUGH, sure) if _ENOUGH in sentence else f"{sentence} That is {sure}."
        if tight is not None and tight.fits and tight.setting is not None and tight.setting != safe.setting:
            sentence += (
                f" {_setting_named(tight, safe.sentence)} covers only the {human_bytes(need)} shortfall, if "
                f"the allocator finds a block among those {'fragments' if caused else 'bytes'}."
            )
        return replace(safe, sentence=sentence)
    if tight is None or not tight.fits:
        return tight or safe
    return replace(
        tight,
        fits=False,
        sentence=tight.sentence.replace(_ENOUGH, "enough for the shortfall")
        + f" It fits only if the allocator finds a block among the {frag} {held}: with none "
        f"of them reused it needs {human_bytes(need + stranded)}.",
    )


def _setting_named(remedy: Remedy, sentence: str) -> str:
    """A remedy's setting as its sentence names it: `max_batch_size=3` (a model's own buffers), `Batch 3`."""
    assert remedy.setting is not None
    knob = _KNOB.search(sentence)
    if knob:
        return f"{knob.group(1)}={remedy.setting:,}"
    return _SETTING_WORDS.get(remedy.kind, "A setting of {:,}").format(remedy.setting)


def allocator_remedies(d: dict[str, object], need: int | None, on_cuda: bool) -> list[Remedy]:
    """The CUDA caching allocator's expandable segments, whatever the cache."""
    out: list[Remedy] = []
    frag = d["reserved_unallocated_bytes"]
    if not on_cuda:
        pass  # a setting of the CUDA caching allocator
    elif isinstance(frag, int) and d.get("reserved_before_trace"):
        why = (
            f"cannot be priced: the peak is the level before the trace's first event, and the "
            f"{human_bytes(frag)} reserved but not allocated then is what the allocator had cached earlier, "
            "not fragmentation at a peak"
        )
        out.append(Remedy("expandable_segments", None, None, None, f"expandable_segments: {why}."))
    elif isinstance(frag, int):
        out.append(
            Remedy(
                "expandable_segments",
                None,
                frag,
                fits(frag, need),
                f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lets segments grow in place, recovering "
                f"up to the {human_bytes(frag)} reserved but not allocated.",
            )
        )
    else:
        why = "cannot be computed: this input has no reserved-memory figures"
        out.append(Remedy("expandable_segments", None, None, None, f"expandable_segments: {why}."))
    return out
