"""What `kvtrace diagnose` finds, as frozen data: the moment, the stacks live there and the remedies
priced there. Pure, torch-free.

The types live apart from the code that fills them (analyzers.planning.diagnose and the modules it calls:
diagnose_moment, diagnose_stacks, diagnose_remedies, diagnose_cache_remedies, diagnose_window_remedies) so
that each of those, and the renderers (analyzers.render), can name them without importing the others. A
Remedy's two None conventions sit beside it: `fits` (no shortfall to compare with) and the sentences of a
figure the input cannot give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from analyzers.budget import BudgetCrossing

__all__ = [
    "CONTEXT_COUNTED",
    "KV_REMEDIES",
    "NO_GEOMETRY",
    "NO_KV",
    "NO_KV_HELD",
    "NO_KV_IN_RUN",
    "Diagnosis",
    "Remedy",
    "StackShare",
    "fits",
    "no_geometry",
]


@dataclass(frozen=True)
class StackShare:
    """Live bytes at the moment that were allocated from one stack (innermost frame first), without the
    frames torch's memory_viz leaves out (analyzers.stack_frames). `heading`: the frames it is known by
    (its Python frames where it has any), one per line."""

    stack: str
    bytes: int
    allocations: int
    heading: str = ""


@dataclass(frozen=True)
class Remedy:
    """One change, priced on this run. `saved_bytes` None: the input lacks what the figure needs
    (`sentence` says what); below 0: the change raises the memory by that much (a static cache's
    preallocated KV at a prefill peak); `fits` None: there is no shortfall to compare with (no OOM, no
    budget)."""

    kind: str
    setting: int | None
    saved_bytes: int | None
    fits: bool | None
    sentence: str


@dataclass(frozen=True)
class Diagnosis:
    """The moment (OOM or peak) and what each remedy buys there."""

    path: str
    source_kind: str
    device: str | None
    event: str  # "oom" | "budget" (a run that would have run out on a device of `budget_bytes`) | "peak"
    ts_us: float | None
    requested_bytes: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    free_bytes: int | None  # device memory outside the allocator's reservation
    capacity_bytes: int | None
    reserved_unallocated_bytes: int | None
    largest_free_block_bytes: int | None
    fragmented: bool | None  # enough free bytes in total, but no block or segment large enough
    shortfall_bytes: int | None
    budget_bytes: int | None
    kv_bytes: int | None
    kv_share: float | None
    kv_peak_bytes: int | None
    kv_final_bytes: int | None
    batch: int | None  # cache rows: under beam search, prompts x beams
    tokens_held: int | None
    step: int | None
    step_phase: str | None
    top_layers: tuple[tuple[int, int], ...]  # (layer, KV bytes) live at that moment, largest first
    top_stacks: tuple[StackShare, ...]
    remedies: tuple[Remedy, ...]
    message: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    budget_crossing: BudgetCrossing | None = None
    beams: int | None = None
    """Beams per prompt when beam search made the rows (`batch` / `beams` prompts); None otherwise or when
    the log does not say (a run recorded before kvtrace logged it)."""
    kv_layers_live: int = 0
    """How many layers held KV at that moment: `top_layers` names the largest 8 of them."""
    top_cache_layers: tuple[tuple[int, int, int], ...] = ()
    """(cache, layer, KV bytes) at that moment, largest first, when several caches held KV then (an
    assistant model's draft cache next to the model's): `top_layers` sums a layer index over them."""
    segment_bytes: int | None = None
    """At an OOM whose CUDA message names only the segment the caching allocator tried to reserve (no
    snapshot): that segment (`OomInfo.segment_bytes`); `requested_bytes` is then None and the shortfall is
    the segment's."""
    peak_leaves_out: str | None = None
    """What the run's memory figures are known to leave out (the weights, when the weights.jsonl its manifest
    lists is missing): `allocated_bytes` is then a lower bound, so no verdict against a budget holds (no
    shortfall, no remedy that fits), and a crossing of it comes at that step or earlier."""
    unfinished: str | None = None
    """"died": the run's manifest still says running and no process records it (killed: perhaps by the
    kernel's OOM killer, for host memory, which leaves no record); "terminated": so, but its manifest says
    the process got SIGTERM (killed while it wrote the run's end); "recording": it is being recorded. No
    OOM recorded then does not mean none happened."""
    held_step: int | None = None
    """The step whose end `batch` and `tokens_held` are, where it is not `step`: the moment falls in a last
    step cut between its layers' updates (a run that never ended, whose report ends at its last whole
    step), which has no end; they are then the last whole step's. None otherwise (they are `step`'s, or
    the moment's where `step_cut`)."""
    step_cut: bool = False
    """The moment's step never ended: killed part-way (`held_step` above), or its forward raised (an OOM, a
    Ctrl-C), when `batch` and `tokens_held` are what its layers held at the moment, as the KV diagnosed."""
    before_first_step: str | None = None
    """The exception's type when the recorded block raised (or was interrupted) before its first step, no
    KV logged: the moment is what the run held then (its weights), not an inference's peak. None otherwise."""
    limit_bytes: int | None = None
    """At an OOM under a per-process cap (torch.cuda.set_per_process_memory_fraction): the figure PyTorch's
    message says is allowed ("24.96 GiB allowed"), to its two decimals, so approximate. None without one."""
    free_within_limit_bytes: int | None = None
    """`limit_bytes` less `reserved_bytes`, at least 0: what the allocator could still reserve under the cap
    (the device's `free_bytes` is not, there). The fragmentation verdict and the shortfall use it (the
    smaller of the two where both are known)."""
    fragmentation_possible: bool | None = None
    """Whether the figures leave fragmentation as this OOM's cause: `fragmented` where that is known; where
    no largest free block is (no snapshot), True when the reserved-but-unallocated bytes and what could still
    be reserved reach the request (it may have, not sure), False when they fall short of it. None where
    nothing can be told."""
    held_from_message: bool = False
    """`allocated_bytes` and `reserved_bytes` (and so `reserved_unallocated_bytes`) are PyTorch's OOM
    message's, for want of a snapshot: to two decimals each, so approximate."""
    private_pool_bytes: int | None = None
    """Where `held_from_message`: the bytes PyTorch's message says are "allocated in private pools (e.g.,
    CUDA Graphs)" (0 where it names none): blocks cached free for captured graphs, which only those graphs
    can use. The message counts them in its allocated figure, and so `allocated_bytes` does, not
    `reserved_unallocated_bytes` (they could not serve the request, nor does expandable_segments recover
    them). With a snapshot's segments at the moment: the free blocks of those a private pool owns
    (`segment_pool_id` not (0, 0)), counted the same way, and none of them `largest_free_block_bytes`;
    None where there are none."""
    row_activation_bytes: int | None = None
    """Bytes of the allocations beside the KV live at the moment whose size is batch-first (the rows times a
    model width: logits, attention's copies, ids and masks; analyzers.planning.diagnose_rows), which a
    smaller batch frees in proportion: the batch remedy's figure, and `kvtrace plan --from-run`'s for a
    smaller batch. None where the moment has no rows or the input no allocator events."""
    kv_figures: bool = True
    """Whether the input gives any KV figure: a KV log (a run recorded with kvtrace) or KV attributed by
    stack. False for a bare trace or snapshot that marks none (the report's `kv.measured_from` "none"),
    whose KV remedies (`KV_REMEDIES`) all go unpriced: the text says so in one line, the JSON keeps them."""

    @property
    def reservable_bytes(self) -> int | None:
        """What the allocator could still reserve at the moment: the device's free memory, no more than a
        per-process cap leaves (`free_within_limit_bytes`)."""
        return reservable(self.free_bytes, self.free_within_limit_bytes)


