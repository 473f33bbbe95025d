"""A run's KV log read back (`read_run`): each event is its line, field by field, as written; equal values
are held once across events (a long light run's 512,000 events were ~0.9 KiB each, mostly copies of the same
strings, sizes and shapes); and the reading bar goes on through the replay and the join, relabelled."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import struct
import sys
import termios
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from kvtrace.format import KvEvent
from kvtrace.run_reader import read_run
from tests.tiny import record_generate, tiny_size

SAMPLE = Path(__file__).resolve().parents[2] / "sample_traces" / "dynamic_b2"
DEFAULTS = {
    f.name: f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
    for f in fields(KvEvent)
    if f.name not in ("seq", "t_ns", "step", "phase", "event", "layer", "kv", "part", "addr", "storage_bytes")
}


@pytest.fixture(scope="module")
def light_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A light-mode run of a tiny Llama 3 (2 layers), 4 prompt tokens and 3 new ones."""
    from kvtrace.llama import build_model

    run = tmp_path_factory.mktemp("light") / "run"
    record_generate(build_model(tiny_size(2)), run, batch=1, prompt=4, new_tokens=3, profiler=False)
    return run


def _lines(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("which", ["light", "profiled-sample"])
def test_each_event_read_back_is_its_line_as_written(light_run: Path, which: str) -> None:
    # GIVEN a real run's KV log: the light run recorded here, or the sample (profiled, 2 rows)
    run = light_run if which == "light" else SAMPLE
    lines = _lines(run)
    assert lines

    # WHEN it is read back
    events = read_run(run).kv_events

    # THEN each event is its line: the fields the line has, as written (`to_json`, the export's and the
    # recorder's), and those it leaves out at KvEvent's defaults (a `freed` line has no shape or dtype)
    assert len(events) == len(lines)
    for event, line in zip(events, lines, strict=True):
        as_json = event.to_json()
        assert list(as_json) == [f.name for f in fields(KvEvent)]
        assert {name: as_json[name] for name in line} == line
        assert {name: value for name, value in as_json.items() if name not in line} == {
            name: value for name, value in DEFAULTS.items() if name not in line
        }


def test_equal_values_of_the_events_are_held_once(light_run: Path) -> None:
    # GIVEN the light run's lines: 2 layers x K,V created at the prefill, grown at each of the 2 decode
    # steps (the old storage freed), all freed at the end
    lines = _lines(light_run)
    assert len(lines) == 2 * 2 * (1 + 2 * 2 + 1)

    # WHEN they are read back
    events = read_run(light_run).kv_events

    # THEN no event has a __dict__ of its own, and every value two events hold equal is one object: a
    # string, a clock reading, a size, a shape list; and a storage's address, on its lines and as the next
    # storage's prev_addr (an address the allocator hands out again after a free is another storage's)
    assert not any(hasattr(event, "__dict__") for event in events)
    for name in ("phase", "event", "part", "dtype", "device", "source", "t_ns", "step", "storage_bytes",
                 "logical_bytes", "tokens", "shape"):  # fmt: skip
        values = [getattr(event, name) for event in events]
        assert len({id(value) for value in values}) == len({json.dumps(value) for value in values}), name
    live: dict[int, KvEvent] = {}  # address -> the line that made its storage
    for event in events:
        if event.prev_addr:
            assert event.prev_addr is live[event.prev_addr].addr
        if event.event == "freed":
            assert event.addr is live.pop(event.addr).addr
        else:
            live[event.addr] = event


def test_repeated_seqs_are_counted_whatever_their_order(tmp_path: Path) -> None:
    # GIVEN the sample's run, its KV lines' seqs rewritten out of order with repeats (a damaged or merged log)
    run = tmp_path / "run"
    shutil.copytree(SAMPLE, run)
    lines = _lines(run)
    seqs = [5, 6, 7, 3, 4, 8, 6, 2, 1, 1, 9, 12, 11, 10, 3, 13]
    seqs += [*range(14, len(lines) - 4), 14, 2]
    assert len(seqs) == len(lines)
    for line, seq in zip(lines, seqs, strict=True):
        line["seq"] = seq
    (run / "kv_events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    # WHEN it is read THEN a line repeats a seq where an earlier line has it, counted as a set of them counts
    seen: set[int] = set()
    repeated = 0
    for seq in seqs:
        repeated += seq in seen
        seen.add(seq)
    assert repeated == 5  # 6, 1, 3, 14, 2
    assert read_run(run).repeated_kv_seqs == repeated


def test_plan_from_run_takes_quiet_and_draws_nothing_off_a_terminal(
    light_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN standard error that is not a terminal (captured)
    assert not sys.stderr.isatty()
    for quiet in (["-q"], ["--quiet"], []):
        # WHEN plan --from-run reads the run, quiet or not THEN it plans and stderr stays empty: no bar
        assert main(["plan", "--from-run", str(light_run), "--json", *quiet]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["request"]["batch"] == 1
        assert captured.err == ""


class _Stages:
    """A progress callback with stages, as the commands' bar is: each stage's calls kept by its label."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[int, int]]] = {"reading": []}

    def __call__(self, done: int, total: int) -> None:
        self.calls["reading"].append((done, total))

    def stage(self, label: str, unit: str) -> Callable[[int, int], None]:
        calls = self.calls.setdefault(f"{label} ({unit})", [])
        return lambda done, total: calls.append((done, total))


def test_a_run_read_with_stages_goes_on_through_its_replay_and_join(light_run: Path) -> None:
    from analyzers.report import load_source

    # GIVEN the light run's lines and storages (each line that makes one: created, grown), from the file
    lines = _lines(light_run)
    storages = sum(1 for line in lines if line["event"] != "freed")
    assert storages == 2 * 2 * (1 + 2)

    # WHEN its source is read and attributed with a staged progress
    progress = _Stages()
    load_source(light_run, progress=progress)

    # THEN after its bytes, the replay counts its events to the end, then the join its storages
    kv_bytes = (light_run / "kv_events.jsonl").stat().st_size
    assert progress.calls["reading"][-1] == (kv_bytes, kv_bytes)
    assert progress.calls["replaying KV log (event)"] == [(0, len(lines)), (len(lines), len(lines))]
    assert progress.calls["joining KV log (storage)"] == [(0, storages), (storages, storages)]


def _all_written(controller: int) -> str:
    """Everything written to the terminal so far: a pseudo-terminal hands it over in pieces (one read got
    the first two stages' lines alone, on a loaded host). Linux says EIO once the terminal's side, closed,
    has nothing more."""
    pieces = []
    while select.select([controller], [], [], 0.5)[0]:
        try:
            piece = os.read(controller, 1 << 16)
        except OSError:
            break
        if not piece:
            break
        pieces.append(piece)
    return b"".join(pieces).decode()


def test_the_bar_on_a_terminal_is_relabelled_for_each_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN standard error on a terminal (a pseudo-terminal's), and the reading commands' bar
    from kvtrace.commands.progress import progress_bar

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new one is 0 wide
    with open(terminal, "w", encoding="utf-8") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        update, close = progress_bar("reading light-4000", quiet=False)
        assert update is not None and close is not None

        # WHEN a long KV log (over 20 MB) is read, replayed, then joined
        update(30_000_000, 30_000_000)
        replay = update.stage("replaying KV log", "event")  # type: ignore[attr-defined]
        replay(0, 512_000)
        replay(512_000, 512_000)
        join = update.stage("joining KV log", "storage")  # type: ignore[attr-defined]
        join(256_000, 256_000)
        close()
        stderr.flush()
    drawn = _all_written(controller)
    os.close(controller)

    # THEN the bar is drawn for each stage, with its label and its own count (each stage's start at least:
    # tqdm draws a call at most every 0.1 s, and the last one as it closes)
    assert "reading light-4000" in drawn and "0.00/30.0M" in drawn
    assert "replaying KV log" in drawn and "0.00/512k" in drawn
    assert "joining KV log" in drawn and "256k/256k" in drawn
