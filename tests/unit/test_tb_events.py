"""kvtrace's TensorBoard event records (analyzers.tb_events) are byte for byte what TensorBoard's own writer
makes of the same events, and TensorBoard reads a run's scalars back as the KV log's figures."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from analyzers.export import SCALARS_DIR, step_start_ns, write_scalars
from analyzers.report import build_report
from analyzers.tb_events import crc32c, file_version_event, record, scalars_event

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

REPO = Path(__file__).resolve().parents[2]


def _tensorboards(event: Event) -> bytes:
    out = io.BytesIO()
    RecordWriter(out).write(event.SerializeToString())
    return out.getvalue()


def test_crc32c_check_value() -> None:
    # The CRC catalogue's check value of CRC-32C (iSCSI): the nine digits' checksum
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


@pytest.mark.parametrize("wall_time", [1_796_672_542.123456, 0.0, -0.0, 1e-300, 5e9])
def test_the_file_version_event_is_tensorboards(wall_time: float) -> None:
    expected = _tensorboards(Event(wall_time=wall_time, file_version="brain.Event:2"))
    assert record(file_version_event(wall_time)) == expected


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**40, -1])
@pytest.mark.parametrize(
    "scalars",
    [
        [],
        [("kv/total_bytes", 0.0)],
        [("kv/total_bytes", 25_791_823_872.0), ("kv/layer_0_bytes", 805_994_496.0)],
        [(f"kv/layer_{layer}_bytes", float(layer * 123_457)) for layer in range(130)],  # > 127 bytes a value
        [("", 1.5), ("kv/é", -2.25), ("x" * 200, 1e-40), ("kv/total_bytes", 3.4e38)],
    ],
)
def test_a_steps_scalars_are_tensorboards(step: int, scalars: list[tuple[str, float]]) -> None:
    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars]
    expected = _tensorboards(Event(wall_time=1_796_672_542.5, step=step, summary=Summary(value=values)))
    assert record(scalars_event(1_796_672_542.5, step, scalars)) == expected


def test_tensorboard_reads_a_runs_scalars_as_the_kv_log_says(tmp_path: Path) -> None:
    # GIVEN a recorded run
    run = tmp_path / "run"
    shutil.copytree(REPO / "sample_traces" / "dynamic_b2", run, ignore=shutil.ignore_patterns(SCALARS_DIR))
    source, _ = build_report(run)
    kv = source.meta["kv"]
    # WHEN its scalars are written
    folder = write_scalars(run, kv, step_start_ns(source))
    # THEN TensorBoard's own loader reads one point per step: the KV total and each layer's bytes
    (path,) = folder.glob("events.out.tfevents.*")
    events = list(LegacyEventFileLoader(str(path)).Load())  # the events as written
    assert events[0].file_version == "brain.Event:2"
    read = {e.step: {v.tag: v.simple_value for v in e.summary.value} for e in events[1:]}
    assert sorted(read) == sorted(kv.step_live) and len(read) > 10
    for step, live in kv.step_live.items():
        expected = {"kv/total_bytes": float(sum(live.values()))}
        expected |= {f"kv/layer_{layer}_bytes": float(v) for layer, v in live.items()}
        assert read[step] == pytest.approx(expected, rel=1e-7)
    assert [e.wall_time for e in events[1:]] == sorted(e.wall_time for e in events[1:])
