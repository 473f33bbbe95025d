"""kv_events.jsonl read a block of whole lines at a time, each line decoded and checked by msgspec in C.

A long run's log is millions of lines, and the line-by-line reader (`json.loads`, then `run_checks`' checks
of 25 fields in Python) took ~11 µs a line, half of a `kvtrace report` of a light run. Here msgspec decodes
each line into a struct whose fields carry the same bounds as `run_checks._EVENT_INTS` (an int of the wrong
kind or range, a string that is not one, a shape of anything but sizes fail the decode), and an unsent
field reads as `UNSET`, so the fields a line left out are known as the line-by-line reader knows them.

Anything a block's lines do that the line-by-line reader would refuse, repair or read otherwise (a line
msgspec does not decode as a KV line, a blank line, a carriage return, a missing field, a `kv` neither "k"
nor "v") makes `decode` return None before any of the reader's counts move, and the block is read line by
line: errors, their line numbers and the notes come from one place. msgspec is a dependency of kvtrace, and
where it is missing every block is read line by line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from kvtrace.format import KvEvent

__all__ = ["line_decoder"]

Decode = Callable[[list[bytes]], list[tuple[Any, ...]] | None]


def line_decoder(
    ints: tuple[tuple[str, int, int], ...], strs: tuple[str, ...], size_max: int
) -> tuple[Decode, Any] | None:
    """(decode, UNSET), or None where msgspec is missing: `decode` takes a block's lines (each without its
    newline) to each line's values in KvEvent's field order, UNSET where the line left a field out, or
    None where the block is not decoded whole. `ints` and `strs`: the fields' checks, as `run_checks`
    makes them; `size_max`: a shape's largest size."""
    try:
        import msgspec
    except ImportError:
        return None
    from msgspec import UNSET, Meta, UnsetType
    from msgspec.structs import astuple

    bounds = {name: (low, high) for name, low, high in ints}
    fields: list[tuple[str, Any, Any]] = []
    for name in KvEvent.__dataclass_fields__:
        kind: Any
        if name in bounds:
            low, high = bounds[name]
            kind = Annotated[int, Meta(ge=low, le=high)]
        elif name in strs:
            kind = str
        elif name == "shape":
            kind = list[Annotated[int, Meta(ge=0, le=size_max)]]
        else:  # a field no check covers: read line by line, where a new field's check would be added
            return None
        fields.append((name, kind | UnsetType, UNSET))
    decode_one = msgspec.json.Decoder(msgspec.defstruct("KvLine", fields, gc=False)).decode
    failed = (msgspec.MsgspecError, RecursionError, ValueError)

    def decode(lines: list[bytes]) -> list[tuple[Any, ...]] | None:
        try:
            return list(map(astuple, map(decode_one, lines)))
        except failed:
            return None

    return decode, UNSET
