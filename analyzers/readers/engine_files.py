"""Reads a serving engine's files in a run directory (engine.json, engine_steps.jsonl, engine_requests.jsonl,
docs/format.md "vLLM runs") into `analyzers.engine.EngineRun`, refusing damaged ones in one line that names
the file, and checking a finished run's step log against the count its manifest holds."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from analyzers.engine import (
    ENGINE,
    ENGINE_REQUESTS,
    ENGINE_STEPS,
    REQUEST_EVENTS,
    EngineInfo,
    EngineRun,
    EngineSteps,
    RequestEvent,
)
from kvtrace.errors import KvtraceError, refuse_special_file, shown_integer
from kvtrace.format import MAX_LAYERS
from kvtrace.json_reads import read_json_file, read_json_line
from kvtrace.run_checks import MAX_BYTES

__all__ = ["block_bytes", "has_engine", "model_in_worker_process", "read_engine"]

_I64 = 2**63 - 1
_I32 = 2**31 - 1  # the export's int32 columns (block_size, the model's geometry)

_STEP_COLUMNS = (
    "step",
    "t_ns",
    "blocks_total",
    "blocks_used",
    "blocks_used_in_step",
    "blocks_free",
    "blocks_cached",
    "running",
    "waiting",
    "tokens_scheduled",
    "prefix_evicted_blocks",
    "prefix_hits",
    "prefix_queries",
)


def has_engine(path: str | os.PathLike[str]) -> bool:
    """Whether the run has engine files (an engine.json that is not a file is read, and refused)."""
    return os.path.lexists(Path(path) / ENGINE)


def model_in_worker_process(path: str | os.PathLike[str]) -> bool:
    """Whether the run's vLLM engine ran its model in a worker process of its own: its KV tensors were
    reached through vLLM's `collective_rpc` (engine.json `pool_source` `kv_tensors_rpc`: vLLM's CPU build
    under multiprocessing, tensor and pipeline parallelism). A profiler in the recording process then
    traced none of the model's memory. False where engine.json is absent or damaged (its reader says so)."""
    file = Path(path) / ENGINE
    if not file.is_file():
        return False
    try:
        data = read_json_file(file, "not valid JSON")
    except KvtraceError:
        return False
    return (
        isinstance(data, dict) and data.get("name") == "vllm" and data.get("pool_source") == "kv_tensors_rpc"
    )


