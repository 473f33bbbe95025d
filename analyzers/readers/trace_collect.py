"""What `read_chrome_trace` keeps of a trace's events, one event at a time: each device's memory events (in
numpy chunks from the byte scan, and those decoded one by one, in file order) and the step ranges.

Why apart from `analyzers.readers.chrome_trace` (which walks the file and makes the `MemorySource`): this is
the per-event callback, where what an event means is decided (its device, whether it is a step, why a
memory event is refused).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from analyzers.readers.kineto_scan import MemoryBlock, as_int64
from analyzers.readers.memory_events_fast import MAX_EVENT_BYTES, MAX_MOVED_BYTES, DeviceColumns
from analyzers.readers.memory_events_fast import as_int as _as_int
from kvtrace.errors import KvtraceError

ChunkSink = Callable[[tuple["np.ndarray", ...], bool, bool], None]
"""sink((ts, addr, delta, total_allocated, total_reserved), all_allocated_known, all_reserved_known); addr and
total_reserved may hold digits as bytes (`kineto_scan.as_int64`)."""

# c10::DeviceType by index. HIP (6) reads as "cuda", as PyTorch on ROCm names its devices.
_DEVICE_TYPE_NAMES = (
    "cpu cuda mkldnn opengl opencl ideep cuda fpga maia xla vulkan metal xpu mps meta hpu ve lazy ipu mtia"
    " privateuseone"
)
_DEVICE_TYPES = dict(enumerate(_DEVICE_TYPE_NAMES.split()))


def _device_name(device_type: Any, device_id: Any) -> str:
    kind = _as_int(device_type, 0)
    prefix = _DEVICE_TYPES.get(kind, f"device_type{kind}")
    index = _as_int(device_id, -1)
    return prefix if prefix == "cpu" or index < 0 else f"{prefix}:{index}"


class _DeviceChunks:
    """One device's memory events: numpy chunks from the byte scan, and events decoded one by one
    (`pending`), kept in file order by flushing `pending` before each chunk."""

    def __init__(self, sink: ChunkSink | None = None, name: str = "", device: str = "") -> None:
        self.pending = DeviceColumns()
        self.chunks: list[tuple[np.ndarray, ...]] = []
        self.with_allocated = 0
        self.with_reserved = 0
        # events seen, and those giving 'Total Allocated' at all, trusted or not: a trace whose events carry
        # none (an older profiler's) counts only from its own start (chrome_trace.NO_TOTAL_NOTE)
        self.seen = self.given_allocated = 0
        self.sink = sink  # when set, chunks go there instead of being kept (streaming summaries)
        self.name = name
        self.moved = 0.0  # |Bytes| summed over the events so far, as a float (no overflow)
        # The processes writing these events. Each counts its own 'Total Allocated' and 'Total Reserved', so
        # with two or more on one device those totals are not the device's: the running sum of Bytes is.
        self.pids: set[Any] = set()
        self.device = device
        # The CPU's earliest event (ts) and its 'Total Allocated' less its 'Bytes' (None: no total): where
        # above 0, the profiler's counter carried bytes over from an earlier session (`counter_start_note`)
        self.first_ts: float | None = None
        self.counter_start: int | None = None

    @property
    def totals_trusted(self) -> bool:
        """Whether 'Total Allocated' / 'Total Reserved' are this device's. Not with several processes, nor
        on the CPU: there the total is the profiler's own counter, which subtracts only the frees it sees
        while profiling, so memory freed between two profiler sessions stays counted (its Bytes are exact)."""
        return len(self.pids) <= 1 and self.device != "cpu"

    def _keep(self, chunk: tuple[np.ndarray, ...], with_allocated: int, with_reserved: int) -> None:
        if self.device == "cpu" and len(chunk[0]):
            first = int(np.argmin(chunk[0]))  # the first of the earliest: a stable sort keeps it first
            if self.first_ts is None or chunk[0][first] < self.first_ts:
                self.first_ts = float(chunk[0][first])
                total = int(chunk[3][first])  # -1: the event gave none
                self.counter_start = total - int(chunk[2][first]) if total >= 0 else None
        self.seen += len(chunk[0])
        self.given_allocated += with_allocated
        if not self.totals_trusted:
            with_allocated = with_reserved = 0
        delta = chunk[2]
        if len(delta):
            # The running totals are int64: sizes that could overflow them are damage, not memory.
            magnitudes = np.abs(delta.astype(np.float64))
            self.moved += float(magnitudes.sum())
            if self.moved > MAX_MOVED_BYTES:
                raise KvtraceError(
                    f"{self.name}: [memory] events whose sizes add up to {self.moved:.3g} bytes: "
                    "not a real trace (damaged or made up)"
                )
        if self.sink is not None:
            self.sink(chunk, with_allocated == len(chunk[0]), with_reserved == len(chunk[0]))
            return
        self.chunks.append(chunk)
        self.with_allocated += with_allocated
        self.with_reserved += with_reserved

    def flush(self) -> None:
        cols = self.pending
        if len(cols.ts):
            self._keep(
                tuple(
                    np.frombuffer(column, dtype=dtype)
                    for column, dtype in (
                        (cols.ts, np.float64),
                        (cols.addr, np.int64),
                        (cols.delta, np.int64),
                        (cols.total_allocated, np.int64),
                        (cols.total_reserved, np.int64),
                    )
                ),
                cols.with_allocated,
                cols.with_reserved,
            )
            self.pending = DeviceColumns()

    def add_block(self, block: MemoryBlock) -> None:
        self.flush()
        self.pids |= block.pids
        self._keep(
            (block.ts, block.addr, block.delta, block.allocated, block.reserved),
            int(np.count_nonzero(block.allocated_known)),
            int(np.count_nonzero(block.reserved_known)),
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        self.flush()
        if not self.chunks:
            empty_f, empty_i = np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
            return empty_f, empty_i, empty_i, empty_i, empty_i
        chunks = [tuple(map(as_int64, chunk)) for chunk in self.chunks]
        if len(chunks) == 1:
            return chunks[0]
        return tuple(np.concatenate(parts) for parts in zip(*chunks, strict=True))


class _TraceCollector:
    """The per-event callback of `read_chrome_trace`: keeps memory events and step ranges only."""

    def __init__(self, sink_for: Callable[[str], ChunkSink] | None = None, name: str = "") -> None:
        self.sink_for = sink_for
        self.name = name
        self.devices: dict[str, _DeviceChunks] = {}
        self.ranges: list[tuple[str, float, float, dict[str, Any]]] = []
        self.open_ranges: dict[tuple[Any, Any], list[tuple[Any, float]]] = {}
        self.all_integral = True
        self.events = 0
        self.skipped: Counter[str] = Counter()
        # [memory] events whose Addr is there but no integer ("zz"), read without it, and the first such value
        self.bad_addresses = 0
        self.bad_address: Any = None
        self._devices_by_key: dict[tuple[Any, Any], _DeviceChunks] = {}

    def _ts(self, event: dict[str, Any]) -> float | None:
        ts = event.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int | float | str):
            return None
        if not isinstance(ts, int):
            try:
                ts = float(ts)
            except ValueError:
                return None
            if not math.isfinite(ts):  # NaN or an infinity (Python's json reads them): no place in time
                return None
            self.all_integral = self.all_integral and float(ts).is_integer()
        return float(ts)

    def __call__(self, event: Any) -> None:
        self.events += 1
        if not isinstance(event, dict):
            self.skipped["not an object"] += 1
            return
        name, phase = event.get("name"), event.get("ph")
        if name == "[memory]":
            args = event.get("args")
            raw_ts = event.get("ts")
            if type(raw_ts) is int:  # the common case, without the general conversion
                ts: float | None = float(raw_ts)
            elif type(raw_ts) is float and math.isfinite(raw_ts):
                ts = raw_ts
                if self.all_integral and not raw_ts.is_integer():
                    self.all_integral = False
            else:
                ts = self._ts(event)
            if ts is None or not isinstance(args, dict):
                self.skipped[_memory_problem(raw_ts, args)] += 1
                return
            delta = args.get("Bytes")
            if type(delta) is not int and _strict_int(delta) is None:
                self.skipped[
                    "[memory] with a non-integer Bytes" if delta is not None else "[memory] without Bytes"
                ] += 1
                return
            size = delta if type(delta) is int else _strict_int(delta)
            if not -MAX_EVENT_BYTES <= size <= MAX_EVENT_BYTES:  # type: ignore[operator]
                self.skipped["[memory] with an impossible Bytes (over 2**56)"] += 1
                return
            addr = args.get("Addr")
            if type(addr) is not int and addr is not None and _as_int(addr, -2) == -2:
                self.bad_addresses += 1  # read as addressless, as a pre-2022 trace's: its Bytes still count
                if self.bad_addresses == 1:
                    self.bad_address = addr
            chunks = self.device_for(args.get("Device Type"), args.get("Device Id"))
            pid = event.get("pid")
            if isinstance(pid, int | str) and pid not in chunks.pids:  # else not a process we can tell apart
                chunks.pids.add(pid)
            chunks.pending.add(ts, args)
        elif phase == "B" or phase == "E":
            self._begin_end(event, phase)
        elif phase == "X" and _is_step(name, event.get("cat")):
            ts = self._ts(event)
            if ts is not None:
                dur = event.get("dur")
                end = ts + float(dur) if isinstance(dur, int | float) and not isinstance(dur, bool) else ts
                self.ranges.append((str(name), ts, end, _range_detail(event)))

    def saw_pids(self, device_type: int, device_id: int, pids: set[int]) -> None:
        self.device_for(device_type, device_id).pids |= pids

    def columns_for(self, device_type: Any, device_id: Any) -> DeviceColumns:
        return self.device_for(device_type, device_id).pending

    def add_block(self, block: MemoryBlock) -> None:
        self.all_integral = self.all_integral and not block.fractional_ts
        self.device_for(block.device_type, block.device_id).add_block(block)

    def device_for(self, device_type: Any, device_id: Any) -> _DeviceChunks:
        key = (device_type, device_id)
        try:
            chunks = self._devices_by_key.get(key)
        except TypeError:  # an unhashable device field: take the slow path
            chunks, key = None, None  # type: ignore[assignment]
        if chunks is None:
            device = _device_name(device_type, device_id)
            chunks = self.devices.get(device)
            if chunks is None:
                sink = self.sink_for(device) if self.sink_for is not None else None
                chunks = self.devices[device] = _DeviceChunks(sink, self.name, device)
            if key is not None:
                self._devices_by_key[key] = chunks
        return chunks

    def _begin_end(self, event: dict[str, Any], phase: str) -> None:
        # Every B is stacked (an E closes the innermost open range of its thread, whatever its name).
        ts = self._ts(event)
        stack = self.open_ranges.setdefault((event.get("pid"), event.get("tid")), [])
        if phase == "B":
            stack.append((event.get("name"), ts if ts is not None else float("nan")))
        elif stack:
            name, start = stack.pop()
            if _is_step(name, event.get("cat")) and ts is not None:
                self.ranges.append((str(name), start, ts, _range_detail(event)))


def _strict_int(value: Any) -> int | None:
    """An integer JSON value or an integral float; None for anything else. A string ("12") is a wrong type
    like any other: no profiler quotes its numbers, so it is skipped with a note, not counted."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return None


