"""The pieces of a CUDA caching-allocator snapshot every reader step shares: its actions and block states,
its frames interned as stack texts, checked integers and byte counts (a damaged or made-up file is refused
with the field it got wrong), segment records, and the bounds a real dump keeps.
"""

from __future__ import annotations

from operator import itemgetter, methodcaller
from typing import Any

from analyzers.model import Segment
from analyzers.readers.memory_events_fast import MAX_EVENT_BYTES
from kvtrace.errors import KvtraceError, shown_float, shown_integer

FREE_ACTIONS = frozenset({"free_completed", "free"})
LIVE_STATES = frozenset({"active_allocated", "active_pending_free", "active_awaiting_free"})
SEGMENT_GROW = frozenset({"segment_alloc", "segment_map"})
SEGMENT_SHRINK = frozenset({"segment_free", "segment_unmap"})
KNOWN_KEYS = frozenset({"segments", "device_traces"})
_FRAME_KEYS = itemgetter("filename", "line", "name")
ACTION = methodcaller("get", "action")


class _FrameLines(dict[tuple[Any, Any, Any], str]):
    """Each distinct frame's "file:line:name", made once: distinct stacks share most of their frames (78
    stacks of a real snapshot hold 4,012 frames, 340 of them distinct). Frames that compare equal share a
    text (a line 1.0 reads as an earlier frame's 1), as equal stacks already share theirs."""

    def __missing__(self, frame: tuple[Any, Any, Any]) -> str:
        file, line, name = frame
        self[frame] = text = f"{file}:{line}:{name}"
        return text


class FrameTable:
    """Interns stacks: one string per distinct stack, shared by every event allocated from it."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._lines = _FrameLines()
        self._ids: dict[tuple[tuple[Any, Any, Any], ...], int] = {}
        # Whole frame lists are shared too (one per call site): one look-up then, not one per frame, so a
        # long list shared by many entries costs its length once.
        self._by_list: dict[int, int] = {}
        # Snapshots share each frame dict among the stacks that hold it (pickle memo): a stack seen before
        # is then a list of the same dicts. It is found among those of its outline (its length and five of
        # its dicts, by identity) and compared with them in C, where each element is the same object (a
        # pointer test, 52 frames in ~0.2 µs), not read. Valid while the loaded snapshot is alive (the read).
        self._by_outline: dict[tuple[int, ...], list[tuple[list[Any], int]]] = {}
        # The first frame dicts seen: a stack whose first dict is new has dicts of its own (torch 2.0), and
        # skips that look-up.
        self._first_frames: set[int] = set()
        # torch 2.0's blocks each hold their own frame dicts and strings (791 stacks of 13 distinct texts in
        # a 300 kB dump): a stack's key then hashes every string anew. One of each distinct stack per shape
        # (its length and three frames' lines) is kept, and a new list compared with those (`==` reads the
        # strings, hashes none): a third of the key's time on a freshly loaded dump.
        self._by_shape: dict[tuple[Any, ...], list[tuple[list[Any], int]]] = {}

    def intern(self, frames: Any) -> int:
        if not frames or not isinstance(frames, list):
            return -1
        known = self._by_list.get(id(frames))
        if known is not None:
            return known
        last = len(frames) - 1
        outline = seen = None
        if id(frames[0]) in self._first_frames:  # a first frame dict seen before: its dicts are shared
            outline = (
                last,
                id(frames[0]),
                id(frames[last >> 2]),
                id(frames[last >> 1]),
                id(frames[last - (last >> 2)]),
                id(frames[last]),
            )
            seen = self._by_outline.get(outline)
        else:
            self._first_frames.add(id(frames[0]))
        frame_id = None if seen is None else _equal_in(seen, frames)
        if frame_id is None:
            frame_id = self._by_content(frames, last)
            if outline is not None:
                self._by_outline.setdefault(outline, []).append((frames, frame_id))
        self._by_list[id(frames)] = frame_id
        return frame_id

    def _by_content(self, frames: list[Any], last: int) -> int:
        """The id of a stack whose dicts are new: one of its shape that is equal, else by its key."""
        try:
            shape = (last, frames[0]["line"], frames[last >> 1]["line"], frames[last]["line"])
            alike = self._by_shape.get(shape)
        except (KeyError, TypeError):  # frames that are not dicts with a line, or a line no key can hold
            return self._by_key(frames)
        frame_id = None if alike is None else _equal_in(alike, frames)
        if frame_id is None:
            frame_id = self._by_key(frames)
            if alike is None:
                self._by_shape[shape] = [(frames, frame_id)]
            else:
                alike.append((frames, frame_id))
        return frame_id

    def _by_key(self, frames: list[Any]) -> int:
        """The id of the stack whose frames read as these (file, line, name), its text made if new."""
        try:  # the usual frame: a dict with all three keys, read in C
            key = tuple(map(_FRAME_KEYS, frames))
        except (KeyError, TypeError):
            key = tuple((f.get("filename", "?"), f.get("line", 0), f.get("name", "?")) for f in frames)
        frame_id = self._ids.get(key)
        if frame_id is None:
            frame_id = len(self.texts)
            self._ids[key] = frame_id
            self.texts.append("\n".join(map(self._lines.__getitem__, key)))
        return frame_id


def _equal_in(stacks: list[tuple[list[Any], int]], frames: list[Any]) -> int | None:
    """The id of a kept stack equal to `frames` (equal frame dicts: the same key), if one is."""
    for stack, stack_id in stacks:
        if stack == frames:
            return stack_id
    return None


def _what(value: Any) -> str:
    """What a value that should be an int is, in the words of the JSON readers' errors."""
    if isinstance(value, float):
        return shown_float(value)
    kinds = {bool: "a boolean", str: "a string", type(None): "None"}
    return kinds.get(type(value), type(value).__name__)


