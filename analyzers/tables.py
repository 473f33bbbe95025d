"""The export tables: their versioned Arrow schemas, and one source turned into rows of each.

Every input kvtrace reads (a run directory, a rank of a run group, a Chrome trace, a snapshot, a memory
timeline) becomes the same seven tables, keyed by `run_id`, so that DuckDB, Spark or pandas can query a
thousand runs at once. The schemas are fixed here and documented in docs/format.md ("Parquet export");
`SCHEMA_VERSION` is written into every file's metadata (`kvtrace.schema_version`). A column added later
is optional for readers; a column removed or changed in meaning bumps the version.

Rows come from the analyzers' own readers and attribution (`analyzers.report.load_source`), so a memory
event's category in a table is the one `kvtrace report` counted. One source at a time: memory stays
bounded by the largest single input, whatever the number of inputs (see analyzers.export_parquet).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from analyzers.engine import model_geometry
from analyzers.export_engine_rows import engine_kv_dtype, kv_event_rows, read_engine_files
from analyzers.export_groups import GroupIds, group_key
from analyzers.export_inputs import Input, parquet_text
from analyzers.export_state import SourceState, source_state
from analyzers.kv_events import is_kv_data
from analyzers.model import (
    CATEGORY_NAMES,
    METHOD_NAMES,
    TORCH_CATEGORY_NAMES,
    UNKNOWN_DEVICE,
    DeviceEvents,
    MemorySource,
)
from analyzers.readers.sources import ProgressFn
from analyzers.run_kv import heads_held_by
from kvtrace.format import is_run_group, rank_dirs

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"kvtrace.schema_version"
TABLE_KEY = b"kvtrace.table"


_I32, _I64, _F64, _STR, _BOOL = pa.int32(), pa.int64(), pa.float64(), pa.string(), pa.bool_()


def _schema(name: str, fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    metadata = {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: name.encode()}
    return pa.schema([pa.field(n, t) for n, t in fields], metadata=metadata)


RUNS = _schema(
    "runs",
    [
        ("run_id", _STR), ("path", _STR), ("source_kind", _STR), ("group_id", _STR),
        ("rank", _I32), ("world_size", _I32), ("local_rank", _I32), ("hostname", _STR), ("backend", _STR),
        ("device_type", _STR), ("device_name", _STR), ("device_index", _I32), ("total_memory_bytes", _I64),
        ("model_class", _STR), ("num_layers", _I32), ("num_attention_heads", _I32), ("num_kv_heads", _I32),
        ("head_dim", _I32), ("hidden_size", _I32), ("vocab_size", _I64), ("sliding_window", _I64),
        ("model_dtype", _STR), ("parameters", _I64), ("parameters_per_rank", _I64), ("kv_heads_held", _I32),
        ("kvtrace_version", _STR), ("torch_version", _STR), ("transformers_version", _STR),
        ("python_version", _STR), ("platform", _STR), ("pid", _I64), ("run_schema_version", _I32),
        ("started_ns", _I64), ("ended_status", _STR), ("ended_ns", _I64), ("ended_type", _STR),
        ("ended_message", _STR), ("ended_signal", _STR), ("oom", _BOOL), ("oom_requested_bytes", _I64),
        ("oom_segment_bytes", _I64), ("truncated", _BOOL),
        ("kv_events", _I64), ("memory_events", _I64), ("samples", _I64), ("engine_steps", _I64),
        ("engine_name", _STR), ("engine_version", _STR), ("engine_status", _STR), ("engine_process", _STR),
        ("num_blocks", _I64), ("block_size", _I32), ("bytes_per_block", _I64), ("kv_cache_bytes", _I64),
        ("kv_dtype", _STR), ("manifest_json", _STR), ("engine_json", _STR),
        ("recording_pid", _I64), ("source_bytes", _I64), ("source_mtime_ns", _I64),
        ("memory_events_from", _STR),
    ],
)  # fmt: skip
DEVICES = _schema(
    "devices",
    [
        ("run_id", _STR), ("device", _STR), ("events", _I64), ("alloc_events", _I64),
        ("free_events", _I64), ("baseline_bytes", _I64), ("capacity_bytes", _I64), ("ts_kind", _STR),
    ],
)  # fmt: skip
KV_EVENTS = _schema(
    "kv_events",
    [
        ("run_id", _STR), ("seq", _I64), ("t_ns", _I64), ("step", _I32), ("phase", _STR), ("event", _STR),
        ("layer", _I32), ("kv", _STR), ("part", _STR), ("addr", _I64), ("storage_bytes", _I64),
        ("view_offset", _I64), ("shape", pa.list_(_I64)), ("logical_bytes", _I64), ("dtype", _STR),
        ("device", _STR), ("tokens", _I64), ("evicted_tokens", _I64), ("prev_addr", _I64),
        ("cache", _I32), ("source", _STR), ("reason", _STR), ("rows", _I64), ("masked_entries", _I64),
        ("capacity_tokens", _I64), ("capacity_rows", _I64),
    ],
)  # fmt: skip
MEMORY_EVENTS = _schema(
    "memory_events",
    [
        ("run_id", _STR), ("device", _STR), ("seq", _I64), ("ts_us", _F64), ("addr", _I64),
        ("delta_bytes", _I64), ("total_allocated", _I64), ("total_reserved", _I64), ("category", _STR),
        ("layer", pa.int16()), ("kv", _STR), ("method", _STR), ("torch_category", _STR),
    ],
)  # fmt: skip
SAMPLES = _schema(
    "samples",
    [
        ("run_id", _STR), ("t_ns", _I64), ("step", _I32), ("phase", _STR), ("rss_bytes", _I64),
        ("cuda_device", _I32), ("cuda_allocated_bytes", _I64), ("cuda_reserved_bytes", _I64),
        ("cuda_peak_allocated_bytes", _I64), ("started_ns", _I64), ("raised", _BOOL),
        ("prompt_end", _I64), ("max_length", _I64), ("max_new_tokens", _I64), ("cpu_percent", _F64),
        ("gpu_memory_used_bytes", _I64), ("gpu_memory_total_bytes", _I64), ("gpu_utilization_percent", _F64),
    ],
)  # fmt: skip
ENGINE_STEPS_SCHEMA = _schema(
    "engine_steps",
    [
        ("run_id", _STR), ("step", _I64), ("t_ns", _I64), ("phase", _STR), ("blocks_total", _I64),
        ("blocks_used", _I64), ("blocks_used_in_step", _I64), ("blocks_free", _I64), ("blocks_cached", _I64),
        ("blocks_reserved", _I64), ("running", _I64), ("waiting", _I64), ("tokens_scheduled", _I64),
        ("preempted", pa.list_(_STR)),
        ("prefix_evicted_blocks", _I64), ("prefix_hits", _I64), ("prefix_queries", _I64),
        ("prefix_preempted_hits", _I64), ("prefix_preempted_queries", _I64), ("raised", _BOOL),
    ],
)  # fmt: skip
ENGINE_REQUESTS_SCHEMA = _schema(
    "engine_requests",
    [
        ("run_id", _STR), ("t_ns", _I64), ("step", _I64), ("request_id", _STR), ("event", _STR),
        ("blocks", _I64), ("tokens", _I64), ("prompt_tokens", _I64), ("output_tokens", _I64),
        ("dropped_blocks", _I64), ("dropped_tokens", _I64), ("recomputed_tokens", _I64),
        ("offloaded_to", _STR), ("finish_reason", _STR), ("max_tokens", _I64), ("cached_tokens", _I64),
    ],
)  # fmt: skip

SCHEMAS: dict[str, pa.Schema] = {
    "runs": RUNS,
    "devices": DEVICES,
    "kv_events": KV_EVENTS,
    "memory_events": MEMORY_EVENTS,
    "samples": SAMPLES,
    "engine_steps": ENGINE_STEPS_SCHEMA,
    "engine_requests": ENGINE_REQUESTS_SCHEMA,
}
TABLE_NAMES = tuple(SCHEMAS)


# ---- values from JSON written by anyone: a wrong type becomes null, never a crash -----------------


def _int(value: Any, bits: int = 64) -> int | None:
    """An integer that fits a signed column of `bits`, else null (the readers refuse such values in the
    records they own; this covers metadata they pass through, a trace's `distributedInfo`)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    limit = 2 ** (bits - 1)
    if not -limit <= value < limit:  # first: float() of a 400-digit int overflows; NaN lands here too
        return None
    return int(value) if float(value).is_integer() else None


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _column(records: list[dict[str, Any]], name: str, kind: pa.DataType) -> pa.Array:
    values = [record.get(name) for record in records]
    if pa.types.is_integer(kind):
        return pa.array([_int(v, kind.bit_width) for v in values], kind)
    if pa.types.is_boolean(kind):
        return pa.array([v if isinstance(v, bool) else None for v in values], kind)
    if pa.types.is_floating(kind):
        numbers = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values]
        return pa.array([None if v is None else float(v) for v in numbers], kind)
    if pa.types.is_list(kind) and pa.types.is_integer(kind.value_type):
        return pa.array([[_int(x) for x in v] if isinstance(v, list) else None for v in values], kind)
    if pa.types.is_list(kind):
        texts: list[Any] = [[_str(x) for x in v] if isinstance(v, list) else None for v in values]
    else:
        texts = [_str(v) for v in values]
    try:
        return pa.array(texts, kind)
    except UnicodeEncodeError:  # a file name that is not UTF-8 (a run's path), checked only when one is
        return pa.array([_parquet_texts(t) for t in texts], kind)


