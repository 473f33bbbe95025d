"""The progress bar the reading commands draw on stderr while a big input is read (report, diagnose,
compare, export): tqdm, as the ecosystem's tools draw theirs, only on a terminal and never under -q."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

__all__ = ["progress_bar", "reading"]

Progress = Callable[[int, int], None]


def progress_bar(label: str, quiet: bool) -> tuple[Progress | None, Callable[[], None] | None]:
    """A tqdm bar on stderr for inputs over 20 MB; None (no bar) for small ones or when quiet."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    state: dict[str, object] = {}

    def update(done: int, total: int) -> None:
        if total < 20_000_000:
            return
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)
        bar.update(done - bar.n)  # type: ignore[attr-defined]

    def close() -> None:
        bar = state.get("bar")
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]

    return update, close


@contextlib.contextmanager
def reading(label: str, quiet: bool) -> Iterator[Progress | None]:
    """`progress_bar` as a block: the bar is closed however the block ends (an unreadable input's error
    is then printed on a line of its own)."""
    update, close = progress_bar(label, quiet)
    try:
        yield update
    finally:
        if close is not None:
            close()
