"""The analyzers' one data model: allocator events as columns, whatever file they came from.

Every reader (run directory, Chrome trace, snapshot pickle) produces a `MemorySource`; attribution,
timelines, reports, diagnosis and plots consume it and nothing else. Columns are numpy arrays so that a
trace of ten million events costs a few hundred MB, not gigabytes of dicts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Category codes stored per event in `DeviceEvents.category`.
OTHER, WEIGHTS, KV = 0, 1, 2
CATEGORY_NAMES = ("other", "weights", "kv")
# torch.profiler's memory categories, by its `_CATEGORY_TO_INDEX` (torch/profiler/_memory_profiler.py);
# index 7 is torch's None, bytes it could not categorise.
TORCH_CATEGORY_NAMES = (
    "PARAMETER", "OPTIMIZER_STATE", "INPUT", "TEMPORARY", "ACTIVATION", "GRADIENT", "AUTOGRAD_DETAIL",
    "uncategorised",
)  # fmt: skip

# How an event's category was decided (`DeviceEvents.method`).
METHOD_NONE, METHOD_KV_LOG, METHOD_STACK_RULE, METHOD_WEIGHTS_TABLE, METHOD_PROFILER = 0, 1, 2, 3, 4
METHOD_NAMES = ("none", "kv_log", "stack_rule", "weights_table", "profiler_category")


@dataclass
class DeviceEvents:
    """All allocator events of one device, in time order.

    `delta_bytes` is signed: positive for an allocation, negative for a free. `total_allocated` and
    `total_reserved` are the allocator's own running figures where the source has them (else None).
    `frame_id` indexes `MemorySource.frames` (-1: no stack). `category`, `layer`, `kv_kind` and `method`
    are filled by attribution (layer -1 and kv_kind 0 when unknown; kv_kind 1 = K, 2 = V); `kv_cache`, the
    KV log's cache of the events joined to it (-1 elsewhere), only where a KV log was joined.
    `stated_category` is the category the file itself gives each event (torch.profiler's memory timeline
    knows its parameters), -1 where it gives none: attribution starts from it. A memory timeline also keeps
    torch's own, finer category (`torch_category`, torch's index into `TORCH_CATEGORY_NAMES`, -1 for an event
    it did not give, None for every other source), the bytes torch moved from one category to another without
    allocating (`torch_moves`) and those live before its first event by category (`torch_baseline`):
    analyzers.torch_categories reads them.
    """

    device: str
    ts_us: np.ndarray  # int64 or float64, Unix-epoch microseconds where the source allows
    addr: np.ndarray  # int64; -1 where the source has no address (old traces)
    delta_bytes: np.ndarray  # int64
    total_allocated: np.ndarray | None = None  # int64
    total_reserved: np.ndarray | None = None  # int64
    frame_id: np.ndarray | None = None  # int32
    category: np.ndarray | None = None  # int8
    layer: np.ndarray | None = None  # int16
    kv_kind: np.ndarray | None = None  # int8
    kv_cache: np.ndarray | None = None  # int64
    method: np.ndarray | None = None  # int8
    stated_category: np.ndarray | None = None  # int8
    torch_category: np.ndarray | None = None  # int8
    # int64 rows (position, bytes, from, to, same_instant): bytes that left torch category `from` for `to`
    # (a version bump) just before event `position`, after the events before it; same_instant 1 where at the
    # instant of event `position - 1`.
    torch_moves: np.ndarray | None = None
    torch_baseline: dict[int, int] | None = None
    capacity_bytes: int | None = None
    baseline_bytes: int = 0  # bytes already allocated before the first event (snapshots)
    # Blocks live at a snapshot's dump that no trace event explains: (address, bytes, frame_id). Their
    # stacks let attribution split the baseline by category; `baseline_categories` holds the result.
    baseline_blocks: list[tuple[int, int, int]] | None = None
    baseline_categories: dict[int, int] | None = None
    # The unit of `delta_bytes`: "requested" (what the program asked for: snapshot trace entries) or
    # "allocator" (what the allocator reported: Kineto events, rounded block sizes on CUDA).
    size_basis: str = "allocator"
    final_rounded_bytes: int | None = None  # allocator block sizes live at a snapshot's dump
    # A snapshot's private pools' (CUDA graphs') reserved-but-unallocated bytes after each event, and at its
    # dump (analyzers.readers.snapshot_pools); None where no segment is a private pool's
    private_pool_free: np.ndarray | None = None  # int64
    private_pool_free_at_dump: int | None = None

    def __len__(self) -> int:
        return int(self.ts_us.shape[0])

    @property
    def alloc_events(self) -> int:
        return int(np.count_nonzero(self.delta_bytes > 0))

    @property
    def free_events(self) -> int:
        return int(np.count_nonzero(self.delta_bytes < 0))

    def events_at(self, addresses: Iterable[int]) -> dict[int, list[int]]:
        """The indices of the events at each of `addresses` that has any, in order."""
        wanted = np.fromiter(set(addresses), dtype=np.int64)
        at: dict[int, list[int]] = {}
        if not len(wanted) or not len(self):
            return at
        for index in np.flatnonzero(np.isin(self.addr, wanted)).tolist():
            at.setdefault(int(self.addr[index]), []).append(index)
        return at


UNKNOWN_DEVICE = "unknown"
"""The device of an input that does not name one (torch's `export_memory_timeline` files): a guess such as
"cuda:0" would read as a fact in the report and the export tables, and a CPU timeline is as likely."""


def normal_device(name: str) -> str:
    """A device as the readers name it: a bare "cuda" (a line without an index) is cuda:0."""
    return "cuda:0" if name == "cuda" else name


@dataclass(frozen=True)
class Marker:
    """A point or span on the timeline: a step boundary, an eviction, an OOM."""

    kind: str  # "step" | "eviction" | "oom" | "snapshot"
    ts_us: float
    label: str
    device: str | None = None
    end_us: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


# The CUDA caching allocator's segment sizes (c10/cuda/CUDACachingAllocator.cpp, `get_allocation_size`): a
# request of up to SMALL_REQUEST_BYTES (`kSmallSize`) gets a segment of SMALL_SEGMENT_BYTES (`kSmallBuffer`).
SMALL_REQUEST_BYTES = 1 << 20
SMALL_SEGMENT_BYTES = 2 << 20


@dataclass(frozen=True)
class OomInfo:
    """What the allocator said when it failed: the request and the device's state at that moment.

    `segment_bytes`: what PyTorch's CUDA message names ("Tried to allocate 20.00 MiB"), the segment the
    caching allocator tried to reserve for the request, not the request (`requested_bytes` is then None):
    `get_allocation_size(round_size(request))`, 2 MiB for a request of up to 1 MiB, 20 MiB for one of 1 to
    10 MiB, the request rounded up to 2 MiB beyond. `request_at_most` bounds the request from it."""

    device: str
    ts_us: float | None
    requested_bytes: int | None
    device_free_bytes: int | None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    message: str | None = None
    stream: int | None = None  # the CUDA stream of the request (snapshots): only its segments can serve it
    segment_bytes: int | None = None
    # The per-process cap in PyTorch's message ("24.96 GiB allowed;", set_per_process_memory_fraction), to
    # its two decimals: the allocator may reserve no more than this, whatever the device has free
    limit_bytes: int | None = None
    # `allocated_bytes` and `reserved_bytes` are PyTorch's message's ("X is allocated by PyTorch, and Y is
    # reserved by PyTorch but unallocated": reserved X + Y), to two decimals each, for want of a snapshot
    held_from_message: bool = False
    # Where `held_from_message`: the bytes the message says are "allocated in private pools (e.g., CUDA
    # Graphs)", 0 where it names none (torch 2.4 on names them whenever there are any). c10 sums the blocks
    # cached free in the graphs' pools and counts them in X, so they are in `allocated_bytes` (and
    # `reserved_bytes`), not in the reserved-but-unallocated Y: only their graphs can use them
    private_pool_bytes: int | None = None


def request_at_most(segment_bytes: int) -> int:
    """The largest request for which the CUDA caching allocator reserves a segment of `segment_bytes`."""
    return SMALL_REQUEST_BYTES if segment_bytes == SMALL_SEGMENT_BYTES else segment_bytes


@dataclass(frozen=True)
class Segment:
    """A reserved allocator segment at the snapshot's moment, for fragmentation figures."""

    device: str
    address: int
    total_size: int
    allocated_size: int
    largest_free_block: int
    segment_type: str = ""
    stream: int | None = None  # the caching allocator serves a stream's requests from its own segments only
    # Its free blocks' bytes where a private pool owns it (the snapshot's `segment_pool_id` is not (0, 0):
    # a CUDA graph's pool, a torch.cuda.MemPool), else 0. Only that pool's allocations can use them: c10's
    # OOM message counts them as allocated ("allocated in private pools (e.g., CUDA Graphs)"), not free
    private_pool_free: int = 0
    private_pool: bool = False


@dataclass
class MemorySource:
    """Everything a reader found in one input."""

    kind: str  # "run" | "chrome_trace" | "snapshot"
    path: str
    devices: list[DeviceEvents] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)  # interned stack texts, innermost frame first
    markers: list[Marker] = field(default_factory=list)
    ooms: list[OomInfo] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_log_only(self) -> bool:
        """The device events are the KV log's alone: no allocator events were recorded (profiler=False,
        profile_memory=False, or a trace without the model thread's memory events), so the peak and the
        memory by category count only the KV cache and the weights, never activations or logits."""
        return str(self.meta.get("events_from", "")).startswith("kv_log")

    @property
    def kv_log_cause(self) -> str | None:
        """Why the device events are the KV log's alone, in the reader's words (a clause: "it was recorded
        with profiler=False", "its profiler trace, listed in the manifest, is missing"), for a command that
        says so apart from the report's notes; None when they are not, or the reader gave no cause."""
        said = str(self.meta.get("events_from", ""))
        return said[len("kv_log (") : -1] if said.startswith("kv_log (") and said.endswith(")") else None