def _parquet_texts(value: Any) -> Any:
    if isinstance(value, list):
        return [_parquet_texts(v) for v in value]
    return parquet_text(value) if isinstance(value, str) else value


def records_table(schema: pa.Schema, run_id: str, records: list[dict[str, Any]]) -> pa.Table:
    """Rows of JSON objects (KV events, samples, engine steps) as a table of `schema`."""
    arrays = [pa.array([run_id] * len(records), _STR)]
    arrays += [_column(records, f.name, f.type) for f in list(schema)[1:]]
    return pa.Table.from_arrays(arrays, schema=schema)


def _repeat(value: str, n: int) -> pa.Array:
    """A string column of one value, built without n Python objects."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value])).cast(_STR)


def _codes(codes: np.ndarray | None, names: tuple[str, ...], n: int, offset: int = 0) -> pa.Array:
    """Names of small integer codes; null where the code is unknown (out of range)."""
    if codes is None:
        return pa.nulls(n, _STR)
    index = codes.astype(np.int32) - offset
    unknown = (index < 0) | (index >= len(names))
    indices = pa.array(np.where(unknown, 0, index), mask=unknown)
    return pa.DictionaryArray.from_arrays(indices, pa.array(list(names))).cast(_STR)


def _optional(values: np.ndarray | None, n: int) -> pa.Array:
    return pa.nulls(n, _I64) if values is None else pa.array(values.astype(np.int64))


def memory_events_table(run_id: str, dev: DeviceEvents) -> pa.Table:
    n = len(dev)
    layer = None if dev.layer is None else pa.array(dev.layer.astype(np.int16), mask=dev.layer < 0)
    arrays = [
        _repeat(run_id, n),
        _repeat(parquet_text(dev.device), n),
        pa.array(np.arange(n, dtype=np.int64)),
        pa.array(dev.ts_us.astype(np.float64)),
        pa.array(dev.addr.astype(np.int64)),
        pa.array(dev.delta_bytes.astype(np.int64)),
        _optional(dev.total_allocated, n),
        _optional(dev.total_reserved, n),
        _codes(dev.category, CATEGORY_NAMES, n),
        layer if layer is not None else pa.nulls(n, pa.int16()),
        _codes(dev.kv_kind, ("k", "v"), n, offset=1),
        _codes(dev.method, METHOD_NAMES, n),
        # torch.profiler's own category, a memory timeline's only (null elsewhere)
        _codes(
            dev.torch_category if dev.torch_category is not None and len(dev.torch_category) == n else None,
            TORCH_CATEGORY_NAMES,
            n,
        ),
    ]
    return pa.Table.from_arrays(arrays, schema=MEMORY_EVENTS)


def _ts_kind(source: MemorySource, device: str) -> str:
    if source.kind == "run":
        return "unix_us"
    if source.kind == "snapshot":
        stamps = source.meta.get("timestamps", {}).get(device, "time_us")
        return "unix_us" if stamps == "time_us" else "event_index"
    return "trace_us"


def _devices_table(run_id: str, source: MemorySource, refused_start: bool = False) -> pa.Table:
    """A row per device. `refused_start` (a vLLM start refused for lack of KV memory: no pool, no step):
    a device without events measured nothing, so its baseline is null, as the report's figures are (a
    measured 0 would make the README's peak query say 0 where the report says unknown)."""
    rows = [
        {
            "run_id": run_id,
            "device": dev.device,
            "events": len(dev),
            "alloc_events": dev.alloc_events,
            "free_events": dev.free_events,
            "baseline_bytes": (
                None
                if refused_start and not (dev.alloc_events or dev.free_events)
                else int(dev.baseline_bytes)
            ),
            "capacity_bytes": dev.capacity_bytes,
            "ts_kind": _ts_kind(source, dev.device),
        }
        for dev in source.devices
    ]
    return records_table(DEVICES, run_id, rows)


