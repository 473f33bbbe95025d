"""The run directory: its layout, its schema version, and the one reader everybody uses.

Stdlib only, on purpose: the analyzers read runs on a laptop without torch, so this module must import
nothing heavy. The recorder writes through `RunWriter`; everything else reads through `read_run`.
See docs/format.md for every field.

Layout of a run directory::

    manifest.json         run metadata; rewritten atomically at start and at end
    kv_events.jsonl       one KV event per line, appended, flushed by the writer thread every 0.1 s
    weights.jsonl         one parameter/buffer storage per line; later, what the model took or let go
    memory_samples.jsonl  process/device memory, one sample per step; host figures every 20 ms
    profiler/             torch.profiler Chrome trace(s) (tensorboard_trace_handler)
    snapshots/            CUDA allocator snapshot pickles (exit.pickle, oom.pickle)

Clock: every `t_ns` in kvtrace's own files is Unix-epoch nanoseconds (`time.time_ns()`), the clock the
profiler's `baseTimeNanoseconds + ts` also lands on, so both line up without conversion.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvtrace.errors import KvtraceError, refuse_special_file, too_long_integer

# Which folders are runs and run groups is part of the format, in a module of its own so that a command can
# ask it of any input cheaply (kvtrace.run_layout): its names are the format's too.
from kvtrace.run_layout import GROUP_FORMAT as GROUP_FORMAT
from kvtrace.run_layout import GROUP_MARKER as GROUP_MARKER
from kvtrace.run_layout import MANIFEST, RANK_DIR_PREFIX, rank_dirs
from kvtrace.run_layout import is_run_dir as is_run_dir
from kvtrace.run_layout import is_run_group as is_run_group

SCHEMA_VERSION = 1
KV_EVENTS = "kv_events.jsonl"
WEIGHTS = "weights.jsonl"
MODEL_CONFIG = "model_config.json"  # the model's Hugging Face config, whole (`kvtrace plan --from-run`)
MEMORY_SAMPLES = "memory_samples.jsonl"
PROFILER_DIR = "profiler"
SNAPSHOT_DIR = "snapshots"
# vLLM runs (docs/format.md, "vLLM runs"): the engine's paged KV pool, its steps and its requests.
ENGINE = "engine.json"
ENGINE_STEPS = "engine_steps.jsonl"
ENGINE_REQUESTS = "engine_requests.jsonl"
ENGINE_FILES = (ENGINE, ENGINE_STEPS, ENGINE_REQUESTS)
# Written into a run by `kvtrace report` (and the demo), replaced when the run is recorded again.
# The manifest written at start is padded with spaces (valid JSON) to this size, so that on a full disk,
# where its atomic rewrite's new file cannot be written, the final one still fits over the same blocks.
MANIFEST_RESERVE_BYTES = 32 * 1024
# Held (flock) by the recording that writes the folder, removed at its end; not part of the run (run_lock.py)
LOCK_FILE = ".kvtrace.lock"

DERIVED_FILES = ("kv_counters.trace.json.gz", "timeline.html")
DERIVED_DIRS = ("tb_scalars",)
# What a run owns besides its manifest: replacing a run removes these names, and nothing else.
RUN_FILES = (KV_EVENTS, WEIGHTS, MEMORY_SAMPLES, MODEL_CONFIG, *ENGINE_FILES, *DERIVED_FILES)
RUN_DIRS = (PROFILER_DIR, SNAPSHOT_DIR, *DERIVED_DIRS)

# The KV event vocabulary (docs/format.md explains each).
EVENT_KINDS = (
    "created",  # a storage appears for this layer/kind for the first time
    "grown",  # replaced by a larger storage (torch.cat growth, reallocation)
    "replaced",  # replaced by a storage of the same or smaller size inside the cache's own method
    "written",  # same storage, written in place (static caches, preallocated custom caches)
    "evicted",  # tokens removed: by a press/eviction library or any code rebinding keys/values
    "cropped",  # Cache.crop (assisted decoding rollback)
    "reset",  # Cache.reset
    "reordered",  # beam search reorder / batch select / repeat
    "offloaded",  # moved to CPU by an offloaded cache
    "prefetched",  # moved back to the accelerator
    "masked",  # tokens hidden in place (kvpress AdaKV): no storage change, nothing released
    "freed",  # the storage was released (no tensor refers to it any more)
)


@dataclass
class KvEvent:
    """One change in one KV storage. `addr`/`storage_bytes` describe the storage (the memory held), while
    `shape`/`logical_bytes` describe the tensor the cache uses, which may be a view of a larger storage."""

    seq: int
    t_ns: int
    step: int
    phase: str  # "prefill" | "decode" | "" (outside a forward)
    event: str
    layer: int
    kv: str  # "k" | "v"
    part: str  # "data" (full precision), "qdata"/"qscale"/... (quantized parts), "buffer" (custom)
    addr: int
    storage_bytes: int
    view_offset: int = 0
    shape: list[int] = field(default_factory=list)
    logical_bytes: int = 0
    dtype: str = ""
    device: str = ""
    tokens: int = 0
    evicted_tokens: int = 0
    prev_addr: int = 0
    cache: int = 0  # which cache object (several can live in one run)
    source: str = "hf"  # "hf" | "module" | "track"
    reason: str = ""
    # Batch rows in use when fewer than shape[0] (a preallocated module cache written for a smaller batch);
    # 0: every row of the tensor. `tokens` are per row of these.
    rows: int = 0
    masked_entries: int = 0  # on `masked`: the (row, head, token) entries the mask hides

    def to_json(self) -> dict[str, Any]:
        # A shallow copy: `asdict` deep-copies and was most of the recorder's cost per event.
        return dict(self.__dict__)


# A KV event's `cache`: which source's state it changes. Transformers caches count 1, 2, ... and step over
# the ids kept for the other sources, so that no two sources of one run share an id (the recorder's state
# per (cache, layer), or a report's figures per cache); runs recorded before this may have both on one id.
MODULE_CACHE_ID = 1000  # tensors on the model's modules (Meta's `cache_k`/`cache_v`)
TRACK_CACHE_ID = 2000  # tensors handed to `kvtrace.track()`
VLLM_CACHE_ID = 3000  # vLLM's paged pool
CB_CACHE_ID = 3100  # transformers' continuous batching pool
RESERVED_CACHE_IDS = frozenset({MODULE_CACHE_ID, TRACK_CACHE_ID, VLLM_CACHE_ID, CB_CACHE_ID})


def next_cache_id(last: int) -> int:
    """The id of the transformers cache seen after the one numbered `last` (0 before the first)."""
    cid = last + 1
    while cid in RESERVED_CACHE_IDS:
        cid += 1
    return cid


# What a weights.jsonl line after the first ones says happened to its storage (docs/format.md):
WEIGHT_EVENTS = (
    "added",  # the model took it during the run (`model.to(torch.bfloat16)`, `.half()`, `.cuda()`)
    "freed",  # a weight storage listed earlier was released by the allocator
)


@dataclass
class WeightRecord:
    """A parameter or buffer storage, so analyzers can tell weights from the rest. `event` is empty for the
    storages held when the recording began; otherwise one of `WEIGHT_EVENTS`, at `t_ns` during `step`."""

    name: str
    addr: int
    storage_bytes: int
    dtype: str
    device: str
    shape: list[int]
    event: str = ""
    t_ns: int = 0
    step: int = 0

    def to_json(self) -> dict[str, Any]:
        """The line's fields: a storage held from the start has none of the change's (as before they
        existed)."""
        fields = dict(self.__dict__)
        if not self.event:
            for name in ("event", "t_ns", "step"):
                del fields[name]
        return fields


@dataclass
class Run:
    """A run directory read back: the manifest and every complete line of every log."""

    path: Path
    manifest: dict[str, Any]
    kv_events: list[KvEvent]
    weights: list[WeightRecord]  # the storages held when the recording began
    memory_samples: list[dict[str, Any]]
    truncated: bool = False  # the last line of a log was cut (the process died mid-write)
    # kv_events.jsonl's lines set aside as read (`_KvEventLines`), for the readers' notes: per event name
    # that is not of `EVENT_KINDS` (cut to 40 characters), the lines skipped
    unknown_kv_events: dict[str, int] = field(default_factory=dict)
    # lines whose `storage_bytes` was smaller than their own tensor, read at the least it can hold
    short_kv_storages: int = 0
    # What the model's weights did afterwards (`WEIGHT_EVENTS`), in the order it happened
    weight_changes: list[WeightRecord] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.manifest.get("ended", {}).get("status") in ("ok", "exception")

    def profiler_traces(self) -> list[Path]:
        folder = self.path / PROFILER_DIR
        if not folder.is_dir():
            return []
        names = (".pt.trace.json", ".pt.trace.json.gz")
        return sorted(p for p in folder.iterdir() if p.name.endswith(names) and p.is_file())

    def snapshots(self) -> list[Path]:
        # Regular files only: a named pipe called *.pickle would hang the first read.
        folder = self.path / SNAPSHOT_DIR
        return sorted(p for p in folder.glob("*.pickle") if p.is_file()) if folder.is_dir() else []


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json_atomic(path: Path, payload: dict[str, Any], reserve: int = 0) -> None:
    """Write via a temporary file and rename, so a reader never sees half a manifest; padded with
    trailing spaces to `reserve` bytes, room for `write_json_in_place` to use later."""
    write_bytes_atomic(path, _json_bytes(payload), reserve)


def write_bytes_atomic(path: Path, data: bytes, reserve: int = 0) -> None:
    """`data` at `path` via a temporary file and a rename (padded with spaces to `reserve` bytes)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data + b" " * max(reserve - len(data), 0))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a 0-byte leftover of a full disk
        raise


