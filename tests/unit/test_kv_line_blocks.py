"""kv_events.jsonl read a block of lines at a time, decoded by msgspec (`kvtrace.kv_line_blocks`), gives
exactly what the line-by-line reader gives: the same events, counts and fields left out, and on a line it
would refuse the same error, because such a block is handed to it (issue 11: the read was half of a long
light run's `kvtrace report`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from kvtrace.errors import KvtraceError
from kvtrace.format import KV_EVENTS
from kvtrace.run_checks import _KvEventLines
from kvtrace.run_reader import _read_jsonl, read_run

REPO = Path(__file__).resolve().parents[2]
SAMPLE_LOGS = sorted((REPO / "sample_traces").glob(f"**/{KV_EVENTS}"))

LINE: dict[str, Any] = {
    "seq": 1, "t_ns": 1_796_684_253_071_232_521, "step": 1, "phase": "prefill", "event": "created",
    "layer": 0, "kv": "k", "part": "data", "addr": 94_408_563_548_160, "storage_bytes": 2048,
    "view_offset": 0, "shape": [1, 2, 16, 16], "logical_bytes": 2048, "dtype": "float32", "device": "cpu",
    "tokens": 16, "evicted_tokens": 0, "prev_addr": 0, "cache": 1, "source": "hf", "reason": "",
}  # fmt: skip
FREED = {
    "seq": 2,
    "t_ns": 5,
    "step": 2,
    "phase": "decode",
    "event": "freed",
    "layer": 0,
    "kv": "k",
    "part": "data",
}
FREED |= {"addr": LINE["addr"], "storage_bytes": 2048}


NO_SEQ = {k: v for k, v in LINE.items() if k != "seq"}


def _line(**changes: Any) -> bytes:
    return json.dumps(LINE | changes, separators=(",", ":")).encode()


def _read(path: Path, blocks: bool) -> tuple[Any, ...]:
    """What `read_run` takes of the log: the events, whether its last line was cut, and every count."""
    lines = _KvEventLines()
    try:
        events, cut = _read_jsonl(path, lines, None, lines.block if blocks else None)
    except KvtraceError as exc:
        return ("error", str(exc))
    counts = (lines.lines, lines.unknown, lines.short_storages, lines.unknown_dtypes, lines.repeated_seqs)
    return events, cut, counts, lines.left_out


def _same_both_ways(path: Path) -> tuple[Any, ...]:
    by_lines = _read(path, blocks=False)
    assert _read(path, blocks=True) == by_lines
    return by_lines


@pytest.mark.parametrize("log", SAMPLE_LOGS, ids=lambda p: str(p.parent.relative_to(REPO / "sample_traces")))
def test_a_recorded_log_reads_the_same_in_blocks(log: Path) -> None:
    # GIVEN a log kvtrace recorded (the sample runs: HF caches, evictions, vLLM's pool, an H200's 32 layers)
    lines = [line for line in log.read_bytes().split(b"\n") if line]

    # WHEN its lines are decoded as one block, THEN msgspec takes them all (none is handed on)
    assert _KvEventLines().block(lines) is not None
    # AND the log reads as the line-by-line reader reads it
    events, cut, counts, _ = _same_both_ways(log)
    assert len(events) == counts[0] - sum(counts[1].values()) and not cut


def test_fields_left_out_read_as_their_defaults_and_are_said() -> None:
    # GIVEN a freed line that sends only the required fields, and one that sends `rows`
    block = [_line(), json.dumps(FREED).encode(), _line(seq=3, rows=1)]

    # WHEN decoded as a block
    reader = _KvEventLines()
    events = reader.block(block)

    # THEN the freed line's shape, dtype and tokens read as KvEvent's defaults and are said to be left out
    assert events is not None and len(events) == 3
    assert (
        events[1].shape == [] and events[1].dtype == "" and events[1].tokens == 0 and events[1].source == "hf"
    )
    assert reader.left_out[1] == {"view_offset", "shape", "logical_bytes", "dtype", "device", "tokens"} | {
        "evicted_tokens", "prev_addr", "cache", "source", "reason", "rows", "masked_entries"
    } | {"capacity_tokens", "capacity_rows"}  # fmt: skip
    assert (
        reader.left_out[2] == {"masked_entries", "capacity_tokens", "capacity_rows"} and events[2].rows == 1
    )
    # AND the events share their strings (json's one-character ones were shared; msgspec makes each anew)
    assert events[0].kv is events[1].kv and events[0].device is events[2].device


# Lines the line-by-line reader refuses, repairs, skips or reads otherwise than msgspec would: each must be
# handed to it (the block reader returns None) or read the same.
ODD_LINES: dict[str, bytes] = {
    "layer a string": _line(layer="0"),
    "layer a bool": _line(layer=True),
    "layer a float": _line(layer=1.0),
    "layer past int16": _line(layer=40_000),
    "negative size": _line(storage_bytes=-1),
    "size past 2**56": _line(storage_bytes=2**57),
    "addr past int64": _line(addr=2**64),
    "an int of 5,000 digits": _line()[:-1] + b',"tokens":' + b"9" * 5000 + b"}",
    "dtype null": _line(dtype=None),
    "shape a string": _line(shape="[1]"),
    "shape negative": _line(shape=[1, -2]),
    "shape of floats": _line(shape=[1.0]),
    "no seq": json.dumps(NO_SEQ).encode(),
    "no event": json.dumps({k: v for k, v in LINE.items() if k != "event"}).encode(),
    "kv x": _line(kv="x"),
    "unknown kind": _line(event="spilled"),
    "unknown kind, bad layer": _line(event="spilled", layer="x"),
    "unknown kind, no seq": json.dumps(
        {k: v for k, v in LINE.items() if k != "seq"} | {"event": "x"}
    ).encode(),
    "extra keys": _line(note="kept out", nested={"a": [1, 2]}),
    "duplicate key": _line()[:-1] + b',"layer":3}',
    "escaped key": _line()[:-1].replace(b'"layer"', b'"l\\u0061yer"') + b"}",
    "NaN": _line()[:-1] + b',"tokens":NaN}',
    "two objects on a line": _line() + b" " + _line(seq=9),
    "a list": b"[1, 2]",
    "deep nesting": b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "not JSON": b"{seq: 1}",
    "blank": b"   ",
    "invalid UTF-8 in a string": _line(device="cpu").replace(b'"cpu"', b'"c\xffu"'),
    "a lone surrogate": _line(reason="x").replace(b'"reason":"x"', b'"reason":"\\ud800"'),
    "repeated seq": _line(),
    "short storage": _line(storage_bytes=16),
    "unknown dtype": _line(dtype="float128"),
}


@pytest.mark.parametrize("name", list(ODD_LINES))
def test_an_odd_line_reads_as_the_line_reader_reads_it(tmp_path: Path, name: str) -> None:
    # GIVEN a log of good lines around one odd line
    path = tmp_path / KV_EVENTS
    path.write_bytes(b"\n".join([_line(), ODD_LINES[name], _line(seq=5, layer=1)]) + b"\n")

    # WHEN read in blocks and line by line, THEN the events, counts or error are the same
    _same_both_ways(path)


def test_a_refused_line_hands_its_block_over_before_counting(tmp_path: Path) -> None:
    # GIVEN a block whose last line has a layer of the wrong kind, after good lines of an unknown kind
    reader = _KvEventLines()
    block = [_line(event="spilled"), _line(), _line(layer="1")]

    # WHEN the block reader takes it, THEN it hands it over with nothing counted
    assert reader.block(block) is None
    assert (reader.lines, reader.unknown, reader.left_out) == (0, {}, [])

    # AND read from a file, the error names the line, as the line reader says it
    path = tmp_path / KV_EVENTS
    path.write_bytes(b"\n".join(block) + b"\n")
    said = _same_both_ways(path)
    assert said == ("error", f"{path}: line 3: field 'layer' is a string, expected an integer")


@pytest.mark.parametrize(
    "text",
    [
        b"\xef\xbb\xbf" + _line() + b"\n" + _line(seq=2) + b"\n",  # a BOM
        _line() + b"\r\n" + _line(seq=2) + b"\r\n",  # CRLF
        _line() + b"\r" + _line(seq=2) + b"\n",  # a lone carriage return ends a line in text mode
        _line() + b"\n\n" + _line(seq=2) + b"\n",  # a blank line
        _line() + b"\n" + _line(seq=2),  # a whole last line without its newline
        _line() + b"\n" + _line(seq=2)[:40],  # a cut last line
        _line() + b"\n" + _line(seq=2)[:40] + b"\n" + _line(seq=3) + b"\n",  # a cut line before others
        b"",
    ],
    ids=["bom", "crlf", "lone-cr", "blank-line", "no-last-newline", "cut-last-line", "cut-inside", "empty"],
)
def test_line_ends_and_cut_lines_read_the_same(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / KV_EVENTS
    path.write_bytes(text)
    _same_both_ways(path)


def test_a_log_longer_than_a_block_keeps_its_line_numbers(tmp_path: Path) -> None:
    # GIVEN 6,000 good lines (over one 256 KiB block) and then a bad one
    lines = [_line(seq=i, t_ns=i) for i in range(1, 6001)] + [_line(seq=6001, step="x")]
    path = tmp_path / KV_EVENTS
    path.write_bytes(b"\n".join(lines) + b"\n")

    # WHEN read, THEN the error names line 6,001, in blocks as line by line
    assert _same_both_ways(path) == (
        "error",
        f"{path}: line 6001: field 'step' is a string, expected an integer",
    )


def test_a_run_reads_the_same_with_its_log_in_blocks() -> None:
    # GIVEN a sample run (a real recording), WHEN read_run reads it
    # THEN its events are those read line by line
    run = read_run(REPO / "sample_traces" / "dynamic_b2")
    events, _, _, left_out = _read(REPO / "sample_traces" / "dynamic_b2" / KV_EVENTS, blocks=False)
    assert run.kv_events == events and run.kv_fields_left_out == left_out and not run.truncated


def test_without_msgspec_every_line_is_read_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN msgspec missing (an install that could not build it)
    from kvtrace import run_checks

    monkeypatch.setitem(sys.modules, "msgspec", None)
    run_checks._line_decoder.cache_clear()
    try:
        # WHEN a block is offered, THEN it is handed to the line reader, and the run reads as before
        assert _KvEventLines().block([_line()]) is None
        assert _same_both_ways(SAMPLE_LOGS[0])[0]
    finally:
        run_checks._line_decoder.cache_clear()
