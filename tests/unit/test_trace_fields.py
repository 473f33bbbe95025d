"""A trace's top-level fields that kvtrace does not read are checked and dropped by every trace reader, so a
text of many of them costs no more memory than its events do (issue 11)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from analyzers.readers.chrome_trace import read_chrome_trace
from analyzers.readers.trace_fields import TOP_FIELDS
from kvtrace.errors import KvtraceError
from tests.same_source import assert_same_devices
from tests.unit.test_chrome_trace import kineto_text, mem, op

TOP = {
    "schemaVersion": 1,
    "deviceProperties": [{"id": 0, "totalGlobalMem": 80 << 30}],
    "baseTimeNanoseconds": 1_700_000_000_000_000_000,
}


def _events() -> list[dict[str, Any]]:
    events = [mem(1000 + i, 64 if i % 3 else -64, Addr=4096 + i, dev_id=i % 2) for i in range(400)]
    events.insert(100, op("ProfilerStep#3", 1100, 20, cat="user_annotation"))
    return events


def _with_extra(text: str, before: int, after: int) -> str:
    """`text`, a trace object, with more top-level fields around its events: `before` and `after` of them."""
    head = "".join(f'"before{i:06d}": {i}, ' for i in range(before))
    tail = "".join(f', "after{i:06d}": [{i}]' for i in range(after))
    body = text.rstrip()
    assert body[0] == "{" and body[-1] == "}"
    return "{" + head + body[1:-1] + tail + "}"


def _read(path: Path, in_memory: bool) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        source = read_chrome_trace(path, in_memory=in_memory)
        return source, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("form", "before", "after", "in_memory", "reader"), [
    ("kineto", 1_000, 1_000, True, "byte_scan"),
    ("kineto", 1_000, 300_000, True, "in_memory"),  # past the byte scan's bound on the text after the events
    ("compact", 150_000, 150_000, True, "in_memory"),
    ("compact", 150_000, 150_000, False, "json_stream"),
])  # fmt: skip
def test_fields_kvtrace_does_not_read_are_checked_and_dropped(
    tmp_path: Path, form: str, before: int, after: int, in_memory: bool, reader: str
) -> None:
    # GIVEN a trace with its memory events, a step and three fields kvtrace reads, and the same trace with
    # more fields around its events (up to 300,000), as Kineto lays it out and on one line
    events = _events()
    if form == "kineto":
        text = kineto_text(TOP, events)
    else:
        text = json.dumps({**TOP, "traceEvents": events}, separators=(",", ":"))
    plain, extra = tmp_path / "plain.json", tmp_path / "extra.json"
    plain.write_text(text)
    extra.write_text(_with_extra(text, before, after))

    # WHEN both are read
    expected = read_chrome_trace(plain, in_memory=in_memory)
    source, peak = _read(extra, in_memory)

    # THEN the figures and the meta are the same, and the extra fields are not held: the reader's peak
    # stays under 4x the text's size read whole (the text is held) and under its size streamed, where the
    # fields kept as Python objects took 7-14x it
    assert source.meta.pop("reader") == reader
    expected.meta.pop("reader")
    assert_same_devices(source, expected)
    assert [(m.label, m.ts_us, m.end_us) for m in source.markers] == [
        (m.label, m.ts_us, m.end_us) for m in expected.markers
    ]
    assert source.meta == expected.meta
    assert source.meta["device_capacity_bytes"] == {"cuda:0": 80 << 30}
    assert [d.device for d in source.devices] == ["cuda:0", "cuda:1"]
    assert [len(d.delta_bytes) for d in source.devices] == [200, 200]
    size = extra.stat().st_size
    if before + after > 100_000:
        assert size > 5 << 20
        assert peak < (4 * size if in_memory else size), (peak, size)


@pytest.mark.parametrize("in_memory", [True, False])
def test_dropped_fields_are_checked_and_may_hold_any_number(tmp_path: Path, in_memory: bool) -> None:
    # GIVEN a trace whose field no part of kvtrace reads holds an integer of 5,000 digits (valid JSON that
    # Python's `int` refuses to read) and one whose such field is damaged
    path, damaged = tmp_path / "t.json", tmp_path / "d.json"
    events = json.dumps(_events())
    path.write_text('{"traceEvents": ' + events + ', "odd": [' + "9" * 5000 + "]}")
    damaged.write_text('{"traceEvents": ' + events + ', "odd": [1 2]}')
    # WHEN read, whole or streamed THEN the first has its 400 memory events
    source = read_chrome_trace(path, in_memory=in_memory)
    assert [len(d.delta_bytes) for d in source.devices] == [200, 200]
    # and the second is an error naming the file and the field
    with pytest.raises(KvtraceError, match=r"d\.json: corrupt JSON.*top-level field 'odd'"):
        read_chrome_trace(damaged, in_memory=in_memory)


def test_an_object_without_events_names_its_first_keys(tmp_path: Path) -> None:
    # GIVEN a JSON object of 1,000 keys and no traceEvents (some other tool's output)
    path = tmp_path / "other.json"
    path.write_text(json.dumps({f"k{i:04d}": i for i in reversed(range(1000))} | {"k0003": 0}))
    # WHEN read THEN the error names its five first keys in sorted order, once each
    keys = "k0000, k0001, k0002, k0003, k0004"
    with pytest.raises(KvtraceError, match=f"other.json: not a Chrome trace: .*its keys: {keys}\\)"):
        read_chrome_trace(path)


def test_the_fields_kept_are_the_ones_the_meta_carries() -> None:
    from analyzers.readers import chrome_trace

    assert set(chrome_trace._META_KEYS) | {"with_stack"} == TOP_FIELDS
