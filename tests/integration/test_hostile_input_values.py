"""Values in another's files that no recorder writes, through the real CLI on copies of real runs and
snapshots: a file name that holds a newline or a terminal escape, a size no device holds, and fields the
readers took silently (an unknown run status, KV dtype or trace address, repeated KV `seq`s, a negative
free memory at an OOM). Each is said in one line naming the file, or refused so; the figures are unchanged.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from plotly.offline import get_plotlyjs

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
REAL_SNAPSHOTS = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"


def _run_copy(tmp_path: Path, name: str = "run") -> Path:
    copy = tmp_path / name
    shutil.copytree(SAMPLES / "dynamic_b2", copy)
    return copy


def _report(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    status = main(["report", str(path), "--no-export", *extra])
    out, err = capsys.readouterr()
    return status, out, err


# -- 1. names with control characters -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shown"), [("a\nb", "a\\nb"), ("x\x1b[31m", "x\\x1b[31m")])
def test_a_run_folder_named_with_control_characters_is_named_escaped_in_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, shown: str
) -> None:
    # GIVEN a run whose folder name holds a newline or a terminal escape, with a damaged manifest
    run = _run_copy(tmp_path, name)
    (run / "manifest.json").write_text("{")
    # WHEN it is reported
    status, out, err = _report(run, capsys)
    # THEN the error is one line that names the folder with the control character escaped
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "\x1b" not in err
    assert err.startswith(f"kvtrace report: error: {tmp_path}/{shown}/manifest.json: corrupt manifest")


def test_a_note_names_a_run_folder_with_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run named "x<ESC>[31m" whose KV log has one line of an unknown event (a note, not an error)
    run = _run_copy(tmp_path, "x\x1b[31m")
    log = run / "kv_events.jsonl"
    lines = log.read_text().splitlines()
    lines[4] = lines[4].replace('"event":"created"', '"event":"bogus"')
    log.write_text("\n".join(lines) + "\n")
    # WHEN it is reported
    status, out, _ = _report(run, capsys)
    # THEN the header and the note name it escaped, each on one line; nothing recolours the terminal
    assert status == 0 and "\x1b" not in out
    shown = f"{tmp_path}/x\\x1b[31m"
    assert out.splitlines()[0] == f"kvtrace report: {shown} (run)"
    assert f"  note: {shown}/kv_events.jsonl: skipped 1 of 256 lines whose event is not one" in out


def test_export_names_a_skipped_run_with_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a folder of two runs, one named "x<ESC>[31m" with a damaged manifest
    folder = tmp_path / "runs"
    (run := _run_copy(folder, "x\x1b[31m")).joinpath("manifest.json").write_text("{")
    _run_copy(folder, "good")
    # WHEN the folder is exported
    status = main(["export", str(folder), "-o", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    # THEN the skipped run's line names it escaped, on one line (status 2: an input was skipped)
    assert status == 2 and "\x1b" not in err
    assert f"kvtrace export: warning: skipped {folder}/x\\x1b[31m/manifest.json: corrupt manifest" in err
    assert str(run) not in err


def test_a_plain_name_prints_as_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_copy(tmp_path, "plain run é")
    (run / "manifest.json").write_text("{")
    status, _, err = _report(run, capsys)
    assert status == 2
    assert err.startswith(f"kvtrace report: error: {run}/manifest.json: corrupt manifest")


# -- 2. sizes no device holds -------------------------------------------------------------------------


def _snapshot(tmp_path: Path, name: str = "oom_snapshot.pickle") -> dict[str, Any]:
    source = REAL_SNAPSHOTS / name
    if not source.exists():
        pytest.skip(f"{source} is not here")
    with source.open("rb") as f:
        data: dict[str, Any] = pickle.load(f)  # a real dump: plain dicts, lists and numbers
    return data


def _write(tmp_path: Path, data: dict[str, Any], name: str = "snapshot.pickle") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data))
    return path


def test_a_segment_size_of_401_digits_is_refused_without_printing_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real snapshot whose first segment's total_size is 10**400
    data = _snapshot(tmp_path)
    data["segments"][0]["total_size"] = 10**400
    path = _write(tmp_path, data)
    # WHEN it is reported
    status, out, err = _report(path, capsys)
    # THEN one line names the file and the field, the size cut to its first digits and its length
    assert status == 2 and out == ""
    assert err == (
        f"kvtrace report: error: {path}: malformed snapshot (ValueError: size 100000… (401 digits) in a "
        "segment, more than any device holds)\n"
    )


# -- 3. fields taken silently -------------------------------------------------------------------------


def test_a_negative_free_memory_at_an_oom_is_noted_and_read_as_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real snapshot with an OOM entry whose device_free is -3
    data = _snapshot(tmp_path)
    oom = {"action": "oom", "size": 1 << 20, "device_free": -3, "addr": 0, "stream": 0, "frames": []}
    data["device_traces"][0].insert(0, oom)
    path = _write(tmp_path, data)
    # WHEN it is reported
    status, out, _ = _report(path, capsys)
    # THEN a note names the file and the value, and the OOM's free memory is unknown, not -3 B
    assert status == 0
    assert (
        f"  note: {path}: 1 oom entry gives a free memory no device has on cuda:0 (-3 B): read as unknown, "
        "as an OOM torch records without it\n" in out
    )
    assert "  OOM on cuda:0: requested 1.00 MiB, free -  (see `kvtrace diagnose`)" in out


def _edit_line(path: Path, index: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines()
    assert old in lines[index]
    lines[index] = lines[index].replace(old, new)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("edit", "note"),
    [
        (
            ("manifest.json", None, '"status": "ok"', '"status": "weird"'),
            '{run}/manifest.json: ended.status is "weird", not one kvtrace writes (exception, interrupted, '
            "ok, running): read as a run that ended, how is unknown",
        ),
        (
            ("kv_events.jsonl", 4, '"dtype":"float32"', '"dtype":"complex1024"'),
            "{run}/kv_events.jsonl: 1 line gives a dtype that torch has not ('complex1024' on 1 line), "
            "which no recorder writes (damage): read as logged, their storage_bytes and logical_bytes as "
            "written, with no element size to check them by",
        ),
        (
            ("kv_events.jsonl", 5, '"seq":6,', '"seq":5,'),
            "{run}/kv_events.jsonl: 1 line repeats the seq of a line above, where each line's is one more "
            "than the last's (damage, or two logs joined): read in the file's order",
        ),
    ],
    ids=["status", "dtype", "seq"],
)
def test_a_run_field_no_recorder_writes_is_noted_and_the_figures_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, int | None, str, str], note: str
) -> None:
    # GIVEN the sample run's report, and a copy with one field changed to a value no recorder writes
    status, before, _ = _report(SAMPLES / "dynamic_b2", capsys, "--json")
    assert status == 0
    run = _run_copy(tmp_path)
    name, index, old, new = edit
    if index is None:
        (run / name).write_text((run / name).read_text().replace(old, new, 1))
    else:
        _edit_line(run / name, index, old, new)
    # WHEN the copy is reported
    status, after, _ = _report(run, capsys, "--json")
    # THEN one note names the file and what it holds, and every figure is the sample's
    assert status == 0
    old_report, new_report = json.loads(before), json.loads(after)
    assert new_report["notes"] == [*old_report["notes"], note.format(run=run)]
    for report in (old_report, new_report):
        report.pop("notes"), report.pop("path", None), report.pop("source", None)
    assert _without_paths(new_report, str(run)) == _without_paths(old_report, str(SAMPLES / "dynamic_b2"))


def _without_paths(value: Any, path: str) -> Any:
    """`value` with the run's own path taken out of its strings: the copy lies elsewhere."""
    if isinstance(value, dict):
        return {key: _without_paths(item, path) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item, path) for item in value]
    return value.replace(path, "RUN") if isinstance(value, str) else value


