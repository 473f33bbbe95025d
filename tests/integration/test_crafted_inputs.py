"""Inputs crafted to cost far more than their size or to print impossible figures (found by a hostile
tour of the CLI): each is refused in one line naming the file, exit 2, before the work grows past what
the file holds. Real snapshots read on: they share frames, never segments, block lists or traces.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

REAL = Path(__file__).resolve().parents[3] / "shared" / "real_traces"


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _shared_segments(n: int) -> dict[str, Any]:
    block = {"size": 8, "state": "active_allocated", "address": 0}
    segment = {"device": 0, "address": 0, "total_size": 8, "blocks": [block] * n}
    return {"segments": [segment] * n, "device_traces": []}


def _shared_block_lists(n: int) -> dict[str, Any]:
    blocks = [{"size": 8, "state": "active_allocated", "address": 0}] * n
    segments = [{"device": 0, "address": i, "total_size": 8, "blocks": blocks} for i in range(n)]
    return {"segments": segments, "device_traces": []}


def _shared_traces(n: int) -> dict[str, Any]:
    trace = [{"action": "alloc", "addr": 4096, "size": 8, "time_us": 1}] * n
    return {"segments": [], "device_traces": [trace] * n}


def _shared_entries(n: int) -> dict[str, Any]:
    frame = {"name": "f", "filename": "x.py", "line": 1}
    alloc = {"action": "alloc", "addr": 1 << 40, "size": 512, "stream": 0, "frames": [frame] * 10}
    free = {**alloc, "action": "free_completed"}
    return {"segments": [], "device_traces": [[alloc, free] * (n // 2)]}


def _shared_blocks(n: int) -> dict[str, Any]:
    block = {"size": 512, "state": "active_allocated", "requested_size": 512, "frames": []}
    return {"segments": [{"device": 0, "address": 1 << 40, "total_size": 2**40, "blocks": [block] * n}]}


@pytest.mark.parametrize(
    ("build", "said"),
    [
        (_shared_segments, "1999 of its 2000 segments repeat another object"),
        (_shared_block_lists, "1999 of its 2000 segment's block lists repeat another object"),
        (_shared_traces, "1999 of its 2000 device traces repeat another object"),
        (_shared_entries, "1998 of its 2000 trace entries repeat another object"),
        (_shared_blocks, "1999 of its 2000 blocks repeat another object"),
    ],
    ids=["segments", "block-lists", "traces", "entries", "blocks"],
)
@pytest.mark.parametrize("command", ["report", "export"])
def test_a_snapshot_that_lists_one_container_many_times_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Any, said: str, command: str
) -> None:
    # GIVEN a pickle of a few KB whose memo repeats one segment / block list / trace 2000 times (4 million
    # blocks or entries to walk: seconds and hundreds of MB before), or one trace entry or block (each
    # reference read as one more event or block: a 4 MB file took 330 MB as 2 million events)
    path = tmp_path / "bomb.pickle"
    path.write_bytes(pickle.dumps(build(2000), protocol=4))
    assert path.stat().st_size < 64_000
    # THEN one line says it is not a real snapshot, exit 2
    argv = ["report", str(path), "--json", "--no-export"]
    assert (
        main(argv if command == "report" else ["export", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2
    )
    said = f"{path}: not a real snapshot (damaged or made up): {said} (a real dump writes each once)"
    expected = f"kvtrace report: error: {said}"
    if command != "report":
        expected = f"kvtrace export: warning: skipped {said}"
    assert _one_error(capsys) == expected


def test_real_snapshots_share_frames_and_still_read(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a real torch 2.6 dump, whose entries share frame lists and frame dicts through the memo
    path = REAL / "snapshots" / "mem_snapshot.pickle"
    if not path.exists():
        pytest.skip("no real traces here")
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"]


def test_a_snapshot_whose_sizes_add_past_int64_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 300 allocations of 2**55 bytes (each below 2**56, together 2**63.2: past int64)
    trace = [{"action": "alloc", "addr": 4096 * i, "size": 2**55, "time_us": i} for i in range(300)]
    path = tmp_path / "overflow.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [trace]}))
    # THEN it is not a real snapshot (it printed "peak 8355840.00 TiB, final -6946816.00 TiB", exit 0)
    assert main(["report", str(path), "--no-export"]) == 2
    err = _one_error(capsys)
    assert str(path) in err and "add up to 1.08e+19 bytes: not a real snapshot" in err
    # AND one entry past any device is named with its size
    trace = [{"action": "alloc", "addr": 4096, "size": 2**60, "time_us": 1}]
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [trace]}))
    assert main(["report", str(path), "--no-export"]) == 2
    assert f"size {2**60} in a trace entry, more than any device holds" in _one_error(capsys)


@pytest.mark.parametrize(
    ("rows", "said"),
    [
        (
            "[[1,1,4611686018427387904,7],[2,1,4611686018427387904,7],[3,1,4611686018427387904,7]]",
            "sizes past what a device holds",
        ),
        ("[[1, 1, -5, 7]]", "-5 bytes allocated before the profiler started: not a real timeline"),
        ("[[1, 1, 100, 7], [2, 4, -200, 7]]", "allocated bytes go below zero (to -100)"),
        ("[[1, 1, 100, 7], [2, 2, 1e400, 7]]", "bytes inf is not a size"),
        ('[[1, 1, 100, 7], [2, 2, "12", 7]]', "bytes '12' is not a size"),
    ],
    ids=["past-int64", "negative-baseline", "below-zero", "infinite", "string"],
)
def test_a_memory_timeline_with_impossible_sizes_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: str, said: str
) -> None:
    # GIVEN an export_memory_timeline_raw file with one impossible size (an internal error, a peak of
    # -5 B, or a row silently read as 0 bytes before)
    path = tmp_path / "memory_timeline.raw"
    path.write_text(rows)
    # THEN one line names the file and the row, exit 2
    assert main(["report", str(path), "--no-export"]) == 2
    err = _one_error(capsys)
    assert str(path) in err and said in err
    # AND sane rows read
    path.write_text("[[1, 1, 100, 7], [2, 2, 50, 3], [3, 4, -50, 3]]")
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_allocated_bytes"] == 150


SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


@pytest.mark.parametrize(
    ("removed", "lacking"),
    [
        ("profiler", "the profiler's allocator events"),
        ("weights.jsonl", "the weights are not in the memory figures"),
        ("memory_samples.jsonl", "no process or device memory samples"),
    ],
)
def test_a_file_the_manifest_lists_that_is_gone_is_named_in_the_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], removed: str, lacking: str
) -> None:
    # GIVEN a copy of a real finished run with one of the files its manifest lists removed (the peak
    # changed, from 72,942,996 to 68,712,768 bytes without the trace, with `notes: []`)
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "static_b2", run)
    listed = json.loads((run / "manifest.json").read_text())["files"]
    gone = [name for name in listed if name.split("/")[0] == removed]
    assert gone
    shutil.rmtree(run / removed) if (run / removed).is_dir() else (run / removed).unlink()
    # THEN the JSON, the text and the HTML report each name the file and what the figures lack
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    said = f"{run / gone[0]} is listed in the manifest but missing: {lacking}"
    assert [n for n in notes if said in n], notes
    assert main(["report", str(run), "--no-export"]) == 0
    assert said in capsys.readouterr().out
    html = tmp_path / "report.html"
    assert main(["report", str(run), "--no-export", "-o", str(html)]) == 0
    assert f"{run / gone[0]} is listed in the manifest but missing" in html.read_text()


def test_a_complete_run_has_no_missing_file_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(SAMPLES / "static_b2"), "--json", "--no-export"]) == 0
    assert not [n for n in json.loads(capsys.readouterr().out)["notes"] if "missing" in n]


def test_a_memory_event_whose_bytes_is_a_string_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Chrome trace whose second [memory] event quotes its Bytes (it was counted as 12, silently)
    def memory(ts: int, addr: int, nbytes: object) -> dict[str, object]:
        args = {"Bytes": nbytes, "Addr": addr, "Device Type": 1, "Device Id": 0}
        return {"ph": "i", "name": "[memory]", "pid": 1, "tid": 1, "ts": ts, "args": args}

    path = tmp_path / "quoted.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": [memory(1, 4096, 100), memory(2, 8192, "12")]}))
    # THEN it is skipped like any other wrong type, and the notes say so
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_allocated_bytes"] == 100
    assert [n for n in report["notes"] if "1 [memory] with a non-integer Bytes" in n], report["notes"]


@pytest.mark.parametrize("name", ["kv_events.jsonl", "weights.jsonl", "memory_samples.jsonl"])
def test_a_run_log_with_a_byte_order_mark_reads_as_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # GIVEN a real run, and a copy whose log an editor saved with a UTF-8 BOM ("line 1 is not valid JSON")
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "static_b2", run)
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    plain = json.loads(capsys.readouterr().out)
    (run / name).write_bytes(b"\xef\xbb\xbf" + (run / name).read_bytes())
    # THEN it reads, with the same figures
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out) == plain


def test_a_pickle_declaring_a_bytearray_past_any_memory_is_one_line(tmp_path: Path) -> None:
    # GIVEN 18 bytes of protocol 5 whose BYTEARRAY8 claims 2**62 bytes: CPython fails to allocate it and, as
    # it frees the half-made bytearray, printed "SystemError: deallocated bytearray object has exported
    # buffers" before our own line. A fresh interpreter, as the user runs it (the stray line depends on
    # what the allocator left in memory).
    import struct
    import subprocess
    import sys

    path = tmp_path / "s.pickle"
    path.write_bytes(b"\x80\x05}\x94\x8c\x01a\x96" + struct.pack("<Q", 2**62) + b"xx")
    for command in ("report", "diagnose"):
        done = subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", command, str(path)], capture_output=True, text=True
        )
        # THEN exactly one line names the file and what is wrong, exit 2
        assert done.returncode == 2
        said = (
            "cannot load: it needs more memory than this machine has "
            "(a damaged or made-up size, or a dump too large for it)"
        )
        assert done.stderr == f"kvtrace {command}: error: {path}: {said}\n"


KINETO = next((SAMPLES / "dynamic_b2" / "profiler").glob("*.pt.trace.json.gz"))
DIGITS_5000 = "9" * 5000  # json.loads raises a ValueError (not a JSONDecodeError) past 4300 digits


def _first_memory_bytes(text: str, raw: str) -> str:
    start = text.index('"Bytes": ', text.index('"[memory]"')) + len('"Bytes": ')
    end = text.index(",", start)
    return text[:start] + raw + text[end:]


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (  # the Kineto fast scanner decodes the memory event
            lambda text: _first_memory_bytes(text, DIGITS_5000),
            "corrupt JSON (an integer of more than 4300 digits) inside traceEvents",
        ),
        (  # the header is left to the general reader
            lambda text: text.replace('"schemaVersion": 1', f'"schemaVersion": {DIGITS_5000}', 1),
            "corrupt JSON: an integer of more than 4300 digits inside top-level field 'schemaVersion'",
        ),
        (  # the same trace written on one line: the general reader throughout
            lambda text: json.dumps(json.loads(text)).replace(
                '"Bytes": ', f'"Bytes": {DIGITS_5000}, "b": ', 1
            ),
            "corrupt JSON: an integer of more than 4300 digits inside traceEvents",
        ),
    ],
    ids=["kineto-event", "kineto-header", "one-line"],
)
@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_chrome_trace_holding_an_integer_of_5000_digits_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, said: str, command: str
) -> None:
    # GIVEN the sample run's real profiler trace with one integer of 5000 digits (internal error, exit 70)
    import gzip

    path = tmp_path / "damaged.pt.trace.json"
    path.write_text(damage(gzip.decompress(KINETO.read_bytes()).decode()))
    # THEN one line names the file and what is wrong, exit 2
    assert main([command, str(path), "--no-export"] if command == "report" else [command, str(path)]) == 2
    assert _one_error(capsys) == f"kvtrace {command}: error: {path}: {said}"


def test_a_trace_naming_a_rank_past_int32_exports_it_as_null(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a trace whose distributedInfo names rank 2**40 (export: "unreadable (ArrowInvalid ...)", query:
    # internal error, exit 70), metadata the report does not use
    memory = {"Bytes": 100, "Addr": 4096, "Device Type": 1, "Device Id": 0}
    event = {"ph": "i", "name": "[memory]", "pid": 1, "tid": 1, "ts": 1, "args": memory}
    path = tmp_path / "ranked.pt.trace.json"
    path.write_text(json.dumps({"distributedInfo": {"rank": 2**40, "world_size": 2}, "traceEvents": [event]}))
    # THEN the runs table holds null there, as for any value its column cannot hold
    assert main(["query", "--json", str(path), "SELECT rank, world_size FROM runs"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"rank": None, "world_size": 2}]


# A Llama-shaped config small enough to build in a test
_SHAPE = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 1000,
}


@pytest.mark.parametrize("layers", [2**15 + 1, 2**63], ids=["one-past-the-bound", "2**63"])
@pytest.mark.parametrize("command", ["plan", "sweep"])
def test_a_config_of_more_layers_than_any_model_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layers: int, command: str
) -> None:
    # GIVEN a config.json of 32,769 or 2**63 layers (2**63: internal error, exit 70; 10**9 was OOM-killed
    # after taking 23 GB; 10**5 planned for 39 s; `sweep` stopped in torch's allocator)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**_SHAPE, "num_hidden_layers": layers}))
    out = tmp_path / "sweep"
    argv = ["plan", "--config", str(config)] if command == "plan" else ["sweep", "--config", str(config)]
    # THEN one line names the file and the field, exit 2, and nothing is written
    assert main([*argv, "--out", str(out)] if command == "sweep" else argv) == 2
    assert _one_error(capsys) == (
        f"kvtrace {command}: error: {config}: field num_hidden_layers is {layers:,}, expected a layer count "
        "of at most 32,768 (no model has nearly so many)"
    )
    assert not out.exists()


def test_a_sweep_whose_weights_pass_the_hosts_memory_is_refused_before_building_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a config of 2**40 vocabulary entries: its embedding and its LM head (not tied in a Llama config)
    # are 2 x 2**40 x 64 x 4 B = 512 TiB in float32
    # (torch's allocator raised: internal error, exit 70; a model a little larger than the host's memory had
    # the kernel kill the process)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**_SHAPE, "vocab_size": 2**40}))
    out = tmp_path / "sweep"
    # WHEN it is swept on the CPU
    argv = ["sweep", "--config", str(config), "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    # THEN one line says what the weights take, more than the host has, before anything is built or written
    line = _one_error(capsys)
    # both ends, 2 layers of q, o (64 x 4 x 16), k, v (64 x 2 x 16), the MLP's 3 and 2 norms, the final norm
    params = 2 * 2**40 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    weights = f"its weights alone take 512.00 TiB ({params:,} parameters in float32), "
    assert line.startswith(f"kvtrace sweep: error: {config}: {weights}more than the "), line
    assert "cpu has available; kvtrace sweep builds and runs the model, kvtrace plan sizes it" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        (
            "head_dim",
            10**40,
            "is 100000… (41 digits), expected at most 1,099,511,627,776 (no model is near so big)",
        ),
        (
            "hidden_size",
            2**40 + 1,
            "is 1,099,511,627,777, expected at most 1,099,511,627,776 (no model is near so big)",
        ),
        ("num_key_value_heads", 1e309, "must be a positive integer, got inf"),
        ("num_key_value_heads", "2", "must be a positive integer, got '2'"),
        ("num_key_value_heads", 2.5, "must be a positive integer, got 2.5"),
    ],
    ids=["head_dim-10**40", "hidden_size-past-2**40", "kv-heads-1e309", "kv-heads-string", "kv-heads-2.5"],
)
def test_a_config_field_no_model_has_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: Any, said: str
) -> None:
    # GIVEN a config.json whose width is past any model's or not an integer (10**40 and 1e309 were internal
    # errors, exit 70; a KV head count of "2" or 2.5 was read with int() and planned as 2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**_SHAPE, field: value}))
    # THEN one line names the file and the field, exit 2
    assert main(["plan", "--config", str(config), "--batch", "1", "--context", "1024"]) == 2
    assert _one_error(capsys) == f"kvtrace plan: error: {config}: field {field} {said}"


def test_a_sweep_point_past_int32_or_past_the_hosts_memory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a batch of 10**20 (stopped in torch's seeding: internal error, exit 70)
    out = tmp_path / "sweep"
    argv = ["sweep", "--size", "tiny", "--device", "cpu", "--new-tokens", "1", "-q", "--out", str(out)]
    assert main([*argv, "--batch", str(10**20), "--context", "8"]) == 2
    assert _one_error(capsys) == (
        f"kvtrace sweep: error: --batch values must be at most 2,147,483,647 (no model is run so wide), "
        f"got '{10**20}'"
    )
    assert not out.exists()
    # GIVEN a point whose prompt ids alone are 2**31 - 1 x 100,000 x 8 B, 1.5 PiB: past any host's memory and
    # address space, which torch's CPU allocator refuses at once with a RuntimeError (internal error, exit 70)
    assert main([*argv, "--batch", str(2**31 - 1), "--context", "100000"]) == 1
    assert _one_error(capsys) == f"kvtrace sweep: error: out of memory ({out})"
    assert not out.exists()  # the folder it made for the sweep, left empty: removed


def test_a_sweep_that_fails_removes_the_empty_folders_it_created_and_no_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an OUT two folders below any that exists, and an empty folder the user made for the sweep
    made = tmp_path / "new" / "deeper" / "sweep"
    kept = tmp_path / "kept"
    kept.mkdir()
    argv = ["sweep", "--size", "tiny", "--device", "cpu", "--new-tokens", "1", "-q"]
    for out in (made, kept):
        # WHEN the sweep fails at its first point (prompt ids of 1.5 PiB: out of memory, after OUT is made)
        assert main([*argv, "--batch", str(2**31 - 1), "--context", "100000", "--out", str(out)]) == 1
        assert _one_error(capsys) == f"kvtrace sweep: error: out of memory ({out})"
    # THEN the folders it created are gone (an empty OUT was left behind), the user's is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert list(kept.iterdir()) == []
