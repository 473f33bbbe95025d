"""Damage inside the records of a real run, a real Chrome trace and a real snapshot (found by feeding the
CLI hostile inputs): each gets one line naming the file, the line and the field, exit 2, never a
traceback, and never a figure made from an impossible value.

Every case starts from a real file (`sample_traces/`, `../shared/real_traces`) and changes one value.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
REAL = SAMPLES.parent.parent / "shared" / "real_traces"


def _copy(tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(SAMPLES / name, copy)
    return copy


def _edit_first_line(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    edit(record)
    lines[0] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(
    ("file", "field", "value", "said"),
    [
        ("kv_events.jsonl", "layer", "zero", "field 'layer' is a string, expected an integer"),
        ("kv_events.jsonl", "layer", 40000, "field 'layer' is 40000, expected an integer from 0 to 32767"),
        (
            "kv_events.jsonl",
            "addr",
            2**70,
            "field 'addr' is 1180591620717411303424, expected an integer from 0",
        ),
        # Python's json reads 1e400 and Infinity as inf, and NaN: each said as what it is, not "a number with
        # a fraction"
        ("kv_events.jsonl", "storage_bytes", 1e400, "field 'storage_bytes' is infinite, expected an integer"),
        ("kv_events.jsonl", "layer", 2.5, "field 'layer' is a number with a fraction, expected an integer"),
        ("kv_events.jsonl", "storage_bytes", 2**70, "field 'storage_bytes' is 1180591620717411303424"),
        ("kv_events.jsonl", "step", "one", "field 'step' is a string, expected an integer"),
        ("kv_events.jsonl", "shape", "2x4", "field 'shape' is a string, expected a list of sizes"),
        ("weights.jsonl", "storage_bytes", -(10**12), "field 'storage_bytes' is -1000000000000"),
        ("weights.jsonl", "dtype", None, "field 'dtype' is null, expected a string"),
        ("memory_samples.jsonl", "rss_bytes", "lots", "field 'rss_bytes' is a string, expected an integer"),
        (
            "memory_samples.jsonl",
            "cpu_percent",
            float("nan"),
            "field 'cpu_percent' is not a number (NaN)",
        ),
        ("memory_samples.jsonl", "t_ns", -1e400, "field 't_ns' is infinite (negative), expected an integer"),
    ],
)
@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_damaged_field_is_named_with_its_file_and_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    file: str,
    field: str,
    value: Any,
    said: str,
) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    _edit_first_line(run / file, lambda record: record.__setitem__(field, value))
    assert main([command, str(run), "--no-export"] if command == "report" else [command, str(run)]) == 2
    err = _one_error(capsys)
    assert f"{run / file}: line 1: {said}" in err


def test_a_weight_record_without_a_field_is_named_and_an_extra_field_is_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    _edit_first_line(run / "weights.jsonl", lambda record: record.__setitem__("origin", "hand-edited"))
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    plain = json.loads(capsys.readouterr().out)
    _edit_first_line(run / "weights.jsonl", lambda record: record.pop("dtype"))
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{run / 'weights.jsonl'}: line 1: weight record without 'dtype'" in _one_error(capsys)
    assert plain["kv"]["final_bytes"] > 0


def test_a_kv_event_without_its_fields_names_them_in_the_logs_terms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real run whose first KV event lost its `seq` and `addr` (it said "KvEvent.__init__() missing 2
    # required positional arguments: ...", the reader's class, not the log's field names)
    run = _copy(tmp_path, "dynamic_b2")
    _edit_first_line(run / "kv_events.jsonl", lambda record: (record.pop("seq"), record.pop("addr")))
    assert main(["report", str(run), "--no-export"]) == 2
    said = f"{run / 'kv_events.jsonl'}: line 1: KV event missing fields: seq, addr"
    assert _one_error(capsys).endswith(said)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (
            lambda m: m["device"].__setitem__("total_memory_bytes", "lots"),
            "field 'device.total_memory_bytes' is a string",
        ),
        (lambda m: m["device"].__setitem__("type", 5), "field 'device.type' is 5, expected a string"),
        (
            lambda m: m["device"].__setitem__("total_memory_bytes", 1e309),
            "field 'device.total_memory_bytes' is infinite, expected a size",
        ),
        (
            lambda m: m["model"].__setitem__("num_kv_heads", float("nan")),
            "field 'model.num_kv_heads' is not a number (NaN), expected a count",
        ),
        (
            lambda m: m["model"].__setitem__("num_kv_heads", "two"),
            "field 'model.num_kv_heads' is a string, expected a count",
        ),
        (
            lambda m: m["ended"].__setitem__("t_ns", "abc"),
            "field 'ended.t_ns' is a string, expected a time in ns",
        ),
        (lambda m: m.__setitem__("schema_version", True), "missing or invalid schema_version"),
    ],
    ids=["total-memory", "device-type", "memory-inf", "kv-heads-nan", "kv-heads", "ended-t", "schema-bool"],
)
def test_a_damaged_manifest_value_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Callable[[dict[str, Any]], None], said: str
) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    manifest = json.loads((run / "manifest.json").read_text())
    edit(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{run / 'manifest.json'}: {said}" in _one_error(capsys)


def test_a_manifest_with_a_bom_reads_and_a_log_that_is_a_folder_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    manifest = run / "manifest.json"
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())  # an editor's byte-order mark
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out)["kv"]["final_bytes"] > 0
    (run / "memory_samples.jsonl").unlink()
    (run / "memory_samples.jsonl").mkdir()
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{run / 'memory_samples.jsonl'}: cannot read (Is a directory)" in _one_error(capsys)
    shutil.rmtree(run / "memory_samples.jsonl")
    (run / "kv_events.jsonl").unlink()
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{run / 'kv_events.jsonl'}: missing, while the manifest counts" in _one_error(capsys)


def test_a_line_nested_too_deeply_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    events = run / "kv_events.jsonl"
    events.write_text("[" * 100_000 + "]" * 100_000 + "\n" + events.read_text())
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{events}: line 1 is nested too deeply" in _one_error(capsys)


WORKER0 = REAL / "chrome" / "worker0.1623143089861.pt.trace.json.gz"


def _chrome_with_first_memory_bytes(tmp_path: Path, value: int) -> tuple[Path, int]:
    import gzip

    data = json.loads(gzip.decompress(WORKER0.read_bytes()))
    memory = [e for e in data["traceEvents"] if e.get("name") == "[memory]"]
    memory[0]["args"]["Bytes"] = value
    path = tmp_path / "damaged.pt.trace.json"
    path.write_text(json.dumps(data))
    return path, len(memory)


def test_a_memory_event_of_impossible_size_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not WORKER0.is_file():
        pytest.skip("needs ../shared/real_traces")
    path, count = _chrome_with_first_memory_bytes(tmp_path, 2**70)
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "1 [memory] with an impossible Bytes (over 2**56)" in " ".join(data["notes"])
    assert sum(d["alloc_events"] + d["free_events"] for d in data["devices"]) <= count - 1


def _chrome_with_every_memory_event_damaged(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """worker0's real trace with each of its [memory] events damaged, in turn: Bytes quoted, args gone, ts
    NaN (Python's json writes and reads NaN)."""
    import gzip

    data = json.loads(gzip.decompress(WORKER0.read_bytes()))
    memory = [e for e in data["traceEvents"] if e.get("name") == "[memory]"]
    for index, event in enumerate(memory):
        if index % 3 == 0:
            event["args"]["Bytes"] = str(event["args"]["Bytes"])
        elif index % 3 == 1:
            del event["args"]
        else:
            event["ts"] = float("nan")
    path = tmp_path / "damaged.pt.trace.json"
    path.write_text(json.dumps(data))
    return path, memory


def test_a_trace_whose_memory_events_are_all_damaged_is_not_called_profiled_without_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real trace whose 12,838 [memory] events are all damaged: 4,280 (indexes 0, 3, ...) with Bytes
    # a string, 4,279 without args, 4,279 with ts NaN. `report` said it was "profiled without
    # profile_memory=True", `diagnose` the same, and `export` wrote a trace of no memory events, exit 0.
    if not WORKER0.is_file():
        pytest.skip("needs ../shared/real_traces")
    path, memory = _chrome_with_every_memory_event_damaged(tmp_path)
    assert len(memory) == 12_838
    damaged = (
        "the trace's [memory] events are damaged: 12,838 of 12,838 skipped (4,280 with a non-integer Bytes, "
        "4,279 with an infinite or NaN ts, 4,279 without args)"
    )
    # THEN the report says so, what was skipped and why, once; not that the profiler left them out
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"] == []
    figures_unknown = f"{damaged}: its memory figures (peak, final, devices) are unknown, not 0"
    assert report["notes"] == [figures_unknown]
    assert main(["report", str(path), "--no-export"]) == 0
    assert f"note: {figures_unknown}\n" in capsys.readouterr().out
    # AND diagnose and compare refuse it in one line that says the same
    refused = f"{path}: {damaged}: no memory figure can be read from it"
    assert main(["diagnose", str(path)]) == 2
    assert _one_error(capsys) == f"kvtrace diagnose: error: {refused}"
    assert main(["compare", str(path), str(WORKER0)]) == 2
    assert _one_error(capsys) == f"kvtrace compare: error: {refused}"
    # AND export skips it as it skips any unreadable input (a warning, exit 2), and exports the others
    out = tmp_path / "tables"
    assert main(["export", str(path), str(WORKER0), "-o", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"kvtrace export: warning: skipped {refused}\n"
    summary = json.loads(captured.out)
    assert summary["skipped"] == [{"path": str(path), "error": refused}]
    assert (summary["inputs"], summary["exported"]) == (2, 1)
    assert summary["rows"]["memory_events"] == 12_838  # the undamaged trace's, every one


def test_a_memory_event_whose_args_is_a_list_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real trace whose first [memory] event has a list for args (said to be "without args")
    if not WORKER0.is_file():
        pytest.skip("needs ../shared/real_traces")
    import gzip

    data = json.loads(gzip.decompress(WORKER0.read_bytes()))
    memory = [e for e in data["traceEvents"] if e.get("name") == "[memory]"]
    memory[0]["args"] = list(memory[0]["args"].values())
    path = tmp_path / "listed.pt.trace.json"
    path.write_text(json.dumps(data))
    # THEN the note says what is wrong with it; the other 12,837 are read
    assert main(["report", str(path), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        f"skipped 1 of {len(data['traceEvents'])} events: 1 [memory] whose args is not an object"
        in (report["notes"])
    )
    assert sum(d["alloc_events"] + d["free_events"] for d in report["devices"]) == len(memory) - 1


def test_memory_events_whose_sizes_add_up_past_int64_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        {"name": "[memory]", "ph": "i", "ts": i, "args": {"Bytes": 2**55, "Addr": i + 1, "Device Type": 1}}
        for i in range(300)
    ]
    path = tmp_path / "sum.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert main(["report", str(path), "--no-export"]) == 2
    assert f"{path}: [memory] events whose sizes add up to" in _one_error(capsys)


def test_diagnose_reads_a_snapshot_whose_history_entries_are_not_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = REAL / "snapshots" / "1.3b_snapshot.pickle"  # torch 2.0: stacks in history, no trace
    if not source.is_file():
        pytest.skip("needs ../shared/real_traces")
    from analyzers.readers.safe_pickle import load_pickle

    data = load_pickle(source)
    damaged = 0
    for segment in data["segments"]:
        for block in segment["blocks"]:
            if block.get("state") == "active_allocated":
                block["frames"], block["history"] = [], ["not a history entry"]
                damaged += 1
    assert damaged
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(data))
    assert main(["diagnose", str(path)]) == 0
    assert "(no stack recorded)" in capsys.readouterr().out


def test_a_vllm_run_with_damaged_engine_files_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tmp_path, "vllm_preempt")
    steps = run / "engine_steps.jsonl"
    text = steps.read_text()
    steps.write_text(text[:-40])  # cut after the run ended
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{steps}: damaged after the run ended: " in _one_error(capsys)
    lines = text.splitlines()
    row = json.loads(lines[0])
    row["blocks_used"] = 1_000_000
    steps.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    assert main(["report", str(run), "--no-export"]) == 2
    assert f"{steps}: line 1: 1000000 blocks used of a pool of" in _one_error(capsys)
    steps.write_text(text)
    info = json.loads((run / "engine.json").read_text())
    info["config"]["max_num_seqs"] = "x"
    (run / "engine.json").write_text(json.dumps(info))
    assert main(["diagnose", str(run)]) == 2
    assert "field 'config.max_num_seqs' must be an integer, got 'x'" in _one_error(capsys)


def _cut_last_step(run: Path) -> None:
    steps = run / "engine_steps.jsonl"
    steps.write_bytes(steps.read_bytes()[:-20])  # the last line cut after the run ended


def _negative_blocks(run: Path) -> None:
    info = json.loads((run / "engine.json").read_text())
    info["num_blocks"] = -16
    (run / "engine.json").write_text(json.dumps(info))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (
            _cut_last_step,
            "engine_steps.jsonl: damaged after the run ended: 95 complete steps of the 96 counted",
        ),
        (
            lambda run: (run / "engine_steps.jsonl").unlink(),
            "engine_steps.jsonl: damaged after the run ended: 0 complete steps of the 96 counted",
        ),
        (
            _negative_blocks,
            "engine.json: field 'num_blocks' out of range: -16, expected 0 to 72057594037927936",
        ),
    ],
    ids=["last_step_cut", "steps_missing", "negative_num_blocks"],
)
def test_export_and_query_refuse_a_damaged_vllm_run_as_report_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None], said: str
) -> None:
    # GIVEN the sample vLLM run (96 engine steps counted by its manifest), damaged after it ended
    run = _copy(tmp_path, "vllm_preempt")
    assert json.loads((run / "manifest.json").read_text())["engine"]["engine_steps"] == 96
    assert len((run / "engine_steps.jsonl").read_text().splitlines()) == 96
    damage(run)
    problem = f"{run}/{said}"
    # WHEN report reads it, THEN it refuses it in one line
    assert main(["report", str(run), "--no-export", "-q"]) == 2
    assert _one_error(capsys) == f"kvtrace report: error: {problem}"
    # AND export skips it with the same line, exit 2, writing no part
    out = tmp_path / "tables"
    assert main(["export", str(run), "-o", str(out), "-q"]) == 2
    assert _one_error(capsys) == f"kvtrace export: warning: skipped {problem}"
    assert not list(out.rglob("*.parquet"))
    # AND query refuses it with the same line, exit 2
    assert main(["query", str(run), "SELECT count(*) FROM engine_steps"]) == 2
    assert _one_error(capsys) == f"kvtrace query: error: {problem}"