def _main_device(source: MemorySource) -> DeviceEvents | None:
    """The device a source's row describes: its GPU where it has one (a trace's "cpu" sorts first)."""
    gpus = [dev for dev in source.devices if dev.device != "cpu"]
    return next(iter(gpus or source.devices), None)


def _gpu_properties(properties: Any, index: int | None) -> dict[str, Any]:
    """A trace's deviceProperties entry of GPU `index`; the first entry when the trace names no GPU of its
    own (a trace without memory events) or the index is not listed."""
    listed = properties if isinstance(properties, list) else []
    entries = [entry for entry in listed if isinstance(entry, dict)]
    return next((entry for entry in entries if entry.get("id") == index), entries[0] if entries else {})


def _in_a_group(path: Path, source: MemorySource, ranked: dict[str, Any], groups: GroupIds) -> bool:
    """Whether an input is one rank of a group: a run directory `rank-<r>` of a run group that the group's
    report sums (not a copy of another rank's run: `GroupIds.left_out`), or a trace that names its rank in
    a job of several processes. A group of one process records a plain run (the manifest still says rank 0
    of 1), so the parent folder of two such runs is no group."""
    if source.kind == "run":
        parent = Path(path).parent
        return (
            is_run_group(parent)
            and Path(path).name in {rank.name for _, rank in rank_dirs(parent)}
            and groups.left_out(Path(path)) is None
        )
    return _int(ranked["rank"]) is not None and _int(ranked["world_size"]) != 1