def write_json_in_place(path: Path, payload: dict[str, Any]) -> None:
    """Overwrite `path` within its present size, padding with spaces: for a full disk, where no new file
    can be written but the blocks of a file written with a `reserve` can. Not atomic (a crash midway
    leaves a corrupt file): the fallback of `write_json_atomic`, never the first choice."""
    data = _json_bytes(payload)
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        if len(data) > size:
            raise OSError(errno.ENOSPC, f"{len(data)} bytes do not fit the {size} reserved", str(path))
        fh.write(data + b" " * (size - len(data)))


# One encoder for every line: json.dumps with options builds a new JSONEncoder on each call.
_encode_compact = json.JSONEncoder(separators=(",", ":")).encode


class JsonlAppender:
    """Append-only JSON-lines file. Lines are buffered and written by `flush()` (the recorder's writer
    thread calls it every 0.1 s, and the recorder at the end) in one unbuffered write, so a killed process
    loses at most what was not flushed yet and never leaves a partial line mid-file. One thread appends
    while another flushes: `flush` takes the buffer by its prefix, so an append meanwhile is kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._pending: list[str | dict[str, Any]] = []
        # Of the lines a `flush()` that raised had taken, those that reached the file whole before the error:
        # a full disk may take part of a write (tmpfs: the pages it still had), cutting a line.
        self.lines_before_error = 0

    def append(self, record: dict[str, Any]) -> None:
        self._pending.append(_encode_compact(record))

    def append_owned(self, record: dict[str, Any]) -> None:
        """A record made for this call and never changed after it (scalars only): encoded at `flush()`
        with the others, in one warm loop, instead of one cold encoder call per step."""
        self._pending.append(record)

    def extend(self, lines: list[str]) -> None:
        """Lines already serialised (one JSON object each, no newline): the recorder's KV events."""
        self._pending.extend(lines)

    def flush(self) -> None:
        pending = self._pending
        if pending:
            count = len(pending)
            taken = pending[:count]
            del pending[:count]
            lines = [p if isinstance(p, str) else _encode_compact(p) for p in taken]
            lines.append("")
            encoded = "\n".join(lines).encode()
            data = memoryview(encoded)
            try:
                while data:  # a raw write may be short
                    written = self._fh.write(data) or 0
                    data = data[written:]
            except OSError:
                self.lines_before_error = encoded.count(b"\n", 0, len(encoded) - len(data))
                raise

    def buffered(self) -> int:
        return len(self._pending)

    def discard(self) -> None:
        """Drop what is buffered (after a write error: nothing more reaches the file)."""
        del self._pending[:]

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self.flush()
            finally:
                self._fh.close()