def _memory_problem(raw_ts: Any, args: Any) -> str:
    """Why a `[memory]` event cannot be used, in the words of the report's notes."""
    if args is None:
        return "[memory] without args"
    if not isinstance(args, dict):
        return "[memory] whose args is not an object"
    if raw_ts is None:
        return "[memory] without ts"
    if type(raw_ts) is float:  # 1e400, NaN or Infinity in the file: a number, but at no place in time
        return "[memory] with an infinite or NaN ts"
    return "[memory] with a non-numeric ts"


_NOT_STEPS = ("kvtrace/evict", "kvtrace/kv_update")  # kvtrace's ranges inside a step, not steps


# Categories of ranges that share a step's name without being one: a step's GPU-side copy, and with
# `with_stack=True` a Python frame of kvtrace's own files, which torch names by its path below sys.path
# ("kvtrace/kv_lines.py(106): iter_tensors") where kvtrace is installed in site-packages.
_NOT_STEP_CATEGORIES = ("gpu_user_annotation", "python_function")


def _is_step(name: Any, category: Any) -> bool:
    return (
        isinstance(name, str)
        and (
            name.startswith("ProfilerStep#")
            or (name.startswith("kvtrace/") and not name.startswith(_NOT_STEPS))
        )
        and category not in _NOT_STEP_CATEGORIES
    )


def _range_detail(event: dict[str, Any]) -> dict[str, Any]:
    return {key: event[key] for key in ("cat", "pid", "tid") if key in event}
