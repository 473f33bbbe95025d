"""The bulk reader of Kineto-layout `[memory]` runs gives exactly the columns a plain JSON parse gives."""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzers.readers import chrome_trace, json_stream
from analyzers.readers.chrome_trace import read_chrome_trace
from kvtrace.cli import main
from kvtrace.errors import KvtraceError
from tests.same_source import assert_same_devices

NEW = (
    '{\n    "ph": "i",\n    \n    "cat": "cpu_instant_event",\n    "s": "t",\n    "name": "[memory]",\n'
    '    "pid": 7,\n    "tid": 7,\n    "ts": %s\n    ,\n    "args": {\n      "Total Reserved": %d,'
    ' "Total Allocated": %d, "Bytes": %d, "Device Id": %d, "Device Type": %d, "Addr": %d, "finished": %s,'
    ' "Ev Idx": %d\n    }\n  }'
)
OLD = (
    '{\n    "ph": "i", "s": "t", "name": "[memory]",\n    "pid": 7, "tid": 7,\n    "ts": %s,\n'
    '    "args": {\n      "Device Type": %d, "Device Id": %d, "Bytes": %d\n    }\n  }'
)
STEP = (
    '{\n    "ph": "X", "cat": "user_annotation", "name": "ProfilerStep#%d", "pid": 7, "tid": 7,\n'
    '    "ts": %s, "dur": 5,\n    "args": {\n      "note": "a \\"[memory]\\" in a string"\n    }\n  }'
)


def _event(index: int, layout: str, ts: str, device: tuple[int, int] = (1, 0)) -> str:
    delta = (index % 5 - 2) * 64
    if layout == "old":
        return OLD % (ts, device[0], device[1], delta)
    finished = "true" if index % 3 else "false"
    return NEW % (ts, 2 << 20, 1000 + index, delta, device[1], device[0], 0x7F00 + index, finished, index)


def _write(path: Path, events: list[str]) -> Path:
    path.write_text('{\n  "traceEvents": [\n  ' + ",\n  ".join(events) + "\n  ]\n}\n")
    return path


def _reference(path: Path) -> dict[str, dict[str, list[Any]]]:
    """Columns per device from `json.load`, computed without the reader under test."""
    return _reference_columns(json.loads(path.read_text()))


def _reference_columns(trace: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    names = {0: "cpu", 1: "cuda"}
    columns: dict[str, dict[str, list[Any]]] = {}
    for event in trace["traceEvents"]:
        if event.get("name") != "[memory]":
            continue
        args = event["args"]
        if type(args["Bytes"]) is not int or abs(args["Bytes"]) > 2**56:
            continue  # no size a device holds: skipped with a note, on every path
        kind, index = names[args["Device Type"]], args["Device Id"]
        device = kind if kind == "cpu" or index < 0 else f"{kind}:{index}"
        column = columns.setdefault(device, {"ts": [], "addr": [], "delta": [], "allocated": []})
        column["ts"].append(float(event["ts"]))
        column["addr"].append(args.get("Addr", -1))
        column["delta"].append(args["Bytes"])
        column["allocated"].append(args.get("Total Allocated", -1))
    return columns


def _assert_same(path: Path) -> None:
    """The columns are json.load's (a trace in Kineto's layout read by the byte scan, any other streamed),
    and those of the whole-text reader the same."""
    source = read_chrome_trace(path, in_memory=False)
    assert_same_devices(source, read_chrome_trace(path, byte_scan=False))
    expected = _reference(path)
    assert sorted(d.device for d in source.devices) == sorted(expected)
    for device in source.devices:
        want = expected[device.device]
        order = np.argsort(np.asarray(want["ts"]), kind="stable")
        np.testing.assert_array_equal(device.ts_us, np.asarray(want["ts"])[order])
        np.testing.assert_array_equal(device.addr, np.asarray(want["addr"], dtype=np.int64)[order])
        np.testing.assert_array_equal(device.delta_bytes, np.asarray(want["delta"], dtype=np.int64)[order])
        if device.total_allocated is not None:
            allocated = np.asarray(want["allocated"], dtype=np.int64)[order]
            np.testing.assert_array_equal(device.total_allocated, allocated)
    assert source.meta["trace_events"] == len(json.loads(path.read_text())["traceEvents"])


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("ts_form", ["%d.%03d", "%d"])
def test_runs_match_plain_json(tmp_path: Path, layout: str, ts_form: str) -> None:
    events = [
        _event(i, layout, ts_form % ((5_000_000 + i, i % 1000) if "." in ts_form else (5_000_000 + i,)))
        for i in range(3000)
    ]
    _assert_same(_write(tmp_path / "t.json", events))


def test_odd_spacing_key_order_floats_and_negative_ids_fall_back_exactly(tmp_path: Path) -> None:
    events = []
    for i in range(400):
        plain = _event(i, "new", f"{100 + i}.5", device=(0, -1) if i % 2 else (1, 3))
        if i % 7 == 0:
            plain = plain.replace('"Bytes": ', '"Bytes":   ')  # odd spacing
        if i % 11 == 0:
            plain = plain.replace('"ph": "i",', '"s": "t", "ph": "i",', 1).replace('    "s": "t",\n', "", 1)
        if i % 13 == 0:
            plain = plain.replace('"Addr": ', '"Addr": 1.0e1, "X": ')  # a float where an int goes
        if i % 17 == 0:
            plain = plain.replace('"Device Id": 3', '"Device Id": -3')
        events.append(plain)
        if i % 50 == 0:
            events.append(STEP % (i, f"{100 + i}.25"))
    _assert_same(_write(tmp_path / "t.json", events))


def test_exact_json_numbers_only(tmp_path: Path) -> None:
    # "-0" vs "-0.0", many decimals, and a leading zero (not JSON: must be reported, not read).
    events = [_event(i, "new", ts) for i, ts in enumerate(["-0", "-0.0", "0.1234567890123", "1e3", "7"])]
    _assert_same(_write(tmp_path / "ok.json", events))
    bad = _write(tmp_path / "bad.json", [_event(0, "new", "1.5"), _event(1, "new", "01.5")])
    with pytest.raises(Exception, match=r"bad\.json"):
        read_chrome_trace(bad)


def test_events_split_across_the_window_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_stream, "_CHUNK_BYTES", 4096 + 123)  # many windows, events cut at odd places
    events = [_event(i, "new" if i % 400 < 300 else "old", f"{i}.{i % 10}") for i in range(2000)]
    _assert_same(_write(tmp_path / "t.json", events))


