"""Find a Kineto trace's memory events with byte scans, without building a JSON object per event.

A torch.profiler trace is mostly ops and kernels we do not keep, and `json.load` (or any parser) spends most
of its time building them. Kineto writes every event with one `fprintf` layout: each event opens with
"\\n  {" and events are separated by ",\\n  ". So the text is cut into blocks of whole events at separators,
and in each block:

* `[memory]` events are matched by one compiled pattern per Kineto layout (2021 and 2022+), whose groups
  are the numbers (JSON number grammar, so a leading zero or garbage is not accepted) and converted per
  column with numpy. When a block's matches do not account for every `"[memory]"` in it (other spacing, key
  order, strings for numbers, garbage), or one holds a Bytes past `MAX_EVENT_BYTES` or a ts past a float's
  range, each of its memory events is decoded with `json` instead, in file order, so damage is reported
  (such an event is skipped with the decoder's note) and odd events are read as the JSON reader reads them.
* events naming a step (`ProfilerStep#`, `kvtrace/`) or opening/closing a B/E range are found by substring
  and decoded one by one with `json`: a handful per step.
* structure is checked cheaply: the separators give the event count, and a lost comma between events
  ("}\\n  {") is corruption.

Anything that does not look like Kineto's layout at the start or at the end raises `NotKineto`; the caller
then reads the file with the general streaming JSON reader (`JsonStream`), which accepts any layout.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyzers.readers.memory_events_fast import MAX_EVENT_BYTES
from analyzers.readers.sources import ProgressFn, open_input
from analyzers.readers.trace_fields import kept_fields
from analyzers.readers.unescaped_names import repair_event
from kvtrace.errors import KvtraceError, too_long_integer

__all__ = ["MemoryBlock", "NotKineto", "ScanResult", "as_int64", "scan_kineto"]

_SEP = b"\n  },\n  {"
_EVENT_OPEN = b"\n  {"
# What the structure check counts: Kineto opens every event with "{" and a new line at its key indentation.
# The longer needles are found in ~15 ms per 35 MB where "\n  {" (two spaces begin most lines) takes ~25.
_EVENT_START = _EVENT_OPEN + b"\n    "
_COMMA_START = b"," + _EVENT_START
_EVENT_CLOSE = b"\n  }"
_NEEDLE = b'"[memory]"'
PYTHON_FUNCTION = b'"python_function"'  # the category of the ranges a with_stack=True trace holds
# Substrings of the events decoded one by one; a needle is a `bytes.find` pass or a compiled pattern. The
# two phases share one pattern: one pass over the text instead of two (each ~25 ms on a 35 MB trace here).
# Step names are kept only where they begin a string (`_is_step` wants the name to start so), and a needle
# that opens with the quote is found faster (~10 against ~16 ms) and skips stack frames of kvtrace's files.
_OTHER_NEEDLES: tuple[bytes | re.Pattern[bytes], ...] = (
    b'"ProfilerStep#',
    b'"kvtrace/',
    re.compile(rb'"ph": "[BE]"'),
)
# 1 MiB blocks, not 8: each block is searched ~7 times (counts, needles), and a block that stays in the CPU's
# cache and reuses freed heap pages beats one that streams from RAM through fresh pages (a page's first touch
# is dear on a VM). Measured on worker0 (35 MB of JSON): 0.26 s against 0.37-0.62 s in a fresh process.
_BLOCK_BYTES = 1 << 20
_HEAD_BYTES = 4 << 20
# Text held with no event separator in it: an event, or the fields after the events, this big is no output of
# Kineto's (its events are < 1 kB; "traceName" follows them), and the general reader bounds its memory.
_MAX_CARRY = 4 << 20
_INT = rb"(-?(?:0|[1-9][0-9]*))"
_TS = rb"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
_ANY_INT = rb"-?(?:0|[1-9][0-9]*)"
# (pattern, names of its groups in order); numbers only where Kineto writes them.
_NEW = re.compile(
    rb'\n  \{\n    "ph": "i",\n    \n    "cat": "cpu_instant_event",\n    "s": "t",\n'
    rb'    "name": "\[memory\]",\n'
    rb'    "pid": ' + _INT + rb',\n    "tid": ' + _ANY_INT + rb',\n    "ts": ' + _TS + rb"\n    ,\n"
    rb'    "args": \{\n      "Total Reserved": '
    + _INT
    + rb', "Total Allocated": '
    + _INT
    + rb', "Bytes": '
    + _INT
    + rb', "Device Id": '
    + _INT
    + rb', "Device Type": '
    + _INT
    + rb', "Addr": '
    + _INT
    + rb', "finished": (?:true|false), "Ev Idx": '
    + _ANY_INT
    + rb"\n    \}\n  \}"
)
_NEW_FIELDS = ("pid", "ts", "reserved", "allocated", "bytes", "device_id", "device_type", "addr")
# torch 2.11+cu130's Kineto (sample_traces/h200): the args of `_NEW`, the head on two lines. Decoded one by
# one, its memory events cost ~0.35 s of a 34 MB H200 trace's ~0.4 s (0.8x json.load).
_CUDA = re.compile(
    rb'\n  \{\n    "ph": "i", "cat": "cpu_instant_event", "s": "t", "name": "\[memory\]",\n'
    rb'    "pid": '
    + _INT
    + rb', "tid": '
    + _ANY_INT
    + rb',\n    "ts": '
    + _TS
    + rb",\n"
    + _NEW.pattern[_NEW.pattern.index(rb'    "args": ') :]
)
_OLD = re.compile(
    rb'\n  \{\n    "ph": "i", "s": "t", "name": "\[memory\]",\n    "pid": '
    + _INT
    + rb', "tid": '
    + _ANY_INT
    + rb',\n    "ts": '
    + _TS
    + rb',\n    "args": \{\n      "Device Type": '
    + _INT
    + rb', "Device Id": '
    + _INT
    + rb', "Bytes": '
    + _INT
    + rb"\n    \}\n  \}"
)
_OLD_FIELDS = ("pid", "ts", "device_type", "device_id", "bytes")


class NotKineto(Exception):
    """The file is not in Kineto's layout (or ends unlike it): read it with the general JSON reader."""