def _group_id(
    run_id: str, path: Path, source: MemorySource, ranked: dict[str, Any], groups: GroupIds
) -> str | None:
    """The source's group (analyzers.export_groups), named after the folder holding it; None: in none."""
    if not _in_a_group(path, source, ranked, groups):
        return None
    key = group_key(path, source.kind, _str(ranked["backend"]), _int(ranked["world_size"]))
    return groups.id_for(key, Path(run_id).parent.as_posix())


def _kv_heads_held(source: MemorySource) -> int | None:
    """The KV heads the run's cache holds (its last KV data tensor's), as the report's arithmetic counts
    them: a tensor-parallel rank's share of the model's `num_kv_heads`."""
    run = source.meta.get("run")
    data = [e for e in run.kv_events if is_kv_data(e) and e.shape] if run is not None else []
    return heads_held_by(data[-1]) if data else None


def _run_row(
    run_id: str,
    path: Path,
    source: MemorySource,
    engine: dict[str, Any],
    counts: dict[str, int],
    state: SourceState | None,
    groups: GroupIds,
) -> dict[str, Any]:
    from analyzers.readers.engine_files import block_bytes

    manifest = _dict(source.meta.get("manifest"))
    device = _dict(manifest.get("device"))
    # a vLLM run's manifest has no model: engine.json holds it
    model = _dict(manifest.get("model") or model_geometry(engine.get("model")))
    ended = _dict(manifest.get("ended"))
    oom = source.ooms[0] if source.ooms else None
    # A Kineto trace of a distributed job names its rank; its devices are in deviceProperties.
    distributed = _dict(source.meta.get("distributedInfo"))
    main_device = _main_device(source)
    # A memory timeline names no device: its row leaves the type and index null rather than guess them.
    # (`is not None`: a device's events define its length, and one with none is still the source's device)
    named = main_device if main_device is not None and main_device.device != UNKNOWN_DEVICE else None
    device_type, _, index_text = named.device.partition(":") if named is not None else ("", "", "")
    device_index = int(index_text) if index_text.isdigit() else None
    gpu = _gpu_properties(source.meta.get("deviceProperties"), device_index) if device_type != "cpu" else {}
    ranked = {key: manifest.get(key, distributed.get(key)) for key in ("rank", "world_size", "backend")}
    return {
        "run_id": run_id,
        "path": str(path),
        "source_kind": source.kind,
        "group_id": _group_id(run_id, path, source, ranked, groups),
        **ranked,
        **{key: manifest.get(key) for key in ("local_rank", "hostname")},
        # A trace's deviceProperties list GPUs only, which torch calls "cuda" (ROCm's too).
        "device_type": device.get("type") or device_type or ("cuda" if gpu else None),
        "device_name": device.get("name") or gpu.get("name"),
        "device_index": device.get("index", device_index),
        "total_memory_bytes": device.get("total_memory_bytes")
        or gpu.get("totalGlobalMem")
        or (main_device.capacity_bytes if main_device is not None else None),
        "model_class": model.get("class"),
        **{key: model.get(key) for key in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim")},
        **{key: model.get(key) for key in ("hidden_size", "vocab_size", "sliding_window", "parameters")},
        "model_dtype": model.get("dtype"),
        # a tensor-parallel rank's own share where it differs from the whole model's (the manifest's)
        "parameters_per_rank": model.get("parameters_per_rank"),
        # an engine's pool views are laid out as its attention backend chooses: heads are not read from them
        "kv_heads_held": None if engine else _kv_heads_held(source),
        **{
            key: manifest.get(key)
            for key in ("kvtrace_version", "torch_version", "transformers_version", "python_version")
        },
        "platform": manifest.get("platform"),
        "pid": manifest.get("pid"),
        "run_schema_version": manifest.get("schema_version"),
        "started_ns": manifest.get("started_ns"),
        "ended_status": ended.get("status"),
        "ended_ns": ended.get("t_ns"),
        "ended_type": ended.get("type"),
        "ended_message": ended.get("message"),
        "ended_signal": ended.get("signal") if isinstance(ended.get("signal"), str) else None,
        "oom": oom is not None,
        "oom_requested_bytes": oom.requested_bytes if oom else None,
        "oom_segment_bytes": oom.segment_bytes if oom else None,
        "truncated": bool(source.meta.get("truncated", False)),
        **counts,
        "engine_name": engine.get("name"),
        "engine_version": engine.get("version"),
        "engine_status": engine.get("status"),
        "engine_process": engine.get("process"),
        "kv_dtype": engine_kv_dtype(engine),
        "engine_json": json.dumps(engine, sort_keys=True) if engine else None,
        **{key: engine.get(key) for key in ("num_blocks", "block_size", "kv_cache_bytes")},
        "bytes_per_block": block_bytes(engine) if engine else None,  # a hybrid's older runs: corrected
        "manifest_json": json.dumps(manifest, sort_keys=True) if manifest else None,
        "recording_pid": _recording_pid(source.meta.get("recording_pid")),
        "source_bytes": state.bytes if state else None,
        "source_mtime_ns": state.mtime_ns if state else None,
        # a run whose allocator events are its KV log's (no readable trace): its peaks count KV and weights
        "memory_events_from": _events_from(source),
    }


def _events_from(source: MemorySource) -> str | None:
    """Where a run's memory events come from when not from its profiler trace ("kv_log (why)"); null for a
    run whose trace was read, and for a trace, a snapshot or a timeline (their own events)."""
    said = source.meta.get("events_from")
    return said if source.kind == "run" and isinstance(said, str) else None


def _recording_pid(holder: str | None) -> int | None:
    """The pid of the recording that held the run as it was read (0: one that had not yet written its pid)."""
    if holder is None:
        return None
    return int(holder) if holder.isdigit() else 0


def _kv_lines(run: Any) -> list[dict[str, Any]]:
    """The run's KV events as their lines said them: a field a line left out (a `freed` line's dtype, shape
    and tokens; `rows` where every row is in use) is null, not the "" or 0 it is read as, so that `IS NULL`
    and `count(column)` tell what the line did not say."""
    rows = [event.to_json() for event in run.kv_events]
    left_out: list[frozenset[str]] = run.kv_fields_left_out
    if len(left_out) != len(rows):  # not known for these events: as read
        return rows
    for row, fields in zip(rows, left_out, strict=True):
        for name in fields:
            row[name] = None
    return rows


def source_tables(
    inp: Input, progress: ProgressFn | None = None, groups: GroupIds | None = None
) -> dict[str, pa.Table]:
    """Every table's rows for one input (tables without rows are absent). Raises KvtraceError.

    `groups`: the group_ids handed out so far in the export (its folder's and this export's), so that two
    groups of one name are told apart; one of its own when not given."""
    from analyzers.report import load_source

    state = source_state(inp.path)  # before reading: what is written meanwhile shows as a change next time
    source = load_source(inp.path, progress=progress)
    run_id = inp.run_id
    tables: dict[str, pa.Table] = {}
    run = source.meta.get("run")
    engine: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    if run is not None:
        engine, steps, requests = read_engine_files(Path(inp.path))
        kv_rows = kv_event_rows(_kv_lines(run), engine)
        tables["kv_events"] = records_table(KV_EVENTS, run_id, kv_rows)
        tables["samples"] = records_table(SAMPLES, run_id, run.memory_samples)
        tables["engine_steps"] = records_table(ENGINE_STEPS_SCHEMA, run_id, steps)
        tables["engine_requests"] = records_table(ENGINE_REQUESTS_SCHEMA, run_id, requests)
    memory = [memory_events_table(run_id, dev) for dev in source.devices]
    if memory:
        tables["memory_events"] = pa.concat_tables(memory)
    tables["devices"] = _devices_table(run_id, source, engine.get("status") == "refused_start")
    counts = {
        "kv_events": len(run.kv_events) if run is not None else 0,
        "memory_events": sum(len(dev) for dev in source.devices),
        "samples": len(run.memory_samples) if run is not None else 0,
        "engine_steps": len(steps),
    }
    # Coerced column by column: a manifest field of the wrong type becomes null, not an ArrowTypeError.
    tables["runs"] = records_table(
        RUNS, run_id, [_run_row(run_id, inp.path, source, engine, counts, state, groups or GroupIds())]
    )
    return {name: table for name, table in tables.items() if table.num_rows}
