"""A trace in another tool's layout is read whole (msgspec finds its events) exactly as the streaming reader
reads it, and any text msgspec would read otherwise than `json` is left to the streaming reader."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from analyzers.readers import chrome_trace, trace_in_memory
from analyzers.readers.chrome_trace import read_chrome_trace
from analyzers.readers.trace_in_memory import read_whole
from kvtrace.errors import KvtraceError
from tests.same_source import assert_same_devices

pytest.importorskip("msgspec")

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TRACE = next((REPO / "sample_traces" / "dynamic_b2" / "profiler").glob("*.pt.trace.json*"))
WORKER0 = REPO.parent / "shared" / "real_traces" / "chrome" / "worker0.1623143089861.pt.trace.json.gz"
_FORMS: dict[str, dict[str, Any]] = {
    "indent4": {"indent": 4},
    "one-line": {},
    "compact": {"separators": (",", ":")},
}


def _memory(index: int, device_type: int = 1) -> dict[str, Any]:
    return {
        "ph": "i",
        "name": "[memory]",
        "pid": 7,
        "tid": 7,
        "ts": 1000 + index,
        "args": {
            "Total Reserved": 2 << 20,
            "Total Allocated": 4096 + 64 * index,
            "Bytes": 64,
            "Device Id": 0,
            "Device Type": device_type,
            "Addr": 0x7F00 + index,
        },
    }


def _kernel(index: int) -> dict[str, Any]:
    return {"ph": "X", "cat": "kernel", "name": f"void k<{index}>::{{lambda}}", "pid": 1, "tid": 2,
            "ts": 1000 + index, "dur": 3, "args": {"grid": [index, 1, 1], "stream": 7}}  # fmt: skip


def _events() -> list[Any]:
    """Memory events on two devices among kernels, a B/E step and an X step."""
    events: list[Any] = []
    for i in range(300):
        events += [_memory(i, device_type=i % 2), _kernel(i)]
    events.insert(40, {"ph": "B", "name": "kvtrace/prefill", "pid": 7, "tid": 7, "ts": 1030})
    events.insert(90, {"ph": "E", "name": "kvtrace/prefill", "pid": 7, "tid": 7, "ts": 1070})
    events.insert(120, {"ph": "X", "name": "ProfilerStep#3", "cat": "user_annotation", "pid": 7, "tid": 7,
                        "ts": 1080, "dur": 20})  # fmt: skip
    return events


def _assert_same_source(left: Any, right: Any) -> None:
    assert_same_devices(left, right)
    marks = [[(m.kind, m.ts_us, m.label, m.end_us, m.detail) for m in s.markers] for s in (left, right)]
    assert marks[0] == marks[1]
    metas = [{k: v for k, v in s.meta.items() if k != "reader"} for s in (left, right)]
    assert metas[0] == metas[1]


def _both(path: Path) -> Any:
    """The source read whole, after checking it is (and is what the streaming reader reads)."""
    whole = read_chrome_trace(path)
    assert whole.meta["reader"] == "in_memory"
    streamed = read_chrome_trace(path, in_memory=False)
    assert streamed.meta["reader"] == "json_stream"
    _assert_same_source(whole, streamed)
    return whole


@pytest.mark.parametrize("form", list(_FORMS))
@pytest.mark.parametrize("original", [SAMPLE_TRACE, WORKER0], ids=["sample", "worker0-2021-layout"])
def test_rewritten_real_trace_is_read_whole_as_torch_wrote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, original: Path, form: str
) -> None:
    # GIVEN a real trace re-indented by another tool, or dumped back on one line by a script
    if not original.exists():
        pytest.skip(f"{original} is not here")
    trace = json.loads(gzip.decompress(original.read_bytes()))
    copy = tmp_path / "rewritten.json.gz"
    copy.write_bytes(gzip.compress(json.dumps(trace, **_FORMS[form]).encode(), compresslevel=1))
    decoded: list[int] = []
    decode = trace_in_memory._decoded
    monkeypatch.setattr(
        trace_in_memory, "_decoded", lambda raws, *args: decoded.append(len(raws)) or decode(raws, *args)
    )
    # WHEN read THEN it is read whole, as streamed, and every column, step and count is the byte scan's of
    # the trace as torch wrote it
    whole = _both(copy)
    scanned = read_chrome_trace(original)
    assert scanned.meta["reader"] == "byte_scan"
    memory = sum(1 for event in trace["traceEvents"] if event.get("name") == "[memory]")
    assert sum(len(d.delta_bytes) for d in whole.devices) == memory > 3000
    _assert_same_source(whole, scanned)
    # AND its memory events were read by Kineto's pattern in this whitespace: json decoded only the steps
    assert 0 < sum(decoded) == len(whole.markers) < 100


@pytest.mark.parametrize("form", list(_FORMS))
def test_crafted_events_are_kept_and_noted_as_streamed(tmp_path: Path, form: str) -> None:
    # GIVEN memory events on two devices, kernels whose names hold braces and steps of both kinds, as a
    # bare array (after a line break) and as a trace object with fields after its events; a kernel's
    # duration 1e400 (json reads infinity; msgspec finds its bounds without reading it)
    events = _events()
    events[1]["dur"] = 123456789
    path = tmp_path / "t.json"
    path.write_text("\n " + json.dumps(events, **_FORMS[form]).replace("123456789", "1e400"))
    # WHEN read THEN both readers say the same: 300 memory events, 2 steps
    source = _both(path)
    assert [len(d.delta_bytes) for d in source.devices] == [150, 150]
    assert [m.label for m in source.markers] == ["kvtrace/prefill", "ProfilerStep#3"]
    assert "skipped_events" not in source.meta
    assert source.meta["trace_events"] == len(events)
    trace = {
        "schemaVersion": 1,
        "traceEvents": events,
        "deviceProperties": [{"id": 0, "totalGlobalMem": 80 << 30}],
    }
    path.write_text(json.dumps(trace, **_FORMS[form]).replace("123456789", "1e400"))
    source = _both(path)
    assert source.meta["device_capacity_bytes"] == {"cuda:0": 80 << 30}
    assert source.meta["schemaVersion"] == 1


@pytest.mark.parametrize("form", ["one-line", "compact"])
def test_names_written_with_escapes_are_read_as_json_reads_them(tmp_path: Path, form: str) -> None:
    # GIVEN a one-line trace (where the streaming reader decodes every event with an escape) whose memory
    # events are named "\u005bmemory]" and a step "kvtrace\/prefill", as some encoders write them
    events = _events()
    text = json.dumps({"traceEvents": events}, **_FORMS[form])
    text = text.replace('"[memory]"', '"\\u005bmemory]"', 5).replace(
        '"kvtrace/prefill"', '"kvtrace\\/prefill"'
    )
    assert text.count("\\u005b") == 5 and text.count("\\/") == 2
    path = tmp_path / "t.json"
    path.write_text(text)
    # WHEN read THEN every memory event and both steps are kept, as json.load reads them
    source = _both(path)
    assert sum(len(d.delta_bytes) for d in source.devices) == 300
    assert [m.label for m in source.markers] == ["kvtrace/prefill", "ProfilerStep#3"]


_DECLINED = {
    "byte-order mark": lambda text: "\ufeff" + text,
    "NaN in a kernel": lambda text: text.replace('"dur": 3', '"dur": NaN', 1),
    "lone surrogate": lambda text: text.replace("{lambda}", "\\ud800", 1),
    "traceEvents twice": lambda text: text.replace(
        '{"traceEvents": ', '{"traceEvents": [], "traceEvents": ', 1
    ),
    "nested 3000 deep": lambda text: text.replace('"stream": 7', '"stream": ' + "[" * 3000 + "]" * 3000, 1),
}


@pytest.mark.parametrize("change", list(_DECLINED))
def test_text_msgspec_reads_otherwise_is_streamed(tmp_path: Path, change: str) -> None:
    # GIVEN a trace that json reads (NaN and lone surrogates included) and msgspec refuses or would read
    # otherwise (a key given twice: the streaming reader reads both arrays), or that neither reads
    path = tmp_path / "t.json"
    text = _DECLINED[change](json.dumps({"traceEvents": _events()}))
    path.write_text(text, encoding="utf-8")
    # WHEN read THEN the streaming reader reads it, as with `in_memory=False`, or says the same error
    try:
        source = read_chrome_trace(path)
    except KvtraceError as exc:
        with pytest.raises(KvtraceError) as streamed:
            read_chrome_trace(path, in_memory=False)
        assert str(exc) == str(streamed.value) and change == "nested 3000 deep"
        return
    assert source.meta["reader"] == "json_stream"
    _assert_same_source(source, read_chrome_trace(path, in_memory=False))
    assert sum(len(d.delta_bytes) for d in source.devices) == 300


_CROWDED = {
    "elements that are no object": lambda events: [*events, 1, "x"],
    "a phase that is no string": lambda events: [{**events[1], "ph": 5}, *events],
    "a phase of a million numbers": lambda events: [{**events[1], "ph": [0] * 1_000_000}, *events],
}


@pytest.mark.parametrize("form", ["bare array", "trace object"])
@pytest.mark.parametrize("change", [*_CROWDED, "more objects than MAX_OBJECTS"])
def test_a_text_msgspec_would_fill_memory_with_is_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, form: str
) -> None:
    # GIVEN traces whose text msgspec would make more objects of than its events (a text of 60 MiB of
    # `0,` is 31 million elements: 3.5 GB of them), elements the reader notes, a phase json reads and
    # msgspec would decode whole, or more events than the bound (the bound lowered to this text's braces)
    events = _CROWDED.get(change, lambda events: events)(_events())
    text = json.dumps(events if form == "bare array" else {"traceEvents": events}, separators=(",", ":"))
    path = tmp_path / "t.json"
    path.write_text(text)
    if change == "more objects than MAX_OBJECTS":
        monkeypatch.setattr(trace_in_memory, "MAX_OBJECTS", text.count("{") - 1)
    # WHEN read THEN the streaming reader reads it, its memory flat, as with `in_memory=False`
    source = read_chrome_trace(path)
    assert source.meta["reader"] == "json_stream"
    _assert_same_source(source, read_chrome_trace(path, in_memory=False))
    assert sum(len(d.delta_bytes) for d in source.devices) == 300
    if change == "elements that are no object":
        assert source.meta["skipped_events"] == {"not an object": 2}
    # AND at the bound itself it is read whole
    if change == "more objects than MAX_OBJECTS":
        monkeypatch.setattr(trace_in_memory, "MAX_OBJECTS", text.count("{"))
        assert read_chrome_trace(path).meta["reader"] == "in_memory"


def test_damage_is_reported_by_the_streaming_reader(tmp_path: Path) -> None:
    # GIVEN a trace with a byte that is no UTF-8 in a kernel's name (which msgspec skips without checking),
    # and one cut short
    text = json.dumps({"traceEvents": _events()}, separators=(",", ":"))
    bad = tmp_path / "bad.json"
    bad.write_bytes(text.encode().replace(b"{lambda}", b"\xff", 1))
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    # WHEN read THEN each error is the streaming reader's, naming the file
    for path in (bad, cut):
        with pytest.raises(KvtraceError) as whole:
            read_chrome_trace(path)
        with pytest.raises(KvtraceError) as streamed:
            read_chrome_trace(path, in_memory=False)
        assert str(whole.value) == str(streamed.value)
        assert str(whole.value).startswith(str(path))


def test_a_kept_event_json_refuses_is_reported_as_streamed(tmp_path: Path) -> None:
    # GIVEN a memory event whose Bytes has 5,000 digits: msgspec finds its bounds, json refuses to read it
    events = _events()
    text = json.dumps({"traceEvents": events}).replace('"Bytes": 64', '"Bytes": ' + "9" * 5000, 1)
    path = tmp_path / "t.json"
    path.write_text(text)
    # WHEN read THEN the error is the streaming reader's
    with pytest.raises(KvtraceError, match="more than 4300 digits inside traceEvents") as whole:
        read_chrome_trace(path)
    with pytest.raises(KvtraceError) as streamed:
        read_chrome_trace(path, in_memory=False)
    assert str(whole.value) == str(streamed.value)


def test_text_over_the_limit_is_streamed_from_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a gzipped one-line trace whose file is small but whose text is over the limit held whole
    text = json.dumps({"traceEvents": _events()}).encode()
    assert read_whole(io.BytesIO(text), limit=len(text))[0] == text
    head, rest = read_whole(io.BytesIO(text), limit=len(text) - 1)
    assert head is None and b"".join(iter(lambda: rest.read(1000), b"")) == text
    path = tmp_path / "t.json.gz"
    path.write_bytes(gzip.compress(text))
    monkeypatch.setattr(chrome_trace, "MAX_TEXT_BYTES", len(text) - 1)
    assert path.stat().st_size < len(text) - 1
    # WHEN read THEN it is streamed from its first byte: every event read
    source = read_chrome_trace(path)
    assert source.meta["reader"] == "json_stream"
    assert sum(len(d.delta_bytes) for d in source.devices) == 300
    monkeypatch.undo()
    _assert_same_source(source, read_chrome_trace(path))


def test_without_msgspec_every_trace_is_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN an install where msgspec cannot be imported
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": _events()}))
    monkeypatch.setitem(sys.modules, "msgspec", None)
    # WHEN a trace is read THEN the streaming reader reads it
    assert read_chrome_trace(path).meta["reader"] == "json_stream"
