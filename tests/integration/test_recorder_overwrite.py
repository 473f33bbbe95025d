"""Recording again into a run directory with overwrite=True replaces the whole run, not half of it; two
recordings into one folder at once are refused (the second), not mixed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvtrace
from kvtrace.format import LOCK_FILE
from kvtrace.llama import build_model
from kvtrace.recorder import RecordingError
from kvtrace.run_reader import read_run
from tests.cli_json import report_json
from tests.tiny import tiny_size

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_overwrite_leaves_one_recording(tmp_path: Path) -> None:
    model = build_model(tiny_size(2))
    run = tmp_path / "run"
    for new_tokens in (6, 3):
        ids = torch.randint(3, 1000, (1, 5))
        with torch.no_grad(), kvtrace.record(run, model=model, overwrite=True):
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
    recorded = read_run(run)
    assert len(recorded.profiler_traces()) == 1
    assert max(e.step for e in recorded.kv_events) == 3


HOLDER = """
import sys, time
from pathlib import Path
import torch
import kvtrace
from kvtrace.llama import build_model

run, go = sys.argv[1], Path(sys.argv[2])
model = build_model("tiny")
ids = torch.randint(3, 1000, (1, 5))
with torch.no_grad(), kvtrace.record(run, model=model, overwrite=True, profiler=False):
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                   do_sample=False, pad_token_id=0)
    print("recording", flush=True)
    while not go.exists():
        time.sleep(0.05)