def _read_jsonl(
    path: Path, check: Callable[[dict[str, Any], Path, int], Any] | None = None
) -> tuple[list[Any], bool]:
    """Every complete line (through `check(record, path, lineno)`, which returns what to keep, None to skip
    the line, or raises); a cut last line (killed writer) is dropped and reported, corrupt lines elsewhere
    are an error naming the file and line."""
    if not path.exists():
        return [], False
    records: list[Any] = []
    truncated = False
    refuse_special_file(path)
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:  # a BOM an editor added, as manifests
            lines = fh.read().split("\n")
    except OSError as exc:  # a folder of that name, no permission
        raise KvtraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    last = len(lines) - 1
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            if lineno - 1 == last:
                truncated = True
                break
            raise KvtraceError(f"{path}: line {lineno} is not valid JSON") from None
        except ValueError:  # not a JSONDecodeError: CPython's limit on the digits of an int
            raise KvtraceError(f"{path}: line {lineno} holds {too_long_integer()}") from None
        except RecursionError:
            raise KvtraceError(f"{path}: line {lineno} is nested too deeply") from None
        if not isinstance(value, dict):
            raise KvtraceError(f"{path}: line {lineno} is not a JSON object")
        kept = value if check is None else check(value, path, lineno)
        if kept is not None:
            records.append(kept)
    return records, truncated