def test_an_unexpected_failure_is_one_line_naming_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder the command cannot list (as root, permissions do not stop us: a dangling symlink loop does)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(["report", str(loop)]) == 2
    err = _one_error(capsys)
    assert str(loop) in err


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return err.splitlines()


def _refused_by_every_command(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], said: str
) -> None:
    """Each command that reads a run exits 2 with `said` (what a reader refuses, naming the file), alone on
    its stderr."""
    other = SAMPLES / "static_b2"
    for argv in (
        ["report", str(run), "--no-export"],
        ["diagnose", str(run)],
        ["compare", str(run), str(other)],
    ):
        assert main(argv) == 2, argv
        assert _errors(capsys) == [f"kvtrace {argv[0]}: error: {said}"]
    assert main(["export", str(run), "-o", str(tmp_path / "exported"), "-q"]) == 2
    assert _errors(capsys) == [f"kvtrace export: warning: skipped {said}"]
    assert main(["query", str(run), "SELECT 1"]) == 2
    assert _errors(capsys) == [f"kvtrace query: error: {said}"]


def test_a_kv_event_of_an_unknown_kind_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a real run whose first KV event says "kv": "x" (it was counted as V: layer 0 read K 0, V twice)
    run = _copy(tmp_path, "dynamic_b2")
    events = run / "kv_events.jsonl"
    assert json.loads(events.read_text().splitlines()[0])["kv"] == "k"
    _edit_first_line(events, lambda record: record.__setitem__("kv", "x"))
    # THEN every command refuses it in one line naming the file, the line and the field
    _refused_by_every_command(
        run, tmp_path, capsys, f"{events}: line 1: field 'kv' is 'x', expected 'k' or 'v'"
    )


