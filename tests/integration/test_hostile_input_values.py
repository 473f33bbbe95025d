"""Values in another's files that no recorder writes, through the real CLI on copies of real runs and
snapshots: a file name that holds a newline or a terminal escape, a size no device holds, and fields the
readers took silently (an unknown run status, KV dtype or trace address, repeated KV `seq`s, a negative
free memory at an OOM). Each is said in one line naming the file, or refused so; the figures are unchanged.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

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
