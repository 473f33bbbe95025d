"""TensorBoard event records made without TensorBoard: its record framing and the one protobuf message kvtrace
writes (an `Event` holding the file's version, or a step's scalars), encoded here.

Why: importing TensorBoard's writer (its protobuf classes, its TensorFlow stub, fsspec) took 0.15-0.25 s of
each `kvtrace report` of a run, more than reading most runs does, for a few kB of scalars; and a laptop
install without TensorBoard left the scalars out. The bytes are those TensorBoard's writer makes
(`tests/unit/test_tb_events.py` compares them): proto3 leaves a field at its default out, but writes a
oneof's field (the scalar's value) even at 0; fields go in their numbers' order.

A record: the data's length (uint64), its masked CRC-32C (uint32), the data, the data's masked CRC-32C, all
little-endian, as TensorFlow's TFRecord files are.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

__all__ = ["crc32c", "file_version_event", "record", "record_size", "scalars_event"]

FILE_VERSION = "brain.Event:2"
_CASTAGNOLI = 0x82F63B78  # the CRC-32C polynomial, bits reversed
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CASTAGNOLI if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, the checksum TFRecord files carry (zlib's CRC-32 is another)."""
    crc, table = _U32, _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def _masked(crc: int) -> int:
    """TFRecord's masking of a CRC (rotated right by 15 bits, plus a constant), as its readers check it."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def record(data: bytes) -> bytes:
    """`data` framed as one TFRecord record."""
    header = _LENGTH.pack(len(data))
    return header + _CRC.pack(_masked(crc32c(header))) + data + _CRC.pack(_masked(crc32c(data)))


def record_size(header: bytes) -> int:
    """The whole size of the record whose first 8 bytes (its data's length) are `header`."""
    return _LENGTH.size + _CRC.size + _LENGTH.unpack(header)[0] + _CRC.size


def _varint(value: int) -> bytes:
    """A protobuf varint; a negative int64 as its 64-bit two's complement (ten bytes), as protobuf has it."""
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    """Field `number` holding `payload` (a string or an embedded message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _head(wall_time: float, step: int) -> bytes:
    """`Event.wall_time` (field 1, a double) and `Event.step` (field 2, an int64), each left out at 0."""
    head = b""
    if _DOUBLE.pack(wall_time) != _DOUBLE.pack(0.0):  # proto3 drops +0.0 alone (-0.0 differs by its bits)
        head += b"\x09" + _DOUBLE.pack(wall_time)
    if step:
        head += b"\x10" + _varint(step)
    return head


def file_version_event(wall_time: float) -> bytes:
    """The `Event` that opens an event file: `file_version` (field 3)."""
    return _head(wall_time, 0) + _delimited(3, FILE_VERSION.encode())


def scalars_event(wall_time: float, step: int, scalars: Iterable[tuple[str, float]]) -> bytes:
    """An `Event` whose `summary` (field 5) holds one `Summary.Value` (its field 1) per scalar: `tag`
    (field 1) and `simple_value` (field 2, a float32)."""
    values = b"".join(
        _delimited(1, (_delimited(1, tag.encode()) if tag else b"") + b"\x15" + _FLOAT.pack(value))
        for tag, value in scalars
    )
    return _head(wall_time, step) + _delimited(5, values)