# json.loads refuses an integer of more than 4300 digits (CPython's int_max_str_digits) with a ValueError,
# not a JSONDecodeError: it stopped report, diagnose, compare and query with "internal error", exit 70.
DIGITS_5000 = "9" * 5000
TOO_LONG = "an integer of more than 4300 digits"


def _with_raw_value(path: Path, field: str, raw: str) -> None:
    """The object of a .json file, or the first line of a log, with `field` set to the JSON text `raw`."""
    lines = [path.read_text()] if path.suffix == ".json" else path.read_text().splitlines()
    record = json.loads(lines[0])
    record[field] = "PLACEHOLDER"
    lines[0] = json.dumps(record).replace('"PLACEHOLDER"', raw)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("file", "field"),
    [("kv_events.jsonl", "storage_bytes"), ("weights.jsonl", "addr"), ("memory_samples.jsonl", "rss_bytes")],
)
def test_an_integer_of_5000_digits_in_a_run_log_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, field: str
) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    _with_raw_value(run / file, field, DIGITS_5000)
    _refused_by_every_command(run, tmp_path, capsys, f"{run / file}: line 1 holds {TOO_LONG}")


def test_an_integer_of_5000_digits_in_the_manifest_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    _with_raw_value(run / "manifest.json", "pid", DIGITS_5000)
    manifest = run / "manifest.json"
    _refused_by_every_command(run, tmp_path, capsys, f"{manifest}: corrupt manifest (it holds {TOO_LONG})")