def test_mixed_devices_interleaved_keep_their_order(tmp_path: Path) -> None:
    events = [_event(i, "new", f"{i // 3}.0", device=(i % 2, i % 2 - 1)) for i in range(1000)]
    _assert_same(_write(tmp_path / "t.json", events))


class _CountedText(str):
    """A window of text that adds up the characters its searches cover: the reader's work, counted without
    a clock. Slices and joins of it are plain strings, as the reader's own are."""

    scanned = 0

    def _span(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = start or 0
        return start, max(start, len(self) if end is None else min(end, len(self)))

    def find(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        start, end = self._span(start, end)
        found = super().find(sub, start, end)
        _CountedText.scanned += (end if found < 0 else found + len(sub)) - start  # up to the match
        return found

    def rfind(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        start, end = self._span(start, end)
        found = super().rfind(sub, start, end)
        _CountedText.scanned += end - (start if found < 0 else found)  # back to the match
        return found

    def count(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        start, end = self._span(start, end)
        _CountedText.scanned += end - start
        return super().count(sub, start, end)


class _CountedStream(json_stream.JsonStream):
    def _fill(self) -> None:
        super()._fill()
        self.buf = _CountedText(self.buf)


def _chars_scanned(path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """`body` written to `path` and streamed in windows of 256 KiB (`_assert_same`): the characters its
    finds and counts went over."""
    path.write_text(body)
    monkeypatch.setattr(json_stream, "_CHUNK_BYTES", 256 << 10)
    monkeypatch.setattr(chrome_trace, "JsonStream", _CountedStream)
    monkeypatch.setattr(_CountedText, "scanned", 0)
    _assert_same(path)
    return _CountedText.scanned


@pytest.mark.parametrize("kineto_tail", [False, True])
def test_reindented_trace_is_read_in_linear_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kineto_tail: bool
) -> None:
    # GIVEN a trace that another tool re-indented (json.dumps(indent=4)): its events still open the way
    # Kineto's do ("{\n    "), but no Kineto separator is left, so neither fast path can take any of them
    # (and, with `kineto_tail`, Kineto-layout events follow in the same window). Looking for a separator at
    # each event ran to the window's end, or to the far one: a sample run's 11 MB trace took 19 s, not 0.5.
    events = []
    for i in range(3000):
        events.append(json.loads(_event(i, "new", f"{i}.5")))
        if i % 3 == 0:
            events.append(
                {"ph": "X", "cat": "kernel", "name": f"gemm_{i}", "pid": 7, "tid": 7, "ts": i, "dur": 1}
            )
    body = json.dumps({"traceEvents": events}, indent=4)
    if kineto_tail:
        tail = ",\n  ".join(_event(i, "new", f"{i}.5") for i in range(3000, 3010))
        body = body[: body.rindex("]")].rstrip() + ",\n  " + tail + "\n  ]\n}\n"
    # WHEN it is read THEN the columns are json.load's, for a few passes over the text (it was 100s of passes)
    assert _chars_scanned(tmp_path / "t.json", body, monkeypatch) < 20 * len(body)


@pytest.mark.parametrize("indent", [4, 3, 2])
def test_reindented_trace_skips_the_events_it_does_not_keep(indent: int) -> None:
    # GIVEN a trace another tool re-indented (json.dumps(indent=4): events at 8 spaces, not Kineto's 2),
    # three kernels before each memory event, which ends the array
    events: list[dict[str, Any]] = []
    for i in range(300):
        for k in range(3):
            events.append({"ph": "X", "cat": "kernel", "name": f"gemm_{i}_{k}", "pid": 7, "ts": i, "dur": 1})
        events.append(json.loads(_event(i, "new", f"{i}.5")))
    text = json.dumps({"traceEvents": events}, indent=indent)
    stream = json_stream.JsonStream(io.BytesIO(text.encode()), "t.json")
    stream.expect("{", "the top")
    assert stream.value("the top") == "traceEvents"
    stream.expect(":", "the top")
    decoded: list[Any] = []
    # WHEN its events are walked with the reader's needles
    skipped = stream.each_element("traceEvents", decoded.append, ('"[memory]"',))
    # THEN every kernel is skipped undecoded, as in Kineto's own layout (each was decoded: ~2.8x the time),
    # and the memory events are json.load's, in order
    assert skipped == 900
    assert decoded == [e for e in events if e["name"] == "[memory]"]


_ONE_LINE = {"one-line": {}, "compact": {"separators": (",", ":")}}


def _walk(text: str) -> tuple[int, list[Any]]:
    """(skipped, decoded) of the trace's events walked with the reader's needles."""
    stream = json_stream.JsonStream(io.BytesIO(text.encode()), "t.json")
    stream.expect("{", "the top")
    while stream.value("the top") != "traceEvents":  # a recorded trace's other keys come first
        stream.expect(":", "the top")
        stream.value("the top")
        stream.expect(",", "the top")
    stream.expect(":", "the top")
    decoded: list[Any] = []
    needles, plain = chrome_trace._NEEDLES, chrome_trace._PLAIN_NEEDLES  # the reader's own
    skipped = stream.each_element("traceEvents", decoded.append, needles, plain_needles=plain)
    return skipped, decoded


def _kept(event: dict[str, Any]) -> bool:
    """Whether the reader keeps the event: a begin or end, or one holding a needle substring."""
    text = json.dumps(event)
    return event.get("ph") in ("B", "E") or any(
        n in text for n in ('"[memory]"', "ProfilerStep#", "kvtrace/")
    )


@pytest.mark.parametrize("form", list(_ONE_LINE))
def test_one_line_sample_trace_skips_its_kernels_and_reads_as_recorded(tmp_path: Path, form: str) -> None:
    # GIVEN a sample run's recorded trace, loaded and dumped back on one line by a script (json.dump(obj), or
    # compact): no layout to skip by, so every event was decoded (~1x json.load)
    recorded = next(
        (Path(__file__).parents[2] / "sample_traces" / "dynamic_b2" / "profiler").glob("*.json.gz")
    )
    trace = json.loads(gzip.decompress(recorded.read_bytes()))
    events = trace["traceEvents"]
    text = json.dumps(trace, **_ONE_LINE[form])
    # WHEN its events are walked with the reader's needles
    skipped, decoded = _walk(text)
    # THEN what is decoded holds every event kept, in order, and what is skipped is events we do not keep:
    # every one not decoded, most of the trace
    kept = [e for e in events if _kept(e)]
    assert [e for e in decoded if _kept(e)] == kept
    assert skipped + len(decoded) == len(events)
    assert skipped > 0.9 * (len(events) - len(kept))
    # AND the report of the one-line copy is the recorded trace's, byte for byte (paths masked)
    copy = tmp_path / recorded.name
    copy.write_bytes(gzip.compress(text.encode()))
    outputs = []
    for path in (recorded, copy):
        done = subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", "report", str(path), "--json", "-q"],
            capture_output=True,
            check=True,
        )
        outputs.append(done.stdout.replace(str(path).encode(), b"<trace>"))
    assert outputs[0] == outputs[1]


_ADVERSARIAL = [
    # an array of objects in args, whose "}, {" is inside an event
    {"ph": "X", "name": "k", "args": {"list": [{"ph": 1}, {"ph": 2}, {"ph": 3}]}},
    # an array whose objects follow a number, and an empty object at the top of an array
    {"ph": "X", "name": "k2", "args": {"list": [1, {"a": 1}, {"b": {}}], "e": [{}]}},
    # names holding separators, braces and brackets, unbalanced
    {"ph": "X", "name": "a}, {b", "args": {}},
    {"ph": "X", "name": "}},{", "args": {"x": "]]"}},
    {"ph": "X", "name": "{{[", "args": {"list": [{"ph": 1}, {"ph": 2}]}},
    # strings balancing an array of objects' braces, so that counts alone would pass
    {"ph": "X", "name": "}]", "args": {"list": [{"ph": 4}, {"ph": 5}]}, "tail": "[{"},
    {"ph": "X", "name": "x}, {}, {", "args": {"y": '}, {"ph": 6}, {'}},
    # a needle inside a string of an event we do not keep, escaped quotes and backslashes
    {"ph": "X", "name": 'not "[memory]" at all', "args": {"path": "C:\\dir\\}, {"}},
    {"ph": "X", "name": "plain", "args": {"k": 1}},
]


@pytest.mark.parametrize("form", list(_ONE_LINE))
def test_one_line_adversarial_events_read_as_json_load_reads_them(form: str) -> None:
    # GIVEN a one-line trace whose kernels hide "}, {" inside arrays of objects and strings, with strings
    # whose braces balance the structure's, between plain kernels and memory events
    events: list[Any] = []
    for i in range(40):
        events.extend(
            {"ph": "X", "cat": "kernel", "name": f"gemm_{i}_{k}", "ts": i, "dur": 1} for k in range(3)
        )
        events.append(_ADVERSARIAL[i % len(_ADVERSARIAL)])
        events.append({"ph": "X", "cat": "kernel", "name": f"after_{i}", "args": {"grid": [1, 2, 3]}})
        events.append(json.loads(_event(i, "new", f"{i}.5")))
    text = json.dumps({"traceEvents": events}, **_ONE_LINE[form])
    # WHEN its events are walked with the reader's needles
    skipped, decoded = _walk(text)
    # THEN nothing is lost or misread: every event is skipped or decoded, as json.load reads it, in order
    assert skipped + len(decoded) == len(events)
    assert [e for e in decoded if e.get("name") == "[memory]"] == [
        e for e in events if e.get("name") == "[memory]"
    ]
    for event in decoded:
        assert event in events
    # AND the plain kernels are skipped (at least the three before each tricky event)
    assert skipped >= 3 * 40


def _dump(trace: dict[str, Any], form: str) -> str:
    """The trace as `form` writes it: Kineto's own layout (events at two spaces), re-indented by json.dumps,
    or on one line with any of json.dumps's separators."""
    if form == "kineto":
        events = ",\n  ".join(json.dumps(e, indent=2).replace("\n", "\n  ") for e in trace["traceEvents"])
        return '{\n  "traceEvents": [\n  ' + events + "\n  ]\n}\n"
    return json.dumps(trace, **_FORMS[form])


_FORMS: dict[str, dict[str, Any]] = {
    "kineto": {},
    "indent=4": {"indent": 4},
    "indent=2": {"indent": 2},
    "tab": {"indent": "\t"},
    "one-line": {},
    "compact": {"separators": (",", ":")},
    "one-line ', ' ':'": {"separators": (", ", ":")},
    "one-line ',' ': '": {"separators": (",", ": ")},
}
# How a tool may write the phase member, beside the form's own spacing ({colon}): the key escaped, other
# JSON whitespace around the colon.
_PHASE_SPELLINGS = (
    '"ph"{colon}"{phase}"',
    '"ph" :  "{phase}"',
    '"ph"\t:\t"{phase}"',
    '"ph":\n"{phase}"',
    '"ph" :"{phase}"',
    '"\\u0070h"{colon}"{phase}"',
    '"p\\u0068" : "{phase}"',
)


@pytest.mark.parametrize("form", list(_FORMS))
def test_begin_end_events_are_kept_in_every_layout_and_spelling(form: str) -> None:
    # GIVEN a trace of kernels, memory events and begin/end events (which the reader keeps: an E closes the
    # innermost open range of its thread, so one missed shifts a step's end), in each layout the reader's
    # bulk skip accepts, the phase member written with every spacing and key escape JSON allows
    events: list[dict[str, Any]] = []
    for i in range(70):
        events.extend({"ph": "X", "cat": "kernel", "name": f"k{i}_{k}", "ts": i, "dur": 1} for k in range(3))
        events.append(
            {"ph": f"@{i}@", "cat": "user_annotation", "name": f"range_{i // 2}", "pid": 1, "ts": i}
        )
        if i % 7 == 0:
            events.append(json.loads(_event(i, "new", f"{i}.5")))

    def spell(match: re.Match[str]) -> str:
        i = int(match.group(2))
        spelling = _PHASE_SPELLINGS[i // 2 % len(_PHASE_SPELLINGS)]
        return spelling.format(colon=match.group(1), phase="BE"[i % 2])

    text = re.sub(r'"ph"(\s*:\s*)"@(\d+)@"', spell, _dump({"traceEvents": events}, form))
    # WHEN its events are walked with the reader's needles
    skipped, decoded = _walk(text)
    # THEN the begin and end events decoded are json.load's, every one, in order, and the kernels are
    # skipped undecoded (the walk did skip: the needles, not decoding everything, found them)
    loaded = json.loads(text)["traceEvents"]
    want = [e for e in loaded if e.get("ph") in ("B", "E")]
    assert len(want) == 70
    assert [e for e in decoded if e.get("ph") in ("B", "E")] == want
    assert skipped + len(decoded) == len(loaded)
    assert skipped >= 0.9 * 3 * 70


@pytest.mark.parametrize("form", ["kineto", "indent=4", "tab", "one-line", "compact"])
def test_events_holding_b_or_e_but_not_as_their_phase_are_skipped(form: str) -> None:
    # GIVEN kernels holding "B" and "E" as strings, but not as a member's value (a key, an array's element)
    # or, on one line, as another key's value: the old needles '"B"' and '"E"' had every one decoded
    events: list[dict[str, Any]] = []
    for i in range(50):
        args = {"B": i, "E": 2, "layout": ["B", "E"]}
        events.append({"ph": "X", "cat": "kernel", "name": f"gemm_{i}", "ts": i, "dur": 1, "args": args})
        if form in ("one-line", "compact"):  # as another key's value: the key is read there, no escape
            events.append({"ph": "X", "cat": "kernel", "name": "E", "ts": i, "args": {"B": "B"}})
        events.append(json.loads(_event(i, "new", f"{i}.5")))
    text = _dump({"traceEvents": events}, form)
    # WHEN its events are walked with the reader's needles
    skipped, decoded = _walk(text)
    # THEN only the memory events are decoded, as json.load reads them; every kernel is skipped
    assert decoded == [e for e in events if e["name"] == "[memory]"]
    assert skipped == len(events) - 50


@pytest.mark.parametrize("form", ["kineto", "indent=4", "tab"])
def test_layout_runs_are_whole_events_or_decoded(form: str) -> None:
    # GIVEN a laid-out trace of kernels and memory events where one kernel holds an array of objects
    # written at the events' own indentation (valid JSON: its lines look like events' separators), and
    # copies with a lost comma or a stray closing line between two kernels
    events: list[Any] = []
    for i in range(60):
        events.extend({"ph": "X", "cat": "kernel", "name": f"k{i}_{k}", "ts": i, "dur": 1} for k in range(3))
        events.append(json.loads(_event(i, "new", f"{i}.5")))
    text = _dump({"traceEvents": events}, form)
    indent = {"kineto": "  ", "indent=4": " " * 8, "tab": "\t\t"}[form]
    sep = f"\n{indent}}},\n{indent}{{"
    odd = f'"list": [\n{indent}{{"a": 1{sep}"b": 2{sep}"c": [3]\n{indent}}}\n]'
    nested = text.replace('"name": "k30_1"', '"name": "k30_1", ' + odd)
    assert nested != text
    # WHEN they are walked THEN every event is counted once and the kept ones are json.load's
    skipped, decoded = _walk(nested)
    loaded = json.loads(nested)["traceEvents"]
    assert skipped + len(decoded) == len(loaded)
    assert [e for e in decoded if e["name"] == "[memory]"] == [e for e in loaded if e["name"] == "[memory]"]
    # AND the damaged copies are reported, not skipped
    at = text.index('"name": "k40_2"')
    at = text.rindex(sep, 0, at)
    for damaged in (
        text[:at] + sep.replace(",", "") + text[at + len(sep) :],
        text[:at] + sep[:-1] + "}" + sep + text[at + len(sep) :],
    ):
        with pytest.raises(KvtraceError, match="corrupt JSON"):
            _walk(damaged)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda t: t.replace(
                '}, {"ph": "X", "cat": "kernel", "name": "gemm_5_1"',
                '}{"ph": "X", "cat": "kernel", "name": "gemm_5_1"',
            ),
            "corrupt JSON",
        ),
        (
            lambda t: t.replace(
                '}, {"ph": "X", "cat": "kernel", "name": "gemm_5_1"',
                '}, 7, {"ph": "X", "cat": "kernel", "name": "gemm_5_1"',
            ),
            "",
        ),
        (lambda t: t[: t.index('"gemm_250_1"')], "truncated"),
    ],
)
def test_one_line_damage_between_events_is_reported(damage: Callable[[str], str], message: str) -> None:
    # GIVEN a one-line trace of kernels and memory events, damaged between two kernels (a lost comma, a
    # stray value) or cut
    events: list[Any] = []
    for i in range(300):
        events.extend(
            {"ph": "X", "cat": "kernel", "name": f"gemm_{i}_{k}", "ts": i, "dur": 1} for k in range(3)
        )
        events.append(json.loads(_event(i, "new", f"{i}.5")))
    text = damage(json.dumps({"traceEvents": events}))
    # WHEN it is walked THEN the damage is reported (a stray number is an element, decoded: not skipped)
    if not message:
        _, decoded = _walk(text)
        assert 7 in decoded
        return
    with pytest.raises(KvtraceError, match=message):
        _walk(text)


@pytest.mark.parametrize("form", list(_ONE_LINE))
def test_one_line_trace_that_defeats_the_skip_is_read_in_linear_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    # GIVEN a one-line trace where every other kernel has a "{lambda" name or an array of objects (neither
    # can be skipped: each is decoded), and the memory events are far apart
    events: list[Any] = []
    for i in range(6000):
        name = f"kernel_{i}::{{lambda(float)#1}}" if i % 4 == 0 else f"gemm_{i}"
        args: dict[str, Any] = {"list": [{"a": i}, {"b": i}]} if i % 4 == 2 else {"grid": [1, 2, 3]}
        events.append({"ph": "X", "cat": "kernel", "name": name, "ts": i, "dur": 1, "args": args})
        if i % 1000 == 999:
            events.append(json.loads(_event(i, "new", f"{i}.5")))
    body = json.dumps({"traceEvents": events}, **_ONE_LINE[form])
    # WHEN it is read THEN the columns are json.load's, for a few passes over the text
    assert _chars_scanned(tmp_path / "t.json", body, monkeypatch) < 30 * len(body)


ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TRACE = next((ROOT / "sample_traces" / "dynamic_b2" / "profiler").glob("*.pt.trace.json.gz"))
WORKER0 = ROOT.parent / "shared" / "real_traces" / "chrome" / "worker0.1623143089861.pt.trace.json.gz"


class _CountedRuns(chrome_trace.MemoryRunReader):
    """The reader of memory runs, kept where the test can see how many events it read undecoded."""

    last: chrome_trace.MemoryRunReader | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _CountedRuns.last = self


def _report(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    return capsys.readouterr().out.replace(str(path), "<trace>")


def _assert_read_as_recorded(
    source: Any,
    copy: Path,
    original: Path,
    trace: dict[str, Any],
    memory: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nearly all of `copy`'s `memory` events taken by the run scan (those cut by a 1 MiB window's edge, or
    followed by "]", are decoded), every column the byte scan's of `original` and json.load's of `trace`, and
    the report the original's."""
    runs = _CountedRuns.last
    assert runs is not None
    assert memory - 20 <= runs.events <= memory
    assert_same_devices(source, read_chrome_trace(original))  # Kineto's own text, read by the byte scan
    for device, want in _reference_columns(trace).items():  # and json.load's, in the trace's time order
        (read,) = [d for d in source.devices if d.device == device]
        order = np.argsort(np.asarray(want["ts"]), kind="stable")
        np.testing.assert_array_equal(read.delta_bytes, np.asarray(want["delta"], dtype=np.int64)[order])
        np.testing.assert_array_equal(read.addr, np.asarray(want["addr"], dtype=np.int64)[order])
    # AND the report says exactly what it says of the trace as torch wrote it
    assert _report(copy, capsys) == _report(original, capsys)


@pytest.mark.parametrize(
    ("original", "dump"),
    [
        (SAMPLE_TRACE, {"indent": 4}),
        (SAMPLE_TRACE, {"indent": 2}),
        (SAMPLE_TRACE, {"indent": "\t"}),
        (WORKER0, {"indent": 4}),
        *((trace, _ONE_LINE[form]) for trace in (SAMPLE_TRACE, WORKER0) for form in _ONE_LINE),
    ],
    ids=[
        "sample-indent4",
        "sample-indent2",
        "sample-tab",
        "worker0-2021-layout-indent4",
        *(f"{name}-{form}" for name in ("sample", "worker0-2021-layout") for form in _ONE_LINE),
    ],
)
def test_rewritten_real_trace_memory_events_are_read_without_decoding(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    original: Path,
    dump: dict[str, Any],
) -> None:
    # GIVEN a real trace (a sample run's, 2024+ layout with Addr and totals; torch's 2021 layout without)
    # re-indented by another tool, or loaded and dumped back on one line by a script (json.dumps(obj), or
    # compact): its memory events keep Kineto's keys, in other whitespace or none
    if not original.exists():
        pytest.skip(f"{original} is not here")
    trace = json.loads(gzip.decompress(original.read_bytes()))
    memory = sum(1 for event in trace["traceEvents"] if event.get("name") == "[memory]")
    assert memory > 3000
    copy = tmp_path / "rewritten.pt.trace.json"
    copy.write_text(json.dumps(trace, **dump))
    monkeypatch.setattr(chrome_trace, "MemoryRunReader", _CountedRuns)
    # WHEN it is streamed (the fallback path for a text too big to hold whole: not Kineto's layout)
    source = read_chrome_trace(copy, in_memory=False)
    assert source.meta["reader"] == "json_stream"
    # THEN nearly all its memory events are taken by the run scan, not decoded one by one (all were: those
    # cut by a 1 MiB window's edge, or followed by "]", still are), and every column is the byte scan's
    _assert_read_as_recorded(source, copy, original, trace, memory, capsys)


@pytest.mark.parametrize(
    "form", ["indent=4", *(form for form in _FORMS if form.startswith(("one-line", "compact")))]
)
def test_a_learned_layout_reads_only_what_json_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    # GIVEN memory events re-indented, or on one line (json.dumps's separators, compact, and both mixed),
    # some in forms the learned layout must not take: a key escaped, a number in exponent form, a leading
    # zero (not JSON), a string for a number, an extra key, a size no device holds, keys in another order;
    # and a step whose string names "[memory]"
    events: list[dict[str, Any]] = [json.loads(_event(i, "new", f"{i}.5")) for i in range(600)]
    events[3]["args"]["Bytes"] = 2**60
    events[5]["args"]["Bytes"] = "64"
    events[7]["args"]["extra"] = 1
    events[9] = {"name": "[memory]", **{k: v for k, v in events[9].items() if k != "name"}}
    events.insert(11, json.loads(STEP % (1, "11.25")))
    text = _dump({"traceEvents": events}, form)
    colon = _FORMS[form].get("separators", (", ", ": "))[1]
    text = re.sub(rf'"Ev Idx"{colon}20\b', f'"Ev \\\\u0049dx"{colon}20', text)
    text = text.replace(f'"Addr"{colon}32552,', f'"Addr"{colon}3.2552e4,')
    assert text.count("\\u0049") == 1 and text.count("3.2552e4") == 1
    path = tmp_path / "t.json"
    path.write_text(text.replace(f'"ts"{colon}40.5,', f'"ts"{colon}040.5,', 1))
    with pytest.raises(Exception, match=r"t\.json"):
        read_chrome_trace(path)  # the leading zero: corrupt JSON, as json.load says
    path.write_text(text)
    monkeypatch.setattr(chrome_trace, "MemoryRunReader", _CountedRuns)
    # WHEN read THEN the columns are json.load's (the impossible size skipped with a note, as decoded)
    _assert_same(path)
    # AND the scan took every memory event but those five (3, 5, 7, 20, 40: event 9's key order is learned)
    # and the last, which "]" follows
    assert _CountedRuns.last is not None and _CountedRuns.last.events == 600 - 5 - 1
    assert read_chrome_trace(path, in_memory=False).meta["skipped_events"] == {
        "[memory] with an impossible Bytes (over 2**56)": 1,
        "[memory] with a non-integer Bytes": 1,
    }


def _kineto_events(text: str) -> tuple[str, list[str], str]:
    """(head through '"traceEvents": [', each event's text as Kineto wrote it, the rest) of a Kineto trace."""
    begin = text.index('"traceEvents": [') + len('"traceEvents": [')
    end = text.rindex("\n  }") + len("\n  }")
    events = text[begin:end].split("\n  },\n  {")
    return text[:begin], [events[0], *(f"\n  {{{event}" for event in events[1:])], text[end:]


@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_impossible_sizes_and_times_are_skipped_alike_by_every_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # GIVEN a small trace in Kineto's own layout made of a sample run's events (the three before its first
    # memory event, its first 40 memory events, three kvtrace step ranges), in which one allocation's
    # Bytes is 2**60 (past any device) and another memory event's ts is 1e400 (past a float's range)
    head, events, tail = _kineto_events(gzip.decompress(SAMPLE_TRACE.read_bytes()).decode())
    memory = [index for index, event in enumerate(events) if '"name": "[memory]"' in event]
    steps = [index for index, event in enumerate(events) if '"name": "kvtrace/' in event][:3]
    kept = sorted({*memory[:40], *steps, *range(memory[0] - 3, memory[0])})
    chosen = [events[index].rstrip(",") for index in kept]
    chosen = [event if event.endswith("\n  }") else f"{event}\n  }}" for event in chosen]
    mine = [position for position, index in enumerate(kept) if index in memory]
    big = next(position for position in mine[4:] if '"Bytes": -' not in chosen[position])
    far = mine[9]
    chosen[big] = re.sub(r'"Bytes": \d+', f'"Bytes": {2**60}', chosen[big], count=1)
    chosen[far] = re.sub(r'"ts": [0-9.]+', '"ts": 1e400', chosen[far], count=1)
    text = head + ",".join(chosen) + tail
    trace = json.loads(text)
    # its four forms: as Kineto writes it (the byte scan), gzipped (the byte scan too), re-indented (the
    # streamed reader, memory events in runs), one line (the streamed reader, each event decoded)
    forms = {
        "plain.pt.trace.json": text.encode(),
        "gzipped.pt.trace.json.gz": gzip.compress(text.encode()),
        "indent4.pt.trace.json": json.dumps(trace, indent=4).encode(),
        "one_line.pt.trace.json": json.dumps(trace).encode(),
    }
    readers = {
        "plain": "byte_scan",
        "gzipped": "byte_scan",
        "indent4": "json_stream",
        "one_line": "json_stream",
    }
    monkeypatch.setattr(chrome_trace, "MemoryRunReader", _CountedRuns)
    outputs = {}
    for name, data in forms.items():
        path = tmp_path / name
        path.write_bytes(data)
        form = name.split(".")[0]
        _CountedRuns.last = None
        source = read_chrome_trace(path)
        assert source.meta["reader"] == readers[form], form
        # WHEN each is read THEN the two events are skipped, each with the JSON decoder's note
        assert source.meta["skipped_events"] == {
            "[memory] with an impossible Bytes (over 2**56)": 1,
            "[memory] with an infinite or NaN ts": 1,
        }, form
        if form == "indent4":  # the run reader took the 38 others, but the last, which no separator follows
            assert _CountedRuns.last is not None and _CountedRuns.last.events == 37
        args = [command, str(path), "--json"] + (["--no-export"] if command == "report" else [])
        assert main(args) == 0
        outputs[form] = json.loads(capsys.readouterr().out.replace(str(path), "<trace>"))
    # AND report / diagnose say the same of every form
    assert outputs["gzipped"] == outputs["plain"]
    assert outputs["indent4"] == outputs["plain"]
    assert outputs["one_line"] == outputs["plain"]
    # AND the figures are the running sum of the other 38 events' Bytes, in time order, from the least
    # level that keeps it at or above 0 (a CPU's totals are the profiler's counter, not followed)
    rows = sorted(
        (float(event["ts"]), event["args"]["Bytes"])
        for position, event in enumerate(trace["traceEvents"])
        if event.get("name") == "[memory]" and position not in (big, far)
    )
    assert len(rows) == 38
    delta = np.array([size for _, size in rows], dtype=np.int64)
    running = np.cumsum(delta)
    baseline = max(0, -int(running.min()))
    if command == "report":
        (cpu,) = outputs["plain"]["devices"]
        assert cpu["device"] == "cpu"
        assert cpu["alloc_events"] == int((delta > 0).sum())
        assert cpu["free_events"] == int((delta < 0).sum())
        assert cpu["peak_allocated_bytes"] == baseline + int(running.max())
        assert cpu["final_allocated_bytes"] == baseline + int(running[-1])
    else:
        assert outputs["plain"]["allocated_bytes"] == baseline + int(running.max())
