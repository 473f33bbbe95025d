"""Columns of `[memory]` events, and a bulk reader for runs of them in the exact layout Kineto writes.

Decoding each memory event as JSON (two dicts, a callback) is most of the time spent on a big trace, and
millions of them are written by one `fprintf` format. `MemoryRunReader` takes a run of consecutive events
in that layout as text, pulls out the numbers with C-level string operations (`translate`, `split`) and
proves the run is exactly the layout with those numbers filled in (`template % numbers == text`), each a
valid JSON number. So what it accepts is what `json` would have read, value for value; anything else (other
spacing, key order, strings for numbers, a `[memory]` inside another event) is left to the JSON decoder.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

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


# One event as Kineto writes it, "%s" where a number goes. Neither layout has a digit, '.' or '-' outside
# its numbers, which is what lets `translate` + `split` find them.
_NEW_LAYOUT = (
    '{\n    "ph": "i",\n    \n    "cat": "cpu_instant_event",\n    "s": "t",\n    "name": "[memory]",\n'
    '    "pid": %s,\n    "tid": %s,\n    "ts": %s\n    ,\n    "args": {\n'
    '      "Total Reserved": %s, "Total Allocated": %s, "Bytes": %s, "Device Id": %s, "Device Type": %s,'
    ' "Addr": %s, "finished": true, "Ev Idx": %s\n    }\n  }'
)
_OLD_LAYOUT = (  # before 2022: no Addr, no totals
    '{\n    "ph": "i", "s": "t", "name": "[memory]",\n    "pid": %s, "tid": %s,\n    "ts": %s,\n'
    '    "args": {\n      "Device Type": %s, "Device Id": %s, "Bytes": %s\n    }\n  }'
)
_ELEMENT_SEP = ",\n  "
_FINISHED_FALSE, _FINISHED_TRUE = '"finished": false', '"finished": true'
_NUMBER_CHARS = frozenset("0123456789.-")
_KEEP_NUMBERS = {code: (code if chr(code) in _NUMBER_CHARS else 32) for code in range(128)}
_ONES = str.maketrans("23456789", "11111111")
# Given that int() or float() accepts each token, these are what JSON's number grammar forbids on top:
# leading zeros, a '.' without digits on both sides. (Digits 1-9 are first mapped to '1'.)
_NOT_JSON = (" 00", " 01", "-00", "-01", " .", "-.", ". ")
_MEMORY_NEEDLE = '"[memory]"'
_KINETO_SEP = "\n  },\n  {"
# Chars of the first bulk try, doubled after each success: a short first try bounds the work lost when a
# run does not fit (then `_ONE_BY_ONE` events are read singly before the next bulk try).
_FIRST_SPAN = 8 << 10
_MAX_SPAN = 512 << 10
_ONE_BY_ONE = 8
# Chars one event in either layout can take: the template's ~290 and ten numbers that int64 and float hold.
# A separator is looked for no further when reading one event: in a trace without Kineto's separators (one
# re-indented by another tool) the search ran to the window's end at each event, quadratic in the window.
_MAX_EVENT_CHARS = 1 << 12


class _Layout:
    def __init__(self, template: str, fields: str) -> None:
        self.template = template
        self.head = template[: template.index("%s")]
        self.fields = fields.split()
        self.width = len(self.fields)
        self.finished = _FINISHED_TRUE in template
        # Every field but ts is converted with int(), so none is left unchecked; unused ones are dropped.
        self.int_fields = [(index, field) for index, field in enumerate(self.fields) if field != "ts"]

    def index(self, field: str) -> int:
        return self.fields.index(field)


_LAYOUTS = (
    _Layout(_NEW_LAYOUT, "pid tid ts reserved allocated bytes device_id device_type addr ev_idx"),
    _Layout(_OLD_LAYOUT, "pid tid ts device_type device_id bytes"),
)


class MemoryRunReader:
    """Reads runs of `[memory]` events in Kineto's layout straight into `DeviceColumns`.

    `columns_for(device_type, device_id)` gives the columns of a device (the same the JSON path fills, so
    events keep their file order per device). `all_integral` turns False at the first fractional `ts`.
    """

    def __init__(
        self,
        columns_for: Callable[[int, int], DeviceColumns],
        saw_pids: Callable[[int, int, set[int]], None] | None = None,
    ) -> None:
        self._columns_for = columns_for
        self._saw_pids = saw_pids  # (device type, device id, the processes of some of its events)
        self.events = 0
        self.all_integral = True

    def __call__(self, buf: str, pos: int, limit: int) -> int:
        """Read the memory events from `buf[pos]` (an element's "{") that fit a layout and are followed by
        a separator before `limit`; return where the next element starts ("{"), or `pos` if none fit."""
        start, span = pos, _FIRST_SPAN
        while True:
            # In bulk: the whole elements within `span` chars, if they are all memory events that fit.
            sep = buf.rfind(_KINETO_SEP, start, min(limit, start + span))
            if sep > start:
                count = buf.count(_KINETO_SEP, start, sep) + 1
                if buf.count(_MEMORY_NEEDLE, start, sep) == count and self._read(buf[start : sep + 4], count):
                    start, span = sep + 8, min(2 * span, _MAX_SPAN)
                    continue
            # One at a time, up to the first element that is not a fitting memory event (the decoder's).
            for _ in range(_ONE_BY_ONE):
                sep = buf.find(_KINETO_SEP, start, min(limit, start + _MAX_EVENT_CHARS))
                if (
                    sep < 0
                    or buf.find(_MEMORY_NEEDLE, start, sep) < 0
                    or not self._read(buf[start : sep + 4], 1)
                ):
                    return start
                start = sep + 8
            span = _FIRST_SPAN

    def _read(self, text: str, count: int) -> bool:
        for layout in _LAYOUTS:
            if text.startswith(layout.head) and self._read_layout(text, count, layout):
                return True
        return False

    def _read_layout(self, text: str, count: int, layout: _Layout) -> bool:
        if layout.finished:
            text = text.replace(_FINISHED_FALSE, _FINISHED_TRUE)
        tokens = text.translate(_KEEP_NUMBERS).split()
        if len(tokens) != count * layout.width:
            return False
        # The proof: the text is the layout with these tokens put in, and each is a JSON number.
        if _ELEMENT_SEP.join([layout.template] * count) % tuple(tokens) != text:
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