def _engine_command(command: str, run: Path) -> list[str]:
    """The argv of a command that reads an engine run: report, diagnose or plan (from the run)."""
    return {
        "report": ["report", str(run), "--no-export"],
        "diagnose": ["diagnose", str(run)],
        "plan": ["plan", "--engine", "vllm", "--from-run", str(run)],
    }[command]


@pytest.mark.parametrize(
    ("file", "said"),
    [
        ("engine.json", f"not valid JSON (it holds {TOO_LONG})"),
        ("engine_steps.jsonl", f"line 1 holds {TOO_LONG}"),
        ("engine_requests.jsonl", f"line 1 holds {TOO_LONG}"),
    ],
)
@pytest.mark.parametrize("command", ["report", "diagnose", "plan"])
def test_an_integer_of_5000_digits_in_an_engine_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, file: str, said: str
) -> None:
    run = _copy(tmp_path, "vllm_preempt")
    _with_raw_value(run / file, "t_ns", DIGITS_5000)
    argv = _engine_command(command, run)
    assert main(argv) == 2
    assert _errors(capsys) == [f"kvtrace {command}: error: {run / file}: {said}"]


def test_the_tensorboard_store_names_an_integer_of_5000_digits_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    run = _copy(tmp_path, "dynamic_b2")
    _with_raw_value(run / "kv_events.jsonl", "storage_bytes", DIGITS_5000)
    loaded = RunStore(tmp_path).load("dynamic_b2")
    assert loaded.error == f"{run / 'kv_events.jsonl'}: line 1 holds {TOO_LONG}"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("file", "field", "value", "low", "high"),
    [
        ("kv_events.jsonl", "step", 2**31, -(2**31), 2**31 - 1),
        ("kv_events.jsonl", "step", 2**62, -(2**31), 2**31 - 1),
        ("kv_events.jsonl", "cache", 2**31, -(2**31), 2**31 - 1),
        ("memory_samples.jsonl", "step", -(2**31) - 1, -(2**31), 2**31 - 1),
    ],
)
def test_an_integer_past_its_int32_column_is_named_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, field: str, value: int, low: int, high: int
) -> None:
    # GIVEN a real run with a step or cache id past the export's int32 columns (report read it, export said
    # "unreadable (ArrowInvalid ...)" without the line, query stopped with an internal error, exit 70)
    run = _copy(tmp_path, "dynamic_b2")
    _edit_first_line(run / file, lambda record: record.__setitem__(field, value))
    said = f"{run / file}: line 1: field {field!r} is {value}, expected an integer from {low} to {high}"
    _refused_by_every_command(run, tmp_path, capsys, said)


