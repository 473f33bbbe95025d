"""numpy imported at first use, in the CLI process of an analyzer command (issue 11).

`kvtrace report` on a small input spends most of its time starting up, and numpy's import alone is
60-70 ms of it: about a fifth of reporting a 26 MB trace that holds no memory events, which never needs
an array. While an analyzer command runs, `import numpy` binds a stand-in module; the first attribute
read on it imports numpy for real and copies numpy's namespace into it, so later reads are plain
dictionary hits, as on numpy itself.

Only for commands that import neither torch nor an extension built against numpy's C API (pyarrow):
those import numpy submodules from C first thing, which a stand-in in `sys.modules` cannot serve.
Library users never see it: it is installed by `kvtrace.cli` around such a command's `run` only, and
only when numpy is not imported yet.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any


class _DeferredNumpy(types.ModuleType):
    """Stands for numpy until an attribute is read; then numpy is imported and its namespace copied."""

    def __getattr__(self, name: str) -> Any:  # only for names not (yet) in this module's namespace
        real = self.__dict__.get("_kvtrace_real")
        if real is None:
            if sys.modules.get("numpy") is self:
                del sys.modules["numpy"]
            real = importlib.import_module("numpy")
            self.__dict__.update(real.__dict__)
            self.__dict__["_kvtrace_real"] = real
        return getattr(real, name)


@contextlib.contextmanager
def numpy_at_first_use() -> Iterator[None]:
    """`import numpy` inside the block binds a stand-in that imports numpy when first used."""
    if "numpy" in sys.modules:
        yield
        return
    spec = importlib.util.find_spec("numpy")
    if spec is None:  # not installed: let the import fail where it is made, as it would without us
        yield
        return
    stand_in = _DeferredNumpy("numpy")
    stand_in.__spec__ = spec
    sys.modules["numpy"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("numpy") is stand_in:
            del sys.modules["numpy"]
