"""One JSON value at a time from a byte stream (`JsonStream`), holding only a window of the text.

Why apart from `analyzers.readers.sources` (which opens a file and tells what it is): this is the reader's
hot loop for Chrome traces of gigabytes, where most events are skipped undecoded by their Kineto layout
(issue 11: finding the memory events without building every JSON object).
"""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import IO, Any

from analyzers.readers.unescaped_names import repair_event
from kvtrace.errors import KvtraceError, too_long_integer

Needle = str | re.Pattern[str]  # what each_element looks for: one `str.find` or `re` pass per window
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_CHUNK_BYTES = 1 << 20
_LOOKAHEAD = 64  # chars that must follow a decoded value, so a number cut by a chunk edge is not misread
_MAX_VALUE_CHARS = 256 << 20  # one JSON value; a hostile one costs ~5x this in memory before it is refused
_KINETO_OPEN = "{\n    "
_KINETO_SEP = "\n  },\n  {"
_KINETO_CLOSE = "\n  }"
# From a point outside any string: the longest stretch whose strings hold no bracket, brace, quote or escape
# (possessive, so linear; Python 3.10 lacks `*+` and gets the same match by backtracking, slower). It ends
# outside a string, before the first string that holds one (or at the end of the range).
try:
    _PLAIN_STRINGS = re.compile(r'[^"]*+(?:"[^"\\{}\[\]]*+"[^"]*+)*+')
except re.error:  # pragma: no cover - Python 3.10
    _PLAIN_STRINGS = re.compile(r'[^"]*(?:"[^"\\{}\[\]]*"[^"]*)*')


def _layout(indent: str) -> tuple[str, str, str]:
    """(open, separator, close) of an array whose elements open at `indent`: Kineto's own for its
    two spaces, or those of a tool that re-indented the trace (json.dumps(indent=4) puts them at eight
    spaces, indent="\\t" at two tabs)."""
    if indent == "  " or not indent or indent.strip(indent[0]) or indent[0] not in " \t":
        return _KINETO_OPEN, _KINETO_SEP, _KINETO_CLOSE
    inner = indent + ("\t" if indent[0] == "\t" else "  ")
    return "{\n" + inner, f"\n{indent}}},\n{indent}{{", f"\n{indent}}}"


def _event_lines(sep: str, close: str) -> re.Pattern[str]:
    """What `_whole_events` finds in one pass: each line at event indentation that opens or closes an
    element, its group "{", "}" or, for a separator (`sep`: `close` + ",\n" + the same line opening the
    next element), the separator from its "}"."""
    line = close[:-1]  # "\n" and the indentation
    return re.compile(re.escape(line) + "(" + re.escape(sep[len(line) :]) + "|[{}])")


_KINETO_LINES = _event_lines(_KINETO_SEP, _KINETO_CLOSE)


def _whole_events(text: str, start: int, end: int, lines: re.Pattern[str] = _KINETO_LINES) -> int:
    """How many whole Kineto-style events text[start:end] (from an element's start to the closing brace
    of one that a separator follows, found by layout) is, or 0 where that is not proven: every line at
    event indentation that opens or closes an element is in a separator but the last, a close, and braces
    and brackets balance. Braces inside strings or a lost comma make it fail safe (the events are then
    decoded). One regex pass (`lines`, ~2.8x faster than counting separators, closes and opens apart)."""
    marks = lines.findall(text, start, end)
    if not marks or marks[-1] != "}" or marks.count("}") + marks.count("{") != 1:
        return 0
    balanced = text.count("{", start, end) == text.count("}", start, end) and text.count(
        "[", start, end
    ) == text.count("]", start, end)
    return len(marks) if balanced else 0


def _whole_one_line(text: str, start: int, end: int, sep: str, value_open: str) -> int:
    """How many whole elements of a one-line array text[start:end] is (an element's start to a "}" that
    `sep`'s ", {" or ",{" follows, in a stretch `_PLAIN_STRINGS` matched, so every brace in it is structure),
    or 0 where that is not proven.

    Every "{" but the first opens an object value (`value_open`, ": {") or an array element after an object
    (`sep`, "}, {"), and braces balance: the counts say so, as each "{" is counted at most once and the
    first (at `start`) is not. Then no "}, {" can be inside an event: an array of objects nested in one
    begins with an object ("[{") or reaches its first object after a non-object (", {" after no "}"), and
    either leaves a "{" uncounted (no pass of its own for "[{"). So each "}, {" is between events, and a
    lost comma ("}{"), garbage between events or a stray brace fails the count, to be decoded."""
    opens = text.count("{", start, end)
    if opens != text.count("}", start, end):
        return 0
    between = text.count(sep, start, end)
    return between + 1 if opens == 1 + text.count(value_open, start, end) + between else 0


