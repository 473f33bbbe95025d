"""What a small snapshot's report leaves behind and pulls in (issue 11: `kvtrace report` on a snapshot at
most 1.5x `pickle.load`): no collection of the cycle collector walks the loaded snapshot's containers (the
collector was switched back on while they were alive, and its next collection walked them all), and the
report imports neither the run's attribution nor threading or gzip for a plain pickle."""

from __future__ import annotations

import gc
import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from analyzers.snapshot_summary import plain_snapshot_report

REAL = sorted(
    (Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots").glob("*.pickle")
)
pytestmark = pytest.mark.skipif(not REAL, reason="shared/real_traces not present")


@contextmanager
def _snapshot_containers_walked() -> Iterator[list[int]]:
    """For each collection in the block, how many of a snapshot's segments and trace entries (dicts with
    "blocks" or "action") its generation held."""
    walked: list[int] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            young = gc.get_objects(generation=info["generation"])
            walked.append(sum(1 for o in young if type(o) is dict and ("blocks" in o or "action" in o)))

    gc.collect()
    gc.callbacks.append(seen)
    try:
        yield walked
    finally:
        gc.callbacks.remove(seen)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_no_collection_walks_the_loaded_snapshot(path: Path) -> None:
    # GIVEN the cycle collector on, as a program that calls the reader has it
    assert gc.isenabled()
    # WHEN a small snapshot is reported
    with _snapshot_containers_walked() as walked:
        _source, report = plain_snapshot_report(str(path))  # both kept, as a caller keeps them
        gc.collect(0)  # the young generation the report leaves, as its next allocations would collect it
    # THEN no collection found one of the snapshot's segments or entries: they were dropped while it was off
    assert report.devices
    assert walked and walked == [0] * len(walked)


def test_a_snapshot_report_imports_no_attribution_threading_or_gzip(tmp_path: Path) -> None:
    # GIVEN every real snapshot, and one of them gzipped
    packed = tmp_path / "packed.pickle"
    packed.write_bytes(gzip.compress(REAL[0].read_bytes()))
    code = (
        "import sys\n"
        "startup = set(sys.modules)\n"  # what this interpreter's site imports (pyenv's: threading)
        "import contextlib, io, json\n"
        "from kvtrace.cli import main\n"
        "def report(path):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        assert main(['report', '--json', path]) == 0\n"
        "    return out.getvalue()\n"
        "watched = [m for m in ['analyzers.attribution', 'analyzers.addr_events', 'threading', 'gzip']"
        " if m not in startup]\n"
        f"plain = [report(p) for p in {[str(p) for p in REAL]!r}]\n"
        "before = [m for m in watched if m in sys.modules]\n"
        f"gzipped = report({str(packed)!r})\n"
        "print(json.dumps({'before': before, 'plain': plain[0], 'gzipped': gzipped, 'watched': watched,"
        " 'after': [m for m in watched if m in sys.modules]}))\n"
    )
    # WHEN `kvtrace report --json` reads the plain ones in a fresh interpreter, then the gzipped one
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    # THEN the plain ones imported none of those modules; the gzipped one imported gzip to read it, and its
    # report is the plain file's, but for the path
    assert result["before"] == []
    assert result["after"] == (["gzip"] if "gzip" in result["watched"] else [])
    assert result["gzipped"].replace(str(packed), str(REAL[0])) == result["plain"]
