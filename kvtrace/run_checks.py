"""What each line of a run's logs and each field of its manifest may hold, checked as `read_run` reads
them: a value the analyzers could not compute with (a size no device holds, a string for a count, a layer
past their int16 columns) is refused in one line naming the file and the line. Stdlib only, but for the KV
log's blocks, which msgspec decodes and checks where it is installed (`kvtrace.kv_line_blocks`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from kvtrace.errors import KvtraceError, shown_float
from kvtrace.format import EVENT_KINDS, MAX_LAYER, MAX_LAYERS, WEIGHT_EVENTS, KvEvent, WeightRecord
from kvtrace.kv_event_sharing import SharedValues
from kvtrace.kv_line_blocks import Decode, line_decoder

# What a record's numbers may be. Sizes above 2**56 bytes (64 PiB) and addresses past 2**63 are damage, not
# memory: they would overflow the analyzers' int64 columns, or print as figures no device holds. Steps and
# cache ids are int32 columns of the export (docs/format.md), so a larger one is refused here, where every
# command reads it, rather than by `export` and `query` alone.
_I64 = 2**63 - 1
_I32 = 2**31 - 1
MAX_BYTES = 2**56
KV_KINDS = ("k", "v")
_EVENT_INTS: tuple[tuple[str, int, int], ...] = (
    ("seq", -_I64, _I64),
    ("t_ns", 0, _I64),
    ("step", -_I32 - 1, _I32),
    ("layer", 0, MAX_LAYER),
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
    ("capacity_tokens", 0, _I64),
    ("capacity_rows", 0, _I64),
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
    ("cuda_device", 0, MAX_LAYER),  # an int16 column too
    ("cuda_allocated_bytes", 0, MAX_BYTES),
    ("cuda_reserved_bytes", 0, MAX_BYTES),
    ("cuda_peak_allocated_bytes", 0, MAX_BYTES),
    ("gpu_memory_used_bytes", 0, MAX_BYTES),
    ("gpu_memory_total_bytes", 0, MAX_BYTES),
    # a prefill's generate() call: a prompt holds a token at least (`prompt_end` < 1 moved the plan's
    # context: -5 planned 53 tokens where the run held 28)
    ("prompt_end", 1, _I64),
    ("max_length", 0, _I64),
    ("max_new_tokens", 0, _I64),
)
_CALL_FIELDS = ("prompt_end", "max_length", "max_new_tokens")
_SAMPLE_NUMBERS = ("cpu_percent", "gpu_utilization_percent")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"{value}" if abs(value) < 10**30 else "an integer of more than 30 digits"
    if isinstance(value, float):
        return shown_float(value)
    kinds: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


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


def _event_from(record: dict[str, Any], path: Path, lineno: int = 0, known_keys: bool = False) -> KvEvent:
    """The line's event, its fields checked. `known_keys`: every key of the line is a KvEvent field (the
    caller knows its layout), so the line is passed as it is, not filtered key by key."""
    known = KvEvent.__dataclass_fields__
    try:
        event = (
            KvEvent(**record) if known_keys else KvEvent(**{k: v for k, v in record.items() if k in known})
        )
    except TypeError:
        lacking = [
            name
            for name, spec in known.items()
            if name not in record and spec.default is MISSING and spec.default_factory is MISSING
        ]
        raise KvtraceError(f"{path}: line {lineno}: KV event missing fields: {', '.join(lacking)}") from None
    # The line's own fields (a slotted event has no `__dict__`): those it leaves out read as KvEvent's
    # defaults, which pass, and any other key is not an event's
    _check_fields(record, path, lineno, _EVENT_INTS, _EVENT_STRS)
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
# Every dtype torch names (`str(dtype)` without "torch."): a KV line's `dtype` outside these is damage (the
# readers' note counts it); the sub-byte and quantized ones are known but have no byte size above.
KNOWN_DTYPES = frozenset(DTYPE_BYTES) | {
    "complex32", "float4_e2m1fn_x2", "qint8", "qint32", "quint8", "quint4x2", "quint2x4",
    "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
    *(f"int{bits}" for bits in range(1, 8)), *(f"uint{bits}" for bits in range(1, 8)),
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


_EVENT_FIELDS = tuple(KvEvent.__dataclass_fields__)
# A dataclass's fields without defaults come first: a line must send these
_REQUIRED = sum(
    spec.default is MISSING and spec.default_factory is MISSING
    for spec in KvEvent.__dataclass_fields__.values()
)
_EVENT_AT = _EVENT_FIELDS.index("event")
_KV_AT = _EVENT_FIELDS.index("kv")
# Each field's default, after a block-read line's values: `_filler` picks a line's value or its default
_DEFAULTS = tuple(
    None if spec.default is MISSING else spec.default for spec in KvEvent.__dataclass_fields__.values()
)


def _filler(left: tuple[bool, ...]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """For a layout whose defaulted fields `left` says left out: a line's values (then `_DEFAULTS`) to
    the event's, in C (`itemgetter`)."""
    count = len(_EVENT_FIELDS)
    places = [count + i if i >= _REQUIRED and left[i - _REQUIRED] else i for i in range(count)]
    return operator.itemgetter(*places)


