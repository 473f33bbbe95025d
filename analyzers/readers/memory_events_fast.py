"""Columns of `[memory]` events, and a bulk reader for runs of them in a layout known to be exact.

Decoding each memory event as JSON (two dicts, a callback) is most of the time spent on a big trace, and
millions of them are written by one `fprintf` format. `MemoryRunReader` takes a run of consecutive events
as text, pulls out the numbers with C-level string operations (`translate`, `split`) and proves the run is
exactly a layout with those numbers filled in (`template % numbers == text`), each a valid JSON number.
The layouts are Kineto's, and those learned from a re-indented trace's own events (`memory_layouts`). So
what it accepts is what `json` would have read, value for value; anything else (other spacing inside a
run, other keys, strings for numbers, a `[memory]` inside another event) is left to the JSON decoder.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

from analyzers.readers.memory_layouts import KINETO_LAYOUTS, Layout, learn_layout

__all__ = ["MAX_EVENT_BYTES", "MAX_MOVED_BYTES", "DeviceColumns", "MemoryRunReader", "as_int"]


_INT64 = 2**63 - 1
# Sizes no device holds, shared by every reader of allocator events (Chrome traces, snapshots, timelines).
MAX_EVENT_BYTES = 2**56  # one allocation or free: 64 PiB, far past any device
MAX_MOVED_BYTES = 2**62  # all of a device's events together: the int64 running totals stay exact


def as_int(value: Any, default: int) -> int:
    """`value` as an int64, else `default` (None, a boolean, garbage, or a number no int64 holds)."""
    if isinstance(value, bool) or value is None:
        return default
    if not isinstance(value, int):
        try:
            value = int(value, 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float (1e400 in the JSON)
            return default
    return value if -_INT64 <= value <= _INT64 else default


class DeviceColumns:
    """Growing columns for one device (compact `array`s, not lists of Python ints)."""

    def __init__(self) -> None:
        self.ts = array("d")
        self.addr = array("q")
        self.delta = array("q")
        self.total_allocated = array("q")
        self.total_reserved = array("q")
        self.with_allocated = 0
        self.with_reserved = 0

    def add(self, ts: float, args: dict[str, Any]) -> None:
        # Plain ints are the norm (Kineto writes them); `type(x) is int` skips the conversion call, which
        # is most of the per-event cost on traces with millions of memory events.
        self.ts.append(ts)
        addr, delta = args.get("Addr"), args.get("Bytes")
        self.addr.append(addr if type(addr) is int and 0 <= addr <= _INT64 else as_int(addr, -1))
        self.delta.append(delta if type(delta) is int else as_int(delta, 0))  # the caller checked its range
        allocated, reserved = args.get("Total Allocated"), args.get("Total Reserved")
        if allocated is not None:
            self.with_allocated += 1
        if reserved is not None:
            self.with_reserved += 1
        self.total_allocated.append(
            allocated if type(allocated) is int and 0 <= allocated <= _INT64 else as_int(allocated, -1)
        )
        self.total_reserved.append(
            reserved if type(reserved) is int and 0 <= reserved <= _INT64 else as_int(reserved, -1)
        )


_NUMBER_CHARS = frozenset("0123456789.-")
_KEEP_NUMBERS = {code: (code if chr(code) in _NUMBER_CHARS else 32) for code in range(128)}
_ONES = str.maketrans("23456789", "11111111")
# Given that int() or float() accepts each token, these are what JSON's number grammar forbids on top:
# leading zeros, a '.' without digits on both sides. (Digits 1-9 are first mapped to '1'.)
_NOT_JSON = (" 00", " 01", "-00", "-01", " .", "-.", ". ")
_MEMORY_NEEDLE = '"[memory]"'
# Chars of the first bulk try, doubled after each success: a short first try bounds the work lost when a
# run does not fit (then `_ONE_BY_ONE` events are read singly before the next bulk try).
_FIRST_SPAN = 8 << 10
_MAX_SPAN = 512 << 10
_ONE_BY_ONE = 8
# Chars one event in either layout can take: the template's ~290 and ten numbers that int64 and float hold.
# A separator is looked for no further when reading one event: in a trace without Kineto's separators (one
# re-indented by another tool) the search ran to the window's end at each event, quadratic in the window.
_MAX_EVENT_CHARS = 1 << 12
# Layouts learned per indentation, and events that taught nothing, before the reader stops learning there:
# a file of odd events then costs a few failed tries, not one per event.
_MAX_LEARNED = 4
_MAX_FAILED_LESSONS = 16
_MAX_INDENTS = 4
_INF = float("inf")


class _Frame:
    """What runs of elements look like at one indentation, or on one line: the separator between two
    elements, the length of an element's closing text before it ("\\n" + indent + "}", or "}"), and the
    layouts read there."""

    def __init__(self, sep: str, close: int, joiner: str, kineto: bool = False) -> None:
        self.sep = sep
        self.close = close
        self.joiner = joiner
        self.layouts: list[Layout] = list(KINETO_LAYOUTS) if kineto else []
        self.failed_lessons = 0

    @classmethod
    def indented(cls, indent: str) -> _Frame:
        """Elements opening at `indent`, first on their line."""
        return cls(f"\n{indent}}},\n{indent}{{", len(indent) + 2, ",\n" + indent, kineto=indent == "  ")

    @classmethod
    def one_line(cls, sep: str) -> _Frame:
        """Elements of a one-line array, `sep` ("}, {" as json.dumps writes, "},{" compact) between two."""
        return cls(sep, 1, sep[1:-1])

    def learn(self, event: str) -> bool:
        """Learn the layout of `event` (one memory event's text); False if it teaches nothing new."""
        if (
            len(self.layouts) >= len(KINETO_LAYOUTS) + _MAX_LEARNED
            or self.failed_lessons >= _MAX_FAILED_LESSONS
        ):
            return False
        layout = learn_layout(event, self.joiner)
        if layout is None or any(known.template == layout.template for known in self.layouts):
            self.failed_lessons += 1
            return False
        self.layouts.append(layout)
        return True


class MemoryRunReader:
    """Reads runs of `[memory]` events straight into `DeviceColumns`: in Kineto's layout, or in a layout
    learned from the file's first such event at each indentation (`memory_layouts`: a trace another tool
    re-indented, json.dumps(indent=4), keeps Kineto's keys in Kineto's order).

    `columns_for(device_type, device_id)` gives the columns of a device (the same the JSON path fills, so
    events keep their file order per device). `all_integral` turns False at the first fractional `ts`.
    `events` counts the events read here, none of them decoded as JSON.
    """

    def __init__(
        self,
        columns_for: Callable[[int, int], DeviceColumns],
        saw_pids: Callable[[int, int, set[int]], None] | None = None,
    ) -> None:
        self._columns_for = columns_for
        self._saw_pids = saw_pids  # (device type, device id, the processes of some of its events)
        self._indents: dict[str, _Frame] = {}
        self._one_lines: dict[str, _Frame] = {}  # per one-line separator
        self.events = 0
        self.all_integral = True

    def __call__(self, buf: str, pos: int, limit: int, one_line: str = "") -> int:
        """Read the memory events from `buf[pos]` (an element's "{", first on its line, or of a one-line
        array whose separator is `one_line`) that fit a layout and are followed by a separator before
        `limit`; return where the next element starts ("{"), or `pos` if none fit.

        On one line the separator ("}, {") may also be inside an event or a string; that costs nothing
        here, as a run is taken only where its text is exactly whole events of a layout joined by the
        separator's ", ", and the separator that follows it is then structure."""
        frame = self._frame(buf, pos, one_line)
        if frame is None:
            return pos
        sep_of, close, step = frame.sep, frame.close, len(frame.sep) - 1
        start, span = pos, _FIRST_SPAN
        while True:
            # In bulk: the whole elements within `span` chars, if they are all memory events that fit.
            sep = buf.rfind(sep_of, start, min(limit, start + span))
            if sep > start:
                count = buf.count(sep_of, start, sep) + 1
                if buf.count(_MEMORY_NEEDLE, start, sep) == count and self._read(
                    frame, buf[start : sep + close], count
                ):
                    start, span = sep + step, min(2 * span, _MAX_SPAN)
                    continue
            # One at a time, up to the first element that is not a fitting memory event (the decoder's).
            for _ in range(_ONE_BY_ONE):
                sep = buf.find(sep_of, start, min(limit, start + _MAX_EVENT_CHARS))
                if sep < 0 or buf.find(_MEMORY_NEEDLE, start, sep) < 0:
                    return start
                event = buf[start : sep + close]
                if not self._read(frame, event, 1) and not (
                    frame.learn(event) and self._read(frame, event, 1)
                ):
                    return start
                start = sep + step
            span = _FIRST_SPAN

    def _frame(self, buf: str, pos: int, one_line: str) -> _Frame | None:
        """The frame of the element at `pos`: of the one-line separator `one_line` ("}, {" or "},{"), or of
        the element's indentation, spaces only or tabs only (JSON whitespace, and a raw new line cannot be
        inside a string, so its separator is structure); None for any other."""
        if one_line:
            frame = self._one_lines.get(one_line)
            if frame is None and one_line in ("}, {", "},{"):
                frame = self._one_lines[one_line] = _Frame.one_line(one_line)
            return frame
        indent = buf[buf.rfind("\n", 0, pos) + 1 : pos]
        frame = self._indents.get(indent)
        if frame is not None or len(self._indents) >= _MAX_INDENTS:
            return frame
        if indent[:1] in (" ", "\t") and not indent.strip(indent[0]):
            frame = self._indents[indent] = _Frame.indented(indent)
        return frame

    def _read(self, frame: _Frame, text: str, count: int) -> bool:
        for layout in frame.layouts:
            if text.startswith(layout.head) and self._read_layout(text, count, layout):
                return True
        return False

    def _read_layout(self, text: str, count: int, layout: Layout) -> bool:
        if layout.finished_true:
            text = text.replace(layout.finished_false, layout.finished_true)
        tokens = text.translate(_KEEP_NUMBERS).split()
        if len(tokens) != count * layout.width:
            return False
        # The proof: the text is the layout with these tokens put in, and each is a JSON number.
        if layout.joiner.join([layout.template] * count) % tuple(tokens) != text:
            return False
        if not _json_numbers(tokens):
            return False
        width = layout.width
        try:
            columns = {
                field: array("q", map(int, tokens[index::width])) for index, field in layout.int_fields
            }
            ts = self._timestamps(tokens[layout.index("ts") :: width])
        except (ValueError, OverflowError):  # a fraction where an int goes, or too big: the JSON path's
            return False
        # Sizes no device holds and times at no place (a float past 1e308) are the JSON path's to skip,
        # each with its note.
        delta = columns["bytes"]
        if max(delta) > MAX_EVENT_BYTES or min(delta) < -MAX_EVENT_BYTES or not -_INF < sum(ts) < _INF:
            return False
        self._store(count, ts, columns)
        self.events += count
        return True

    def _timestamps(self, tokens: list[str]) -> array[float]:
        # JSON reads "5" as int 5 (float 5.0 here) and "5.0" as float; only "-0" vs "-0.0" tells them apart.
        fractional = sum(1 for token in tokens if "." in token)
        if fractional == 0:
            return array("d", map(float, map(int, tokens)))
        values = (
            array("d", map(float, tokens))
            if fractional == len(tokens)
            else array("d", [float(token) if "." in token else float(int(token)) for token in tokens])
        )
        if self.all_integral and not all(map(float.is_integer, values)):
            self.all_integral = False
        return values

    def _store(self, count: int, ts: array[float], columns: dict[str, array[int]]) -> None:
        missing = array("q", [-1]) * count
        keys = list(zip(columns["device_type"], columns["device_id"], strict=True))
        devices = dict.fromkeys(keys)
        for key in devices:
            target = self._columns_for(*key)
            pick: Callable[[array[Any]], array[Any]] = _whole
            if len(devices) > 1:  # CPU and GPU events interleaved: each device gets its rows, in order
                pick = _picker([row for row, row_key in enumerate(keys) if row_key == key])
            target.ts.extend(pick(ts))
            if self._saw_pids is not None:
                self._saw_pids(*key, set(pick(columns["pid"])))
            target.delta.extend(pick(columns["bytes"]))
            target.addr.extend(pick(columns.get("addr", missing)))
            allocated, reserved = columns.get("allocated"), columns.get("reserved")
            picked_allocated = pick(allocated if allocated is not None else missing)
            target.total_allocated.extend(picked_allocated)
            target.total_reserved.extend(pick(reserved if reserved is not None else missing))
            if allocated is not None:
                target.with_allocated += len(picked_allocated)
            if reserved is not None:
                target.with_reserved += len(picked_allocated)


def _json_numbers(tokens: list[str]) -> bool:
    """Whether tokens made of digits, '.' and '-' that int()/float() accept are JSON numbers."""
    joined = " " + " ".join(tokens).translate(_ONES) + " "
    return not any(pattern in joined for pattern in _NOT_JSON)


def _whole(column: array[Any]) -> array[Any]:
    return column


def _picker(rows: list[int]) -> Callable[[array[Any]], array[Any]]:
    return lambda column: array(column.typecode, map(column.__getitem__, rows))
