"""A report of an unchanged run writes nothing into it: its KV counters and TensorBoard scalars are compared
with what the report would write, and only exports that differ are written again."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _exports(run: Path) -> dict[str, tuple[bytes, int]]:
    """Each export file's bytes and modification time (ns), by its path in the run."""
    files = [run / "kv_counters.trace.json.gz", *sorted((run / "tb_scalars").iterdir())]
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def test_a_second_report_of_an_unchanged_run_writes_nothing(tmp_path: Path, capsys) -> None:
    # GIVEN a recorded run (a vLLM one too), reported once: its exports written
    for name in ("dynamic_b2", "vllm_preempt"):
        run = tmp_path / name
        shutil.copytree(SAMPLES / name, run, ignore=shutil.ignore_patterns("kv_counters*", "tb_scalars"))
        assert main(["report", str(run), "-q"]) == 0
        first = _exports(run)
        assert len(first) == 2
        # WHEN it is reported again
        assert main(["report", str(run), "-q"]) == 0
        # THEN no file was written: the same names, bytes and times
        assert _exports(run) == first
    capsys.readouterr()


def test_exports_that_differ_from_the_run_are_written_again(tmp_path: Path, capsys) -> None:
    # GIVEN a run whose exports were written, then changed: counters with one more character, scalars of
    # one step fewer, and one of them damaged
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run, ignore=shutil.ignore_patterns("kv_counters*", "tb_scalars"))
    assert main(["report", str(run), "-q"]) == 0
    written = {path: data for path, (data, _) in _exports(run).items()}
    counters, scalars = run / "kv_counters.trace.json.gz", next((run / "tb_scalars").iterdir())
    text = gzip.decompress(written["kv_counters.trace.json.gz"]).decode()
    for changed_counters, changed_scalars in (
        (gzip.compress((text + " ").encode()), scalars.read_bytes()[:-40]),
        (gzip.compress(text.encode())[:-8], scalars.read_bytes()[:-1] + b"\0"),  # no CRC; a bad CRC
    ):
        counters.write_bytes(changed_counters)
        scalars.write_bytes(changed_scalars)
        # WHEN the run is reported
        assert main(["report", str(run), "-q"]) == 0
        # THEN both are written again as the run says: the same content as the first report's
        again = _exports(run)
        assert json.loads(gzip.decompress(again["kv_counters.trace.json.gz"][0])) == json.loads(text)
        ((name, (data, _)),) = [(k, v) for k, v in again.items() if k.startswith("tb_scalars")]
        first_record = 8 + 4 + int.from_bytes(data[:8], "little") + 4
        old = written[str(scalars.relative_to(run))]
        assert data[first_record:] == old[8 + 4 + int.from_bytes(old[:8], "little") + 4 :]
        scalars = run / name
    capsys.readouterr()