@functools.cache
def _line_decoder() -> tuple[Decode, Any] | None:
    """The block reader's decoder, made at a log's first block (msgspec is imported then)."""
    return line_decoder(_EVENT_INTS, _EVENT_STRS, _I64)


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
        self.unknown_dtypes: dict[str, int] = {}
        self.repeated_seqs = 0
        self._seqs = _SeenSeqs()
        self.left_out: list[frozenset[str]] = []  # per event kept: the fields its line left out
        # a few distinct line layouts: the fields each leaves out, and whether it holds only KvEvent's
        self._layouts: dict[tuple[str, ...], tuple[frozenset[str], bool]] = {}
        self._shared = SharedValues()
        # per block-read layout (which defaulted fields a line left out): those fields, the event's values
        # from the line's, whether a shape is made
        self._block_layouts: dict[tuple[bool, ...], tuple[frozenset[str], Callable[..., Any], bool]] = {}

    def __call__(self, record: dict[str, Any], path: Path, lineno: int) -> KvEvent | None:
        self.lines += 1
        kind = record.get("event")
        if type(kind) is str and kind not in EVENT_KINDS:
            self.unknown[kind[:40]] = self.unknown.get(kind[:40], 0) + 1
            return None
        keys = tuple(record)
        layout = self._layouts.get(keys)
        if layout is None:
            fields = KvEvent.__dataclass_fields__
            layout = (frozenset(fields).difference(keys), all(key in fields for key in keys))
            if len(self._layouts) < 1024:  # a crafted log of endless layouts does not grow it
                self._layouts[keys] = layout
        event = _event_from(record, path, lineno, known_keys=layout[1])
        self._keep(event, layout[0])
        return event

    def block(self, lines: list[bytes]) -> list[KvEvent] | None:
        """The events of a block of whole lines (each without its newline), as `__call__` makes them one by
        one, decoded in C (`kvtrace.kv_line_blocks`); None, nothing counted, where a line must be read by
        `__call__` (one it would refuse, or that msgspec does not decode as a KV line)."""
        decoder = _line_decoder()
        if decoder is None:
            return None
        decode, unset = decoder
        rows = decode(lines)
        if rows is None:
            return None
        for values in rows:  # first the checks that refuse a line, so that a refused block counts nothing
            kind = values[_EVENT_AT]
            if kind is unset:
                return None
            if kind in EVENT_KINDS and (unset in values[:_REQUIRED] or values[_KV_AT] not in KV_KINDS):
                return None
        events: list[KvEvent] = []
        layouts = self._block_layouts
        is_unset = functools.partial(operator.is_, unset)
        for values in rows:
            self.lines += 1
            kind = values[_EVENT_AT]
            if kind not in EVENT_KINDS:
                self.unknown[kind[:40]] = self.unknown.get(kind[:40], 0) + 1
                continue
            left = tuple(map(is_unset, values[_REQUIRED:]))
            layout = layouts.get(left)
            if layout is None:
                named = zip(_EVENT_FIELDS[_REQUIRED:], left, strict=True)
                out = frozenset(name for name, gone in named if gone)
                layout = (out, _filler(left), "shape" in out)
                if len(layouts) < 1024:
                    layouts[left] = layout
            event = KvEvent(*layout[1](values + _DEFAULTS))
            if layout[2]:
                event.shape = []  # the event's own, as its default
            self._keep(event, layout[0])
            events.append(event)
        return events

    def _keep(self, event: KvEvent, left_out: frozenset[str]) -> None:
        """What every event read takes, its fields checked: the counts of the readers' notes, its storage's
        least size, its values shared."""
        if event.dtype and event.dtype not in KNOWN_DTYPES:
            self.unknown_dtypes[event.dtype[:40]] = self.unknown_dtypes.get(event.dtype[:40], 0) + 1
        if not self._seqs.add(event.seq):
            self.repeated_seqs += 1
        self.left_out.append(left_out)
        least = least_storage_bytes(event)
        # Only where its `logical_bytes` says the same tensor size as its shape: two fields against one. Where
        # they disagree, the shape may be the damaged field, and the line is read as it is.
        if event.storage_bytes < least <= MAX_BYTES and least - event.view_offset == event.logical_bytes:
            event.storage_bytes = least
            self.short_storages += 1
        self._shared.share(event)


