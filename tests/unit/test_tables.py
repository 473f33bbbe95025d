"""The export tables' pure parts on small hand-made inputs: schemas, coercion of bad values, discovery."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from analyzers.export_inputs import find_inputs
from analyzers.model import KV, METHOD_KV_LOG, METHOD_NONE, OTHER, WEIGHTS, DeviceEvents
from analyzers.readers.folders import FolderSearch
from analyzers.tables import (
    KV_EVENTS,
    SAMPLES,
    SCHEMA_VERSION,
    SCHEMAS,
    memory_events_table,
    records_table,
)
from kvtrace.format import KvEvent


def test_kv_events_table_has_every_kv_log_field() -> None:
    # A field added to the KV log must be added to the export schema (and docs/format.md) too.
    fields = {f.name for f in dataclasses.fields(KvEvent)}
    assert set(KV_EVENTS.names) == fields | {"run_id"}


def test_every_table_carries_its_name_and_schema_version() -> None:
    for name, schema in SCHEMAS.items():
        assert schema.metadata[b"kvtrace.table"] == name.encode()
        assert schema.metadata[b"kvtrace.schema_version"] == str(SCHEMA_VERSION).encode()
        assert schema.names[0] == "run_id"


def test_records_with_wrong_types_become_nulls_not_errors() -> None:
    records = [
        {"t_ns": 5, "step": 1, "phase": "start", "rss_bytes": 1024},
        {"t_ns": "soon", "step": 2.0, "phase": 7, "rss_bytes": True, "cuda_device": [1]},
        {"t_ns": 2.5, "step": None},
    ]
    table = records_table(SAMPLES, "r1", records)
    rows = table.to_pylist()
    assert [r["run_id"] for r in rows] == ["r1"] * 3
    assert [r["t_ns"] for r in rows] == [5, None, None]  # a string and a fraction are not nanoseconds
    assert [r["step"] for r in rows] == [1, 2, None]
    assert [r["phase"] for r in rows] == ["start", "7", None]
    assert rows[1]["rss_bytes"] is None and rows[1]["cuda_device"] is None


def test_kv_event_shape_is_a_list_column() -> None:
    event = KvEvent(1, 10, 1, "prefill", "created", 0, "k", "data", 4096, 512, shape=[2, 2, 8, 16])
    table = records_table(KV_EVENTS, "r", [event.to_json(), {"seq": 2, "shape": "2x2"}])
    assert table.column("shape").to_pylist() == [[2, 2, 8, 16], None]
    assert table.schema.field("shape").type == pa.list_(pa.int64())


def test_memory_events_columns_from_device_events() -> None:
    dev = DeviceEvents(
        device="cuda:0",
        ts_us=np.array([10, 20, 30], dtype=np.int64),
        addr=np.array([7, 8, 7], dtype=np.int64),
        delta_bytes=np.array([100, 50, -100], dtype=np.int64),
        category=np.array([KV, WEIGHTS, OTHER], dtype=np.int8),
        layer=np.array([3, -1, -1], dtype=np.int16),
        kv_kind=np.array([2, 0, 0], dtype=np.int8),
        method=np.array([METHOD_KV_LOG, METHOD_NONE, 9], dtype=np.int8),
    )
    rows = memory_events_table("run-a", dev).to_pylist()
    assert [r["seq"] for r in rows] == [0, 1, 2]
    assert [r["ts_us"] for r in rows] == [10.0, 20.0, 30.0]
    assert [r["category"] for r in rows] == ["kv", "weights", "other"]
    assert [r["layer"] for r in rows] == [3, None, None]
    assert [r["kv"] for r in rows] == ["v", None, None]
    assert [r["method"] for r in rows] == ["kv_log", "none", None]  # an unknown code is null
    assert rows[0]["total_allocated"] is None and rows[0]["run_id"] == "run-a"


def _run_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "kvtrace-run", "schema_version": 1}))
    return path


def test_find_inputs_searches_folders_for_runs_traces_and_snapshots(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    run = _run_dir(fleet / "a" / "run1")
    (run / "profiler").mkdir()
    (run / "profiler" / "x.pt.trace.json.gz").write_bytes(b"")  # part of the run, not an input of its own
    (run / "snapshots").mkdir()
    (run / "snapshots" / "exit.pickle").write_bytes(b"")
    _run_dir(run / "worker-1")  # a vLLM worker's own run inside the engine's run
    _run_dir(fleet / "group" / "rank-0")
    _run_dir(fleet / "group" / "rank-1")
    (fleet / "b").mkdir()
    (fleet / "b" / "t.pt.trace.json").write_text("{}")
    (fleet / "b" / "oom.pickle").write_bytes(b"")
    (fleet / "b" / "notes.json").write_text("{}")  # other names are inputs only when named explicitly
    (fleet / ".hidden").mkdir()
    (fleet / ".hidden" / "y.pickle").write_bytes(b"")
    inputs, problems = find_inputs(
        [fleet, fleet / "b" / "notes.json", fleet / "a" / "run1", tmp_path / "nope"]
    )
    shown = [inp.run_id for inp in inputs]
    root = fleet.as_posix()
    assert shown == [
        f"{root}/a/run1",
        f"{root}/a/run1/worker-1",
        f"{root}/b/oom.pickle",
        f"{root}/b/t.pt.trace.json",
        f"{root}/group/rank-0",
        f"{root}/group/rank-1",
        f"{root}/b/notes.json",
    ]  # run1 named again: exported once
    assert problems == [(str(tmp_path / "nope"), f"{tmp_path / 'nope'}: no such file or directory")]
    assert all(inp.path.is_absolute() for inp in inputs)


def test_folder_search_counts_real_folders_once_whatever_the_links(tmp_path: Path) -> None:
    # GIVEN three real folders below a folder, two links back to it and one from a subfolder up to it
    tree = tmp_path / "tree"
    for name in ("s1", "s2", "s3"):
        (tree / name).mkdir(parents=True)
    (tree / "a").symlink_to(".")
    (tree / "b").symlink_to(".")
    (tree / "s1" / "up").symlink_to("..")
    # WHEN it is searched THEN it holds no input, and 3 folders were listed, every one: the links are
    # folders already searched, not new ones
    search = FolderSearch(tree)
    assert (list(search), search.folders, search.complete) == ([], 3, True)
    # AND a bound of 2 folders stops the search there, saying it did not see every folder
    bounded = FolderSearch(tree, max_folders=2)
    assert (list(bounded), bounded.folders, bounded.complete) == ([], 2, False)


def test_folder_search_finds_the_nearest_input_first_when_asked(tmp_path: Path) -> None:
    # GIVEN a snapshot three folders down under the first name, a trace one folder down under the last
    deep = tmp_path / "a" / "b" / "c" / "oom.pickle"
    near = tmp_path / "z" / "t.pt.trace.json"
    for path in (deep, near):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    # WHEN searched in name order (export's order) THEN the deep one comes first; level by level, the near one
    assert [found.path for found in FolderSearch(tmp_path)] == [deep, near]
    assert [found.path for found in FolderSearch(tmp_path, shallowest_first=True)] == [near, deep]