def _int(value: Any, where: str, name: str, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvtraceError(f"{where}: field {name!r} must be an integer, got {value!r}")
    return value


def _opt_int(value: Any, where: str, name: str) -> int | None:
    return None if value is None else _int(value, where, name)


def _log_int(value: Any, where: str, name: str) -> int:
    """An integer field of a line of engine_steps.jsonl or engine_requests.jsonl (0 where the line leaves it
    out), refused (naming the file, the line and the field) outside what a count can be: 0 to 2**63 - 1, a
    step number below 0 too. A request's -3 blocks was read as it stood: the request dropped from the
    demand, its blocks from the totals."""
    checked = _int(value, where, name, default=0)
    if not (-_I64 if name == "step" else 0) <= checked <= _I64:
        raise KvtraceError(f"{where}: field {name!r} out of range: {shown_integer(checked)}")
    return checked


def _opt_log_int(value: Any, where: str, name: str) -> int | None:
    """`_log_int` of a field whose absence is not 0 (None)."""
    return None if value is None else _log_int(value, where, name)


def _read_info(file: Path) -> EngineInfo:
    data = read_json_file(file, "not valid JSON")
    if not isinstance(data, dict):
        raise KvtraceError(f"{file}: expected a JSON object")
    where = str(file)
    refused = data.get("refused")
    if refused is not None and not isinstance(refused, dict):
        raise KvtraceError(f"{file}: field 'refused' must be an object or null")
    for name in ("model", "config", "memory_profile"):
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise KvtraceError(f"{file}: field {name!r} must be an object")
    for name, low, high in _INFO_INTS:
        _in_range(data.get(name), where, name, low, high)
    config = data.get("config") or {}
    for name in _CONFIG_INTS:
        high = MAX_BYTES if name.endswith("_bytes") else _I64
        _in_range(config.get(name), where, f"config.{name}", 0, high)
    model = data.get("model") or {}
    for name, high in _MODEL_INTS:
        _in_range(model.get(name), where, f"model.{name}", 0, high)
    util = config.get("gpu_memory_utilization")
    if util is not None and (type(util) not in (int, float) or not 0 < util <= 1):
        raise KvtraceError(f"{file}: field 'config.gpu_memory_utilization' must be in (0, 1], got {util!r}")
    return EngineInfo(
        name=str(data.get("name", "")),
        version=str(data.get("version", "")),
        status=str(data.get("status", "ok")),
        process=str(data.get("process", "")),
        model=dict(data.get("model") or {}),
        config=dict(data.get("config") or {}),
        num_blocks=_opt_int(data.get("num_blocks"), where, "num_blocks"),
        block_size=_opt_int(data.get("block_size"), where, "block_size"),
        bytes_per_block=block_bytes(data, where),
        kv_cache_bytes=_opt_int(data.get("kv_cache_bytes"), where, "kv_cache_bytes"),
        kv_dtype=str(data["kv_dtype"]) if data.get("kv_dtype") is not None else "",  # "": not recorded
        layout=str(data.get("layout", "")),
        layers=tuple(x for x in data.get("layers") or () if isinstance(x, dict)),
        storage=tuple(x for x in data.get("storage") or () if isinstance(x, dict)),
        memory_profile=dict(data.get("memory_profile") or {}),
        refused=refused,
        blocks_reserved=_int(data.get("blocks_reserved"), where, "blocks_reserved", default=1),
        bytes_per_sector=_opt_int(data.get("bytes_per_sector"), where, "bytes_per_sector") or None,
        failure=dict(data["failure"]) if isinstance(data.get("failure"), dict) else None,
        failed_requests_logged=data.get("failed_requests_logged") is True,
        aborted_requests_logged=data.get("aborted_requests_logged") is True,
        prefix_stats=_opt_str(data.get("prefix_stats"), where, "prefix_stats"),
        pipeline_stages=_pipeline_stages(data.get("pipeline_stages"), where),
    )


def _pipeline_stages(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """engine.json's `pipeline_stages` (vLLM, pipeline parallel): a list of objects whose byte counts are
    in range and whose `layers` are layer numbers; () where absent."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(stage, dict) for stage in value):
        raise KvtraceError(f"{where}: field 'pipeline_stages' must be a list of objects")
    for number, stage in enumerate(value):
        for name in ("kv_cache_bytes", "weights_bytes", "buffers_bytes"):
            _in_range(stage.get(name), where, f"pipeline_stages[{number}].{name}", 0, MAX_BYTES)
        layers = stage.get("layers")
        if not isinstance(layers, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _I32 for x in layers
        ):
            raise KvtraceError(
                f"{where}: field 'pipeline_stages[{number}].layers' must be a list of layer numbers"
            )
    return tuple(value)


def block_bytes(data: dict[str, Any], where: str = "engine.json") -> int | None:
    """engine.json's `bytes_per_block`, what one block id costs. kvtrace's vLLM recorder once summed the
    `KVCacheTensor`s of a hybrid model (Gemma 2, 3), each of them the whole allocation its cache groups
    share: its blocks came out 2x or 6x too big, more than the measured storage holds. Such a run's block
    is its storage over its blocks (what vLLM divided by), so that diagnoses and plans price real blocks."""
    recorded = _opt_int(data.get("bytes_per_block"), where, "bytes_per_block")
    num_blocks = _opt_int(data.get("num_blocks"), where, "num_blocks")
    storage = _opt_int(data.get("kv_cache_bytes"), where, "kv_cache_bytes")
    measured = data.get("pool_source") in ("kv_tensors", "kv_tensors_rpc")  # not the summed config's
    vllm = data.get("name") == "vllm" and measured
    if vllm and recorded and num_blocks and storage and recorded * num_blocks > storage:
        return storage // num_blocks
    return recorded


def _in_range(value: Any, where: str, name: str, low: int, high: int) -> None:
    """An optional integer field of engine.json, refused when out of [low, high]: sizes past 2**56 bytes
    (as every size the run's other files hold) printed pools of 9e17 TiB; int32 fields past 2**31 stopped
    `export` and `query` alone."""
    checked = _opt_int(value, where, name)
    if checked is not None and not low <= checked <= high:
        said = shown_integer(checked)
        raise KvtraceError(f"{where}: field {name!r} out of range: {said}, expected {low} to {high}")


# engine.json's own integers, when present: (name, lowest, highest)
_INFO_INTS = (
    ("num_blocks", 0, MAX_BYTES),  # a block holds at least a byte
    ("block_size", 1, _I32),
    ("bytes_per_block", 0, MAX_BYTES),
    ("kv_cache_bytes", 0, MAX_BYTES),
    ("blocks_reserved", 0, MAX_BYTES),
    ("bytes_per_sector", 0, MAX_BYTES),
)
# engine.json `model` integers, when present: the runs table keeps the geometry in int32, and the planners
# loop over the layers (a model has at most MAX_LAYERS)
_MODEL_INTS = (
    ("num_layers", MAX_LAYERS),
    ("draft_kv_layers", MAX_LAYERS),
    ("sliding_layers", MAX_LAYERS),
    ("num_attention_heads", _I32),
    ("num_kv_heads", _I32),
    ("head_dim", _I32),
    ("hidden_size", _I32),
    ("vocab_size", _I64),
    ("num_params", _I64),
)
# engine.json `config` fields the planners compute with, when present
_CONFIG_INTS = (
    "block_size",
    "max_num_seqs",
    "max_model_len",
    "max_num_batched_tokens",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "kv_cache_memory_bytes",
    "num_gpu_blocks_override",
)


def _jsonl(file: Path) -> tuple[list[dict[str, Any]], bool]:
    """Complete lines of a JSON-lines log, and whether its last line was cut (the process died mid-write:
    dropped); a corrupt line elsewhere is an error naming the file and line."""
    if not os.path.lexists(file):
        return [], False
    refuse_special_file(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise KvtraceError(f"{file}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise KvtraceError(f"{file}: not UTF-8 text") from None
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = read_json_line(line, file, number, last=number == len(lines) and not text.endswith("\n"))
        if row is None:
            return rows, True  # the last line was cut
        rows.append(row)
    return rows, False


def _read_steps(file: Path, counted: int | None, num_blocks: int | None) -> EngineSteps:
    """The step log; `counted`: the steps the finished run's manifest counts (None: still running)."""
    rows, cut = _jsonl(file)
    if counted is not None and (cut or len(rows) != counted):
        said = f"{len(rows)} complete steps of the {counted} counted"
        raise KvtraceError(f"{file}: damaged after the run ended: {said}")
    columns = {name: np.zeros(len(rows), dtype=np.int64) for name in _STEP_COLUMNS}
    preempted: list[tuple[str, ...]] = []
    in_step = bool(rows)
    prefix_known = True
    for i, row in enumerate(rows):
        where = f"{file}: line {i + 1}"
        if "prefix_hits" in row and row["prefix_hits"] is None:
            prefix_known = False  # kvtrace could not count them (vLLM's stats off): unknown, not 0
        for name in _STEP_COLUMNS:
            value = _log_int(row.get(name), where, name)
            if name == "blocks_used_in_step" and row.get(name) is None:
                value = int(columns["blocks_used"][i])  # runs recorded before kvtrace wrote it
                in_step = False
            columns[name][i] = value
        for name in ("blocks_used", "blocks_used_in_step"):
            if num_blocks is not None and columns[name][i] > num_blocks:
                raise KvtraceError(
                    f"{where}: {columns[name][i]} blocks used of a pool of {num_blocks}: not a real step"
                )
        ids = row.get("preempted") or []
        if not isinstance(ids, list):
            raise KvtraceError(f"{where}: field 'preempted' must be a list")
        preempted.append(tuple(str(x) for x in ids))
    return EngineSteps(columns, tuple(preempted), in_step, prefix_known)


def _read_requests(
    file: Path, counts: _EndCounts, steps: EngineSteps
) -> tuple[tuple[RequestEvent, ...], str | None]:
    """The request log, and the note on one that is missing (or empty) though the run had requests (None
    otherwise). A finished run's log is checked as its steps are: against the lines the manifest counts, or,
    in runs recorded before kvtrace counted them, for a cut last line and against its preemptions."""
    rows, cut = _jsonl(file)
    if counts.finished:
        _check_requests(file, rows, cut, counts)
    events = tuple(_request_event(row, f"{file}: line {i + 1}") for i, row in enumerate(rows))
    return events, None if events else _requests_missing(file, counts, steps)


def _check_requests(file: Path, rows: list[dict[str, Any]], cut: bool, counts: _EndCounts) -> None:
    """Refuses a finished run's request log damaged after the run: cut mid-line, or holding another number
    of lines than the recorder wrote. Figures from it would be wrong, not early: a copy cut at half read as
    2 preemptions of 6, and the remedies were priced on a third of the requests. A missing log is read with
    a note (`_requests_missing`), as a missing weights.jsonl or memory_samples.jsonl is."""
    if not os.path.lexists(file):
        return
    written, preemptions = counts.requests, counts.preemptions
    if written is not None and (cut or len(rows) != written):
        last = ", the last one cut" if cut else ""
        said = f"{len(rows)} complete lines of the {written} the manifest counts{last}"
    elif written is not None:
        return
    elif cut:  # recorded before kvtrace counted the lines: a cut line is all that can be seen
        said = "its last line is cut"
    elif preemptions is not None and preemptions != (
        logged := sum(r.get("event") == "preempted" for r in rows)
    ):
        said = f"{logged} preempted lines of the {preemptions} preemptions the manifest counts"
    else:
        return
    raise KvtraceError(f"{file}: damaged after the run ended: {said}")


def _requests_missing(file: Path, counts: _EndCounts, steps: EngineSteps) -> str | None:
    """The note on a request log that is missing or empty while the run had requests (the manifest counts
    its lines or preemptions, or a step scheduled tokens or held requests); None where it had none. Every
    figure read from the log (the requests, the tokens preemptions dropped, the demand the remedies are
    priced on) is then unknown: read as 0, a pool of 1 block "fitted" a run that preempted 6 times."""
    if counts.requests:
        evidence = f"the manifest counts {counts.requests:,} lines"
    elif counts.preemptions:
        evidence = f"the manifest counts {counts.preemptions:,} preemptions"
    else:
        busy = (
            int(np.count_nonzero(steps["tokens_scheduled"] | steps["running"] | steps["waiting"]))
            if len(steps)
            else 0
        )
        if not busy:
            return None
        evidence = f"{busy:,} engine steps ran requests"
    state = "missing" if not os.path.lexists(file) else "empty"
    return (
        f"{file} is {state} while {evidence}: the requests, the KV tokens preemptions dropped and the demand "
        "remedies are priced on are unknown, and no preemption remedy is priced"
    )


def _request_event(row: dict[str, Any], where: str) -> RequestEvent:
    event = row.get("event")
    if event not in REQUEST_EVENTS:
        raise KvtraceError(f"{where}: unknown request event {event!r}")
    if row.get("request_id") is None:
        raise KvtraceError(f"{where}: no request_id")
    counts = {name: _log_int(row.get(name), where, name) for name in _REQUEST_INTS}
    return RequestEvent(
        request_id=str(row["request_id"]),
        event=str(event),
        finish_reason=_opt_str(row.get("finish_reason"), where, "finish_reason"),
        error=_opt_str(row.get("error"), where, "error"),
        max_tokens=_opt_log_int(row.get("max_tokens"), where, "max_tokens"),
        cached_tokens=_opt_log_int(row.get("cached_tokens"), where, "cached_tokens"),
        **counts,
    )


# engine_requests.jsonl's integers, 0 where a line leaves one out
_REQUEST_INTS = (
    "t_ns",
    "step",
    "blocks",
    "tokens",
    "prompt_tokens",
    "output_tokens",
    "dropped_blocks",
    "dropped_tokens",
    "recomputed_tokens",
)


def _opt_str(value: Any, where: str, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise KvtraceError(f"{where}: field {name!r} must be a string, got {value!r}")
    return value


def read_engine(path: str | os.PathLike[str]) -> EngineRun | None:
    """The engine files of a run directory; None when the run has no engine.json (an HF run)."""
    folder = Path(path)
    if not has_engine(folder):
        return None
    counts = _end_counts(folder)
    info = _read_info(folder / ENGINE)
    steps = _read_steps(folder / ENGINE_STEPS, counts.steps, info.num_blocks)
    requests, missing = _read_requests(folder / ENGINE_REQUESTS, counts, steps)
    if _prefix_stats_were_off(info, steps, requests):
        steps = dataclasses.replace(steps, prefix_known=False)
    return EngineRun(path=str(folder), info=info, steps=steps, requests=requests, requests_missing=missing)


def _prefix_stats_were_off(info: EngineInfo, steps: EngineSteps, requests: tuple[RequestEvent, ...]) -> bool:
    """Whether a vLLM run recorded before engine.json said who counts prefix-cache hits (`prefix_stats`)
    logged 0 for hits nobody counted: vLLM with its stats off (`LLM()`'s default) keeps none, and kvtrace
    did not count them then. With its stats on and prefix caching on, vLLM queries every new request it
    admits (`record_prefix_cache_stats`), so no query in a run that admitted one says the stats were off."""
    if info.name != "vllm" or info.prefix_stats is not None or not info.config.get("enable_prefix_caching"):
        return False
    if not steps.prefix_known or not len(steps):
        return False
    return not steps["prefix_queries"].any() and any(e.event == "scheduled" for e in requests)


@dataclasses.dataclass(frozen=True)
class _EndCounts:
    """What a finished run's manifest counts of its engine logs (`engine`): each None where it does not (a
    run still recorded or killed, one recorded before kvtrace counted it, or no manifest)."""

    finished: bool = False
    steps: int | None = None
    requests: int | None = None  # lines of engine_requests.jsonl
    preemptions: int | None = None


def _end_counts(folder: Path) -> _EndCounts:
    """The manifest's counts of a finished run's engine logs. A damaged manifest is refused as the run
    reader refuses it: read as none, a truncated one let `plan --from-run` read a run `report` refuses."""
    path = folder / "manifest.json"
    if not os.path.lexists(path):
        return _EndCounts()  # the engine files alone
    manifest = read_json_file(path, "corrupt manifest", encoding="utf-8-sig")
    if not isinstance(manifest, dict):
        raise KvtraceError(f"{path}: not a kvtrace manifest")
    ended = manifest.get("ended")
    if not isinstance(ended, dict) or ended.get("status") in (None, "running"):
        return _EndCounts()
    engine = manifest.get("engine")
    engine = engine if isinstance(engine, dict) else {}

    def count(name: str) -> int | None:
        value = engine.get(name)
        return value if type(value) is int and value >= 0 else None

    return _EndCounts(True, count("engine_steps"), count("engine_requests"), count("preemptions"))
