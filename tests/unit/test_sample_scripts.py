"""The scripts that regenerate the committed sample runs read their arguments before they record: `--help`
or a typo used to re-record every sample run in place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _stamps() -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in SAMPLES.rglob("*") if p.is_file()}


@pytest.mark.parametrize("script", ["regenerate.py", "regenerate_vllm.py", "tb_screenshot.py"])
def test_help_and_unknown_runs_record_nothing(script: str) -> None:
    # GIVEN the committed sample runs
    before = _stamps()
    # WHEN a user asks a regenerate script for its help, or names a run that does not exist
    shown = subprocess.run([sys.executable, str(SAMPLES / script), "--help"], capture_output=True, text=True)
    typo = subprocess.run(
        [sys.executable, str(SAMPLES / script), "no_such_run"], capture_output=True, text=True
    )
    # THEN the help is printed (status 0), the typo is refused in one usage error (status 2)
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {script}"), shown.stderr
    assert typo.returncode == 2 and typo.stderr.splitlines()[-1].startswith(f"{script}: error:")
    # AND no sample file was written
    assert _stamps() == before
