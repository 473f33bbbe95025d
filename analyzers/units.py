"""Human-readable sizes (binary units, as the allocator and nvidia-smi count)."""

from __future__ import annotations


def human_bytes(value: float | int | None) -> str:
    if value is None:
        return "-"
    sign = "-" if value < 0 else ""
    size = float(abs(value))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.2f} {unit}"
        size /= 1024
    return f"{sign}{size:.2f} TiB"


_BINARY_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def binary_unit(max_bytes: float | int | None) -> tuple[str, int]:
    """The unit a chart of bytes up to `max_bytes` is drawn in, and its size: ("MiB", 1048576).

    Charts plot bytes divided by this and title the axis with the unit, so that their ticks read like the
    tables beside them (binary units), never plotly's SI "80M"."""
    largest = float(max_bytes or 0)
    for unit, factor in _BINARY_UNITS:
        if largest >= factor:
            return unit, factor
    return "B", 1


def hover_bytes(unit: str) -> str:
    """A plotly hover template for values already divided into `unit`: two decimals, as human_bytes."""
    return "%{y:,.0f} B" if unit == "B" else "%{y:,.2f} " + unit


def times(ratio: float) -> str:
    """A ratio of bytes as every table says it ("39.66x"): `report`'s KV churn and `compare`'s are one
    figure, and read alike (they said 3.5x and 3.45x of one run)."""
    return f"{ratio:,.2f}x"


def a_or_an(figure: str) -> str:
    """`figure` after its indefinite article as said aloud: "an 8-token window", "an 11.00 KiB request",
    "an 80.00 GiB device", but "a 1.25 MiB pool" (the article of a number is that of its first word:
    eight, eleven, eighteen, eighty, eight hundred, eleven thousand...)."""
    group = ""
    for char in figure:
        if not char.isdigit():
            break
        group += char
    spoken_vowel = group.startswith("8") or group in ("11", "18")
    return f"{'an' if spoken_vowel else 'a'} {figure}"
