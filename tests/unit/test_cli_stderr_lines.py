"""kvtrace's own lines on standard error leave in one write each, their newline with it: the ranks of a
torchrun group share one stderr, and unbuffered (PYTHONUNBUFFERED=1) `print` writes the newline apart, so
two ranks' last lines ran together (CI: "...rank-1, ...diagnose OUTkvtrace run: recorded ...rank-0")."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from kvtrace.cli import main


class WriteLog(io.StringIO):
    """A stderr that keeps each write call apart, as an unbuffered file turns each into a system call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_a_ranks_last_line_is_one_write_with_its_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN rank 1 of 2 (torchrun's environment) running a script under `kvtrace run`, its stderr unbuffered
    script, out = tmp_path / "job.py", tmp_path / "tp"
    script.write_text("print('job done')\n", encoding="utf-8")
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    log = WriteLog()
    monkeypatch.setattr(sys, "stderr", log)
    # WHEN it runs
    assert main(["run", "--no-profiler", "-o", str(out), str(script)]) == 0
    # THEN its last line, naming rank 1's own run, was written whole in one call, newline and all
    last = [w for w in log.writes if w.startswith("kvtrace run: recorded ")]
    assert len(last) == 1, log.writes
    assert last[0].startswith(f"kvtrace run: recorded {out / 'rank-1'}, this rank's run of the group {out} ")
    assert last[0].endswith("\n") and last[0].count("\n") == 1


def test_an_error_line_is_one_write_with_its_newline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # GIVEN a command given a file that is not there, its stderr unbuffered
    log = WriteLog()
    monkeypatch.setattr(sys, "stderr", log)
    # WHEN it fails
    assert main(["report", str(tmp_path / "missing"), "--no-export"]) == 2
    # THEN its one error line was one write, newline and all
    said = [w for w in log.writes if "error" in w]
    assert len(said) == 1, log.writes
    assert said[0].startswith("kvtrace report: error: ") and said[0].endswith("\n")
