"""A Chrome trace in another tool's layout, read whole: msgspec cuts the event array into events in C and
reads each one's name and phase, so only the events `read_chrome_trace` may keep are decoded.

Why apart from `analyzers.readers.json_stream`: Kineto's own layout is read by byte scans; a trace that
another tool re-indented or dumped on one line (`json.dump`, a script that filters a trace) has no layout they
know, and walking it in Python cost 0.6-1x `json.load` (issue 11's fallback path). msgspec validates the text
and finds each event's bounds at C speed without building the events; the events kept are decoded by `json`,
as the streaming reader decodes them, so the figures are the same.

The price is the text held whole and an object per event, so only inputs of at most `MAX_TEXT_BYTES` with at
most `MAX_OBJECTS` events (by their braces), every element an object with a string phase, are read this way.
msgspec is optional: without it, for a bigger or denser input, or for any text msgspec reads otherwise than
`json` (NaN, a lone surrogate, a byte-order mark, deep nesting, a repeated "traceEvents", damage),
`read_chrome_trace` walks the text with `JsonStream` as before, which also says what is wrong with a damaged
file and notes the elements that are no object.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Callable
from typing import IO, Any, cast

from analyzers.readers.json_stream import decode_failure
from analyzers.readers.kineto_scan import MemoryBlock, memory_blocks_in
from analyzers.readers.trace_fields import TOP_FIELDS
from kvtrace.errors import KvtraceError

# Text held whole: with ~0.1 kB of msgspec's per event beside it, a dense trace this size peaks near 150 MiB.
MAX_TEXT_BYTES = 64 << 20
# Events cut apart at most (counted by their opening braces, an upper bound): msgspec makes ~0.1 kB an event,
# and a text of tiny events (`{},` 21 million times in 64 MiB) would take gigabytes. Real traces hold one
# brace per 140-260 bytes as torch writes them (~110 compact); a denser text is streamed, its memory flat.
# At the bound, 63 MiB of 623,000 events: 172 MiB peak RSS for `report --json`.
MAX_OBJECTS = MAX_TEXT_BYTES // 100
_READ_BYTES = 1 << 20
_BATCH = 4096  # kept events decoded by one json.loads (~1/3 faster than a call each), or read as one block
# Names of the step ranges `_TraceCollector` keeps, as the JSON text begins them.
_STEP_STARTS = (b'"ProfilerStep#', b'"kvtrace/')
# Escapes that could spell such a name, or "[memory]", another way: one regex pass (two `in` tests cost ~6x).
_ESCAPES = re.compile(rb"\\[u/]")
_LEADING_SPACE = re.compile(rb"[ \t\n\r]*")


class _Declined(Exception):
    """The text is not read here; `JsonStream` reads it (and says what is wrong with it, if anything)."""


def read_whole(binary: IO[bytes], limit: int = MAX_TEXT_BYTES) -> tuple[bytearray | None, IO[bytes]]:
    """(The whole text, if it is at most `limit` bytes, and a stream reading it from its start for the
    streaming reader; or None and a stream reading the whole text, the part read here first.)"""
    data = bytearray()
    while len(data) <= limit:
        got = binary.read(min(_READ_BYTES, limit + 1 - len(data)))
        if not got:
            return data, cast(IO[bytes], _HeadThenRest(data, None))
        data += got
    return None, cast(IO[bytes], _HeadThenRest(data, binary))


class _HeadThenRest:
    """A byte stream giving `head` and then what `rest` reads: the text read by `read_whole`, whole or not."""

    def __init__(self, head: bytearray, rest: IO[bytes] | None) -> None:
        self._head: bytearray | None = head
        self._at = 0
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if self._head is not None:
            end = len(self._head) if size < 0 else self._at + size
            chunk = bytes(self._head[self._at : end])
            self._at += len(chunk)
            if self._at >= len(self._head):
                self._head = None  # freed once given out: the streaming reader holds a window, not the file
            if chunk:
                return chunk
        return self._rest.read(size) if self._rest is not None else b""


def walk_whole(
    data: bytearray,
    name: str,
    on_event: Callable[[Any], None],
    on_memory: Callable[[MemoryBlock], None],
) -> tuple[dict[str, Any], int] | None:
    """(The top-level fields but `traceEvents`, how many events there are), each event the collector may
    keep given to `on_event` in file order, or with the memory events next to it in one of Kineto's layouts
    (in any whitespace) to `on_memory` as blocks; None where `JsonStream` must read the text (then neither
    was called). An error a kept event gives `json` is the streaming reader's for it."""
    try:
        import msgspec
    except ImportError:  # an optional speed-up: the streaming reader reads every file
        return None
    if data.count(b"{") > MAX_OBJECTS:
        return None
    try:
        top, events = _cut(data, msgspec)
        kept, memory, total = _kept(events, msgspec, escaped=_ESCAPES.search(data) is not None)
    except _Declined:
        return None
    where = "traceEvents" if top is not None else "the event array"
    start = 0
    while start < len(kept):
        end, run_of_memory = start + 1, memory[start]
        while end < len(kept) and end - start < _BATCH and memory[end] == run_of_memory:
            end += 1
        blocks = memory_blocks_in(kept[start:end]) if run_of_memory else None
        if blocks is not None:
            for block in blocks:
                on_memory(block)
        else:
            for event in _decoded(kept[start:end], name, where):
                on_event(event)
        start = end
    return top or {}, total