def reservable(free: int | None, free_within_limit: int | None) -> int | None:
    """What the allocator could still reserve: the device's free memory, no more than a per-process cap
    leaves; whichever is known where only one is."""
    if free_within_limit is None:
        return free
    return free_within_limit if free is None else min(free, free_within_limit)


def fits(saved: int | None, shortfall: int | None) -> bool | None:
    """A Remedy's `fits`: whether the bytes it saves cover the shortfall; None when either is unknown."""
    if saved is None or shortfall is None:
        return None
    return saved >= shortfall


# The remedies priced on the KV cache, by kind, as the text names them where none can be priced (an input
# without KV figures: `Diagnosis.kv_figures`)
KV_REMEDIES = {
    "batch": "smaller batch",
    "context": "shorter context",
    "sliding_window": "sliding window",
    "static_cache": "static cache",
    "quantized_kv": "quantized KV",
    "offloading": "offloading",
}
# How a context remedy counts its tokens: as `kvtrace plan --context` takes them, so the figure plans as typed
CONTEXT_COUNTED = "prompt + new tokens, as `kvtrace plan --context` counts them; the cache holds one fewer"
# A Remedy's sentence when the input lacks the figure (its `saved_bytes` None)
NO_KV = "cannot be computed: this input has no KV cache figures (record the run with kvtrace.record)"
NO_GEOMETRY = "cannot be computed: this input has no KV geometry (batch, tokens held; record with kvtrace)"
NO_KV_HELD = "cannot be computed: no KV cache is held at this moment (the KV log shows none live)"
NO_KV_IN_RUN = "cannot be computed: no KV cache was held in this run (the KV log shows none)"
NO_GEOMETRY_HELD = "cannot be computed: the KV log does not say the batch and tokens held at this moment"


def no_geometry(d: dict[str, object]) -> str:
    """Why a remedy priced on the KV cache's geometry has no price, from the Diagnosis fields `d`: an input
    without a KV log (a bare trace or snapshot) has no geometry at all; a run recorded with kvtrace has one,
    but may hold no KV at the moment diagnosed (a peak before the first forward, say)."""
    if not d.get("kv_logged"):
        return NO_GEOMETRY
    return NO_KV_HELD if not d.get("kv_bytes") else NO_GEOMETRY_HELD