class _SeenSeqs:
    """The `seq`s of the lines read, for telling a repeated one: a range [low, high] seen whole, and the
    others apart. Each line's is one more than the last's, so a real log's is one range, however long (a
    set of them all was 16 MiB of a 4,000-token run's read)."""

    def __init__(self) -> None:
        self._low = 0
        self._high = -1  # none yet
        self._apart: set[int] = set()

    def add(self, seq: int) -> bool:
        """Note `seq`; False where it was seen before."""
        low, high = self._low, self._high
        if seq == high + 1 and high >= low:
            high = seq
            while high + 1 in self._apart:  # the range reaches ones seen out of order
                high += 1
                self._apart.remove(high)
            self._high = high
            return True
        if low <= seq <= high or seq in self._apart:
            return False
        if high < low:  # the first
            self._low = self._high = seq
        elif seq == low - 1:
            while seq - 1 in self._apart:
                seq -= 1
                self._apart.remove(seq)
            self._low = seq
        else:
            self._apart.add(seq)
        return True


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
    if record.get("t_ns") is None:  # the recorder times every sample; compare and the page place it by it
        said = "missing" if "t_ns" not in record else "null"
        raise KvtraceError(f"{path}: line {lineno}: field 't_ns' is {said}, expected an integer")
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


class _SampleLines:
    """memory_samples.jsonl's lines through `_sample_from`, keeping where each prefill sample says its
    call's prompt ends, (line, step, prompt_end), for `check_prompt_ends`."""

    def __init__(self) -> None:
        self.prompt_ends: list[tuple[int, int, int]] = []

    def __call__(self, record: dict[str, Any], path: Path, lineno: int) -> dict[str, Any]:
        sample = _sample_from(record, path, lineno)
        end, step = sample.get("prompt_end"), sample.get("step")
        # Not a prefill that raised: it may have written part of its prompt (a chunked one, its first chunks)
        whole = sample.get("phase") == "prefill" and not sample.get("raised")
        if end is not None and step is not None and whole:
            self.prompt_ends.append((lineno, step, end))
        return sample