print("done", flush=True)
"""


def test_a_second_recording_into_a_folder_being_recorded_is_refused(tmp_path: Path) -> None:
    # GIVEN another process recording into `run` (overwrite=True), inside its block
    run, go = tmp_path / "run", tmp_path / "go"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen(
        [sys.executable, str(script), str(run), str(go)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "recording\n"

        # WHEN this process records into the same folder, overwrite=True too
        model = build_model(tiny_size(2))
        with pytest.raises(RecordingError) as refused, kvtrace.record(run, model=model, overwrite=True):
            pass  # pragma: no cover - never entered

        # THEN it is refused at its start in one line naming the folder and the holder
        assert str(refused.value) == f"{run}: another recording is writing this folder (pid {holder.pid})"
        assert refused.value.exit_code == 1
    finally:
        go.touch()
        out, _ = holder.communicate(timeout=300)
    # AND the holder's run is its own alone, whole
    assert holder.returncode == 0 and out == "done\n"
    recorded = read_run(run)
    assert recorded.manifest["pid"] == holder.pid
    assert recorded.manifest["ended"]["status"] == "ok"
    assert max(e.step for e in recorded.kv_events) == 4
    # AND once it ended, the folder is free again, with no lock file left in it or in the manifest
    assert not (run / LOCK_FILE).exists() and LOCK_FILE not in recorded.manifest["files"]
    with kvtrace.record(run, overwrite=True, profiler=False):
        assert (run / LOCK_FILE).is_file()
    assert not (run / LOCK_FILE).exists()


def test_a_lock_file_left_by_a_killed_recording_blocks_nothing(tmp_path: Path) -> None:
    # GIVEN a folder of the user's holding only the lock file a killed recording left (its lock died with it)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / LOCK_FILE).write_text("12345")

    # WHEN recording into it THEN it is neither "a run being recorded" nor a clash with the user's files
    with kvtrace.record(folder, profiler=False):
        kvtrace.track(torch.zeros(1, 2, 4, 8), layer=0, kind="k")
    assert read_run(folder).manifest["ended"]["status"] == "ok"


def _generate(model: torch.nn.Module, run: Path, **options: bool) -> None:
    ids = torch.randint(3, 1000, (1, 5))
    with torch.no_grad(), kvtrace.record(run, model=model, **options):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0
        )


def test_the_manifest_lists_the_runs_files_not_the_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a folder holding a file of the user's, recorded into; then a run replaced (overwrite=True) in a
    # folder where the user has put a file in a folder of their own
    model = build_model(tiny_size(2))
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    _generate(model, run, profiler=False)
    first = json.loads((run / "manifest.json").read_text())["files"]
    (run / "sub").mkdir()
    (run / "sub" / "x").write_text("mine")
    _generate(model, run, overwrite=True)
    second = json.loads((run / "manifest.json").read_text())["files"]

    # THEN each manifest lists the files the recording wrote, and neither of the user's
    recorder_files = [
        "kv_events.jsonl",
        "manifest.json",
        "memory_samples.jsonl",
        "model_config.json",
        "weights.jsonl",
    ]
    assert first == recorder_files
    traces = sorted(f"profiler/{p.name}" for p in (run / "profiler").iterdir())
    assert len(traces) == 1 and second == sorted(recorder_files + traces)
    on_disk = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert on_disk == sorted([*second, "notes.txt", "sub/x"])

    # AND once the user deletes their files, the report notes nothing missing
    (run / "notes.txt").unlink()
    (run / "sub" / "x").unlink()
    notes = report_json(run, capsys)["notes"]
    assert not any("listed in the manifest but missing" in note for note in notes), notes


SAMPLE_RUN = REPO_ROOT / "sample_traces" / "dynamic_b2"


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (links followed) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _record_one_tensor(run: Path) -> None:
    with kvtrace.record(run, overwrite=True, profiler=False):
        kvtrace.track(torch.zeros(1, 2, 4, 8), layer=0, kind="k")


@pytest.mark.parametrize("damage", ["profiler is a link", "weights.jsonl is a folder"])
def test_overwrite_refuses_a_run_it_cannot_replace_whole_and_removes_nothing(
    tmp_path: Path, damage: str
) -> None:
    # GIVEN a run whose profiler/ is a link to a folder elsewhere (a larger disk), or whose weights.jsonl is a
    # folder of the user's
    run, elsewhere = tmp_path / "run", tmp_path / "scratch"
    shutil.copytree(SAMPLE_RUN, run)
    if damage == "profiler is a link":
        (run / "profiler").rename(elsewhere)
        (run / "profiler").symlink_to(elsewhere)
        path, said = run / "profiler", "a symbolic link where the run's profiler/ folder goes"
    else:
        (run / "weights.jsonl").unlink()
        (run / "weights.jsonl").mkdir()
        (run / "weights.jsonl" / "mine.txt").write_text("mine")
        path, said = run / "weights.jsonl", "a folder where the run has a file of that name"
    before = _listing(run)

    # WHEN it is recorded again with overwrite=True
    with pytest.raises(RecordingError) as refused:
        _record_one_tensor(run)

    # THEN one line naming the path (it was an OSError's traceback after the run's logs were deleted), and
    # every file of the old run is as it was, the trace behind the link too
    assert str(refused.value).startswith(f"{path}: {said}") and "nothing was removed" in str(refused.value)
    assert refused.value.exit_code == 2
    assert _listing(run) == before


def test_overwrite_removes_the_runs_files_and_keeps_the_users_in_its_folders(tmp_path: Path) -> None:
    # GIVEN a run with files of the user's in profiler/, snapshots/ and tb_scalars/, beside the run's own:
    # its trace, a snapshot, TensorBoard scalars, and a file its manifest lists below profiler/
    run = tmp_path / "run"
    shutil.copytree(SAMPLE_RUN, run)
    (run / "profiler" / "notes.txt").write_text("my notes")
    (run / "profiler" / "sub").mkdir()
    (run / "profiler" / "sub" / "extra.json").write_text("{}")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"].append("profiler/sub/extra.json")
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "snapshots").mkdir()
    (run / "snapshots" / "exit.pickle").write_bytes(b"old")
    (run / "snapshots" / "keep.txt").write_text("keep")
    (run / "tb_scalars").mkdir()
    (run / "tb_scalars" / "events.out.tfevents.1.host.1.0").write_bytes(b"old")
    (run / "tb_scalars" / "mine.txt").write_text("mine")

    # WHEN it is recorded again with overwrite=True, twice
    for _ in range(2):
        _record_one_tensor(run)

        # THEN the old run's files are gone and the user's are there, unchanged, in their folders (both
        # used to be removed with the folders); the new manifest lists none of the user's files, so the
        # second overwrite keeps them too
        kept = {
            "profiler/notes.txt": b"my notes",
            "snapshots/keep.txt": b"keep",
            "tb_scalars/mine.txt": b"mine",
        }
        recorded = json.loads((run / "manifest.json").read_text())["files"]
        assert recorded == ["kv_events.jsonl", "manifest.json", "memory_samples.jsonl"]
        assert _listing(run) == {**kept, **{name: (run / name).read_bytes() for name in recorded}}
        assert not (run / "profiler" / "sub").exists()  # emptied by the removal: gone with it


def test_recording_into_an_export_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN an export directory (Parquet tables)
    tables = tmp_path / "tables"
    assert main(["export", str(SAMPLE_RUN), "-o", str(tables), "-q"]) == 0
    capsys.readouterr()
    before = _listing(tables)
    # WHEN a run is recorded into it THEN it is refused in one line, the tables as they were
    with pytest.raises(RecordingError) as refused:
        _record_one_tensor(tables)
    said = "an export directory (Parquet tables), not a run's folder: record into a new or empty folder"
    assert str(refused.value) == f"{tables}: {said}"
    assert _listing(tables) == before
