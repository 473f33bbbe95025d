"""The writer thread's drain at every update, for tests of what it logs when it runs at the worst moment."""

from __future__ import annotations

from typing import Any

import kvtrace


def flush_after_each_update(recording: kvtrace.Recording) -> None:
    """Run the writer thread's drain (`Recording._flush`, the real one) after every layer update the tracker
    captures, as the writer thread may by chance at any of them (every 0.1 s)."""
    tracker = recording.tracker
    update = tracker.update

    def update_then_flush(*args: Any, **kwargs: Any) -> None:
        update(*args, **kwargs)
        recording._flush()

    tracker.update = update_then_flush  # type: ignore[method-assign]
