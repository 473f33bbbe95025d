"""An engine run's rows for the export tables (vLLM, transformers' continuous batching): its engine files
read as `kvtrace report` reads them, and its KV events with the dtype its pool holds. Pure, no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analyzers.engine import PREFIX_FIELDS, cache_dtype_name
from kvtrace.errors import KvtraceError
from kvtrace.format import ENGINE, ENGINE_REQUESTS, ENGINE_STEPS

__all__ = ["engine_kv_dtype", "kv_event_rows", "read_engine_files"]


def engine_kv_dtype(engine: dict[str, Any]) -> Any:
    """What the engine's KV pool holds, as the report names it: an fp8 pool's tensors are uint8 (engine.json's
    `kv_dtype`), the config's `kv_cache_dtype` says fp8. engine.json's value otherwise (null when absent)."""
    stored = engine.get("kv_dtype")
    return cache_dtype_name(stored, engine.get("config")) if isinstance(stored, str) else stored


def kv_event_rows(events: list[dict[str, Any]], engine: dict[str, Any]) -> list[dict[str, Any]]:
    """KV events as rows. A `freed` line carries only its storage's identity: its row gets the device of
    that storage's last event, so that a join on `device` keeps the frees. The views of an engine's pool
    (their `source` is the engine's name) carry the dtype the pool holds (`engine_kv_dtype`), not its
    tensors' (uint8 for fp8); their bytes are the tensors' as logged. Other caches of the run keep theirs."""
    device_at: dict[int, str] = {}
    for row in events:
        addr, device = row.get("addr"), row.get("device")
        if row.get("event") == "freed":
            if not device and addr in device_at:
                row["device"] = device_at[addr]
        elif device and isinstance(addr, int):
            device_at[addr] = device
    stored, held = engine.get("kv_dtype"), engine_kv_dtype(engine)
    if not isinstance(stored, str) or held == stored:
        return events
    name = engine.get("name")
    for row in events:
        if row.get("source") == name and row.get("dtype") == stored:
            row["dtype"] = held
    return events


def read_engine_files(run_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """engine.json and the engine's step and request logs (vLLM and continuous-batching runs; else empty).

    A run with engine.json is first read as `kvtrace report` reads it (`read_engine`), so
    that a damaged one (a step log cut or short after the run ended, a field out of range) is refused with
    the report's one-line error, not exported as if whole. The rows are then the files' own lines: a field
    the log leaves out stays null in the tables."""
    from analyzers.readers.engine_files import read_engine
    from kvtrace.errors import too_long_integer
    from kvtrace.run_reader import _read_jsonl  # the format's one JSONL reader: tolerates a cut last line

    engine: Any = {}
    engine_path = run_path / ENGINE
    run = read_engine(run_path)  # raises KvtraceError on a damaged engine file
    if run is not None:
        try:
            engine = json.loads(engine_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:  # changed since it was checked
            raise KvtraceError(f"{engine_path}: corrupt engine file ({type(exc).__name__})") from None
        except ValueError:  # CPython's limit on the digits of an int
            raise KvtraceError(f"{engine_path}: corrupt engine file ({too_long_integer()})") from None
    steps, _ = _read_jsonl(run_path / ENGINE_STEPS)
    if run is not None and not run.steps.prefix_known:  # hits nobody counted: null, as the report's unknown
        steps = [{**step, **dict.fromkeys(PREFIX_FIELDS)} for step in steps]
    requests, _ = _read_jsonl(run_path / ENGINE_REQUESTS)
    return (engine if isinstance(engine, dict) else {}), steps, requests
