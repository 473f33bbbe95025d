"""KV events as JSON lines, written without building a dict or calling json.dumps per event.

The recorder logs several events per layer update, so each is one `%` format of a fixed template with the
keys of `kvtrace.format.KvEvent` (read back by `read_run` like any JSON line). String fields are quoted
once and memoised; shapes are turned into JSON once per distinct shape. Also: the plain tensors inside a
cache attribute (`iter_tensors`), for quantized caches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import torch

# One event per line, the keys of `kvtrace.format.KvEvent`. String fields arrive already JSON-quoted.
EVENT_LINE = (
    '{"seq":%d,"t_ns":%d,"step":%d,"phase":%s,"event":"%s","layer":%d,"kv":%s,"part":%s,"addr":%d,'
    '"storage_bytes":%d,"view_offset":%d,"shape":%s,"logical_bytes":%d,"dtype":%s,"device":%s,"tokens":%d,'
    '"evicted_tokens":%d,"prev_addr":%d,"cache":%d,"source":%s,"reason":%s}'
)
# Fields a line leaves out take KvEvent's defaults when read back.
FREED_LINE = (
    '{"seq":%d,"t_ns":%d,"step":%d,"phase":%s,"event":"freed","layer":%d,"kv":%s,"part":%s,"addr":%d,'
    '"storage_bytes":%d,"cache":%d}'
)
NO_STORAGE_LINE = (
    '{"seq":%d,"t_ns":%d,"step":%d,"phase":%s,"event":"%s","layer":%d,"kv":%s,"part":%s,"addr":0,'
    '"storage_bytes":0,"tokens":%d,"evicted_tokens":%d,"prev_addr":%d,"cache":%d,"source":%s,"reason":%s}'
)
# A mask that hides tokens in place (kvpress AdaKV): the layer's tensors stay as they were logged.
MASKED_LINE = (
    '{"seq":%d,"t_ns":%d,"step":%d,"phase":%s,"event":"masked","layer":%d,"kv":%s,"part":"data","addr":0,'
    '"storage_bytes":0,"tokens":%d,"cache":%d,"source":"hf","reason":%s,"masked_entries":%d}'
)


# The three fields a line takes from its update (`"t_ns":%d,"step":%d,"phase":%s`) as one: `CLOCK % (t_ns,
# step, phase_json)`, made once per update and shared by its lines (`slot_lines`' templates take it as `%s`).
CLOCK = '%d,"step":%d,"phase":%s'


def slot_lines(
    layer: int, kv_json: str, part_json: str, dtype_json: str, device_json: str, cache: int, source_json: str
) -> tuple[str, str]:
    """`EVENT_LINE` and `FREED_LINE` with one slot's constant fields filled in, and the update's time, step
    and phase taken as one `CLOCK` string, for the recorder's drain loop: the same bytes, with 9 and 6 fewer
    conversions per line (each ~0.1 us, issue 11). Formatted with (seq, clock, ...)."""

    def literal(value: object) -> str:
        return str(value).replace("%", "%%")

    slot = (literal(layer), literal(kv_json), literal(part_json))
    event = EVENT_LINE.replace("%d", "%s") % (
        "%d",
        "%s",
        "",
        "",
        "%s",
        *slot,
        "%d",
        "%d",
        "%d",
        "%s",
        "%d",
        literal(dtype_json),
        literal(device_json),
        "%d",
        "%d",
        "%d",
        literal(cache),
        literal(source_json),
        "%s",
    )
    freed = FREED_LINE.replace("%d", "%s") % ("%d", "%s", "", "", *slot, "%d", "%d", literal(cache))
    return _clocked(event), _clocked(freed)


def _clocked(template: str) -> str:
    """A template whose step and phase were left empty, its time field taking the whole `CLOCK`."""
    return template.replace('"t_ns":%s,"step":,"phase":,', '"t_ns":%s,', 1)


_QUOTED: dict[str, str] = {}
# torch.Size -> (its JSON list, element count): str(list(shape)) alone costs ~1-2 us
SHAPE_JSON: dict[tuple[int, ...], tuple[str, int]] = {}
KEY_JSON: dict[tuple[str, str], tuple[str, str]] = {}  # (kv, part) -> both JSON-quoted
_DTYPE_NAMES: dict[torch.dtype, str] = {}
_DEVICE_NAMES: dict[torch.device, str] = {}


def quoted(text: str) -> str:
    """`text` as a JSON string literal, memoised: the same few names come back on every event."""
    literal = _QUOTED.get(text)
    if literal is None:
        literal = _QUOTED[text] = json.dumps(text)
    return literal


def shape_facts(shape: tuple[int, ...]) -> tuple[str, int]:
    facts = SHAPE_JSON.get(shape)
    if facts is None:
        if len(SHAPE_JSON) > 100_000:  # a run of many distinct shapes: start over rather than grow
            SHAPE_JSON.clear()
        count = 1
        for size in shape:
            count *= size
        facts = SHAPE_JSON[shape] = (str(list(shape)).replace(" ", ""), count)
    return facts


def key_json(key: tuple[str, str]) -> tuple[str, str]:
    pair = KEY_JSON.get(key)
    if pair is None:
        pair = KEY_JSON[key] = (quoted(key[0]), quoted(key[1]))
    return pair


def dtype_json(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = quoted(str(dtype).removeprefix("torch."))
    return name


def device_json(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = quoted(str(device))
    return name


def iter_tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every plain tensor inside a cache attribute: quantized caches keep tuples (fp8: data, scale),
    tensor subclasses (quanto) or dicts of metadata (hqq)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        flatten = getattr(type(value), "__tensor_flatten__", None)
        if flatten is not None and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter:
            names, _ = cast(Any, value).__tensor_flatten__()  # a subclass hook torch.Tensor's stubs lack
            for name in names:
                yield from iter_tensors(getattr(value, name), f"{prefix}.{name}")
            return
        yield prefix, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from iter_tensors(item, f"{prefix}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_tensors(item, f"{prefix}.{key}")
    else:
        inner = getattr(value, "__dict__", None)
        if isinstance(inner, dict):  # e.g. an hqq quantized object holding W_q and meta tensors
            for key, item in inner.items():
                if isinstance(item, (torch.Tensor, dict, tuple, list)):
                    yield from iter_tensors(item, f"{prefix}.{key}")
