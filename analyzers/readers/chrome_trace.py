"""Read torch.profiler / Kineto Chrome traces and `export_memory_timeline` raw files, streaming.

Chrome traces reach gigabytes, and `json.load` would hold every event as a dict. `JsonStream` walks the
top-level object and the `traceEvents` array one element at a time (`json.JSONDecoder.raw_decode` over a
sliding text window), so memory grows with the memory events we keep, never with the file.

What we keep from a trace (kind "chrome_trace"):

* ``[memory]`` instant events -> one `DeviceEvents` per device ("cpu", "cuda:0", ...), stably sorted by
  time. ``Bytes`` is the signed delta; ``Addr`` (absent in pre-2022 traces -> -1), ``Total Allocated``
  and ``Total Reserved`` (columns set only when every event of the device has them).
  ``Device Type`` follows c10::DeviceType; HIP (6) is reported as "cuda" like PyTorch on ROCm does.
* ``baseline_bytes``: with totals, the first event's ``Total Allocated - Bytes`` (memory held when
  profiling began); without, the smallest baseline that keeps the running sum >= 0 (frees of memory
  allocated before the profiler started are normal). allocated(t) = baseline + cumsum(delta); the peak
  is its maximum, baseline included. Events that the trace's own other events rule out (a free larger than
  any earlier total, a ts far outside the others) are dropped and counted (`impossible_events`).
* ``ProfilerStep#N`` and ``kvtrace/...`` ranges (ph X, or B/E pairs) -> ``Marker(kind="step")``; the
  GPU-side copies (cat ``gpu_user_annotation``) are skipped so each step appears once, and so are Python
  frames (cat ``python_function``) of kvtrace's own files, which `with_stack` names ``kvtrace/...`` too.
* Timestamps: ``ts`` in microseconds, integer or float. When the top level has ``baseTimeNanoseconds``
  (newer Kineto writes ``ts`` relative to it; it may come after ``traceEvents``) we add it / 1000 so
  every ``ts_us`` is Unix-epoch microseconds. int64 when all values are integral, else float64.
* deviceProperties (``totalGlobalMem`` -> ``capacity_bytes`` of "cuda:<id>"; all of them also in
  ``meta["device_capacity_bytes"]``), distributedInfo, schemaVersion, baseTimeNanoseconds -> ``meta``.
  Only devices with memory events get a `DeviceEvents`: a trace without them has no devices.
Memory timelines (`export_memory_timeline`) are read by `analyzers.readers.memory_timeline`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from analyzers.model import DeviceEvents, Marker, MemorySource
from analyzers.readers.impossible_events import (
    FAR_TS_REASON,
    OVERSIZED_FREE_REASON,
    far_timestamps,
    oversized_frees,
)
from analyzers.readers.json_stream import JsonStream
from analyzers.readers.kineto_scan import PYTHON_FUNCTION, MemoryBlock, NotKineto, as_int64, scan_kineto
from analyzers.readers.memory_events_fast import (
    MAX_EVENT_BYTES,
    MAX_MOVED_BYTES,
    DeviceColumns,
    MemoryRunReader,
)
from analyzers.readers.memory_events_fast import as_int as _as_int
from analyzers.readers.memory_timeline import read_memory_timeline  # re-exported: one import for both
from analyzers.readers.sources import ProgressFn, open_input
from analyzers.readers.unescaped_names import merge_unescaped_names
from kvtrace.errors import KvtraceError

__all__ = ["ChunkSink", "read_chrome_trace", "read_memory_timeline", "timestamps"]

ChunkSink = Callable[[tuple["np.ndarray", ...], bool, bool], None]
"""sink((ts, addr, delta, total_allocated, total_reserved), all_allocated_known, all_reserved_known); addr and
total_reserved may hold digits as bytes (`kineto_scan.as_int64`)."""

# c10::DeviceType by index. HIP (6) reads as "cuda", as PyTorch on ROCm names its devices.
# Substrings of the events we keep; events without any are skipped undecoded (see JsonStream.each_element).
_NEEDLES = ('"[memory]"', "ProfilerStep#", "kvtrace/", '"B"', '"E"')
_DEVICE_TYPE_NAMES = (
    "cpu cuda mkldnn opengl opencl ideep cuda fpga maia xla vulkan metal xpu mps meta hpu ve lazy ipu mtia"
    " privateuseone"
)
_DEVICE_TYPES = dict(enumerate(_DEVICE_TYPE_NAMES.split()))
_META_KEYS = (
    "schemaVersion",
    "deviceProperties",
    "distributedInfo",
    "baseTimeNanoseconds",
    "displayTimeUnit",
)


def _walk_trace(
    stream: JsonStream, on_event: Callable[[Any], None], memory_runs: MemoryRunReader
) -> tuple[dict[str, Any], int]:
    """Feed the trace events we may keep to `on_event` (runs of Kineto-layout memory events to
    `memory_runs`); return the other top-level fields and how many events were skipped undecoded."""
    top: dict[str, Any] = {}
    skipped = 0
    first = stream.peek()
    if first == "[":  # the Chrome "JSON array" form: a bare list of events
        skipped = stream.each_element("the event array", on_event, _NEEDLES, memory_runs)
    elif first == "{":
        stream.pos += 1
        if stream.peek() == "}":
            stream.pos += 1
        else:
            while True:
                key = stream.value("the top-level object")
                if not isinstance(key, str):
                    raise stream.error("corrupt JSON: a top-level key that is not a string")
                stream.expect(":", "the top-level object")
                if key == "traceEvents":
                    if stream.peek() != "[":
                        kind = type(stream.value("traceEvents")).__name__
                        raise stream.error(f"not a Chrome trace: its 'traceEvents' is a {kind}, not a list")
                    skipped = stream.each_element("traceEvents", on_event, _NEEDLES, memory_runs)
                    top["traceEvents"] = None
                else:
                    top[key] = stream.value(f"top-level field {key!r}")
                if stream.expect(",}", "the top-level object") == "}":
                    break
    elif not first:
        raise stream.error("empty file")
    else:
        raise stream.error(f"not a Chrome trace: starts with {first!r}, expected a JSON object")
    stream.end()
    if first == "{" and "traceEvents" not in top:
        keys = ", ".join(sorted(top)[:5]) or "none"
        raise stream.error(f"not a Chrome trace: a JSON object without 'traceEvents' (its keys: {keys})")
    top.pop("traceEvents", None)
    return top, skipped


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
        self.sink = sink  # when set, chunks go there instead of being kept (streaming summaries)
        self.name = name
        self.moved = 0.0  # |Bytes| summed over the events so far, as a float (no overflow)
        # The processes writing these events. Each counts its own 'Total Allocated' and 'Total Reserved', so
        # with two or more on one device those totals are not the device's: the running sum of Bytes is.
        self.pids: set[Any] = set()
        self.device = device

    @property
    def totals_trusted(self) -> bool:
        """Whether 'Total Allocated' / 'Total Reserved' are this device's. Not with several processes, nor
        on the CPU: there the total is the profiler's own counter, which subtracts only the frees it sees
        while profiling, so memory freed between two profiler sessions stays counted (its Bytes are exact)."""
        return len(self.pids) <= 1 and self.device != "cpu"

    def _keep(self, chunk: tuple[np.ndarray, ...], with_allocated: int, with_reserved: int) -> None:
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


def timestamps(raw: np.ndarray, base_ns: Any, integral: bool) -> np.ndarray:
    """Raw `ts` values -> Unix-epoch µs where `baseTimeNanoseconds` allows; exact for integers < 2**53."""
    offset = offset_us(base_ns, integral)
    if isinstance(offset, int):
        return raw.astype(np.int64) + np.int64(offset)
    return raw.astype(np.float64) + offset


def clock_base(base_ns: Any) -> bool:
    """Whether a `baseTimeNanoseconds` is a clock base: an int64, Kineto's type. Another (a string, a float,
    NaN, 1e40) added to every `ts` would overflow or round the times away."""
    return isinstance(base_ns, int) and not isinstance(base_ns, bool) and -(2**63) < base_ns < 2**63


def offset_us(base_ns: Any, integral: bool) -> int | float:
    """What `timestamps` adds to a raw `ts`: an int where both are whole µs, else a float; 0 for a base
    that is no clock base (`clock_base`)."""
    base_ns = base_ns if clock_base(base_ns) else 0
    return base_ns // 1000 if integral and base_ns % 1000 == 0 else base_ns / 1000.0


_STACKS_PEEK = 1 << 20  # bytes looked at for python_function ranges (the JSON reader's first window)

SEVERAL_PROCESSES_NOTE = (
    "{device}: [memory] events of {count} processes; each counts its own 'Total Allocated', so the device's "
    "curve is the running sum of their 'Bytes'"
)
NO_CLOCK_BASE_NOTE = (
    "'baseTimeNanoseconds' is {value}, no clock base (Kineto writes an int64): ignored, times are the "
    "trace's own 'ts' microseconds, not Unix-epoch ones"
)
NEGATIVE_TOTAL_NOTE = (
    "{device}: 'Total Allocated' below zero in the trace (no allocator writes that): ignored, the curve is "
    "the running sum of 'Bytes'"
)


def _baseline(delta: np.ndarray, total_allocated: np.ndarray | None) -> int:
    if delta.size == 0:
        return 0
    if total_allocated is not None:
        return max(0, int(total_allocated[0] - delta[0]))
    return max(0, -int(np.cumsum(delta).min()))


def _in_time_order(
    columns: tuple[np.ndarray, ...], several_processes: bool, skipped: Counter[str]
) -> tuple[np.ndarray, ...]:
    """A device's columns (ts, addr, delta, allocated, reserved) in time order, without the events that
    `impossible_events` rules out (counted in `skipped`). A free is judged against the totals before it in
    time, hence after the sort; with several processes, whose totals are their own, it is not judged."""
    far = far_timestamps(columns[0])
    if far is not None:
        skipped[FAR_TS_REASON] += int(np.count_nonzero(far))
        columns = tuple(column[~far] for column in columns)
    raw_ts = columns[0]
    # Kineto writes memory events in time order; sorting (and copying every column) only when it did not
    # keeps the peak at one copy of the columns.
    if not bool(np.all(raw_ts[1:] >= raw_ts[:-1])):
        order = np.argsort(raw_ts, kind="stable")
        columns = tuple(column[order] for column in columns)
    if not several_processes:
        oversized, _ = oversized_frees(columns[2], columns[3])
        if oversized.any():
            skipped[OVERSIZED_FREE_REASON] += int(np.count_nonzero(oversized))
            columns = tuple(column[~oversized] for column in columns)
    return columns


def _capacities(device_properties: Any) -> dict[str, int]:
    capacities: dict[str, int] = {}
    for props in device_properties if isinstance(device_properties, list) else []:
        if isinstance(props, dict) and isinstance(props.get("totalGlobalMem"), int):
            capacities[f"cuda:{_as_int(props.get('id'), 0)}"] = int(props["totalGlobalMem"])
    return capacities


def _device_order(name: str) -> tuple[int, str, int]:
    prefix, _, index = name.partition(":")
    return (0 if prefix == "cpu" else 1, prefix, _as_int(index, -1))


def read_chrome_trace(
    path: str | os.PathLike[str],
    progress: ProgressFn | None = None,
    byte_scan: bool = True,
    sink_for: Callable[[str], ChunkSink] | None = None,
) -> MemorySource:
    """A `MemorySource` (kind "chrome_trace") from a Kineto/torch.profiler trace, plain or gzipped.

    Kineto's own layout is read by byte scans (`kineto_scan`); any other layout, or `byte_scan=False`, by
    the streaming JSON reader. Both give the same columns (`meta["reader"]` says which ran).
    A trace without memory events is valid: it yields no devices, or devices without events.
    With `sink_for(device)`, each device's events go in file-order chunks to that callable and its
    `DeviceEvents` stays empty (analyzers.stream_summary folds them in bounded memory).
    """
    if byte_scan:
        collector = _TraceCollector(sink_for, str(path))
        try:
            result = scan_kineto(path, collector.add_block, collector, collector, progress)
        except NotKineto:
            pass
        else:
            source = _source_of(
                str(path), collector, result.top, collector.all_integral, result.events, "byte_scan"
            )
            source.meta["python_stacks"] = result.python_stacks
            merge_unescaped_names(source.meta, result.unescaped_names)
            return source
    name = str(path)
    collector = _TraceCollector(sink_for, name)
    memory_runs = MemoryRunReader(collector.columns_for, collector.saw_pids)
    with open_input(path, progress) as binary:
        python_stacks = PYTHON_FUNCTION in binary.peek(_STACKS_PEEK)[:_STACKS_PEEK]
        stream = JsonStream(binary, name)
        top, skipped = _walk_trace(stream, collector, memory_runs)
    integral = collector.all_integral and memory_runs.all_integral
    events = collector.events + memory_runs.events + skipped
    source = _source_of(name, collector, top, integral, events, "json_stream")
    source.meta["python_stacks"] = python_stacks or bool(top.get("with_stack"))
    merge_unescaped_names(source.meta, stream.unescaped_names)
    return source


def _source_of(
    name: str, collector: _TraceCollector, top: dict[str, Any], integral: bool, events: int, reader: str
) -> MemorySource:
    base_ns = top.get("baseTimeNanoseconds")
    capacities = _capacities(top.get("deviceProperties"))
    source = MemorySource(kind="chrome_trace", path=name)
    if "baseTimeNanoseconds" in top and not clock_base(base_ns):
        value = repr(base_ns) if len(repr(base_ns)) <= 40 else f"{repr(base_ns)[:37]}..."
        source.meta.setdefault("input_notes", []).append(NO_CLOCK_BASE_NOTE.format(value=value))
    for device in sorted(collector.devices, key=_device_order):
        chunks = collector.devices[device]
        columns = chunks.arrays()
        count = len(columns[0])
        trusted = chunks.totals_trusted
        all_allocated = count > 0 and chunks.with_allocated == count and trusted
        all_reserved = count > 0 and chunks.with_reserved == count and trusted
        several = len(chunks.pids) > 1
        raw_ts, addr, delta, allocated, reserved = _in_time_order(columns, several, collector.skipped)
        full_allocated = allocated if all_allocated else None
        if several:
            source.meta.setdefault("input_notes", []).append(SEVERAL_PROCESSES_NOTE.format(
                device=device, count=len(chunks.pids)
            ))  # fmt: skip
        if full_allocated is not None and int(full_allocated.min()) < 0:
            # No allocator reports a negative total: a damaged or crafted trace. Its curve would go below
            # zero; the running sum of `Bytes` (over the smallest baseline that keeps it >= 0) is used.
            full_allocated = None
            source.meta.setdefault("input_notes", []).append(NEGATIVE_TOTAL_NOTE.format(device=device))
        source.devices.append(
            DeviceEvents(
                device=device,
                ts_us=timestamps(raw_ts, base_ns, integral),
                addr=addr,
                delta_bytes=delta,
                total_allocated=full_allocated,
                total_reserved=reserved if all_reserved else None,
                capacity_bytes=capacities.get(device),
                baseline_bytes=_baseline(delta, full_allocated),
            )
        )
    offset = offset_us(base_ns, integral)  # without numpy: a trace of ranges only never loads it
    for label, start, end, detail in sorted(collector.ranges, key=lambda r: r[1]):
        source.markers.append(
            Marker(
                kind="step",
                ts_us=float(start + offset),
                label=label,
                end_us=float(end + offset),
                detail=detail,
            )
        )
    source.meta.update({key: top[key] for key in _META_KEYS if key in top})
    source.meta["format"] = "chrome_trace"
    source.meta["top_level_keys"] = sorted(top)
    source.meta["trace_events"] = events
    source.meta["reader"] = reader
    source.meta["ts_integral"] = integral
    source.meta["device_capacity_bytes"] = capacities
    if collector.skipped:
        source.meta["skipped_events"] = dict(collector.skipped)
    return source
