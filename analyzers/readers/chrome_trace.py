"""Read torch.profiler / Kineto Chrome traces and `export_memory_timeline` raw files, streaming.

Chrome traces reach gigabytes, and `json.load` would hold every event as a dict. Kineto's own layout is
read by byte scans (`kineto_scan`); a text in another layout that fits `trace_in_memory.MAX_TEXT_BYTES` is
read whole, msgspec finding its events; any other, `JsonStream` walks the top-level object and the
`traceEvents` array one element at a time (`json.JSONDecoder.raw_decode` over a sliding text window), so
memory grows with the memory events we keep, never with the file.

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

import bisect
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from analyzers.model import DeviceEvents, Marker, MemorySource
from analyzers.readers.impossible_events import (
    FAR_TS_REASON,
    OVERSIZED_FREE_REASON,
    far_timestamps,
    oversized_frees,
)
from analyzers.readers.json_stream import JsonStream
from analyzers.readers.kineto_scan import PYTHON_FUNCTION, NotKineto, scan_kineto
from analyzers.readers.memory_events_fast import (
    MemoryRunReader,
)
from analyzers.readers.memory_events_fast import as_int as _as_int
from analyzers.readers.memory_timeline import read_memory_timeline  # re-exported: one import for both
from analyzers.readers.sources import ProgressFn, open_input
from analyzers.readers.trace_collect import ChunkSink, _TraceCollector
from analyzers.readers.trace_fields import TOP_FIELDS
from analyzers.readers.trace_in_memory import MAX_TEXT_BYTES, read_whole, walk_whole
from analyzers.readers.unescaped_names import merge_unescaped_names

__all__ = ["ChunkSink", "read_chrome_trace", "read_memory_timeline", "timestamps"]

# Substrings of the events we keep; events without any are skipped undecoded (see JsonStream.each_element).
# A B or E event holds its phase as a member's value, after ":" and any JSON whitespace, whatever the
# spacing or the key's escapes (`"\u0070h"`): one regex pass for both, ~2.2x faster than finding '"B"' and
# '"E"' (the quote is everywhere in JSON, so those finds crawl). The value written escaped ("\u0042")
# is missed, as '"B"' missed it.
_PHASE_NEEDLE = re.compile(r':[ \t\n\r]*"[BE]"')
_NEEDLES = ('"[memory]"', "ProfilerStep#", "kvtrace/", _PHASE_NEEDLE)
# A one-line run is skipped only where its strings hold no escape, so the key is "ph" as written: the
# rarer needle (~2.6x faster than the two finds), with any spacing around the colon.
_PLAIN_NEEDLES = ('"[memory]"', "ProfilerStep#", "kvtrace/", re.compile(r'"ph"[ \t\n\r]*:[ \t\n\r]*"[BE]"'))
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
    `memory_runs`); return the top-level fields kvtrace reads (`TOP_FIELDS`; the others are checked and
    dropped) and how many events were skipped undecoded."""
    top: dict[str, Any] = {}
    names: list[str] = []  # the 5 first of the keys in sorted order, for an error (the rest are not kept)
    skipped = 0
    first = stream.peek()
    if first == "[":  # the Chrome "JSON array" form: a bare list of events
        skipped = stream.each_element("the event array", on_event, _NEEDLES, memory_runs, _PLAIN_NEEDLES)
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
                if key not in names and (len(names) < 5 or key < names[-1]):
                    bisect.insort(names, key)
                    del names[5:]
                if key == "traceEvents":
                    if stream.peek() != "[":
                        kind = type(stream.value("traceEvents")).__name__
                        raise stream.error(f"not a Chrome trace: its 'traceEvents' is a {kind}, not a list")
                    skipped = stream.each_element(
                        "traceEvents", on_event, _NEEDLES, memory_runs, _PLAIN_NEEDLES
                    )
                    top["traceEvents"] = None
                else:
                    kept = key in TOP_FIELDS
                    value = stream.value(f"top-level field {key[:40]!r}", dropped=not kept)
                    if kept:
                        top[key] = value
                if stream.expect(",}", "the top-level object") == "}":
                    break
    elif not first:
        raise stream.error("empty file")
    else:
        raise stream.error(f"not a Chrome trace: starts with {first!r}, expected a JSON object")
    stream.end()
    if first == "{" and "traceEvents" not in top:
        keys = ", ".join(names) or "none"
        raise stream.error(f"not a Chrome trace: a JSON object without 'traceEvents' (its keys: {keys})")
    top.pop("traceEvents", None)
    return top, skipped


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

NO_TOTAL_NOTE = (
    "{device}: {which} no 'Total Allocated' (the allocator's running total, which newer torch.profiler "
    "traces give): its figures are the running sum of 'Bytes' from {level} at the trace's start, so what was "
    "allocated before the trace began (weights, optimizer state) is not in them, a lower bound"
)


def no_total_note(device: str, baseline: int, missing: tuple[int, int]) -> str:
    """`NO_TOTAL_NOTE` of a device whose running sum of 'Bytes' starts from `baseline`; `missing`: (events
    without the total, events), which a partly damaged trace makes differ."""
    level = f"{baseline:,} B (the least that keeps it at or above 0)" if baseline else "0"
    without, seen = missing
    if without == seen:
        which = "its memory events carry"
    else:
        which = f"{without:,} of its {seen:,} memory events {'carries' if without == 1 else 'carry'}"
    return NO_TOTAL_NOTE.format(device=device, which=which, level=level)


