"""Analyzers: pure analysis of recorded memory events and capacity plans; never imports torch.

`analyzers.load_tables(path)` (also `kvtrace.load_tables`) is the notebook entry point: any run, group,
trace, snapshot or export directory as pyarrow tables. Loaded on first use, so `import analyzers` stays
light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analyzers.load import Tables, load_tables

__all__ = ["Tables", "load_tables"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from analyzers import load

        return getattr(load, name)
    raise AttributeError(f"module 'analyzers' has no attribute {name!r}")