# What a record's numbers may be. Sizes above 2**56 bytes (64 PiB) and addresses past 2**63 are damage, not
# memory: they would overflow the analyzers' int64 columns, or print as figures no device holds. Steps and
# cache ids are int32 columns of the export (docs/format.md), so a larger one is refused here, where every
# command reads it, rather than by `export` and `query` alone.
_I64 = 2**63 - 1
_I32 = 2**31 - 1
MAX_BYTES = 2**56
_MAX_LAYER = 2**15 - 1  # the analyzers keep layers in int16
KV_KINDS = ("k", "v")
_EVENT_INTS: tuple[tuple[str, int, int], ...] = (
    ("seq", -_I64, _I64),
    ("t_ns", 0, _I64),
    ("step", -_I32 - 1, _I32),
    ("layer", 0, _MAX_LAYER),
    ("addr", 0, _I64),
    ("storage_bytes", 0, MAX_BYTES),
    ("view_offset", 0, MAX_BYTES),
    ("logical_bytes", 0, MAX_BYTES),
    ("tokens", 0, _I64),
    ("evicted_tokens", 0, _I64),
    ("prev_addr", 0, _I64),
    ("cache", -_I32 - 1, _I32),
    ("rows", 0, _I64),
    ("masked_entries", 0, _I64),
)
_EVENT_STRS = ("phase", "event", "kv", "part", "dtype", "device", "source", "reason")
_WEIGHT_INTS = (("addr", 0, _I64), ("storage_bytes", 0, MAX_BYTES), ("t_ns", 0, _I64), ("step", 0, _I32))
_WEIGHT_STRS = ("name", "dtype", "device", "event")
_WEIGHT_REQUIRED = ("name", "addr", "storage_bytes", "dtype", "device", "shape")
# memory_samples.jsonl: the keys analyzers compute with, when present
_SAMPLE_INTS = (
    ("t_ns", 0, _I64),
    ("step", -_I32 - 1, _I32),
    ("started_ns", 0, _I64),
    ("rss_bytes", 0, MAX_BYTES),
    ("cuda_device", 0, _MAX_LAYER),
    ("cuda_allocated_bytes", 0, MAX_BYTES),
    ("cuda_reserved_bytes", 0, MAX_BYTES),
    ("cuda_peak_allocated_bytes", 0, MAX_BYTES),
    ("gpu_memory_used_bytes", 0, MAX_BYTES),
    ("gpu_memory_total_bytes", 0, MAX_BYTES),
)
_SAMPLE_NUMBERS = ("cpu_percent", "gpu_utilization_percent")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"{value}" if abs(value) < 10**30 else "an integer of more than 30 digits"
    return {str: "a string", float: "a number with a fraction", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _bad(path: Path, lineno: int, name: str, value: Any, low: int, high: int) -> KvtraceError:
    want = "an integer" if type(value) is not int else f"an integer from {low} to {high}"
    return KvtraceError(f"{path}: line {lineno}: field {name!r} is {_kind(value)}, expected {want}")


def _check_fields(
    record: dict[str, Any],
    path: Path,
    lineno: int,
    ints: tuple[tuple[str, int, int], ...],
    strs: tuple[str, ...],
) -> None:
    for name, low, high in ints:
        value = record.get(name, 0)
        if type(value) is not int or not low <= value <= high:
            raise _bad(path, lineno, name, value, low, high)
    for name in strs:
        value = record.get(name, "")
        if type(value) is not str:
            raise KvtraceError(f"{path}: line {lineno}: field {name!r} is {_kind(value)}, expected a string")
    shape = record.get("shape", [])
    if type(shape) is not list or not all(type(n) is int and 0 <= n <= _I64 for n in shape):
        said = _kind(shape)
        raise KvtraceError(f"{path}: line {lineno}: field 'shape' is {said}, expected a list of sizes")


def _event_from(record: dict[str, Any], path: Path, lineno: int = 0) -> KvEvent:
    known = KvEvent.__dataclass_fields__
    try:
        event = KvEvent(**{k: v for k, v in record.items() if k in known})
    except TypeError as exc:
        raise KvtraceError(f"{path}: line {lineno}: KV event missing fields ({exc})") from None
    _check_fields(event.__dict__, path, lineno, _EVENT_INTS, _EVENT_STRS)
    if event.kv not in KV_KINDS:  # any other value was counted as V
        said = repr(event.kv[:40])
        raise KvtraceError(f"{path}: line {lineno}: field 'kv' is {said}, expected 'k' or 'v'")
    return event


# Bytes per element of the dtypes a KV tensor is logged with (`str(dtype)` without "torch."). Others (sub-byte
# kinds such as uint4) are left unchecked: a size this module is not sure of would flag true lines.
DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
    "complex128": 16, "complex64": 8,
}  # fmt: skip