@pytest.mark.parametrize(
    ("key", "inner", "what"),
    [("model", "hidden_size", "a count"), ("device", "index", "a device index"), (None, "rank", "a rank")],
)
def test_a_manifest_value_past_its_int32_column_is_named_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str | None, inner: str, what: str
) -> None:
    run = _copy(tmp_path, "dynamic_b2")
    manifest = json.loads((run / "manifest.json").read_text())
    (manifest[key] if key else manifest)[inner] = 2**40
    (run / "manifest.json").write_text(json.dumps(manifest))
    dotted = f"{key}.{inner}" if key else inner
    said = f"{run / 'manifest.json'}: field {dotted!r} is {2**40}, expected {what} of at most {2**31 - 1}"
    _refused_by_every_command(run, tmp_path, capsys, said)


@pytest.mark.parametrize("field", ["num_layers", "kv_layers", "sliding_layers"])
def test_a_manifest_of_more_layers_than_any_model_is_named_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    # GIVEN a real run whose manifest says its model has one layer more than MAX_LAYERS, 32,768 (kv_events
    # indexes layers up to 32,767; 10**9 passed the int32 check, and `diagnose` and `plan --from-run` looped
    # over the layers for a minute, holding 5 GB; kv_layers had no bound at all)
    run = _copy(tmp_path, "dynamic_b2")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"][field] = 2**15 + 1
    (run / "manifest.json").write_text(json.dumps(manifest))
    said = (
        f"{run / 'manifest.json'}: field 'model.{field}' is {2**15 + 1}, expected a layer count of at most "
        f"{2**15} (no model has nearly so many)"
    )
    # THEN every command refuses it in one line naming the file and the field, before any work
    _refused_by_every_command(run, tmp_path, capsys, said)
    assert main(["plan", "--from-run", str(run)]) == 2
    assert _errors(capsys) == [f"kvtrace plan: error: {said}"]


