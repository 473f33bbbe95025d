"""Memory sizes as people type them ("80GiB", "80GB", "1.5e9"), for every command that takes one
(`plan --gpu-memory`, `diagnose --budget`, `sweep --budget`). No torch.

A device's memory or a budget (`parse_device_memory`) is refused as a bare number below 1 MiB: "24" is a
24 GiB GPU without its unit, and read as 24 bytes it planned a GPU of 0.02 KiB. Sizes whose natural unit is
bytes (`--kv-cache-memory`, `--weights-bytes`) take any bare number.
"""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

from kvtrace.errors import KvtraceError
from kvtrace.gpu_names import gpu_by_name, gpu_names_text

__all__ = ["MAX_SIZE", "MIN_BARE_DEVICE_MEMORY", "parse_device_memory", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"([0-9.eE+-]+)\s*([A-Za-z]*)")


MAX_SIZE = 2**64  # bytes
MIN_BARE_DEVICE_MEMORY = 2**20  # bytes: below it, a device's memory typed without a unit lost its unit


def parse_size(text: str, flag: str | None = None, positive: bool = False) -> int:
    """Bytes from "80GiB" (2**30), "80GB" (10**9), "1.5e9" or "12345"; fractions of a byte of a larger unit
    round down, but a byte count must be whole ("1.5B" reads as 1.5 billion to some: refused, not 1 byte).

    Bare K/M/G are refused: whether they mean 10**9 or 2**30 is a 7% difference at 80 GiB. `flag` (the
    option the text came from, "--budget") starts every error; `positive` refuses 0.
    """
    try:
        size = _parse_size(text)
    except KvtraceError as exc:
        if flag is None:
            raise
        raise KvtraceError(f"{flag}: {exc}") from None
    if positive and size == 0:
        said = f"{flag} {text.strip()}" if flag else repr(text)
        raise KvtraceError(f"{said}: a memory size must be positive")
    return size


def parse_device_memory(text: str, flag: str) -> int:
    """Bytes of a device's memory or a budget (`--gpu-memory 80GiB`, `--budget 24GB`), as `parse_size` reads
    them, or a GPU's name (`--gpu-memory H100`: `kvtrace.gpu_names`), positive; a number without a unit
    below 1 MiB is refused: no device has so little memory, and "24" was meant as 24GiB (read as bytes, it
    planned a GPU of 0.02 KiB)."""
    try:
        size = parse_size(text, flag, positive=True)
    except KvtraceError as exc:
        shaped = _SIZE_PATTERN.fullmatch(text.strip())
        if shaped is not None and shaped.group(2).lower() in _SIZE_UNITS:
            raise  # a size, refused as a size ("0", "1e99GiB")
        try:
            gpu = gpu_by_name(text)
        except KvtraceError as named:
            raise KvtraceError(f"{flag}: {named}") from None
        if gpu is None:
            raise KvtraceError(f"{exc}, or a GPU's name: {gpu_names_text()}") from None
        return gpu.bytes
    match = _SIZE_PATTERN.fullmatch(text.strip())
    if match is not None and not match.group(2) and size < MIN_BARE_DEVICE_MEMORY:
        gpu = gpu_by_name(text)  # "4090": the card, not 4,090 bytes
        if gpu is not None:
            return gpu.bytes
        typed = text.strip()
        raise KvtraceError(
            f"{flag} {typed}: a number without a unit is bytes, and {size:,} B is no device's memory: give "
            f"its unit, e.g. {flag} {typed}GiB"
        )
    return size


def _parse_size(text: str) -> int:
    match = _SIZE_PATTERN.fullmatch(text.strip())
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise KvtraceError(f"cannot read size {text!r}: write e.g. 80GiB, 80GB, 1.5e9 or 12345")
    try:
        value = Decimal(match.group(1))
    except InvalidOperation:
        raise KvtraceError(f"cannot read size {text!r}: {match.group(1)!r} is not a number") from None
    if not value.is_finite():
        raise KvtraceError(f"cannot read size {text!r}")
    if value < 0:
        raise KvtraceError(f"size cannot be negative: {text!r}")
    if _SIZE_UNITS[unit] == 1 and value != value.to_integral_value():
        hint = "B means bytes: 1.5GB is 1.5e9 bytes" if unit else "or give a unit: 1.5GiB"
        raise KvtraceError(f"a size in bytes must be a whole number, got {text!r} ({hint})")
    size = int((value * _SIZE_UNITS[unit]).to_integral_value(rounding=ROUND_FLOOR))
    if size > MAX_SIZE:  # a typo (1e99), and beyond what the float arithmetic of a plan can hold
        raise KvtraceError(f"size too large: {text!r} (at most 16 EiB)")
    return size