def least_storage_bytes(event: KvEvent) -> int:
    """The fewest bytes the storage of an event's tensor can hold: its `view_offset` plus its shape's elements
    x its dtype's size. Its elements lie at distinct places from the view's start to the storage's end, so
    that holds for a view, a preallocated buffer, a pool's per-layer view and a quantized part alike (they
    may hold more, never less); only a tensor that repeats its elements (`expand`) could, which no cache
    keeps. 0 where the line does not say: no storage (`addr` 0), a `freed` line, no shape, a dtype not in
    `DTYPE_BYTES`."""
    itemsize = DTYPE_BYTES.get(event.dtype, 0)
    if not event.addr or event.event == "freed" or not event.shape or not itemsize:
        return 0
    elements = 1
    for size in event.shape:
        elements *= size
    return event.view_offset + elements * itemsize if elements else 0


class _KvEventLines:
    """kv_events.jsonl's lines through `_event_from`, setting aside what the replay cannot take as written,
    counted for the readers' notes (`Run.unknown_kv_events`, `Run.short_kv_storages`): a line whose
    `event` is not of `EVENT_KINDS` (a newer kvtrace's kind, or damage) is skipped, as no rule says what it
    does to its storage; a storage smaller than its own tensor (`least_storage_bytes`), impossible, is read
    at that least size rather than skipped: skipping would drop the whole storage and orphan its `freed`
    line, while the least size is exact for a fresh contiguous tensor (a dynamic cache's) and a lower bound
    for a view."""

    def __init__(self) -> None:
        self.lines = 0
        self.unknown: dict[str, int] = {}
        self.short_storages = 0

    def __call__(self, record: dict[str, Any], path: Path, lineno: int) -> KvEvent | None:
        self.lines += 1
        kind = record.get("event")
        if type(kind) is str and kind not in EVENT_KINDS:
            self.unknown[kind[:40]] = self.unknown.get(kind[:40], 0) + 1
            return None
        event = _event_from(record, path, lineno)
        least = least_storage_bytes(event)
        # Only where its `logical_bytes` says the same tensor size as its shape: two fields against one. Where
        # they disagree, the shape may be the damaged field, and the line is read as it is.
        if event.storage_bytes < least <= MAX_BYTES and least - event.view_offset == event.logical_bytes:
            event.storage_bytes = least
            self.short_storages += 1
        return event