def test_a_trace_memory_event_whose_addr_is_no_integer_is_noted_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sample run's report, and a copy whose profiler trace has one [memory] event with Addr "zz"
    status, before, _ = _report(SAMPLES / "dynamic_b2", capsys, "--json")
    assert status == 0
    run = _run_copy(tmp_path)
    (trace,) = (run / "profiler").glob("*.pt.trace.json.gz")
    text = gzip.decompress(trace.read_bytes()).decode()
    start = text.index('"Addr": ')
    end = text.index(",", start)
    trace.write_bytes(gzip.compress((text[:start] + '"Addr": "zz"' + text[end:]).encode()))
    # WHEN the copy is reported
    status, after, _ = _report(run, capsys, "--json")
    # THEN a note names the trace and the value; the event is read without its address, every figure kept
    assert status == 0
    old_report, new_report = json.loads(before), json.loads(after)
    note = (
        f'{trace}: 1 [memory] event has an Addr that is not an integer (the first: "zz"), which no '
        "profiler writes (damage): read without an address, as in a trace from before 2022, their Bytes "
        "counted"
    )
    assert new_report["notes"] == [*old_report["notes"], note]
    for report in (old_report, new_report):
        report.pop("notes"), report.pop("path", None), report.pop("source", None)
    assert _without_paths(new_report, str(run)) == _without_paths(old_report, str(SAMPLES / "dynamic_b2"))