@pytest.mark.parametrize("field", ["num_layers", "draft_kv_layers", "sliding_layers"])
@pytest.mark.parametrize("command", ["report", "diagnose", "plan"])
def test_an_engine_model_of_more_layers_than_any_model_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, field: str
) -> None:
    # GIVEN a real vLLM run whose engine.json says its model has a billion layers (the planners divide the
    # pool among them, and split them over pipeline stages)
    run = _copy(tmp_path, "vllm_preempt")
    info = json.loads((run / "engine.json").read_text())
    info["model"][field] = 10**9
    (run / "engine.json").write_text(json.dumps(info))
    # THEN it is refused as a manifest's is
    assert main(_engine_command(command, run)) == 2
    said = f"field 'model.{field}' out of range: {10**9}, expected 0 to {2**15}"
    assert _errors(capsys) == [f"kvtrace {command}: error: {run / 'engine.json'}: {said}"]


@pytest.mark.parametrize(
    "field",
    ["blocks", "tokens", "prompt_tokens", "output_tokens", "dropped_blocks", "t_ns", "max_tokens"],
)
@pytest.mark.parametrize("command", ["report", "diagnose", "plan"])
def test_a_negative_count_in_the_request_log_is_named_as_in_the_step_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, field: str
) -> None:
    # GIVEN a real vLLM run whose request log's line 3 (a request scheduled with 2 blocks) says -3 of a
    # count: it was read as it stood (`diagnose` dropped the request, its totals went from 15 blocks to 13,
    # exit 0), where the same -3 in engine_steps.jsonl was refused
    run = _copy(tmp_path, "vllm_preempt")
    log = run / "engine_requests.jsonl"
    lines = log.read_text().splitlines()
    row = json.loads(lines[2])
    assert (row["event"], row["blocks"]) == ("scheduled", 2)
    lines[2] = json.dumps({**row, field: -3})
    log.write_text("\n".join(lines) + "\n")
    # THEN it is refused in one line naming the file, the line and the field, as the step log's is
    assert main(_engine_command(command, run)) == 2
    assert _errors(capsys) == [f"kvtrace {command}: error: {log}: line 3: field {field!r} out of range: -3"]
    steps = run / "engine_steps.jsonl"
    step_lines = steps.read_text().splitlines()
    first = json.dumps({**json.loads(step_lines[0]), "blocks_used": -3})
    steps.write_text("\n".join([first, *step_lines[1:]]) + "\n")
    log.write_text("\n".join([*lines[:2], json.dumps(row), *lines[3:]]) + "\n")
    assert main(_engine_command(command, run)) == 2
    said = f"{steps}: line 1: field 'blocks_used' out of range: -3"
    assert _errors(capsys) == [f"kvtrace {command}: error: {said}"]