def integer(value: Any, where: str, field: str) -> int:
    """A size, address or time as written: an int. torch writes nothing else; int() would read True as 1,
    "1048576" as 1 MiB and 1.5e9 as 1,500,000,000 (ValueError: the file is reported malformed)."""
    if type(value) is not int:
        raise ValueError(f"field {field!r} of {where} is {_what(value)}, expected an integer")
    return value


def checked_bytes(value: Any, where: str, field: str = "size") -> int:
    """A size field as an int. No allocator writes a negative size: only a damaged or crafted file has
    one, and it would make memory curves go below zero; nor one past any device, whose sums wrap the int64
    columns (ValueError: the file is reported malformed)."""
    if type(value) is int and 0 <= value <= MAX_EVENT_BYTES:  # every size of a real dump: no more calls
        return value
    size = integer(value, where, field)
    if size < 0:
        raise ValueError(f"negative size {shown_integer(size)} in {where}")
    if size > MAX_EVENT_BYTES:
        raise ValueError(f"size {shown_integer(size)} in {where}, more than any device holds")
    return size


def block_request_size(block: dict[str, Any]) -> int:
    """Bytes the program asked for: what trace entries carry, so baseline and deltas share a unit."""
    requested = block.get("requested_size")
    if requested is not None and (size := checked_bytes(requested, "a block", "requested_size")):
        return size
    history = block.get("history")
    real = history[0].get("real_size") if history and isinstance(history[0], dict) else None
    if real is not None and (size := checked_bytes(real, "a block's history", "real_size")):
        return size
    return checked_bytes(block.get("size", 0), "a block")