def check_prompt_ends(
    path: Path, prompt_ends: list[tuple[int, int, int]], events: list[KvEvent], ended: bool
) -> None:
    """Refuses a prefill sample whose `prompt_end` lies past every token the KV log shows its step's caches
    taking in (held after an update, plus what a window, a press or a crop let go in it): the prompt was
    written whole in that step, so a larger one is damage. Read as it is, 10**20 planned a context of
    10**20 tokens for a run of 28. Judged where the log says: a step of known token counts (some caches
    do not say them), and whose lines are all written (the run ended, or a later step's lines follow)."""
    if not prompt_ends:
        return
    steps = {step for _, step, _ in prompt_ends}
    seen: dict[int, int] = {}
    last_step = None
    for event in events:
        step = event.step
        if last_step is None or step > last_step:
            last_step = step
        if step in steps:
            taken = event.tokens + event.evicted_tokens
            if taken > seen.get(step, 0):
                seen[step] = taken
    for lineno, step, end in prompt_ends:
        most = seen.get(step, 0)
        whole = ended or (last_step is not None and last_step > step)
        if most and whole and end > most:
            raise KvtraceError(
                f"{path}: line {lineno}: field 'prompt_end' is {_kind(end)}, past the {most} tokens a row "
                f"the KV log shows step {step}'s caches taking in: a prompt is written whole at its prefill"
            )


# The integers of a manifest's `generate_calls` entry that `plan --from-run` computes with, when present: as
# its prefill sample's (`_SAMPLE_INTS`), and the step of that prefill
_CALL_INTS = (("step", -_I32 - 1, _I32), *(field for field in _SAMPLE_INTS if field[0] in _CALL_FIELDS))


def check_generate_calls(manifest: dict[str, Any], path: Path) -> None:
    """Refuses a `generate_calls` entry whose numbers no call has (a prompt ending at -5 or at 10**20 gave the
    plan of a process killed in its prefill that context): one line naming the entry and the field. A
    non-list, or a field of another type, is not read as a call, as before (calls that keep nothing named)."""
    calls = manifest.get("generate_calls")
    for number, call in enumerate(calls if isinstance(calls, list) else ()):
        if not isinstance(call, dict):
            continue  # not read as a call
        for name, low, high in _CALL_INTS:
            value = call.get(name)
            if type(value) is int and not low <= value <= high:
                said = f"{_kind(value)}, expected an integer from {low} to {high}"
                raise KvtraceError(f"{path}: field 'generate_calls[{number}].{name}' is {said}")


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


def _layers_or_null(value: Any) -> bool:
    """A count of a model's layers: no more than `MAX_LAYERS` (the planners loop over them)."""
    return value is None or (type(value) is int and 0 <= value <= MAX_LAYERS)


def _text_or_null(value: Any) -> bool:
    return value is None or type(value) is str


_LAYERS = f"a layer count of at most {MAX_LAYERS} (no model has nearly so many)"
# Values inside the manifest that analyzers compute with, when present: (dotted key, test, expected).
_MANIFEST_VALUES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("started_ns", _count_or_null, "a time in ns"),
    ("model_found_ns", _count_or_null, "a time in ns"),
    ("kv_events", _count, "a count"),
    ("weights_lines", _count, "a count"),
    ("memory_samples_lines", _count, "a count"),
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
    ("model.num_layers", _layers_or_null, _LAYERS),
    ("model.num_attention_heads", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.num_kv_heads", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.head_dim", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.global_kv_heads", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.global_head_dim", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.hidden_size", _small_count_or_null, f"a count of at most {_I32}"),
    ("model.vocab_size", _count_or_null, "a count"),
    ("model.parameters", _count_or_null, "a count"),
    ("model.sliding_window", _count_or_null, "a count"),
    ("model.kv_layers", _layers_or_null, _LAYERS),
    ("model.sliding_layers", _layers_or_null, _LAYERS),
    ("model.dtype", _text_or_null, "a string"),
    ("options.gpu_memory", _size_or_null, f"a size of at most {MAX_BYTES} bytes"),
)