@dataclass
class MemoryBlock:
    """Memory events of one device from one block, in file order. Missing fields are -1 (`*_known` False)."""

    device_type: int
    device_id: int
    ts: np.ndarray  # float64, raw `ts` as written
    addr: np.ndarray  # int64, or the digits as bytes (dtype "S"): `as_int64` converts
    delta: np.ndarray  # int64
    allocated: np.ndarray  # int64
    reserved: np.ndarray  # int64, or the digits as bytes (dtype "S")
    allocated_known: np.ndarray  # bool
    reserved_known: np.ndarray  # bool
    fractional_ts: bool = False
    pids: frozenset[int] = frozenset()  # the processes whose events these are (their totals are their own)


@dataclass
class ScanResult:
    top: dict[str, Any] = field(default_factory=dict)
    events: int = 0
    python_stacks: bool = False  # a trace taken with_stack=True (python_function ranges to attribute by)
    unescaped_names: Counter[str] = field(default_factory=Counter)  # names repaired (`unescaped_names`)


def _blocks_of(columns: dict[str, np.ndarray], count: int) -> list[MemoryBlock]:
    raw_ts = columns["ts"]
    ts = raw_ts.astype(np.float64)
    fractional = bool(np.any(ts != np.floor(ts)))
    ints: dict[str, np.ndarray] = {
        name: columns[name].astype(np.int64) for name in ("bytes", "allocated") if name in columns
    }
    # Addresses and reserved bytes stay text until a reader needs them (the streamed report needs no
    # address and the reserved bytes at a few points only); text of 20+ chars may not fit: convert now.
    for name in ("addr", "reserved"):
        if name in columns:
            text = columns[name]
            long = count and bool(np.any(text.view(np.uint8).reshape(count, -1)[:, 19:] != 0))
            ints[name] = text.astype(np.int64) if long else text
    missing = np.full(count, -1, dtype=np.int64)
    known = np.ones(count, dtype=bool)
    unknown = np.zeros(count, dtype=bool)
    with_totals = "allocated" in ints
    raw_type, raw_id = columns["device_type"], columns["device_id"]
    if bool(np.all(raw_type == raw_type[0])) and bool(np.all(raw_id == raw_id[0])):  # the usual case
        keys = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
        pairs = np.array([[int(raw_type[0])], [int(raw_id[0])]], dtype=np.int64)
        keys[0][:], keys[1][:] = pairs[0, 0], pairs[1, 0]
    else:  # CPU and GPU events interleaved: each device gets its rows, in order
        keys = raw_type.astype(np.int64), raw_id.astype(np.int64)
        # Sorted like `np.unique(..., axis=1)`, which would import numpy.ma (11 ms) for a few pairs.
        pairs = np.array(sorted(set(zip(keys[0].tolist(), keys[1].tolist(), strict=True))), dtype=np.int64).T
    blocks = []
    pid = columns["pid"]
    for device_type, device_id in pairs.T.tolist():
        rows: Any = slice(None)
        if pairs.shape[1] > 1:
            rows = (keys[0] == device_type) & (keys[1] == device_id)
        pids = pid[rows]
        one = bool(np.all(pids == pids[0]))
        blocks.append(
            MemoryBlock(
                device_type=device_type,
                device_id=device_id,
                ts=ts[rows],
                addr=ints.get("addr", missing)[rows],
                delta=ints["bytes"][rows],
                allocated=ints.get("allocated", missing)[rows],
                reserved=ints.get("reserved", missing)[rows],
                allocated_known=(known if with_totals else unknown)[rows],
                reserved_known=(known if with_totals else unknown)[rows],
                fractional_ts=fractional,
                pids=frozenset(int(p) for p in ((pids[0],) if one else set(pids.tolist()))),
            )
        )
    return blocks


