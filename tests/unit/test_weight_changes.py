"""weights.jsonl's changes (a model converted inside the block) on small hand-made inputs: the reader, and the
events the analyzers add or attribute, for the two kinds of trace (CPU: the old storages' frees missing;
CUDA: present) that a CPU machine cannot both record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analyzers.attribution import JOIN_TOLERANCE_US, attribute
from analyzers.model import METHOD_WEIGHTS_TABLE, OTHER, WEIGHTS, DeviceEvents, MemorySource
from analyzers.readers.weight_changes import add_weight_events, weight_changes
from analyzers.timeline import device_timeline
from kvtrace.errors import KvtraceError
from kvtrace.format import MANIFEST, SCHEMA_VERSION
from kvtrace.format import WEIGHTS as WEIGHTS_FILE
from kvtrace.run_reader import read_run

GOOD = {"format": "kvtrace-run", "schema_version": SCHEMA_VERSION, "ended": {"status": "running"}}
OLD_A, OLD_B, NEW_A, NEW_B, OTHER_ADDR = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
SEEN_NS = 10_000_000  # when the recorder compared the storages after `.to()` (10,000 µs)


def _line(name: str, addr: int, nbytes: int, dtype: str, **change: object) -> str:
    fields = {
        "name": name,
        "addr": addr,
        "storage_bytes": nbytes,
        "dtype": dtype,
        "device": "cpu",
        "shape": [],
    }
    return json.dumps({**fields, **change})


def _run(tmp_path: Path, *lines: str) -> Path:
    (tmp_path / MANIFEST).write_text(json.dumps(GOOD))
    (tmp_path / WEIGHTS_FILE).write_text("\n".join(lines) + "\n")
    return tmp_path


def _converted(tmp_path: Path) -> Path:
    """a (400 B) and b (40 B) in float32, then both in bfloat16 (200 B, 20 B) at step 0."""
    change = {"t_ns": SEEN_NS, "step": 0}
    return _run(
        tmp_path,
        _line("a", OLD_A, 400, "float32"),
        _line("b", OLD_B, 40, "float32"),
        _line("a", OLD_A, 400, "float32", event="freed", **change),
        _line("b", OLD_B, 40, "float32", event="freed", **change),
        _line("a", NEW_A, 200, "bfloat16", event="added", **change),
        _line("b", NEW_B, 20, "bfloat16", event="added", **change),
    )


def test_the_start_lines_are_the_weights_and_the_later_lines_their_changes(tmp_path: Path) -> None:
    run = read_run(_converted(tmp_path))
    assert [(w.name, w.storage_bytes, w.event) for w in run.weights] == [("a", 400, ""), ("b", 40, "")]
    assert [(w.event, w.addr) for w in run.weight_changes] == [
        ("freed", OLD_A), ("freed", OLD_B), ("added", NEW_A), ("added", NEW_B),
    ]  # fmt: skip
    assert {(w.t_ns, w.step) for w in run.weight_changes} == {(SEEN_NS, 0)}
    assert [c.from_start for c in weight_changes(run)] == [True, True, False, False]


def test_an_unknown_weights_event_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = _run(
        tmp_path, _line("a", OLD_A, 400, "float32"), _line("a", NEW_A, 1, "int8", event="moved", t_ns=1)
    )
    with pytest.raises(KvtraceError, match=r"weights\.jsonl: line 2: field 'event' is 'moved'"):
        read_run(path)


def _trace(rows: list[tuple[float, int, int]], totals: bool) -> DeviceEvents:
    ts = np.array([r[0] for r in rows], dtype=np.float64)
    delta = np.array([r[2] for r in rows], dtype=np.int64)
    dev = DeviceEvents("cpu", ts, np.array([r[1] for r in rows], dtype=np.int64), delta)
    if totals:  # an allocator total that, like Kineto's CPU one, never counted the start's weights
        dev.total_allocated = np.cumsum(delta)
    dev.baseline_bytes = 440  # the weights listed at the start (run_dir adds them)
    return dev


def _attributed(dev: DeviceEvents, tmp_path: Path) -> DeviceEvents:
    changes = weight_changes(read_run(_converted(tmp_path)))
    add_weight_events(dev, changes, traced=True, tolerance_us=JOIN_TOLERANCE_US)
    attribute(MemorySource("run", "x", devices=[dev], meta={"weight_changes": changes}))
    return dev


@pytest.mark.parametrize("totals", [True, False], ids=["with_totals", "without"])
def test_a_cpu_trace_gets_the_old_storages_frees_after_their_replacements(
    tmp_path: Path, totals: bool
) -> None:
    # GIVEN a CPU trace of the conversion: the new storages' allocations, not the old ones' frees, then an
    # activation that comes and goes
    dev = _trace(
        [
            (9_000.0, NEW_A, 200),
            (9_500.0, NEW_B, 20),
            (20_000.0, OTHER_ADDR, 64),
            (21_000.0, OTHER_ADDR, -64),
        ],
        totals,
    )
    # WHEN the weights' changes are added and attributed
    dev = _attributed(dev, tmp_path)
    # THEN each old storage is freed right after its replacement is made, as `_apply` does
    assert dev.addr.tolist() == [NEW_A, OLD_A, NEW_B, OLD_B, OTHER_ADDR, OTHER_ADDR]
    assert dev.delta_bytes.tolist() == [200, -400, 20, -40, 64, -64]
    assert dev.ts_us.tolist() == [9_000.0, 9_000.0, 9_500.0, 9_500.0, 20_000.0, 21_000.0]
    assert dev.category is not None and dev.method is not None
    assert dev.category.tolist() == [WEIGHTS] * 4 + [OTHER] * 2
    assert (dev.method[:4] == METHOD_WEIGHTS_TABLE).all()
    # AND the timeline holds 440 B of weights, then 440 + 200 at the transient peak, then 220 (arithmetic)
    timeline = device_timeline(dev, WEIGHTS)
    assert timeline.by_category["weights"].tolist() == [640, 240, 260, 220, 220, 220]
    assert timeline.allocated.tolist() == [640, 240, 260, 220, 284, 220]
    assert timeline.by_category["other"].tolist() == [0, 0, 0, 0, 64, 0]


def test_a_cuda_trace_keeps_its_own_frees_of_the_old_storages(tmp_path: Path) -> None:
    # GIVEN a trace whose allocator reports the frees of blocks made before it began (CUDA's does), with
    # its total counting them from the start
    rows = [(9_000.0, NEW_A, 200), (9_001.0, OLD_A, -400), (9_500.0, NEW_B, 20), (9_501.0, OLD_B, -40)]
    dev = _trace(rows, totals=False)
    # WHEN the weights' changes are added and attributed
    dev = _attributed(dev, tmp_path)
    # THEN nothing is added, and the trace's frees are the weights'
    assert dev.delta_bytes.tolist() == [200, -400, 20, -40]
    assert dev.category is not None and dev.category.tolist() == [WEIGHTS] * 4
    assert device_timeline(dev, WEIGHTS).by_category["weights"].tolist() == [640, 240, 260, 220]


def test_without_allocator_events_the_changes_are_the_events_frees_first(tmp_path: Path) -> None:
    # GIVEN the KV log's events only (profiler=False): a KV storage made after the conversion
    dev = _trace([(15_000.0, OTHER_ADDR, 64)], totals=False)
    changes = weight_changes(read_run(_converted(tmp_path)))
    # WHEN the weights' changes are added
    add_weight_events(dev, changes, traced=False, tolerance_us=JOIN_TOLERANCE_US)
    # THEN they come at the recorder's time, before the later KV storage, the frees first
    assert dev.addr.tolist() == [OLD_A, OLD_B, NEW_A, NEW_B, OTHER_ADDR]
    assert dev.delta_bytes.tolist() == [-400, -40, 200, 20, 64]
    assert dev.ts_us.tolist() == [10_000.0] * 4 + [15_000.0]


def test_a_start_storage_found_freed_at_the_end_was_freed_before_its_address_was_reused(
    tmp_path: Path,
) -> None:
    # GIVEN a conversion found only at the block's end (logged at 10,000 µs), while the KV log saw a storage
    # made at the old storage a's address at 5,000 µs
    dev = _trace([(5_000.0, OLD_A, 64)], totals=False)
    changes = weight_changes(read_run(_converted(tmp_path)))
    # WHEN the weights' changes are added and attributed (no allocator events)
    add_weight_events(dev, changes, traced=False, tolerance_us=JOIN_TOLERANCE_US)
    attribute(MemorySource("run", "x", devices=[dev], meta={"weight_changes": changes}))
    # THEN a's free comes before the KV storage took its address, and is the weights'
    assert dev.addr.tolist() == [OLD_A, OLD_A, OLD_B, NEW_A, NEW_B]
    assert dev.delta_bytes.tolist() == [-400, 64, -40, 200, 20]
    assert dev.category is not None and dev.category.tolist()[0] == WEIGHTS
    assert device_timeline(dev, WEIGHTS).by_category["weights"][-1] == 220