@pytest.mark.parametrize("command", ["diagnose", "compare"])
def test_diagnose_and_compare_name_a_run_with_a_newline_on_one_line(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run folder named "a\nb"
    run = _run_copy(tmp_path, "a\nb")
    argv = [command, str(run)] + ([str(SAMPLES / "static_b2")] if command == "compare" else [])
    # WHEN diagnosed, or compared with another run THEN its name is escaped on the first line
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "a\\nb" in first
    assert first.startswith("kvtrace diagnose: ") or first.rstrip().endswith("static_b2")


_RAW_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # not the page's own \t, \n and \r


@pytest.mark.parametrize(("name", "shown"), [("x\x1b[31m", "x\\x1b[31m"), ("a\rb", "a\\rb")])
@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_page_names_a_run_with_control_characters_written_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, name: str, shown: str
) -> None:
    # GIVEN a run named "x<ESC>[31m" (or "a<CR>b") whose KV log has one line of an unknown event (a note)
    run = _run_copy(tmp_path, name)
    log = run / "kv_events.jsonl"
    lines = log.read_text().splitlines()
    lines[4] = lines[4].replace('"event":"created"', '"event":"bogus"')
    log.write_text("\n".join(lines) + "\n")
    page = tmp_path / "page.html"
    other = [str(SAMPLES / "static_b2")] if command == "compare" else ["--no-export"]
    # WHEN its HTML page is written
    assert main([command, str(run), *other, "-o", str(page)]) == 0
    capsys.readouterr()
    text = page.read_text().replace(get_plotlyjs(), "")  # plotly.js, minified, holds some of its own
    # THEN the page carries no raw control character; the note names the run as the text report does
    assert _RAW_CONTROL.findall(text) == [] and name not in text
    assert f"{tmp_path}/{shown}/kv_events.jsonl: skipped 1 of 256 lines whose event is not one" in text
    if command != "compare":  # compare's title is its own; the others name the input
        assert f"<title>kvtrace: {tmp_path}/{shown}</title>" in text


def test_a_segment_on_device_10_to_the_30_is_refused_without_printing_its_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a snapshot of this repo's samples whose segments are all on device 10**30
    with (SAMPLES / "h200" / "dynamic_b24" / "snapshots" / "exit.pickle").open("rb") as f:
        data = pickle.load(f)
    for segment in data["segments"]:
        segment["device"] = 10**30
    path = _write(tmp_path, data)
    # WHEN it is reported
    status, out, err = _report(path, capsys)
    # THEN one line names the file and the device index, cut to its first digits and its length
    assert status == 2 and out == ""
    said = "a segment on device 100000… (31 digits)"
    assert err == f"kvtrace report: error: {path}: malformed snapshot ({said})\n"


def test_an_engine_step_field_of_31_digits_is_refused_without_printing_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a copy of the vLLM sample whose first step's blocks used is 10**30 (engine.json's fields:
    # test_damaged_records' test_an_engine_size_past_any_device_is_named)
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "vllm_preempt", run)
    steps = run / "engine_steps.jsonl"
    first, *rest = steps.read_text().splitlines()
    steps.write_text("\n".join([json.dumps({**json.loads(first), "blocks_used": 10**30}), *rest]) + "\n")
    # WHEN it is reported
    status, out, err = _report(run, capsys)
    # THEN one line names the file, the line and the field, the value cut to its first digits and its length
    assert status == 2 and out == ""
    said = "field 'blocks_used' out of range: 100000… (31 digits)"
    assert err == f"kvtrace report: error: {steps}: line 1: {said}\n"


@pytest.mark.parametrize("field", ["num_layers", "num_attention_heads", "num_kv_heads", "head_dim"])
def test_a_manifest_geometry_of_zero_is_refused_by_plan_naming_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    # GIVEN a run whose manifest gives its model 0 of a geometry field (the manifest's checks take 0 as a
    # count): plan --from-run said "KV bytes per token and block size must be positive" (no file named),
    # stopped with an internal error (0 layers: exit 70), or planned a model of no attention heads
    run = _run_copy(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"][field] = 0
    (run / "manifest.json").write_text(json.dumps(manifest))
    # WHEN it is planned from THEN one line names the manifest and the field, exit 2
    assert main(["plan", "--from-run", str(run), "-q"]) == 2
    out, err = capsys.readouterr()
    assert err == (
        f"kvtrace plan: error: {run / 'manifest.json'}: field 'model.{field}' is 0, and no model with KV has "
        "none: plan it with --preset or --config instead of --from-run\n"
    )
    assert out == ""


def _as_a_user(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`kvtrace ARGV` as a process that permission bits apply to: root reads through them, so as root it
    runs without the capabilities that let it (setpriv, util-linux)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads any file, and setpriv is not here to drop that")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [*prefix, sys.executable, "-m", "kvtrace.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_unreadable_run_parts_are_named_as_report_names_them(tmp_path: Path) -> None:
    # GIVEN a run folder that cannot be listed, and a run whose profiler folder cannot be
    closed, no_profiler = _run_copy(tmp_path, "closed"), _run_copy(tmp_path, "no_profiler")
    closed.chmod(0)
    (no_profiler / "profiler").chmod(0)
    try:
        # WHEN plan reads the first, export the second
        planned = _as_a_user(["plan", "--from-run", str(closed), "-q"])
        exported = _as_a_user(["export", str(no_profiler), "-q", "-o", str(tmp_path / "tables")])
    finally:
        closed.chmod(0o755)
        (no_profiler / "profiler").chmod(0o755)
    # THEN each is one line naming a file that is there (plan named engine.json, which no such run has;
    # export said "unreadable (PermissionError: [Errno 13] Permission denied: '...')")
    assert (planned.returncode, planned.stderr) == (
        2,
        f"kvtrace plan: error: {closed / 'manifest.json'}: Permission denied\n",
    )
    assert (exported.returncode, exported.stderr) == (
        2,
        f"kvtrace export: warning: skipped {no_profiler / 'profiler'}: cannot read (Permission denied)\n",
    )