COUNTER_START_NOTE = (
    "{device}: the trace's 'Total Allocated' starts at {start:,} B from before the profiling began (the "
    "profiler's counter, carried over from an earlier profiler session in the same process); kvtrace counts "
    "the trace's own 'Bytes' from {level}, so TensorBoard's memory view, which plots 'Total Allocated', "
    "shows up to {more:,} B more"
)


def counter_start_note(source: MemorySource, device: str, baseline: int) -> None:
    """Add `COUNTER_START_NOTE` to the input notes of a CPU device whose profiler counter started above 0
    (the reader's `counter_start`) beyond `baseline`, the level kvtrace's running sum of 'Bytes' starts from
    (what its unmatched frees free: a trace that starts late holds the counter's bytes that way already)."""
    start = source.meta.get("counter_start", {}).get(device)
    if start and start > baseline:
        level = f"{baseline:,} B" if baseline else "0"
        more = start - baseline
        note = COUNTER_START_NOTE.format(device=device, start=start, level=level, more=more)
        source.meta.setdefault("input_notes", []).append(note)


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
    in_memory: bool = True,
) -> MemorySource:
    """A `MemorySource` (kind "chrome_trace") from a Kineto/torch.profiler trace, plain or gzipped.

    Kineto's own layout is read by byte scans (`kineto_scan`); any other layout, or `byte_scan=False`, whole
    where its text is small enough (`trace_in_memory`; `in_memory=False` never), else by the streaming JSON
    reader. All give the same columns (`meta["reader"]` says which ran).
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
    with open_input(path, progress) as binary:
        python_stacks = PYTHON_FUNCTION in binary.peek(_STACKS_PEEK)[:_STACKS_PEEK]
        text: IO[bytes] = binary
        walked = None
        unescaped: Counter[str] = Counter()  # names the streaming reader repaired
        if in_memory and _text_may_fit(path):
            data, text = read_whole(binary, MAX_TEXT_BYTES)
            walked = walk_whole(data, name, collector, collector.add_block) if data is not None else None
            del data
        if walked is not None:
            (top, events), reader, integral = walked, "in_memory", collector.all_integral
        else:
            memory_runs = MemoryRunReader(collector.columns_for, collector.saw_pids)
            stream = JsonStream(text, name)
            top, skipped = _walk_trace(stream, collector, memory_runs)
            events = collector.events + memory_runs.events + skipped
            reader, integral = "json_stream", collector.all_integral and memory_runs.all_integral
            unescaped = stream.unescaped_names
    source = _source_of(name, collector, top, integral, events, reader)
    source.meta["python_stacks"] = python_stacks or bool(top.get("with_stack"))
    merge_unescaped_names(source.meta, unescaped)
    return source


def _text_may_fit(path: str | os.PathLike[str]) -> bool:
    """Whether the file's text may be small enough to read whole: its size on disk (gzipped or not) is
    at most what `read_whole` holds, so a bigger file is streamed without reading that much first."""
    try:
        return os.stat(path).st_size <= MAX_TEXT_BYTES
    except OSError:
        return False


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
        if chunks.seen and chunks.given_allocated < chunks.seen:
            missing = (chunks.seen - chunks.given_allocated, chunks.seen)
            source.meta.setdefault("without_totals", {})[device] = missing
            if count:  # streamed (`sink_for`), its baseline is the fold's: analyzers.stream_summary says it
                note = no_total_note(device, _baseline(delta, None), missing)
                source.meta.setdefault("input_notes", []).append(note)
        if device == "cpu" and not several and chunks.counter_start and chunks.counter_start > 0:
            # Not trusted (`totals_trusted`): what the counter held at the start is said, not counted
            source.meta.setdefault("counter_start", {})[device] = chunks.counter_start
            if count:  # streamed, its baseline is the fold's: analyzers.stream_summary says it
                counter_start_note(source, device, _baseline(delta, full_allocated))
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
    source.meta["trace_events"] = events
    source.meta["reader"] = reader
    source.meta["ts_integral"] = integral
    source.meta["device_capacity_bytes"] = capacities
    if collector.skipped:
        source.meta["skipped_events"] = dict(collector.skipped)
    if collector.bad_addresses:  # kept apart too: a run's reader takes it into the run's notes
        source.meta["bad_addresses_note"] = bad_addresses_note(source.path, collector)
        source.meta.setdefault("input_notes", []).append(source.meta["bad_addresses_note"])
    return source


def bad_addresses_note(path: str, collector: _TraceCollector) -> str:
    """The note on `[memory]` events whose `Addr` is no integer: each is read as an event without an address
    (Bytes and totals counted, as a pre-2022 trace's), so its free is not paired with its alloc by address."""
    count = collector.bad_addresses
    events = "1 [memory] event has" if count == 1 else f"{count:,} [memory] events have"
    value = json.dumps(collector.bad_address, default=str)[:40]
    return (
        f"{path}: {events} an Addr that is not an integer (the first: {value}), which no profiler writes "
        "(damage): read without an address, as in a trace from before 2022, their Bytes counted"
    )