def _weight_from(record: dict[str, Any], path: Path, lineno: int) -> WeightRecord:
    known = WeightRecord.__dataclass_fields__
    missing = [name for name in _WEIGHT_REQUIRED if name not in record]
    if missing:
        raise KvtraceError(f"{path}: line {lineno}: weight record without {', '.join(map(repr, missing))}")
    _check_fields(record, path, lineno, _WEIGHT_INTS, _WEIGHT_STRS)
    event = record.get("event", "")
    if event and event not in WEIGHT_EVENTS:
        said = repr(event[:40])
        raise KvtraceError(f"{path}: line {lineno}: field 'event' is {said}, expected 'added' or 'freed'")
    # A change line says when (docs/format.md): read without them it would happen at time 0, before the
    # first step, and move the peak
    absent = [name for name in ("t_ns", "step") if event and name not in record]
    if absent:
        raise KvtraceError(f"{path}: line {lineno}: {event!r} line without {' or '.join(map(repr, absent))}")
    return WeightRecord(**{k: v for k, v in record.items() if k in known})


class _WeightLines:
    """weights.jsonl's lines through `_weight_from`, following the storages held line by line: a `freed`
    line is for a storage listed above (at the start, or `added`) and not freed since. Any other would be
    counted as a free of bytes no line held, taking them off the weights and every figure after it."""

    def __init__(self) -> None:
        self.held: set[tuple[str, int]] = set()  # (device, addr)

    def __call__(self, record: dict[str, Any], path: Path, lineno: int) -> WeightRecord:
        weight = _weight_from(record, path, lineno)
        key = (weight.device, weight.addr)
        if weight.event != "freed":
            self.held.add(key)
        elif key in self.held:
            self.held.remove(key)
        else:
            raise KvtraceError(
                f"{path}: line {lineno}: 'freed' line for a storage that no line above holds "
                f"(addr {weight.addr} on {weight.device})"
            )
        return weight


def _sample_from(record: dict[str, Any], path: Path, lineno: int) -> dict[str, Any]:
    for name, low, high in _SAMPLE_INTS:
        value = record.get(name)
        if value is not None and (type(value) is not int or not low <= value <= high):
            raise _bad(path, lineno, name, value, low, high)
    for name in _SAMPLE_NUMBERS:
        value = record.get(name)
        if value is not None and (type(value) not in (int, float) or not 0 <= value <= 1e6):
            said = _kind(value)
            raise KvtraceError(f"{path}: line {lineno}: field {name!r} is {said}, expected a percentage")
    phase = record.get("phase", "")
    if type(phase) is not str:
        raise KvtraceError(f"{path}: line {lineno}: field 'phase' is {_kind(phase)}, expected a string")
    return record