def blocks_with_addresses(segment: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(address, block) pairs; torch 2.0 blocks have no address, they tile the segment in order."""
    address = integer(segment.get("address", 0), "a segment", "address")
    pairs = []
    for block in segment.get("blocks", []):
        at, size = block.get("address", address), block.get("size", 0)
        if type(at) is not int:  # the checks' calls only where a value is odd: a dump has ~1,000 blocks
            at = integer(at, "a block", "address")
        if type(size) is not int or not 0 <= size <= MAX_EVENT_BYTES:
            size = checked_bytes(size, "a block")
        pairs.append((at, block))
        address = at + size
    return pairs


def segment_bytes(segment: dict[str, Any]) -> int:
    """A segment's reserved bytes: its `total_size`, or where a damaged file lacks it, the sum of its blocks'
    sizes, exact because the blocks of every segment torch dumps tile it (all 862 segments of the six real
    snapshots in shared/real_traces do). Reading it as 0 reported allocated bytes above reserved ones."""
    if "total_size" not in segment:
        return sum(checked_bytes(block.get("size", 0), "a block") for block in segment.get("blocks", []))
    return checked_bytes(segment["total_size"], "a segment", "total_size")


def lacking_fields(entry: dict[str, Any]) -> str | None:
    """Why an alloc or free trace entry cannot be replayed ("alloc entry without addr"); None when it can.
    Without its address an alloc's free never matches it (both stay counted), without its size it moves no
    bytes: such an entry is left out, and the report's note counts it. A free without its size but with its
    address is not: it frees the allocation live there (`LOST_SIZE_USED`, else `LOST_SIZE_UNKNOWN`)."""
    missing = [field for field in ("addr", "size") if field not in entry]
    if not missing:
        return None
    action = entry.get("action")
    reason = f"{action} entry without {' or '.join(missing)}"
    if action in FREE_ACTIONS and "addr" in missing:
        reason += ": the block it freed stays counted (the final may hold it)"
    return reason


# A free without size at an address an alloc in the trace holds frees that alloc's bytes: what torch writes
# in the free too (the 512 MiB block of mem_snapshot.pickle: 512 MiB in its alloc, free_requested and
# free_completed). Left out, it kept the block in the final (542.25 MiB for 30.25 MiB).
LOST_SIZE_USED = "{action} entry without size: its allocation's size used"
# One whose address no alloc in the trace holds freed a block allocated before the trace, of unknown size:
# left out, the levels before it lack that block (the final does not: the block is gone at the dump).
LOST_SIZE_UNKNOWN = (
    "{action} entry without size at an address no alloc in the trace holds: the levels before it lack the "
    "block it freed (the peak may be higher)"
)


def segment_record(
    device: str, segment: dict[str, Any], pairs: list[tuple[int, dict[str, Any]]] | None = None
) -> Segment:
    """The segment at the dump; `pairs`: its `blocks_with_addresses`, where the replay has walked them."""
    blocks = [block for _, block in (blocks_with_addresses(segment) if pairs is None else pairs)]
    allocated = segment.get("allocated_size")
    if allocated is None:
        allocated = sum(int(b.get("size", 0)) for b in blocks if b.get("state") in LIVE_STATES)
    free_sizes = [int(b.get("size", 0)) for b in blocks if b.get("state") == "inactive"]
    private = private_pool(segment.get("segment_pool_id"))
    return Segment(
        device=device,
        address=int(segment.get("address", 0)),
        total_size=segment_bytes(segment),
        allocated_size=checked_bytes(allocated, "a segment"),
        largest_free_block=max(free_sizes, default=0),
        segment_type=str(segment.get("segment_type", "")),
        stream=stream_of(segment.get("stream")),
        private_pool_free=sum(free_sizes) if private else 0,
        private_pool=private,
    )


def private_pool(pool_id: Any) -> bool:
    """Whether a segment's `segment_pool_id` names a private pool. c10 writes its `SegmentInfo`'s
    `owner_private_pool_id` there, a pair of ints that stays {0, 0} (the default pool) unless a private
    pool owns the segment (c10/core/CachingDeviceAllocator.h; a CUDA graph's capture id, or a MemPool's);
    torch 2.0's snapshots have no such key. Anything but a pair of ints is taken as the default pool."""
    if not isinstance(pool_id, tuple | list) or len(pool_id) != 2:
        return False
    # (0, 0) first, in C: every segment of a dump without CUDA graphs has it
    return any(pool_id) and all(isinstance(v, int) and not isinstance(v, bool) for v in pool_id)


def refuse_more_than_reserved(
    name: str, device: str, trace: list[dict[str, Any]], baseline: int, reserved_at_dump: int
) -> None:
    """Every block live when the trace began sat in a segment reserved then, and no moment of the trace
    reserved more than the dump's segments plus those the trace released (its segment_alloc entries only
    lower that). A level before the trace above that bound (49 frees of 1 TiB blocks never allocated, on
    2 MiB of segments, printed a 49 TiB peak) is no state the allocator was ever in: the file is refused."""
    if baseline <= reserved_at_dump:
        return  # the usual case, without a pass over the trace
    released = sum(e.get("size", 0) for e in trace if e.get("action") in SEGMENT_SHRINK)  # checked ints
    if baseline > reserved_at_dump + released:
        raise KvtraceError(
            f"{name}: not a real snapshot (damaged or made up): on {device} its trace begins with "
            f"{baseline:,} B allocated (blocks it frees or the dump holds that it never allocates), more "
            f"than its segments ever reserved ({reserved_at_dump:,} B at the dump, plus {released:,} B the "
            "trace released)"
        )


PLAIN_MAX_ENTRIES = 20_000
_INT64 = range(-(2**63), 2**63)
_EXACT_FLOAT = 2**53


def plain_trace_ok(trace: list[Any]) -> bool:
    """Whether `replay_device(plain=True)` gives this trace's figures as the columns would: every action
    hashable and every size, address and time a plain int in int64, no size negative or past any device,
    and the sizes' sum exact as a float. Anything else (damaged or crafted files) is read with numpy, which
    names the problem as it always has."""
    if not ONLY_DICT.issuperset(map(type, trace)):  # an entry that is no dict: the numpy path names it
        return False
    try:
        set(map(ACTION, trace))
    except TypeError:  # an unhashable action
        return False
    sizes = list(map(SIZE, trace))
    columns = [sizes, list(map(ADDR, trace))]
    if trace and all(map(HAS_TIME, trace)):
        columns.append(list(map(TIME, trace)))
    if not all(ONLY_INT.issuperset(map(type, column)) for column in columns):
        return False
    if any(column and (min(column) not in _INT64 or max(column) not in _INT64) for column in columns):
        return False
    if sizes and (min(sizes) < 0 or max(sizes) > MAX_EVENT_BYTES):
        return False
    return 2 * sum(sizes) < _EXACT_FLOAT  # a free's delta is its alloc's size: at most twice the sizes


SIZE = methodcaller("get", "size", 0)
HAS_TIME = methodcaller("__contains__", "time_us")
ADDR = methodcaller("get", "addr", -1)
TIME = itemgetter("time_us")
ONLY_INT = frozenset({int})
ONLY_DICT = frozenset({dict})


def unrequested_free(trace: list[Any]) -> int | None:
    """The index of the first ``free_completed`` entry with no ``free_requested`` of its address before it,
    or None. c10 records a free's request, then its completion (at once, or once the streams that used the
    block are done), so such an entry shows the ring buffer dropped the trace's older entries (or the
    history was turned on while that free waited on a stream): the run's start is not in the trace."""
    requested: set[int] = set()
    for index, entry in enumerate(trace):
        address = entry.get("addr") if isinstance(entry, dict) else None
        if type(address) is not int:  # damaged: the replay has said what it did with it
            continue
        action = entry.get("action")
        if action == "free_requested":
            requested.add(address)
        elif action == "free_completed":
            if address not in requested:
                return index
            requested.discard(address)
    return None


def stream_of(value: Any) -> int | None:
    """A stream handle as written (an int); anything else is unknown."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
