"""A run's out-of-memory error: the failed request, and what was allocated, reserved and free then, from the
OOM snapshot the recorder dumped (CUDA) when there is one, else from PyTorch's message.

Why apart from `analyzers.readers.run_dir`: reading c10's message is its own grammar (sizes to two decimals,
the segment it tried to reserve, a per-process cap, private pools), followed as PyTorch's versions wrote it.
"""

from __future__ import annotations

import re
from typing import Any

from analyzers.model import SMALL_SEGMENT_BYTES, MemorySource, OomInfo
from kvtrace.errors import KvtraceError
from kvtrace.format import Run

_SIZE_UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE = r"(\d{1,15}(?:\.\d{1,6})?) (B|bytes|KiB|MiB|GiB|TiB)\b"  # c10's format_size: "2.00 MiB", "0 bytes"
_TRIED = re.compile(r"Tried to allocate " + _SIZE)
# The CUDA caching allocator's message (HIP's on ROCm): its figure is the segment it tried to reserve
_SEGMENT_MESSAGE = re.compile(r"\b(?:CUDA|HIP) out of memory\. Tried to allocate ")
# "... of which 6.00 MiB is free." (torch 2.1 on), "(GPU 0; 79.19 GiB total capacity; ...; 6.00 MiB free; ..."
_FREE = re.compile(r"of which " + _SIZE + r" is free|; " + _SIZE + r" free;")
# "... this process has 25.58 GiB memory in use. 24.96 GiB allowed; Of the allocated memory ...": the cap
# torch.cuda.set_per_process_memory_fraction set (c10's allowed_memory_maximum), which bounds what the
# caching allocator may reserve, however much the device has free
_ALLOWED = re.compile(_SIZE + r" allowed;")
# "Of the allocated memory 23.58 GiB is allocated by PyTorch, and 1.29 GiB is reserved by PyTorch but
# unallocated." (torch 2.1 on), and from torch 2.4 (pytorch/pytorch#124673), where a private pool holds free
# blocks, "... is allocated by PyTorch, with 1.27 GiB allocated in private pools (e.g., CUDA Graphs), and
# 21.91 MiB is reserved by PyTorch but unallocated." ("HIP Graphs" on ROCm). How c10 counts them
# (pytorch/pytorch c10/cuda/CUDACachingAllocator.cpp, DeviceCachingAllocator::malloc, its OOM branch): the
# pools' figure sums the sizes of the blocks in every graph pool's large_blocks and small_blocks sets, which
# hold unallocated cached blocks only ("unallocated cached blocks larger than 1 MB", the members' comments),
# so it is bytes cached *free* for the graphs' replays, not their live tensors (those are in the
# allocated_bytes stat already). The first figure is the allocated_bytes stat plus the pools' bytes, the last
# the reserved_bytes stat less both (the TORCH_CHECK_WITH(OutOfMemoryError, ...) that builds the message).
# Reserved is then still the two figures' sum, the pools' bytes counted in the allocated one as c10's message
# counts them: only their own graphs can use them (Note [Interaction with CUDA graph capture]: the pool keeps
# them until its graphs are destroyed), so, unlike the unallocated figure, they could not serve the request.
_HELD = re.compile(
    _SIZE
    + r" is allocated by PyTorch, (?:with "
    + _SIZE
    + r" allocated in private pools \(e\.g\., (?:CUDA|HIP) Graphs\), )?and "
    + _SIZE
    + r" is reserved by PyTorch but unallocated\."
)


def _size_of(number: str, unit: str) -> int:
    return int(float(number) * _SIZE_UNITS[unit])


def limit_of(message: str) -> int | None:
    """The per-process cap PyTorch's CUDA message names ("24.96 GiB allowed;"), to its two decimals; None
    where no cap was set (the message then has no such figure). `plan --from-run` plans such a run in it."""
    match = _ALLOWED.search(message)
    return _size_of(match.group(1), match.group(2)) if match else None


def _held_of(message: str) -> tuple[int, int, int] | None:
    """Allocated, reserved and private pools' bytes at the failure as PyTorch's CUDA message gives them ("X
    is allocated by PyTorch, [with P allocated in private pools (e.g., CUDA Graphs), ]and Y is reserved by
    PyTorch but unallocated": reserved X + Y, P within X; P 0 where the clause is absent, as c10 leaves it out
    when there are none), to two decimals each; None where the message has no such sentence."""
    match = _HELD.search(message)
    if not match:
        return None
    allocated = _size_of(match.group(1), match.group(2))
    pools = _size_of(match.group(3), match.group(4)) if match.group(3) else 0
    return allocated, allocated + _size_of(match.group(5), match.group(6)), pools


def oom_of_run(run: Run, ended: dict[str, Any], message: str, source: MemorySource) -> OomInfo:
    """The failed request: from the OOM snapshot the recorder dumped (CUDA) when there is one, else from
    PyTorch's message ("Tried to allocate 2.00 GiB"), whose two decimals make it approximate. The CUDA
    caching allocator's message names the segment it tried to reserve (`OomInfo.segment_bytes`), never
    less than 2 MiB (`kSmallBuffer`), and the device's free memory; a smaller figure, or another
    allocator's message, is taken as the request. The per-process cap ("X allowed") is only in the message
    (a snapshot does not record it): it is read from there in either case. Without a snapshot, allocated and
    reserved memory at the failure are the message's too (`OomInfo.held_from_message`); a snapshot's exact
    figures win where there is one."""
    device = run.manifest.get("device", {})
    name = f"cuda:{device.get('index', 0)}" if device.get("type") == "cuda" else "cpu"
    oom_pickle = run.path / "snapshots" / "oom.pickle"
    if oom_pickle.is_file():
        from analyzers.readers.snapshot import read_snapshot

        try:
            snapshot = read_snapshot(oom_pickle)
        except KvtraceError as exc:  # refused or damaged: the OOM keeps PyTorch's message, and says why
            source.meta.setdefault("input_notes", []).append(f"the OOM snapshot was not used: {exc}")
        else:
            source.segments.extend(snapshot.segments)
            if snapshot.ooms:
                found = snapshot.ooms[-1]
                return OomInfo(
                    name,
                    ended.get("t_ns", 0) / 1000.0,
                    found.requested_bytes,
                    found.device_free_bytes,
                    found.allocated_bytes,
                    found.reserved_bytes,
                    message,
                    limit_bytes=limit_of(message),
                )
    requested = segment = free = None
    match = _TRIED.search(message)
    if match:
        requested = _size_of(match.group(1), match.group(2))
        if _SEGMENT_MESSAGE.search(message) and requested >= SMALL_SEGMENT_BYTES:
            requested, segment = None, requested
    match = _FREE.search(message)
    if match:
        number, unit = (
            (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        )
        free = _size_of(number, unit)
    held = _held_of(message)
    return OomInfo(
        name,
        ended.get("t_ns", 0) / 1000.0,
        requested,
        free,
        held[0] if held else None,
        held[1] if held else None,
        message=message,
        segment_bytes=segment,
        limit_bytes=limit_of(message),
        held_from_message=held is not None,
        private_pool_bytes=held[2] if held else None,
    )
