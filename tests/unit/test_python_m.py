"""`python -m kvtrace` runs the `kvtrace` command (a venv not activated has no `kvtrace` on PATH): it said
"No module named kvtrace.__main__; 'kvtrace' is a package and cannot be directly executed", status 1."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER0 = ROOT.parent / "shared" / "real_traces" / "chrome" / "worker0.1623143089861.pt.trace.json.gz"


def _python_m(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvtrace", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )


@pytest.mark.skipif(not WORKER0.exists(), reason="shared/real_traces not present")
def test_python_m_kvtrace_reports_a_real_trace() -> None:
    # GIVEN a real V100 trace; its cuda:0 peak summed here from its [memory] events (Device Type 1)
    events = json.loads(gzip.decompress(WORKER0.read_bytes()))["traceEvents"]
    level = peak = 0
    for event in sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"]["Device Type"] == 1),
        key=lambda e: e["ts"],
    ):
        level += event["args"]["Bytes"]
        peak = max(peak, level)
    assert peak == 2_791_636_480
    # WHEN it is reported through `python -m kvtrace`
    done = _python_m("report", "--json", "-q", str(WORKER0))
    # THEN the command ran, with the trace's figure
    assert done.returncode == 0, done.stderr
    (cuda,) = [d for d in json.loads(done.stdout)["devices"] if d["device"] == "cuda:0"]
    assert cuda["peak_allocated_bytes"] == peak


def test_python_m_kvtrace_names_itself_and_fails_in_one_line(tmp_path: Path) -> None:
    # GIVEN an empty file, WHEN reported through `python -m kvtrace`
    empty = tmp_path / "empty.pickle"
    empty.write_bytes(b"")
    done = _python_m("report", str(empty))
    # THEN one line names the file and the problem, status 2, as the `kvtrace` script says it
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"kvtrace report: error: {empty}: empty file\n"
    assert _python_m("--help").stdout.startswith("usage: kvtrace ")