def read_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory written by any schema version up to ours.

    A run that was interrupted (manifest still says "running", or a cut last line) is read up to its last
    complete event; `Run.truncated` and the manifest's `ended` say so.
    """
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise KvtraceError(f"{root}: not a directory")
    if not manifest_path.exists():
        group = f"; a run group, one run per rank: {RANK_DIR_PREFIX}<r>/" if rank_dirs(root) else ""
        raise KvtraceError(f"{root}: not a kvtrace run directory (no {MANIFEST}){group}")
    refuse_special_file(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8-sig"))  # a BOM an editor added
    except OSError as exc:  # a folder of that name, no permission
        raise KvtraceError(f"{manifest_path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KvtraceError(f"{manifest_path}: corrupt manifest ({exc.__class__.__name__})") from None
    except ValueError:  # CPython's limit on the digits of an int
        raise KvtraceError(f"{manifest_path}: corrupt manifest (it holds {too_long_integer()})") from None
    except RecursionError:
        raise KvtraceError(f"{manifest_path}: corrupt manifest (nested too deeply)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "kvtrace-run":
        raise KvtraceError(f"{manifest_path}: not a kvtrace manifest")
    version = manifest.get("schema_version")
    if type(version) is not int or version < 1:
        raise KvtraceError(f"{manifest_path}: missing or invalid schema_version")
    if version > SCHEMA_VERSION:
        raise KvtraceError(
            f"{manifest_path}: schema version {version} is newer than this kvtrace reads ({SCHEMA_VERSION}); "
            "upgrade kvtrace"
        )
    for key, types, what in _MANIFEST_FIELDS:
        if key in manifest and not isinstance(manifest[key], types):
            found = "null" if manifest[key] is None else type(manifest[key]).__name__
            raise KvtraceError(f"{manifest_path}: field {key!r} is {found}, expected {what}")
    for dotted, check, what in _MANIFEST_VALUES:
        outer, _, inner = dotted.partition(".")
        holder = manifest.get(outer) if inner else manifest
        name = inner or outer
        if isinstance(holder, dict) and name in holder and not check(holder[name]):
            raise KvtraceError(f"{manifest_path}: field {dotted!r} is {_kind(holder[name])}, expected {what}")
    ended = manifest.get("ended") or {}
    write_error = ended.get("write_error")
    if write_error is not None:
        # The recorder could not write its logs to the end (a full disk): they hold an early part of the run.
        # (Only its profiler trace unwritten, the logs whole: `ended.trace_error`, and the run reads.)
        lost = ended.get("kv_events_lost")
        lost_said = f"; {lost} KV events were lost" if isinstance(lost, int) else ""
        raise KvtraceError(f"{root}: incomplete run: the recorder failed to write {write_error}{lost_said}")
    events_path = root / KV_EVENTS
    kv_lines = _KvEventLines()
    events, cut_events = _read_jsonl(events_path, kv_lines)
    if kv_lines.unknown and not events:
        raise KvtraceError(
            f"{events_path}: none of its {kv_lines.lines:,} lines is a KV event this kvtrace knows "
            f"({unknown_kinds_text(kv_lines.unknown)}): written by a newer kvtrace (upgrade it), or damaged"
        )
    weights, cut_weights = _read_jsonl(root / WEIGHTS, _WeightLines())
    samples, cut_samples = _read_jsonl(root / MEMORY_SAMPLES, _sample_from)
    if manifest.get("ended", {}).get("status") not in (None, "running"):
        # The recorder closed every file and counted the events: a cut or short file was damaged after the
        # run (a partial copy, a full disk), and figures from it would be wrong, not merely early.
        count = manifest.get("kv_events")
        if isinstance(count, int) and count and not events_path.is_file():
            raise KvtraceError(f"{events_path}: missing, while the manifest counts {count} KV events")
        short = isinstance(count, int) and count != kv_lines.lines  # skipped lines were written all the same
        if cut_events or short:
            counted = f" of the {count} the manifest counts" if isinstance(count, int) else ""
            raise KvtraceError(
                f"{events_path}: damaged after the run ended: {kv_lines.lines} complete events{counted}"
            )
        for name, cut in ((WEIGHTS, cut_weights), (MEMORY_SAMPLES, cut_samples)):
            if cut:
                raise KvtraceError(f"{root / name}: damaged after the run ended: its last line is cut")
    return Run(
        path=root,
        manifest=manifest,
        kv_events=events,
        weights=[w for w in weights if not w.event],
        memory_samples=samples,
        truncated=cut_events or cut_weights or cut_samples,
        weight_changes=[w for w in weights if w.event],
        unknown_kv_events=kv_lines.unknown,
        short_kv_storages=kv_lines.short_storages,
    )


_UNKNOWN_KINDS_SHOWN = 5  # event names a message lists (a damaged log may hold thousands of distinct ones)


def unknown_kinds_text(unknown: dict[str, int]) -> str:
    """The unknown event names of `Run.unknown_kv_events`, most lines first: "'growed' on 2 lines, 'spill'
    on 1 line", and how many more names."""
    ranked = sorted(unknown.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(
        f"{name!r} on {count:,} line{'s' if count != 1 else ''}"
        for name, count in ranked[:_UNKNOWN_KINDS_SHOWN]
    )
    more = len(ranked) - _UNKNOWN_KINDS_SHOWN
    return shown + (f", and {more:,} more names" if more > 0 else "")


# Manifest fields that readers open as objects or lists, with the types they may hold when present (a
# model-less recording writes `"model": null`); anything else is a damaged or hand-edited manifest.
_MANIFEST_FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("device", (dict,), "an object"),
    ("ended", (dict,), "an object"),
    ("options", (dict,), "an object"),
    ("clock", (dict,), "an object"),
    ("snapshots", (dict,), "an object"),
    ("monitors", (dict,), "an object"),
    ("engine", (dict,), "an object"),
    ("model", (dict, type(None)), "an object or null"),
    ("files", (list,), "a list"),
    ("notes", (list,), "a list"),
    ("warnings", (list,), "a list"),
)


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _I64


