"""Load a pickle written by someone else without letting it run code.

A pickle is a program: its GLOBAL/STACK_GLOBAL opcodes import any callable and REDUCE calls it, so
`pickle.load` on a downloaded snapshot can run `os.system`. CUDA allocator snapshots only hold dicts,
lists, tuples, strings, numbers, booleans and None, which the unpickler builds from opcodes without ever
asking `find_class`. So our unpickler refuses every global: nothing callable can enter, and a snapshot
that needs one is not a snapshot. Gzip-compressed pickles are read too (detected by magic bytes).
"""

from __future__ import annotations

import gc
import os
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from analyzers.readers.sources import ProgressFn, open_input
from kvtrace.errors import KvtraceError

__all__ = ["load_pickle"]


class _RefusedGlobal(Exception):
    """Raised by `find_class`; kept distinct so the message can say what the file asked for."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds builtin containers and scalars only; any import request is refused."""

    def find_class(self, module: str, name: str) -> type:  # type: ignore[override]
        raise _RefusedGlobal(module, name)

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not plain data")


# What a damaged or foreign byte stream makes the unpickler raise. Anything else is a bug of ours.
_DECODE_ERRORS = (
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    struct.error,
    UnicodeDecodeError,
    RecursionError,
    MemoryError,
)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of plain containers: they hold no cycles
    to free, yet each allocation threshold re-scans all of them (it halves the time of a big snapshot)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_pickle(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> object:
    """The plain-data object stored in the pickle at `path` (plain or gzip-compressed).

    Raises `KvtraceError("{path}: ...")` for an empty, truncated, corrupt or non-pickle file, and for any
    pickle that asks to import something (which is how a pickle runs code).
    """
    name = str(path)
    with open_input(path, progress) as stream:
        if not stream.peek(1):
            raise KvtraceError(f"{name}: empty file")
        first = stream.peek(2)[:2]
        if first[:1] != b"\x80" and first not in (b"(d", b"}q", b"}("):
            # Protocols 0 and 1 have no header: a dict there opens with these (torch writes protocol >= 2).
            raise KvtraceError(f"{name}: not a pickle (starts with {first!r}, no protocol header)")
        try:
            with gc_paused():
                return _DataOnlyUnpickler(stream).load()
        except _RefusedGlobal as exc:
            raise KvtraceError(
                f"{name}: refused to load: the pickle asks to import {exc.module}.{exc.name}; "
                "only plain data (dicts, lists, numbers, strings) is accepted because a pickle can run code"
            ) from None
        except EOFError as exc:
            raise KvtraceError(f"{name}: truncated pickle: the data ends early") from exc
        except _DECODE_ERRORS as exc:
            if "truncated" in str(exc):
                raise KvtraceError(f"{name}: truncated pickle: the data ends early") from exc
            raise KvtraceError(f"{name}: corrupt or not a pickle ({type(exc).__name__}: {exc})") from exc
