"""Paths that name no readable file, through the CLI and the Python API: one line naming the path and the
problem, never a bare OSError or ValueError, never a run or a sweep written where it does not belong.

Each case was found by a tester: a device file whose first read fails, a manifest that is a loop of links,
a path holding a NUL byte (which every OS call refuses with "embedded null byte", naming nothing), an
empty path (pathlib reads "" as the current folder), and a sweep pointed at a run's folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvtrace
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.errors import KvtraceError
from kvtrace.format import MANIFEST
from kvtrace.run_reader import read_run

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


@pytest.fixture()
def run_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", copy)
    return copy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/mem is Linux's")
@pytest.mark.parametrize("command", ["report", "diagnose", "compare"])
def test_a_file_whose_first_read_fails_is_named(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a file that opens but whose first byte cannot be read: /proc/self/mem at offset 0 is unmapped
    mem = "/proc/self/mem"
    with open(mem, "rb") as fh, pytest.raises(OSError) as raised:
        fh.read(2)
    reason = os.strerror(raised.value.errno or 0)  # what the OS says here ("Input/output error")
    # WHEN it is reported THEN one line names it (it said only "error: Input/output error")
    argv = [command, mem, mem] if command == "compare" else [command, mem]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"kvtrace {command}: error: {mem}: cannot read ({reason})\n"


@pytest.mark.parametrize(
    ("make_link", "what"),
    [
        (lambda manifest: manifest.symlink_to(manifest.name), "a loop of symbolic links"),
        (lambda manifest: manifest.symlink_to("gone.json"), "a symbolic link to nothing (gone.json)"),
    ],
    ids=["loop", "dangling"],
)
def test_a_manifest_that_is_a_link_to_no_file_is_named_not_missing(
    run_copy: Path, make_link: Callable[[Path], None], what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose manifest.json is a link that leads to no file
    manifest = run_copy / MANIFEST
    manifest.unlink()
    make_link(manifest)
    said = f"{manifest}: cannot read ({what})"
    # WHEN it is read THEN the manifest is there and cannot be read (it was "no manifest.json")
    with pytest.raises(KvtraceError) as raised:
        read_run(run_copy)
    assert str(raised.value) == said
    for command in ("report", "diagnose"):
        assert main([command, str(run_copy)]) == 2
        assert capsys.readouterr().err == f"kvtrace {command}: error: {said}\n"


_READERS: list[tuple[str, Callable[[str], Any]]] = [
    ("read_run", read_run),
    ("build_report", build_report),
    ("load_tables", kvtrace.load_tables),
    ("load_tables-beside-a-run", lambda path: kvtrace.load_tables(SAMPLES / "static_b2", path)),
]


@pytest.mark.parametrize(("name", "reader"), _READERS, ids=[name for name, _ in _READERS])
@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("runs/a\x00b", "'runs/a\\x00b': a path cannot hold a NUL byte"),
        ("", "an empty path ('') names no file or folder"),
    ],
    ids=["nul", "empty"],
)
def test_the_api_readers_refuse_a_path_that_names_no_file_in_one_line(
    name: str,
    reader: Callable[[str], Any],
    path: str,
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a working folder holding a run, which "" would name (pathlib reads it as ".")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(SAMPLES / "dynamic_b2", tmp_path, dirs_exist_ok=True)
    # WHEN a reader the README documents is given the path THEN a KvtraceError of one line (NUL was a bare
    # ValueError "embedded null byte"; "" read the current folder's run)
    with pytest.raises(KvtraceError) as raised:
        reader(path)
    assert str(raised.value) == said


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("a\x00b", "record(): 'a\\x00b': a path cannot hold a NUL byte"),
        ("", "record(): an empty path ('') names no file or folder"),
    ],
    ids=["nul", "empty"],
)
def test_record_refuses_a_path_that_names_no_folder_before_writing(
    path: str, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN an empty working folder
    monkeypatch.chdir(tmp_path)
    # WHEN a recording is asked for into a path holding a NUL byte, or an empty one (an unset variable)
    # THEN a RecordingError (NUL was a bare ValueError; "" recorded into the current folder)
    with pytest.raises(kvtrace.RecordingError) as raised, kvtrace.record(path, profiler=False):
        pass  # pragma: no cover - never entered
    assert str(raised.value) == said
    assert list(tmp_path.iterdir()) == []


_SMALL_SWEEP = [
    *("--batch", "1", "--context", "4", "--cache", "dynamic"),
    *("--new-tokens", "1", "--device", "cpu"),
]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_a_sweep_into_a_run_folder_is_refused_before_running(
    run_copy: Path, overwrite: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run, its files as recorded
    before = {p.relative_to(run_copy): p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    # WHEN a sweep is pointed at it (--overwrite replaces a sweep, not a run)
    assert main(["sweep", *_SMALL_SWEEP, "--out", str(run_copy), *overwrite]) == 2
    # THEN one line says OUT is a run, and the run holds what it held (no sweep.json, no runs/ beside it)
    said = f"kvtrace sweep: error: {run_copy}: a kvtrace run, not a sweep's folder (sweep.json, runs/); "
    assert capsys.readouterr().err == said + "pass another --out DIR\n"
    after = {p.relative_to(run_copy): p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    assert after == before


def test_a_sweep_into_an_empty_path_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an empty working folder WHEN a sweep's --out is "" (pathlib's current folder)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", *_SMALL_SWEEP, "--out", ""]) == 2
    # THEN one line, nothing written
    said = "--out: an empty path ('') names no file or folder"
    assert capsys.readouterr().err == f"kvtrace sweep: error: {said}\n"
    assert list(tmp_path.iterdir()) == []
