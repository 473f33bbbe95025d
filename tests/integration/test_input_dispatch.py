"""What `kvtrace report` / `diagnose` do with inputs that are not one run or one file (issue 10, items 4-5):
folders of runs, profiler folders, empty or foreign folders, JSON that is not a trace, and events with
wrong types. Each case runs the real CLI on real files (the sample runs) and checks exit status and output.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
RUNS = ("dynamic_b2", "sliding_b2", "static_b2")


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _runs_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    for name in RUNS:
        shutil.copytree(SAMPLES / name, folder / name)
    return folder


@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_folder_of_runs_lists_them_and_says_how_to_pick_one(tmp_path: Path, command: str) -> None:
    folder = _runs_folder(tmp_path)
    code, out, err = _cli(command, str(folder), "--json")
    assert (code, out) == (2, "")
    names = ", ".join(str(folder / name) for name in RUNS)
    said = f"a folder of 3 kvtrace runs, not one run; pass one of them: {names}"
    assert err == f"kvtrace {command}: error: {folder}: {said}\n"


@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_folder_of_many_runs_is_one_line_naming_the_first_few(tmp_path: Path, command: str) -> None:
    # GIVEN a folder of 5 runs (the error took one line per run, 301 lines for 300)
    folder = tmp_path / "runs"
    for number in range(5):
        shutil.copytree(SAMPLES / RUNS[0], folder / f"run{number}")
    code, out, err = _cli(command, str(folder))
    # THEN one line names the first three and counts the others
    assert (code, out) == (2, "")
    names = ", ".join(str(folder / f"run{number}") for number in range(3))
    said = f"a folder of 5 kvtrace runs, not one run; pass one of them: {names} and 2 more"
    assert err == f"kvtrace {command}: error: {folder}: {said}\n"


def test_a_folder_of_one_run_names_it_in_the_singular(tmp_path: Path) -> None:
    # GIVEN a folder holding one run (it said "a folder of 1 kvtrace runs, not one run")
    folder = tmp_path / "runs"
    shutil.copytree(SAMPLES / RUNS[0], folder / "only")
    code, out, err = _cli("report", str(folder), "--no-export")
    assert (code, out) == (2, "")
    said = f"a folder holding 1 kvtrace run, not a run itself; pass it: {folder / 'only'}"
    assert err == f"kvtrace report: error: {folder}: {said}\n"


@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_folder_of_runs_lists_its_run_groups_too(tmp_path: Path, command: str) -> None:
    # GIVEN a folder of two runs and a run group (a folder of rank-<r> runs) beside them
    folder = tmp_path / "runs"
    for name in RUNS[:2]:
        shutil.copytree(SAMPLES / name, folder / name)
    shutil.copytree(SAMPLES / RUNS[2], folder / "group" / "rank-0")
    # WHEN it is passed as one input
    code, out, err = _cli(command, str(folder), "--json")
    # THEN the group is listed with the runs, as the input it is (report and compare read a group whole)
    assert (code, out) == (2, "")
    listed = f"{folder / 'dynamic_b2'}, {folder / 'group'} (a run group), {folder / 'sliding_b2'}"
    assert err == (
        f"kvtrace {command}: error: {folder}: a folder of 3 kvtrace runs (1 of them a run group), not one "
        f"run; pass one of them: {listed}\n"
    )
    # AND a group alone is read as the group it is
    code, out, err = _cli(command, str(folder / "group"), "--json")
    assert code == 0, err


def test_plan_from_a_run_group_names_a_rank_to_pass(tmp_path: Path) -> None:
    # GIVEN a run group: one run per rank, no manifest of its own
    group = tmp_path / "group"
    shutil.copytree(SAMPLES / RUNS[0], group / "rank-0")
    shutil.copytree(SAMPLES / RUNS[0], group / "rank-1")
    # WHEN a command that takes one run is given the group
    code, out, err = _cli("plan", "--from-run", str(group), "--json")
    # THEN one line says what it is and names a rank's run to pass
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"kvtrace plan: error: {group}: a run group (2 rank-<r>/ runs, one per rank), not one run: pass one "
        f"rank's run, e.g. {group / 'rank-0'}"
    )


def test_a_profiler_folder_reads_its_trace(tmp_path: Path) -> None:
    profiler = SAMPLES / "dynamic_b2" / "profiler"
    (trace,) = sorted(profiler.iterdir())
    code, out, err = _cli("report", str(profiler), "--json", "-q")
    assert code == 0, err
    from_folder = json.loads(out)
    code, out, _ = _cli("report", str(trace), "--json", "-q")
    assert code == 0
    from_file = json.loads(out)
    assert from_folder["source"] == {"kind": "chrome_trace", "path": str(trace)}
    assert from_folder["devices"] == from_file["devices"]


@pytest.mark.parametrize("command", ["report", "diagnose"])
@pytest.mark.parametrize("content", ["empty", "foreign"])
def test_a_folder_that_is_nothing_of_ours_is_one_line_exit_2(
    tmp_path: Path, command: str, content: str
) -> None:
    folder = tmp_path / "stuff"
    folder.mkdir()
    if content == "foreign":
        (folder / "notes.txt").write_text("hello")
        (folder / "sub").mkdir()
    code, out, err = _cli(command, str(folder))
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"kvtrace {command}: error: {folder}: ")
    assert ("empty folder" in err) == (content == "empty")


@pytest.mark.parametrize("text", ['{"hello": [1, 2, 3]}', "{}", '{"traceEvents": 5}'])
def test_json_that_is_not_a_chrome_trace_says_so(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(text)
    code, out, err = _cli("report", str(path), "--json", "-q")
    assert code == 2
    assert out == ""
    assert err.startswith(f"kvtrace report: error: {path}: not a Chrome trace")
    assert len(err.strip().splitlines()) == 1


def _mem(ts: Any, nbytes: Any, addr: Any = 1000) -> dict[str, Any]:
    args = {"Device Type": 1, "Device Id": 0, "Addr": addr, "Bytes": nbytes}
    return {"ph": "i", "name": "[memory]", "ts": ts, "pid": 1, "tid": 1, "args": args}


def test_events_with_wrong_types_are_counted_with_their_reason_in_notes(tmp_path: Path) -> None:
    events = [
        _mem(1, 100),
        _mem("x", 50),
        _mem(2, "lots"),
        _mem(3, 7, addr=2000),
        _mem(4, -100),
        _mem(5, "more"),
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    code, out, err = _cli("report", str(path), "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    (device,) = result["devices"]
    assert (device["alloc_events"], device["free_events"]) == (2, 1)
    assert device["peak_allocated_bytes"] == 107
    skipped = [note for note in result["notes"] if note.startswith("skipped 3 of 6 events")]
    assert len(skipped) == 1, result["notes"]
    assert "2 [memory] with a non-integer Bytes" in skipped[0]
    assert "1 [memory] with a non-numeric ts" in skipped[0]


@pytest.mark.parametrize(
    ("first_name", "last_name"),
    [
        # one worker's traces, as torch.profiler names them: the last by name is the newest
        ("host_1.100.pt.trace.json.gz", "host_1.200.pt.trace.json.gz"),
        # two workers' (as in real_traces/chrome): the last by name, worker0's, is the older one
        ("rank-34.200.pt.trace.json.gz", "worker0.100.pt.trace.json.gz"),
    ],
    ids=["one-worker", "two-workers"],
)
def test_a_profiler_folder_with_several_traces_reads_the_last_by_name_and_says_so(
    tmp_path: Path, first_name: str, last_name: str
) -> None:
    folder = tmp_path / "profiler"
    folder.mkdir()
    runs = [SAMPLES / name / "profiler" for name in ("static_b2", "dynamic_b2")]
    first, last = (sorted(run.iterdir())[0] for run in runs)
    shutil.copy(first, folder / first_name)
    shutil.copy(last, folder / last_name)
    code, out, err = _cli("report", str(folder), "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    _, alone, _ = _cli("report", str(last), "--json", "-q")
    assert result["devices"] == json.loads(alone)["devices"]
    # the note says the rule it followed: "the newest" was untrue of the second folder
    said = f"{folder} holds 2 profiler traces: read the last by name, {last_name}"
    assert f"{said} (name a trace to read another)" in result["notes"]


@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_run_folder_without_its_manifest_names_it_and_the_trace_that_reads_alone(
    tmp_path: Path, command: str
) -> None:
    # GIVEN a copy of a real recorded run whose manifest.json is gone (its KV log and profiler/ still there)
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    (run / "manifest.json").unlink()
    (trace,) = sorted((run / "profiler").iterdir())
    # WHEN it is read
    code, out, err = _cli(command, str(run))
    # THEN one line says the manifest is missing and names the trace that reads on its own (it said the
    # folder held no torch.profiler traces)
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"kvtrace {command}: error: {run}: not a kvtrace run: no manifest.json, which its ")
    assert err.strip().endswith(f"; its profiler trace reads on its own: pass {trace}")
    # AND `kvtrace export` finds the folder as that same problem, not its trace as the run (which lost the
    # KV log without a word); the trace named reads
    from analyzers.export_inputs import find_inputs

    found, problems = find_inputs([run])
    assert (found, problems) == ([], [(str(run), err.strip().split(": error: ", 1)[1])])
    code, out, err = _cli(command, str(trace), "--json")
    assert code == 0, err


def test_a_folder_with_a_trace_deeper_down_names_it(tmp_path: Path) -> None:
    # GIVEN a folder whose only input is a real trace two folders down (a TensorBoard log dir's layout)
    folder = tmp_path / "logs"
    (folder / "worker0" / "plugins").mkdir(parents=True)
    (trace,) = sorted((SAMPLES / "dynamic_b2" / "profiler").iterdir())
    shutil.copy(trace, folder / "worker0" / "plugins" / trace.name)
    # WHEN it is reported
    code, out, err = _cli("report", str(folder))
    # THEN the one line names that trace (it said the folder held none), as export would find it
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1
    assert f"but it holds {folder / 'worker0' / 'plugins' / trace.name}: pass that" in err


@pytest.mark.parametrize("command", ["report", "diagnose", "compare"])
def test_a_run_group_copied_without_its_manifests_names_the_first_rank(tmp_path: Path, command: str) -> None:
    # GIVEN a run group's folder whose rank folders were copied without their manifest.json (a real run's
    # logs and profiler trace in each): no rank reads, so it is no group
    group = tmp_path / "tp"
    for rank in range(2):
        shutil.copytree(SAMPLES / "dynamic_b2", group / f"rank-{rank}")
        (group / f"rank-{rank}" / "manifest.json").unlink()
    (trace,) = sorted((group / "rank-0" / "profiler").iterdir())
    # WHEN the group is read
    code, out, err = _cli(
        command, str(group), *([str(SAMPLES / "static_b2")] if command == "compare" else [])
    )
    # THEN the one line names rank-0's missing manifest and the trace that reads on its own, as `kvtrace
    # export` does (it said the folder held no runs or traces "in it or below it")
    assert (code, out) == (2, "")
    assert err == (
        f"kvtrace {command}: error: {group / 'rank-0'}: not a kvtrace run: no manifest.json, which its "
        f"kv_events.jsonl cannot be read without (a partial copy?); its profiler trace reads on its own: "
        f"pass {trace}\n"
    )


@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_a_run_folder_without_its_manifest_and_an_unreadable_profiler_folder_says_both(
    tmp_path: Path, command: str, make_unreadable: Callable[[Path], None]
) -> None:
    # GIVEN a copy of a real run whose manifest.json is gone and whose profiler/ this user may not list
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    (run / "manifest.json").unlink()
    make_unreadable(run / "profiler")
    # WHEN it is read
    code, out, err = _cli(command, str(run))
    # THEN one line says the manifest is missing, the news, and that profiler/ could not be searched (it said
    # only `.../profiler: Permission denied`)
    assert (code, out) == (2, "")
    assert err == (
        f"kvtrace {command}: error: {run}: not a kvtrace run: no manifest.json, which its kv_events.jsonl "
        "cannot be read without (a partial copy?); its profiler/ folder, which may hold a trace that reads "
        f"on its own, cannot be searched ({run / 'profiler'}: permission denied)\n"
    )


def test_a_folder_with_links_back_to_itself_is_searched_once(tmp_path: Path) -> None:
    # GIVEN a folder of nothing kvtrace reads: one real subfolder, a link to itself and one from the
    # subfolder up to it (a walk along the links meets a new path at every step)
    folder = tmp_path / "logs"
    (folder / "sub").mkdir(parents=True)
    (folder / "self").symlink_to(".")
    (folder / "sub" / "up").symlink_to("..")
    (folder / "readme.txt").write_text("notes\n")
    # WHEN it is reported
    code, out, err = _cli("report", str(folder))
    # THEN the one line says every folder below it was searched: there are two real ones (it said "the
    # first 10,000 folders below it", counting each visit through a link as a folder)
    assert (code, out) == (2, "")
    assert err == (
        f"kvtrace report: error: {folder}: a folder that is not a kvtrace run (no manifest.json) and holds "
        "no runs, torch.profiler traces (*.pt.trace.json[.gz]) or snapshots (*.pickle) in it or below it; "
        "pass a run, a trace or a snapshot\n"
    )


RUN_FILES = ["kv_events.jsonl", "manifest.json", "weights.jsonl", "memory_samples.jsonl"]


@pytest.mark.parametrize("command", ["report", "diagnose", "compare"])
@pytest.mark.parametrize("name", RUN_FILES)
def test_a_runs_own_log_or_manifest_names_the_run_folder_to_pass(command: str, name: str) -> None:
    # GIVEN a file of a real run (not its profiler trace, which reads on its own), WHEN handed over instead
    # of the run's folder
    run = SAMPLES / "dynamic_b2"
    argv = [command, str(run / name)] + ([str(run)] if command == "compare" else [])
    code, out, err = _cli(*argv)
    # THEN one line says whose file it is and to pass the folder (it said "corrupt JSON: extra data ...")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"kvtrace {command}: error: {run / name}: a file of the kvtrace run {run}, not a trace or snapshot: "
        "pass the run's folder"
    ]
    # AND the run's profiler trace still reads on its own
    (trace,) = (run / "profiler").iterdir()
    assert _cli("report", str(trace), "--no-export", "-q")[0] == 0