def _find(text: str, needle: Needle, start: int) -> int:
    """Where `needle` (a substring or a pattern) is next in `text` from `start`; len(text) if nowhere."""
    if isinstance(needle, str):
        found = text.find(needle, start)
        return found if found >= 0 else len(text)
    match = needle.search(text, start)
    return match.start() if match else len(text)


def _one_line_separators(text: str, start: int) -> tuple[str, str]:
    """(between events, before an object value) of a one-line array whose first element starts here, by the
    separators after its first key: ("}, {", ": {") as json.dumps writes, ("},{", ":{") compact."""
    colon = text.find(":", start)
    comma = text.find(",", start)
    item = ", " if comma >= 0 and text.startswith(", ", comma) else ","
    key = ": " if colon >= 0 and text.startswith(": ", colon) else ":"
    return "}" + item + "{", key + "{"


def decode_failure(exc: Exception, where: str) -> str:
    """Why `json` refused a value inside `where`: corrupt JSON, a plain ValueError (CPython's limit on the
    digits of an int) or a RecursionError (the C decoder's depth limit, ~1,000 levels: of the file)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"corrupt JSON ({exc.msg}) inside {where}"
    if isinstance(exc, RecursionError):
        return f"JSON nested too deeply to read inside {where}"
    return f"corrupt JSON: {too_long_integer()} inside {where}"


def _dropped_int(text: str) -> int:
    return 0


class JsonStream:
    """One JSON value at a time from a byte stream, holding only a window of the text.

    Chrome traces reach gigabytes; `json.load` would hold every event as a dict. This walks arrays
    element by element with `json.JSONDecoder.raw_decode` (C speed) over a sliding window, so memory
    stays flat however long the array is. A value cut by the window's edge is retried after reading more;
    a decode error anywhere else is corruption and is reported at once, without reading the rest.
    """

    def __init__(self, binary: IO[bytes], path: str) -> None:
        self._binary = binary
        self._path = path
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        # For a value read only to be dropped: its syntax checked, an integer of any length taken (`int`
        # refuses more than 4,300 digits, which msgspec, reading a trace whole, does not check where it skips)
        self._dropping = json.JSONDecoder(parse_int=_dropped_int)
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.unescaped_names: Counter[str] = Counter()  # names read with their quotes escaped, per name

    def error(self, what: str) -> KvtraceError:
        return KvtraceError(f"{self._path}: {what}")

    def _fill(self) -> None:
        # Read at least as much as is pending, so one huge value costs O(n log n), not O(n^2).
        want = max(_CHUNK_BYTES, len(self.buf) - self.pos)
        data = self._binary.read(want)
        try:
            text = self._utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise self.error(f"not UTF-8 text ({exc.reason})") from None
        self.eof = not data
        self.buf = self.buf[self.pos :] + text
        self.pos = 0

    def peek(self) -> str:
        """The next non-whitespace character without consuming it; "" at the end of the input."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self._fill()

    def expect(self, allowed: str, where: str) -> str:
        char = self.peek()
        if not char:
            raise self.error(f"truncated: the JSON ends inside {where}")
        if char not in allowed:
            raise self.error(f"corrupt JSON: {char!r} at {where}, expected one of {allowed!r}")
        self.pos += 1
        return char

    def value(self, where: str, dropped: bool = False) -> Any:
        """The JSON value here; `dropped`: one the caller does not keep, whose integers are not made."""
        self.peek()
        decoder = self._dropping if dropped else self._decoder
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # Near the window's end the value may just continue in the next chunk; at the end of
                # the input, only an error at the very end (or an open string) means truncation.
                edge = len(self.buf.rstrip()) if self.eof else len(self.buf) - _LOOKAHEAD
                cut = exc.pos >= edge or exc.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    truncated = f"truncated: the JSON ends inside {where}"
                    raise self.error(truncated if self.eof and cut else decode_failure(exc, where)) from None
                if len(self.buf) - self.pos > _MAX_VALUE_CHARS:
                    raise self.error(f"corrupt JSON: one value in {where} exceeds 256 MiB") from None
                self._fill()
                continue
            except (ValueError, RecursionError) as exc:  # too many digits, or too deep (`decode_failure`)
                raise self.error(decode_failure(exc, where)) from None
            if end > len(self.buf) - _LOOKAHEAD and not self.eof:
                self._fill()
                continue
            self.pos = end
            return obj

    def each_element(
        self,
        where: str,
        on_element: Callable[[Any], None],
        needles: tuple[Needle, ...] | None = None,
        read_run: Callable[[str, int, int, str], int] | None = None,
        plain_needles: tuple[Needle, ...] | None = None,
    ) -> int:
        """Call `on_element` with each element of the array that starts here; return how many were
        skipped undecoded.

        With `needles`, runs of elements laid out the way Kineto writes events ("{\\n    " ... "\\n  }"
        separated by ",\\n  ") that contain no needle and whose braces and brackets balance are skipped
        undecoded, often a whole window at once: most events of a big trace are kernels and ops we do
        not keep. Raw newlines cannot occur inside JSON strings, so that separator is always structure.
        The same goes for a trace another tool re-indented, at the indentation of its first element
        (`_layout`: eight spaces for json.dumps(indent=4)). The price: damage inside an event we skip
        (garbage between its fields) goes unnoticed; a lost separator, unbalanced braces, truncation and
        gzip CRC errors are still reported.

        A one-line array (its first element on the "[" line, as json.dump(obj) writes, with ", " or compact
        ",") has no layout: "}, {" is also between the objects of an array inside an event, or in a string.
        There a run is skipped only up to the first string that holds a bracket, brace or escape
        (`_PLAIN_STRINGS`, a regex ~8x faster than decoding), so every bracket counted is structure, and only
        if `_whole_one_line` proves each "}, {" in it is between events; an event with such a string (a CUDA
        kernel's "::{lambda") or an array of objects is decoded. The same price as the layouts': damage
        inside a skipped event goes unnoticed; a lost comma or garbage between events, truncation and
        unbalanced braces are reported.
        Its needles are `plain_needles` where given: as no string of a run it skips holds an escape, a
        needle there may rely on keys being written as they read (`"ph"`, not `"\\u0070h"`).

        A needle is a substring or a compiled pattern (one `re` pass can beat two `str.find`s).

        With `read_run` too, an element in that layout (or on one line) holding a needle is first offered to
        `read_run(buf, pos, limit, one_line)`, `one_line` the one-line separator ("}, {" or "},{"; "" in a
        layout), which may take it and the elements after it without decoding (it must take only whole
        elements that are each followed by a separator before `limit`, proven so by their text, as on one
        line that separator may also be inside an event) and returns where the next element starts, or
        `pos` to leave the element to the JSON decoder.
        """
        self.expect("[", where)
        bracket = self.pos
        if self.peek() == "]":
            self.pos += 1
            return 0
        skipped = 0
        # The first element's indentation sets the layout the bulk skip looks for: a re-indented trace's
        # events are skipped as Kineto's are (every one was decoded: ~2.8x the time), and offered to
        # `read_run`, which learns the layout of their memory events.
        line = self.buf.rfind("\n", 0, self.pos)
        element_open, sep, close = _layout(self.buf[line + 1 : self.pos] if line >= 0 else "")
        lines = _event_lines(sep, close)
        value_open = ""
        one_line = "\n" not in self.buf[bracket : self.pos] and self.buf.startswith('{"', self.pos)
        if one_line:  # no layout: its own skip below, and `read_run` told the one-line separator
            sep, value_open = _one_line_separators(self.buf, self.pos)
            element_open = '{"'
            needles = plain_needles if plain_needles is not None else needles
        scan = self._decoder.scan_once  # type: ignore[attr-defined]
        whitespace = _WHITESPACE.match
        while True:
            buf, pos = self.buf, self.pos
            limit = len(buf) - _LOOKAHEAD
            needle_at = -1  # nearest needle at or after pos (len(buf): none in this window)
            next_needle = [-1] * len(needles or ())
            bulk_from = pos  # after a failed bulk skip, skip one element at a time up to here
            # The nearest separator at or after pos (len(buf): none in this window), and the last one before
            # `sep_stop`, kept as the needles are: a trace re-indented by another tool (json.dumps(indent=4))
            # has none, and looking for one again at each element read such a file in quadratic time.
            next_sep, last_sep, sep_stop = -1, -1, -1
            plain_to = -1  # one-line: where the stretch of bracket-free strings from an earlier pos ends
            while True:  # fast path: whole elements well inside the window
                pos = whitespace(buf, pos).end()  # type: ignore[union-attr]
                if pos >= limit:
                    break
                if one_line and needles is not None and buf.startswith('{"', pos):
                    if needle_at < pos:
                        for index, needle in enumerate(needles):
                            if next_needle[index] < pos:
                                next_needle[index] = _find(buf, needle, pos)
                        needle_at = min(next_needle)
                    # No separator before the needle: this element holds it, offered to `read_run` (memory
                    # events come in runs), else decoded. Else the last "}, {" before the first string with a
                    # bracket (or the needle, or the edge); after a failed run, the first, one element at a
                    # time up to where that run ended.
                    last = -1
                    if needle_at >= limit or buf.find(sep, pos, needle_at) >= 0:
                        if plain_to <= pos:  # pos is between events, so outside any string
                            plain = _PLAIN_STRINGS.match(buf, pos, min(needle_at, limit))
                            plain_to = plain.end()  # type: ignore[union-attr]
                        last = (
                            buf.rfind(sep, pos, plain_to)
                            if pos >= bulk_from
                            else buf.find(sep, pos, plain_to)
                        )
                    elif read_run is not None and needle_at < limit:  # this element holds the needle
                        after_run = read_run(buf, pos, limit, sep)
                        if after_run > pos:
                            pos = after_run
                            continue
                    run = _whole_one_line(buf, pos, last + 1, sep, value_open) if last > pos else 0
                    if run:
                        skipped += run
                        pos = last + 2  # past "}," of the last skipped element
                        continue
                    if last > pos and pos >= bulk_from:
                        bulk_from = last
                        first = buf.find(sep, pos, plain_to)
                        if _whole_one_line(buf, pos, first + 1, sep, value_open):
                            skipped += 1
                            pos = first + 2
                            continue
                elif needles is not None and buf.startswith(element_open, pos):
                    if needle_at < pos:  # each needle's next position is cached: one pass per window
                        for index, needle in enumerate(needles):
                            if next_needle[index] < pos:
                                next_needle[index] = _find(buf, needle, pos)
                        needle_at = min(next_needle)
                    stop = min(needle_at, limit)
                    if next_sep < pos:
                        found = buf.find(sep, pos, limit)
                        next_sep = found if found >= 0 else len(buf)
                    if next_sep + len(sep) > stop:  # no separator between here and stop
                        last_sep = -1
                    elif stop != sep_stop or last_sep < next_sep:
                        last_sep, sep_stop = buf.rfind(sep, pos, stop), stop
                    if last_sep > pos and pos >= bulk_from:
                        run = _whole_events(buf, pos, last_sep + len(close), lines)
                        if run:
                            skipped += run
                            pos = last_sep + len(close) + 1  # past "}," of the last skipped element
                            continue
                    if last_sep > pos:
                        bulk_from = last_sep
                        # The first separator in the run.
                        if _whole_events(buf, pos, next_sep + len(close), lines) == 1:
                            skipped += 1
                            pos = next_sep + len(close) + 1
                            continue
                    if read_run is not None and needle_at < limit and next_sep < limit:
                        after_run = read_run(buf, pos, limit, "")
                        if after_run > pos:
                            pos = after_run
                            continue
                try:
                    obj, end = scan(buf, pos)
                except (StopIteration, ValueError, RecursionError):  # JSONDecodeError, too many digits
                    break  # let the slow path decide: cut by the window's edge, corrupt, or too deep
                after = whitespace(buf, end).end()  # type: ignore[union-attr]
                if after >= limit:
                    break
                on_element(obj)
                if buf[after] == "]":
                    self.pos = after + 1
                    return skipped
                if buf[after] != ",":
                    self.pos = after
                    raise self.error(f"corrupt JSON: {buf[after]!r} in {where}, expected ',' or ']'")
                pos = after + 1
            self.pos = pos
            # Slow path for the element at the window's edge: decode it with refills.
            on_element(self._element(where))
            if self.expect(",]", where) == "]":
                return skipped

    def _element(self, where: str) -> Any:
        """The array element here; one that does not decode is read with its name's quotes escaped if it is
        a whole Kineto-layout event whose name torch wrote unescaped (`unescaped_names`), else reported."""
        try:
            return self.value(where)
        except KvtraceError:
            if not self.buf.startswith(_KINETO_OPEN, self.pos):
                raise
            close = self.buf.find(_KINETO_CLOSE, self.pos)
            while close < 0 and not self.eof and len(self.buf) - self.pos <= _MAX_VALUE_CHARS:
                self._fill()
                close = self.buf.find(_KINETO_CLOSE, self.pos)
            end = close + len(_KINETO_CLOSE)
            repaired = repair_event(self.buf[self.pos : end]) if close >= 0 else None
            if repaired is None:
                raise
            self.unescaped_names.update(repaired[1])
            self.pos = end
            return repaired[0]

    def end(self) -> None:
        if self.peek():
            raise self.error("corrupt JSON: extra data after the top-level value")