@pytest.mark.parametrize(
    ("field", "value", "shown", "low", "high"),
    [
        ("kv_cache_bytes", 10**30, "100000… (31 digits)", 0, 2**56),  # cut, as shown_integer cuts sizes
        ("bytes_per_block", 2**56 + 1, str(2**56 + 1), 0, 2**56),
        ("num_blocks", 2**60, str(2**60), 0, 2**56),
        ("block_size", 2**31, str(2**31), 1, 2**31 - 1),
    ],
)
@pytest.mark.parametrize("command", ["report", "diagnose", "plan"])
def test_an_engine_size_past_any_device_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    field: str,
    value: int,
    shown: str,
    low: int,
    high: int,
) -> None:
    # GIVEN a real vLLM run whose engine.json says its pool holds 10**30 bytes (the report printed a KV peak
    # of 909494701772928256.00 TiB next to a device peak of 1.00 MiB, exit 0)
    run = _copy(tmp_path, "vllm_preempt")
    info = json.loads((run / "engine.json").read_text())
    info[field] = value
    (run / "engine.json").write_text(json.dumps(info))
    argv = _engine_command(command, run)
    # THEN it is refused like every other size past 2**56 bytes
    assert main(argv) == 2
    said = f"field {field!r} out of range: {shown}, expected {low} to {high}"
    assert _errors(capsys) == [f"kvtrace {command}: error: {run / 'engine.json'}: {said}"]


