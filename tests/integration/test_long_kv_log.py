"""A run's KV log is read with progress, as its trace was: a light-mode run (`profiler=False`) has no trace,
and its log alone is long (135 MB for 4,000 tokens of 32 layers, read for a minute or more), so `report`,
`diagnose` and `compare` read it with no bar at all. One bar covers the KV log, then the trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from analyzers.readers.run_dir import read_run_source
from tests.tiny import record_generate, tiny_size

SAMPLE = Path(__file__).resolve().parents[2] / "sample_traces" / "dynamic_b2"


def _calls(run: Path) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    read_run_source(run, progress=lambda done, total: calls.append((done, total)))
    return calls


def test_a_light_runs_kv_log_is_read_with_progress(tmp_path: Path) -> None:
    # GIVEN a light-mode run of a tiny Llama 3 (2 layers): its KV log, and no trace
    from kvtrace.llama import build_model

    run = tmp_path / "light"
    record_generate(build_model(tiny_size(2)), run, batch=1, prompt=4, new_tokens=3, profiler=False)
    assert not (run / "profiler").exists()
    kv_bytes = (run / "kv_events.jsonl").stat().st_size
    # 2 layers x K,V: created at the prefill; each of the 2 decode steps a new storage grown and the old one
    # freed; the last freed at the end
    assert len((run / "kv_events.jsonl").read_text().splitlines()) == 2 * 2 * (1 + 2 * 2 + 1)

    # WHEN its source is read THEN the progress reaches the log's bytes, its total from the first call
    calls = _calls(run)
    assert calls, "no progress at all: a light run's read was silent"
    assert calls[-1] == (kv_bytes, kv_bytes)
    assert {total for _, total in calls} == {kv_bytes}


def test_a_traced_run_reads_its_kv_log_then_its_trace_under_one_total() -> None:
    # GIVEN a run with both: its KV log's bytes and its trace's (the sample, recorded with the profiler on)
    kv_bytes = (SAMPLE / "kv_events.jsonl").stat().st_size
    traces = sorted((SAMPLE / "profiler").glob("*.pt.trace.json.gz"))
    assert len(traces) == 1
    both = kv_bytes + traces[0].stat().st_size

    # WHEN it is read THEN every call has both files' total; the KV log ends at its bytes, the trace at both
    calls = _calls(SAMPLE)
    assert {total for _, total in calls} == {both}
    assert (kv_bytes, both) in calls
    assert calls[-1] == (both, both)
    dones = [done for done, _ in calls]
    assert dones == sorted(dones)


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "last-line-cut"])
def test_a_kv_log_read_a_line_at_a_time_keeps_every_line_and_drops_a_cut_last_one(
    tmp_path: Path, cut: bool
) -> None:
    # GIVEN the sample's run, copied, with (or without) a last KV line cut where a killed writer stopped
    import shutil

    from kvtrace.run_reader import read_run

    run = tmp_path / "run"
    shutil.copytree(SAMPLE, run)
    lines = (run / "kv_events.jsonl").read_text().splitlines(keepends=True)
    manifest = (run / "manifest.json").read_text()
    if cut:
        (run / "kv_events.jsonl").write_text("".join(lines) + lines[-1][:25])
        (run / "manifest.json").write_text(manifest.replace('"status": "ok"', '"status": "running"'))

    # WHEN it is read THEN every whole line is an event, and the cut one is said, not an error
    read = read_run(run)
    assert len(read.kv_events) == len(lines)
    assert read.truncated is cut


def test_plan_from_a_light_run_reads_its_kv_log_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a light-mode run of a tiny Llama 3, and the run reader counted (the real one runs)
    import json

    import analyzers.planning.run_defaults as run_defaults
    import analyzers.readers.run_dir as run_dir
    from kvtrace.cli import main
    from kvtrace.llama import build_model

    run = tmp_path / "light"
    record_generate(build_model(tiny_size(2)), run, batch=1, prompt=4, new_tokens=3, profiler=False)
    reads: list[Path] = []
    for module in (run_dir, run_defaults):
        real = module.read_run

        def counted(path: Path, *args: object, real: object = real, **kwargs: object) -> object:
            reads.append(Path(path))
            return real(path, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(module, "read_run", counted)

    # WHEN it is planned from
    assert main(["plan", "--from-run", str(run), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]

    # THEN its KV log was read once (for the run's defaults), not a second time for a report whose only use
    # is to say that the run has no allocator events, which its note says as the report would
    assert reads == [run]
    said = "the run has no allocator events (it was recorded with profiler=False): its activations are unseen"
    assert [n for n in notes if n.startswith("the run has no allocator events")] == [
        f"{said}, so the reserve stands for them"
    ]


def test_reading_a_run_pauses_the_cycle_collector_and_restores_it() -> None:
    # GIVEN the sample run (its KV lines and its trace's events, each read into objects), the collector's runs
    # counted
    import gc

    from analyzers.report import load_source
    from kvtrace.run_reader import read_run

    lines = len((SAMPLE / "kv_events.jsonl").read_text().splitlines())
    assert lines == 256
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        """A collection that starts inside the reading (one may follow it, the objects made then counted)."""
        import sys

        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename != __file__:
            if frame.f_code.co_name == "__exit__":  # as the pause ends: the collector on again
                return
            if frame.f_code.co_name in ("read_run", "_read_run", "load_source", "_load_source"):
                if phase == "start":
                    collections.append(info["generation"])
                return
            frame = frame.f_back  # type: ignore[assignment]

    gc.callbacks.append(count)
    try:
        # WHEN it is read, and read and attributed, with the collector on
        assert gc.isenabled()
        run = read_run(SAMPLE)
        source = load_source(SAMPLE)
    finally:
        gc.callbacks.remove(count)

    # THEN no collection walked the objects while they were being made, every line is an event, and the
    # collector is on again
    assert collections == []
    assert len(run.kv_events) == lines
    assert source.meta["kv"] is not None
    assert gc.isenabled()
