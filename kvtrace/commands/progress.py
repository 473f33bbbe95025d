"""The progress bar the reading commands draw on stderr while a big input is read (report, diagnose,
compare, export, plan --from-run): tqdm, as the ecosystem's tools draw theirs, only on a terminal and never
under -q."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["progress_bar", "reading"]

Progress = Callable[[int, int], None]


def progress_bar(label: str, quiet: bool) -> tuple[Progress | None, Callable[[], None] | None]:
    """A tqdm bar on stderr for inputs over 20 MB; None (no bar) for small ones or when quiet.

    The callback's `stage(label, unit)` gives the callback of a later stage of the same read (a long KV log's
    replay, then its join: `analyzers.readers.sources.next_stage`), which draws in the same bar, relabelled
    and counting that stage's items from 0: a bar left at 100% for the third of the command they take looked
    hung. A stage draws only where the reading drew its bar."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if total < 20_000_000:
            return
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)
        elif state.get("stage") is not None:  # the bytes again after a stage (a run's trace after its replay)
            state["stage"] = None
            bar.refresh()  # the stage as it ended (tqdm draws a call at most every 0.1 s)
            bar.unit = "B"
            bar.set_description(label, refresh=False)
            bar.reset(total=total)
        bar.update(done - bar.n)

    def stage(stage_label: str, unit: str) -> Progress:
        def stage_update(done: int, total: int) -> None:
            bar = state.get("bar")
            if bar is None:  # a small input: no bar drawn for its reading, none for its stages
                return
            if state.get("stage") != stage_label:
                state["stage"] = stage_label
                bar.refresh()  # what was read (or done) as it ended: 100% once the read is whole
                bar.unit = unit
                bar.set_description(stage_label, refresh=False)
                bar.reset(total=total)
            bar.update(done - bar.n)

        return stage_update

    update.stage = stage  # type: ignore[attr-defined]

    def close() -> None:
        bar = state.get("bar")
        if bar is not None:
            bar.close()

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