def as_int64(column: np.ndarray) -> np.ndarray:
    """A column of `MemoryBlock` as int64 (converting digits kept as bytes)."""
    return column.astype(np.int64) if column.dtype.kind == "S" else column


def _event_at(block: bytes, at: int) -> tuple[int, int]:
    """(start, end) of the top-level event holding byte `at`: from its "{" to just after its "}"."""
    start = block.rfind(_EVENT_OPEN, 0, at)
    end = block.find(_EVENT_CLOSE, at)
    if start < 0 or end < 0:
        raise NotKineto
    return start + 3, end + 4


def _repaired(event: bytes) -> tuple[Any, list[str]] | None:
    try:
        return repair_event(event.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _decode(block: bytes, start: int, end: int, path: str, unescaped: Counter[str]) -> Any:
    try:
        return json.loads(block[start:end])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        repaired = _repaired(block[start:end]) if isinstance(exc, json.JSONDecodeError) else None
        if repaired is not None:  # a name torch wrote with unescaped quotes (`unescaped_names`)
            unescaped.update(repaired[1])
            return repaired[0]
        what = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise KvtraceError(f"{path}: corrupt JSON ({what}) inside traceEvents") from None
    except ValueError:  # CPython's limit on the digits of an int
        raise KvtraceError(f"{path}: corrupt JSON ({too_long_integer()}) inside traceEvents") from None
    except RecursionError:  # the C decoder's depth limit (~1,000 levels)
        raise KvtraceError(f"{path}: JSON nested too deeply to read inside traceEvents") from None


class _Scanner:
    def __init__(
        self,
        path: str,
        on_memory: Callable[[MemoryBlock], None],
        on_odd_memory: Callable[[Any], None],
        on_event: Callable[[Any], None],
    ) -> None:
        self.path = path
        self.on_memory = on_memory
        self.on_odd_memory = on_odd_memory
        self.on_event = on_event
        self.result = ScanResult()
        self.commas = 0
        self._layouts = [(_NEW, _NEW_FIELDS), (_CUDA, _NEW_FIELDS), (_OLD, _OLD_FIELDS)]

    def block(self, block: bytes) -> None:
        """`block`: whole events, the first preceded by "\\n  " or whitespace, the last ending with "}".

        A block is cut in three: before the first `[memory]` event, the run from it to the last one, and
        after. A run that the layout pattern matches end to end (one match per event, joined by separators
        only) needs no other check; the rest is counted and searched for the few events we decode."""
        first = block.find(_NEEDLE)
        if first < 0:
            self._plain(block, 0, len(block))
            return
        start = block.rfind(_EVENT_OPEN, 0, first)
        end = block.find(_EVENT_CLOSE, block.rfind(_NEEDLE)) + 4
        if start < 0 or end < 4:
            raise NotKineto
        self._plain(block, 0, start)
        if start > 0 and block[start - 1 : start] == b",":
            self.commas += 1
        if not self._memory_run(block, start, end):
            self._plain(block, start, end, memory=True)
        self._plain(block, end, len(block))

    def check(self) -> None:
        """Every event but the first follows a comma (a lost one is corruption, or not Kineto's layout)."""
        if self.commas != self.result.events - 1:
            raise NotKineto

    def _plain(self, block: bytes, start: int, end: int, memory: bool = False) -> None:
        """Count the events of block[start:end] and decode those we keep (memory ones only if `memory`)."""
        self.result.events += block.count(_EVENT_START, start, end)
        self.commas += block.count(_COMMA_START, start, end)
        found: dict[int, int] = {}  # start -> end of each event worth decoding
        for needle in (_NEEDLE, *_OTHER_NEEDLES) if memory else _OTHER_NEEDLES:
            if isinstance(needle, bytes):
                at = block.find(needle, start, end)
                while at >= 0:
                    event_start, event_end = _event_at(block, at)
                    found[event_start] = event_end
                    at = block.find(needle, event_end, end)
            else:
                hit = needle.search(block, start, end)
                while hit is not None:
                    event_start, event_end = _event_at(block, hit.start())
                    found[event_start] = event_end
                    hit = needle.search(block, event_end, end)
        for event_start in sorted(found):  # file order
            event = _decode(block, event_start, found[event_start], self.path, self.result.unescaped_names)
            is_memory = isinstance(event, dict) and event.get("name") == "[memory]"
            if is_memory or _NEEDLE not in block[event_start : found[event_start]]:
                (self.on_odd_memory if is_memory else self.on_event)(event)

    def _memory_run(self, block: bytes, start: int, end: int) -> bool:
        """Read the memory events of block[start:end] with one layout pattern, in one regex pass.

        `split` gives the numbers of each match and the text between matches: a lone "," between two memory
        events, or other events (kernels, steps: GPU traces interleave them), which are counted and searched
        like any other text. False (nothing done) if a `[memory]` is left between matches."""
        for pattern, fields in self._layouts:
            parts = pattern.split(block[start:end])
            width = len(fields) + 1
            count = len(parts) // width
            if count == 0:
                continue
            gaps = parts[::width]
            others = [gap for gap in gaps if gap and gap != b","]
            if any(_NEEDLE in gap for gap in others):
                return False
            memory_blocks = _blocks_in(parts, fields, count)
            if memory_blocks is None:
                return False
            if self._layouts[0][0] is not pattern:  # a trace keeps one layout: try its own first
                self._layouts.sort(key=lambda layout: layout[0] is not pattern)
            for memory in memory_blocks:
                self.on_memory(memory)
            self.result.events += count
            self.commas += gaps.count(b",")
            for gap in others:  # a comma ending a gap precedes the next memory event's "\n  {"
                self._plain(gap, 0, len(gap))
                self.commas += gap.endswith(b",")
            return True
        return False


def _any_whitespace(pattern: re.Pattern[bytes]) -> re.Pattern[bytes]:
    """`pattern` (one memory event in a Kineto layout, from its "{") with any JSON whitespace, or none, where
    it has its own between tokens: the event as another tool re-indented or dumped it. Keys keep their
    spaces. It begins with "{", a literal, so that `re` looks for candidates at C speed."""
    source = pattern.pattern[pattern.pattern.index(rb"\{") :].split(b'"')  # even pieces: outside strings
    outside = (
        re.sub(rb"(?:\\n| )+", rb"[ \\t\\n\\r]*", piece) if i % 2 == 0 else piece
        for i, piece in enumerate(source)
    )
    return re.compile(b'"'.join(outside))


# `_NEW` (`_CUDA` differs from it only in whitespace) and `_OLD` in any whitespace: for `memory_blocks_in`.
ANY_LAYOUTS = ((_any_whitespace(_NEW), _NEW_FIELDS), (_any_whitespace(_OLD), _OLD_FIELDS))


def memory_blocks_in(events: list[bytes]) -> list[MemoryBlock] | None:
    """`events` (each one memory event's whole text) as blocks, if the pattern of `ANY_LAYOUTS` that matches
    the first matches each of them; None to decode them one by one (as a number beyond int64 or an
    impossible size must be)."""
    for pattern, fields in ANY_LAYOUTS:
        if pattern.fullmatch(events[0]) is None:
            continue
        parts = pattern.split(b"".join(events))
        width = len(fields) + 1
        if len(parts) != len(events) * width + 1 or any(parts[::width]):  # an event the pattern misses
            return None
        return _blocks_in(parts, fields, len(events))
    return None


def _blocks_in(parts: list[bytes], fields: tuple[str, ...], count: int) -> list[MemoryBlock] | None:
    """The blocks of a pattern's split (`count` events, each `fields` after a gap); None where the JSON
    reader must decide: a number beyond int64 or of over 24 characters (numpy would cut "1.000...0e10" to
    "1.000...0e1"), a size no device holds or a ts past a float's range (skipped with a note)."""
    width = len(fields) + 1
    columns = np.array([parts[index::width] for index in range(1, width)])
    if columns.dtype.itemsize > 24:
        return None
    try:
        blocks = _blocks_of(dict(zip(fields, columns, strict=True)), count)
    except (ValueError, OverflowError):
        return None
    return None if any(map(_impossible, blocks)) else blocks


def _impossible(block: MemoryBlock) -> bool:
    """Whether a Bytes no device holds (past `MAX_EVENT_BYTES`) or a ts past a float's range (1e400) is
    among `block`'s events: the decoder skips such an event with a note, as the streamed reader does."""
    delta = block.delta
    return (
        int(delta.max()) > MAX_EVENT_BYTES
        or int(delta.min()) < -MAX_EVENT_BYTES
        or not bool(np.isfinite(block.ts).all())
    )


def _header(head: bytes) -> tuple[dict[str, Any], int]:
    """Top-level fields before "traceEvents" and where the events begin; NotKineto if unlike Kineto."""
    key = head.find(b'"traceEvents": [')
    if key < 0:
        raise NotKineto
    try:
        top = json.loads(head[:key] + b'"traceEvents": []}')
    except ValueError:  # not JSON, not UTF-8, an int of too many digits: the general reader says which
        raise NotKineto from None
    if not isinstance(top, dict):
        raise NotKineto
    top.pop("traceEvents", None)
    begin = key + len(b'"traceEvents": [')
    first = head.find(_EVENT_START, begin)
    if first < 0 or head[begin:first].strip():
        raise NotKineto
    return top, begin


def _trailer(tail: bytes) -> dict[str, Any]:
    """The fields after the event array ("\\n  ]" or "]", then more keys or "}"); NotKineto otherwise."""
    rest = tail.strip()
    if not rest.startswith(b"]"):
        raise NotKineto
    rest = rest[1:].strip()
    if rest == b"}":
        return {}
    if not rest.startswith(b","):
        raise NotKineto
    try:
        more = json.loads(b"{" + rest[1:])
    except ValueError:  # not JSON, not UTF-8, an int of too many digits: the general reader says which
        raise NotKineto from None
    if not isinstance(more, dict):
        raise NotKineto
    return more


def scan_kineto(
    path: str | os.PathLike[str],
    on_memory: Callable[[MemoryBlock], None],
    on_odd_memory: Callable[[Any], None],
    on_event: Callable[[Any], None],
    progress: ProgressFn | None = None,
    block_bytes: int | None = None,
) -> ScanResult:
    """Feed a Kineto-layout trace's memory events to `on_memory` (numpy columns per device and block) or,
    one by one, to `on_odd_memory` (decoded dicts, where the layout differs); step and B/E events to
    `on_event`. Raises `NotKineto` before calling anything if the file does not start like Kineto's output,
    and also if it ends unlike it (the caller must then discard what it got and use the general reader)."""
    name = str(path)
    scanner = _Scanner(name, on_memory, on_odd_memory, on_event)
    with open_input(path, progress) as binary:
        head = binary.read(_HEAD_BYTES)
        top, begin = _header(head)
        # torch.profiler writes "with_stack": 1 at the top; older traces show their python_function ranges
        scanner.result.python_stacks = bool(top.get("with_stack")) or PYTHON_FUNCTION in head
        carry = head[begin:]
        while True:
            data = binary.read(block_bytes or _BLOCK_BYTES)
            buffer = carry + data if carry else data
            if not data:
                break
            cut = buffer.rfind(_SEP)
            if cut < 0:
                if len(buffer) > _MAX_CARRY:
                    raise NotKineto
                carry = buffer
                continue
            scanner.block(buffer[: cut + 4])
            scanner.commas += 1  # the one at buffer[cut + 4], between this block and the next
            carry = buffer[cut + 5 :]
        end = buffer.rfind(_EVENT_CLOSE)
        if end < 0:
            raise NotKineto
        top.update(_trailer(buffer[end + 4 :]))
        top = kept_fields(top)
        scanner.block(buffer[: end + 4])
    scanner.check()
    scanner.result.top = top
    return scanner.result