def _size_or_null(value: Any) -> bool:
    return value is None or (type(value) is int and 0 <= value <= MAX_BYTES)


def _count_or_null(value: Any) -> bool:
    return value is None or _count(value)


def _small_count_or_null(value: Any) -> bool:
    """A count the export keeps in int32 (ranks, device index, model geometry)."""
    return value is None or (type(value) is int and 0 <= value <= _I32)


def _text_or_null(value: Any) -> bool:
    return value is None or type(value) is str


# Values inside the manifest that analyzers compute with, when present: (dotted key, test, expected).
_MANIFEST_VALUES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("started_ns", _count_or_null, "a time in ns"),
    ("kv_events", _count, "a count"),
    ("rank", _small_count_or_null, f"a rank of at most {_I32}"),
    ("local_rank", _small_count_or_null, f"a rank of at most {_I32}"),
    ("world_size", _small_count_or_null, f"a count of at most {_I32}"),
    ("device.type", lambda v: type(v) is str, "a string"),
    ("device.name", _text_or_null, "a string"),
    ("device.index", _small_count_or_null, f"a device index of at most {_I32}"),
    ("device.total_memory_bytes", _size_or_null, f"a size of at most {MAX_BYTES} bytes"),
    ("ended.status", lambda v: type(v) is str, "a string"),
    ("ended.t_ns", _count, "a time in ns"),
    ("ended.type", _text_or_null, "a string"),
    ("ended.message", _text_or_null, "a string"),
    ("ended.write_error", lambda v: type(v) is str, "a string"),
    ("ended.trace_error", lambda v: type(v) is str, "a string"),
    ("ended.kv_events_lost", _count, "a count"),
    ("model.num_layers", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.num_attention_heads", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.num_kv_heads", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.head_dim", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.global_kv_heads", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.global_head_dim", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.hidden_size", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.vocab_size", _count_or_null, "a count"),
    ("model.parameters", _count_or_null, "a count"),
    ("model.sliding_window", _count_or_null, "a count"),
    ("model.kv_layers", _count_or_null, "a count"),
    ("model.sliding_layers", _count_or_null, "a count"),
    ("model.dtype", _text_or_null, "a string"),
    ("options.gpu_memory", _size_or_null, f"a size of at most {MAX_BYTES} bytes"),
)
