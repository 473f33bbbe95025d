"""Python's cycle collector paused while a long log is read into objects. Stdlib only.

Reading a run makes millions of small objects that all live until the command ends (a KV event, its
shape, its dict a line; the replay's and the join's lists): each full collection walks every one of them
again, and a 4,000-token run of 32 layers paid 13 of them, a third of `report`'s time, to free nothing
(none of these objects is in a cycle). Reference counting still frees what is dropped; the collector runs
again as before once the block ends. A big snapshot pickle's millions of plain containers (the safe
unpickler's, then the replay's) are read under it too.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cycle collector off inside the block, as it was after it (nested blocks leave it off)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
