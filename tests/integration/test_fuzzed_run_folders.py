"""Run folders a seeded fuzzer of the readers found mishandled (a file replaced by a pipe, a manifest cut or
of the wrong type, every rank of a group damaged), each rebuilt here by hand from a sample run: one line on
stderr naming the file and the problem, status 2, never a hang.

The CLI runs in a child process with a time limit, since the code before these fixes waited for ever on a
named pipe; a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_traces"
LIMIT_S = 60  # a sample run's report or diagnosis takes about a second here


def _kvtrace(*argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "kvtrace.cli", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"kvtrace {' '.join(argv)} still ran after {LIMIT_S} s (a hang)")


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("pipe", "manifest.json: a named pipe, not a regular file"),
        ("cut", "manifest.json: corrupt manifest"),
        ("list", "manifest.json: not a kvtrace manifest"),
    ],
)
def test_diagnose_of_an_engine_run_refuses_a_damaged_manifest(tmp_path: Path, damage: str, said: str) -> None:
    # GIVEN a vLLM run (engine files whole) whose manifest is a named pipe, cut mid-way, or a JSON list
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "vllm_refused", run)
    manifest = run / "manifest.json"
    text = manifest.read_text()
    manifest.unlink()
    if damage == "pipe":
        os.mkfifo(manifest)  # before: read as the manifest, waiting for a writer for ever
    elif damage == "cut":
        manifest.write_text(text[: len(text) // 2])  # before: read as {}, status 0, its budget unsaid
    else:
        manifest.write_text(json.dumps([json.loads(text)]))
    # WHEN it is diagnosed
    result = _kvtrace("diagnose", str(run), "--json")
    # THEN one line names the manifest and what is wrong with it, as `kvtrace report` does
    line = _one_error_line(result)
    assert line.startswith(f"kvtrace diagnose: error: {run / 'manifest.json'}")
    assert said in line
    assert result.stdout == ""
    report_line = _one_error_line(_kvtrace("report", str(run), "--json", "--no-export", "-q"))
    assert report_line.split(": error: ")[1].split(" (")[0] == line.split(": error: ")[1].split(" (")[0]


@pytest.mark.parametrize("lock", ["pipe", "folder"])
def test_an_interrupted_run_whose_lock_file_is_not_a_file_is_read(tmp_path: Path, lock: str) -> None:
    # GIVEN a run whose process died (its manifest still says "running"), with a named pipe or a folder where
    # the recording's lock file goes: the reader probes that lock to tell a live recording from a dead one
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["ended"] = {"status": "running"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    if lock == "pipe":
        os.mkfifo(run / ".kvtrace.lock")  # before: opening it waited for a writer, and the report never ended
    else:
        (run / ".kvtrace.lock").mkdir()
    # WHEN it is reported and diagnosed
    report = _kvtrace("report", str(run), "--json", "--no-export", "-q")
    diagnosis = _kvtrace("diagnose", str(run), "--json")
    # THEN both finish, and the report says the process died (no live recording holds the folder)
    assert report.returncode == 0, report.stderr
    assert diagnosis.returncode == 0, diagnosis.stderr
    notes = json.loads(report.stdout)["notes"]
    assert "the run never finished (the process died): read up to its last flushed step" in notes
    # The figures are the whole run's: every line of its KV log was flushed before it "died"
    events = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    assert len(events) == manifest["kv_events"] == 256


def test_a_run_group_with_no_readable_rank_names_the_first_ranks_problem(tmp_path: Path) -> None:
    # GIVEN a run group of two ranks: rank 0's manifest cut mid-way, rank 1's written by a newer kvtrace
    group = tmp_path / "group"
    for rank in (0, 1):
        shutil.copytree(SAMPLES / "dynamic_b2", group / f"rank-{rank}")
    manifest_text = (group / "rank-0" / "manifest.json").read_text()
    (group / "rank-0" / "manifest.json").write_text(manifest_text[:100])
    newer = json.loads(manifest_text)
    newer["schema_version"] = 999
    (group / "rank-1" / "manifest.json").write_text(json.dumps(newer))
    # WHEN the group is reported, diagnosed and compared
    for argv in (
        ("report", str(group), "--json", "--no-export", "-q"),
        ("diagnose", str(group), "--json"),
        ("compare", str(group), str(SAMPLES / "dynamic_b2")),
    ):
        line = _one_error_line(_kvtrace(*argv))
        # THEN the one line names the group, then rank 0's file and its problem, and counts the rest
        # (before: "no rank of this run group could be read", and no file named)
        assert line.startswith(
            f"kvtrace {argv[0]}: error: {group}: no rank of this run group could be read: "
        )
        assert f"rank 0 left out: {group / 'rank-0' / 'manifest.json'}: corrupt manifest (" in line
        assert line.endswith(" (and 1 more)")


def test_a_run_group_with_one_unreadable_rank_gives_the_others_and_exits_2(tmp_path: Path) -> None:
    # GIVEN a run group of two ranks (the sample run as rank 0 and 1 of 2) whose rank 1 manifest is cut to "{"
    group = tmp_path / "group"
    for rank in (0, 1):
        shutil.copytree(SAMPLES / "dynamic_b2", group / f"rank-{rank}")
        manifest = json.loads((group / f"rank-{rank}" / "manifest.json").read_text())
        manifest.update(rank=rank, world_size=2)
        (group / f"rank-{rank}" / "manifest.json").write_text(json.dumps(manifest))
    (group / "rank-1" / "manifest.json").write_text("{\n")
    said = f"rank 1 left out: {group / 'rank-1' / 'manifest.json'}: corrupt manifest ("
    # WHEN it is reported, diagnosed and compared
    for argv in (
        ("report", str(group), "--json", "--no-export", "-q"),
        ("diagnose", str(group), "--json"),
        ("compare", str(group), str(SAMPLES / "dynamic_b2"), "--json"),
    ):
        result = _kvtrace(*argv)
        # THEN rank 0's figures are given (before: the same, with exit status 0 and the unreadable rank named
        # only in a note, where `kvtrace export` of the group exits 2)
        data = json.loads(result.stdout)
        if argv[0] == "report":
            assert ([r["rank"] for r in data["ranks"]], data["missing_ranks"]) == ([0], [1])
        elif argv[0] == "diagnose":
            assert (data["run_group"]["rank"], data["run_group"]["missing_ranks"]) == (0, [1])
        else:
            assert [run["label"] for run in data["runs"]] == ["group", "dynamic_b2"]
        # AND rank 1's error is one line on stderr naming its file, and the status is 2, as export's
        assert _one_error_line(result).startswith(f"kvtrace {argv[0]}: error: {said}")
    exported = _kvtrace("export", str(group), "-o", str(tmp_path / "exported"), "-q")
    file_said = said.removeprefix("rank 1 left out: ")
    assert _one_error_line(exported).startswith(f"kvtrace export: warning: skipped {file_said}")


@pytest.mark.parametrize("damage", ["missing", "null"])
def test_a_memory_sample_without_its_time_is_refused_naming_its_line(tmp_path: Path, damage: str) -> None:
    # GIVEN a run whose first memory sample (phase "start", the one compare times tokens/s from) has lost its
    # t_ns: dropped, or null
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    samples = (run / "memory_samples.jsonl").read_text().splitlines()
    first = json.loads(samples[0])
    assert first["phase"] == "start"
    if damage == "missing":
        del first["t_ns"]
    else:
        first["t_ns"] = None
    (run / "memory_samples.jsonl").write_text("\n".join([json.dumps(first), *samples[1:]]) + "\n")
    # WHEN it is reported, diagnosed, compared with the whole run, and exported
    said = f"{run / 'memory_samples.jsonl'}: line 1: field 't_ns' is {damage}, expected an integer"
    for argv in (
        ("report", str(run), "--json", "--no-export", "-q"),
        ("diagnose", str(run), "--json"),
        ("compare", str(run), str(SAMPLES / "dynamic_b2")),  # before: KeyError 't_ns', status 70
        ("plan", "--from-run", str(run)),
    ):
        # THEN each says so in one line naming the file and the line, status 2
        assert _one_error_line(_kvtrace(*argv)) == f"kvtrace {argv[0]}: error: {said}"


def test_a_sweep_folder_whose_table_is_a_pipe_is_refused_not_waited_on(tmp_path: Path) -> None:
    # GIVEN a sweep's folder with its runs/ and a named pipe where sweep.json was (read to list its points)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    os.mkfifo(out / "sweep.json")
    # WHEN a sweep is run again over it THEN the pipe is refused by name (an output path that names no
    # file: 2, as report's -o), never read
    argv = ["sweep", "--batch", "1", "--context", "8", "--new-tokens", "2", "--cache", "dynamic"]
    done = _kvtrace(*argv, "--device", "cpu", "--overwrite", "--out", str(out), "-q")
    assert done.returncode == 2
    assert (
        done.stderr
        == f"kvtrace sweep: error: {out / 'sweep.json'}: cannot write (a named pipe, not a regular file)\n"
    )


def test_an_export_of_a_run_seen_running_whose_manifest_became_a_pipe_is_not_waited_on(
    tmp_path: Path,
) -> None:
    # GIVEN a run exported while its manifest said running, then a pipe in the manifest's place
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["ended"] = {"status": "running"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "tables"
    first = _kvtrace("export", str(run), "--output", str(out))
    assert first.returncode == 0, first.stderr
    (run / "manifest.json").unlink()
    os.mkfifo(run / "manifest.json")
    # WHEN it is exported again THEN the pipe is refused by name (the export says so), never read
    again = _kvtrace("export", str(run), "--output", str(out))
    assert again.returncode in (0, 1, 2) and "manifest.json" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