class _BuiltinsOnly(pickle.Unpickler):
    """The test's own loader of a real snapshot: builtins only, every global refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _real_snapshot(name: str) -> dict[str, Any]:
    path = REAL / "snapshots" / name
    if not path.is_file():
        pytest.skip("needs ../shared/real_traces")
    with open(path, "rb") as fh:
        return _BuiltinsOnly(fh).load()


def _first_block(snap: dict[str, Any]) -> dict[str, Any]:
    return snap["segments"][0]["blocks"][0]


def _first_alloc(snap: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in snap["device_traces"][0] if e["action"] == "alloc")


def _first_free(snap: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in snap["device_traces"][0] if e["action"] == "free_completed")


@pytest.mark.parametrize(
    ("holder", "field", "value", "said"),
    [
        (_first_block, "size", True, "field 'size' of a block is a boolean"),  # read as 1 B
        (_first_block, "address", "0x7f00", "field 'address' of a block is a string"),
        (
            lambda snap: snap["segments"][0],
            "total_size",
            2.0**21,
            "field 'total_size' of a segment is a number",
        ),
        (
            _first_alloc,
            "size",
            "1048576",
            "field 'size' of a trace entry (alloc) is a string",
        ),  # read as 1 MiB
        (_first_free, "size", 1.5e9, "field 'size' of a trace entry (free_completed) is a number with a"),
        (_first_alloc, "addr", False, "field 'addr' of a trace entry (alloc) is a boolean"),
        (_first_alloc, "time_us", 1.5e15, "field 'time_us' of a trace entry (alloc) is a number with a"),
    ],
    ids=[
        "block-size-bool",
        "block-address-str",
        "segment-float",
        "alloc-str",
        "free-float",
        "addr-bool",
        "time",
    ],
)
@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_snapshot_size_or_address_of_the_wrong_type_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    holder: Callable[[dict[str, Any]], dict[str, Any]],
    field: str,
    value: Any,
    said: str,
) -> None:
    # GIVEN a real torch 2.6 dump with one size, address or time that torch never writes (it writes ints; the
    # JSON readers refuse these too): True was read as 1 B, "1048576" as 1 MiB, 1.5e9 as 1,500,000,000 B
    snap = _real_snapshot("memory_forward_bf16_128.pickle")
    holder(snap)[field] = value
    path = tmp_path / "damaged.pickle"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    # THEN one line names the file and the field, exit 2
    assert main([command, str(path), "--no-export"] if command == "report" else [command, str(path)]) == 2
    err = _one_error(capsys)
    assert f"{path}: malformed snapshot (ValueError: {said}" in err and err.endswith("expected an integer)")


@pytest.mark.parametrize("extra", [0, 1], ids=["all-reserved", "one-byte-more"])
def test_a_snapshot_whose_level_before_its_trace_is_more_than_was_ever_reserved_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: int
) -> None:
    # GIVEN a real dump, its trace given a segment released at its end and, at its start, frees of blocks it
    # never allocates (live before the trace) that fill every byte ever reserved, or one byte more (49 frees
    # of 1 TiB on 2 MiB of segments printed a 49 TiB peak, "reserved" 2 MiB)
    snap = _real_snapshot("memory_forward_bf16_128.pickle")
    (trace,) = snap["device_traces"]
    assert {s["device"] for s in snap["segments"]} == {0}
    assert not [e for e in trace if e["action"].startswith("segment")]
    reserved_at_dump = sum(s["total_size"] for s in snap["segments"])
    # What was live before the trace, from the raw file: the blocks held at the dump that the trace does not
    # leave allocated (it frees no block it did not allocate: checked), by their requested bytes
    allocated: set[int] = set()
    for entry in trace:
        if entry["action"] == "alloc":
            allocated.add(entry["addr"])
        elif entry["action"] == "free_completed":
            allocated.remove(entry["addr"])
    live = ("active_allocated", "active_pending_free", "active_awaiting_free")
    before = sum(
        b["requested_size"]
        for s in snap["segments"]
        for b in s["blocks"]
        if b["state"] in live and b["address"] not in allocated
    )
    assert 0 < before < reserved_at_dump
    released = 64 * 2**20  # a 64 MiB segment freed at the end (empty_cache)
    unseen = reserved_at_dump + released - before + extra
    first, last, far = trace[0]["time_us"], trace[-1]["time_us"], 1 << 50
    pieces = [unseen // 2, unseen - unseen // 2]
    frees = [
        {
            "action": "free_completed",
            "addr": far + i * (1 << 40),
            "size": size,
            "stream": 0,
            "time_us": first - 1,
        }
        for i, size in enumerate(pieces)
    ]
    segment_free = {"action": "segment_free", "addr": far - (1 << 40), "size": released, "stream": 0}
    snap["device_traces"] = [[*frees, *trace, {**segment_free, "time_us": last + 1}]]
    path = tmp_path / "damaged.pickle"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    if not extra:
        # THEN a level the segments could hold reads, and it is the peak
        assert main(["report", str(path), "--json", "--no-export"]) == 0
        (device,) = json.loads(capsys.readouterr().out)["devices"]
        assert device["peak_allocated_bytes"] == reserved_at_dump + released and device["peak_before_trace"]
        return
    # AND one byte more is no state the allocator was in: refused in one line by every command, exit 2
    level = reserved_at_dump + released + 1
    for argv in (["report", str(path), "--no-export"], ["diagnose", str(path)]):
        assert main(argv) == 2
        assert _one_error(capsys) == (
            f"kvtrace {argv[0]}: error: {path}: not a real snapshot (damaged or made up): on cuda:0 its "
            f"trace begins with {level:,} B allocated (blocks it frees or the dump holds that it never "
            f"allocates), more than its segments ever reserved ({reserved_at_dump:,} B at the dump, plus "
            f"{released:,} B the trace released)"
        )