def _cut(data: bytearray, msgspec: Any) -> tuple[dict[str, Any] | None, Any]:
    """The top-level fields (None for a bare array) and the event array, undecoded (a `msgspec.Raw`)."""
    if data.startswith(codecs.BOM_UTF8) or not _utf8(data):
        raise _Declined
    first = _LEADING_SPACE.match(data)
    if first is not None and data[first.end() : first.end() + 1] == b"[":
        return None, data  # the Chrome "JSON array" form, a bare list of events: `_kept` reads and checks it
    # A repeated key is read twice by the streaming reader and once here: that (and an escaped key) it reads
    if data.count(b'"traceEvents"') != 1:
        raise _Declined
    try:
        top = msgspec.json.decode(data, type=_top_type(msgspec))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # no "traceEvents" among them
        raise _Declined from None
    fields = {}
    for key in TOP_FIELDS:
        raw = getattr(top, key)
        if raw is msgspec.UNSET:
            continue
        try:
            fields[key] = json.loads(bytes(raw))
        except (ValueError, RecursionError):  # a field `json` refuses: reported by the streaming reader
            raise _Declined from None
    return fields, top.traceEvents


def _utf8(data: bytearray) -> bool:
    """Whether `data` is UTF-8, which msgspec does not check inside the values it skips."""
    if data.isascii():
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for start in range(0, len(view), _READ_BYTES):
            decoder.decode(view[start : start + _READ_BYTES])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _kept(events: Any, msgspec: Any, escaped: bool) -> tuple[list[Any], list[bool], int]:
    """The events `_TraceCollector` may keep (a `[memory]` name, a B or E phase, an X named as a step),
    undecoded, whether each is named "[memory]" as Kineto writes it, and how many events there are. Names
    are compared as written unless the text has escapes that could spell one (`escaped`: a "\\u" or "\\/"),
    then as json reads them. An element that is no object, or a phase that is no string, is declined at once
    (for the streaming reader): every element an object, there are no more than the text's braces."""
    heads = _head_type(msgspec)
    try:
        each = msgspec.json.decode(events, type=list[heads])  # type: ignore[valid-type]
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise _Declined from None
    plain_memory = msgspec.Raw(b'"[memory]"')
    wanted, memory = [], []
    for index, head in enumerate(each):
        phase = head.ph
        if head.name == plain_memory:
            wanted.append(index)
            memory.append(True)
        elif phase == "B" or phase == "E":
            wanted.append(index)
            memory.append(False)
        elif escaped or phase == "X":
            name = bytes(head.name)
            if escaped and b"\\" in name:
                name = _unescaped(name)
            if name == b'"[memory]"' or (phase == "X" and name.startswith(_STEP_STARTS)):
                wanted.append(index)
                memory.append(False)
    total = len(each)
    del each  # the heads go before the events' own bounds are made: the peak holds one of the two
    if not wanted:
        return [], [], total
    raws = msgspec.json.decode(events, type=list[msgspec.Raw])
    return [raws[index] for index in wanted], memory, total


@functools.cache
def _top_type(msgspec: Any) -> Any:
    """The trace object as msgspec reads it: its events and the fields kvtrace reads (`TOP_FIELDS`), each
    undecoded; msgspec checks the syntax of the others and makes nothing of them."""
    fields = [(key, msgspec.Raw | msgspec.UnsetType, msgspec.UNSET) for key in sorted(TOP_FIELDS)]
    return msgspec.defstruct("Top", [("traceEvents", msgspec.Raw), *fields], gc=False)


@functools.cache
def _head_type(msgspec: Any) -> Any:
    """An event's name (its text) and phase, all msgspec builds of it: a kernel's long name stays unread, and
    a phase of one character is Python's own string of it."""
    fields = [("name", msgspec.Raw, msgspec.Raw(b"null")), ("ph", str | None, None)]
    return msgspec.defstruct("Head", fields, gc=False)


def _unescaped(raw: bytes) -> bytes:
    """A JSON string's text with its escapes read (`"\\u005bmemory]"` is `"[memory]"`); else `raw`."""
    try:
        value = json.loads(raw)
    except ValueError:  # a lone surrogate's string, which msgspec refused before this
        return raw
    return b'"' + value.encode("utf-8", "surrogatepass") + b'"' if isinstance(value, str) else raw


def _decoded(raws: list[Any], name: str, where: str) -> list[Any]:
    try:
        return json.loads(b"[" + b",".join(raws) + b"]")  # type: ignore[no-any-return]
    except (ValueError, RecursionError) as exc:
        raise KvtraceError(f"{name}: {decode_failure(exc, where)}") from None
