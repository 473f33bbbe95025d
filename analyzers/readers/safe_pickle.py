"""Load a pickle written by someone else without letting it run code.

A pickle is a program: its GLOBAL/STACK_GLOBAL opcodes import any callable and REDUCE calls it, so
`pickle.load` on a downloaded snapshot can run `os.system`. CUDA allocator snapshots only hold dicts,
lists, tuples, strings, numbers, booleans and None, which the unpickler builds from opcodes without ever
asking `find_class`. So our unpickler refuses every global: nothing callable can enter, and a snapshot
that needs one is not a snapshot. Gzip-compressed pickles are read too (detected by magic bytes).
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from _thread import allocate_lock
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from analyzers.readers.sources import ProgressFn, open_input
from kvtrace.collector import collector_paused
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


# CPython (3.11 at least) builds the bytearray of a BYTEARRAY8 opcode before reading its bytes; when the
# declared size cannot be allocated (a 1 TiB claim in an 18-byte file), it frees the half-made object, whose
# uninitialised export count makes it print this line through sys.excepthook, before our own error line.
# The C unpickler offers no hook between reading the size and allocating it, and walking the opcodes in
# Python first (pickletools) costs ten times the load of a real snapshot, so the stray line is dropped
# while we load; every other report passes through.
_STRAY_BYTEARRAY_LINE = "deallocated bytearray object has exported buffers"
_hook_lock = allocate_lock()  # threading.Lock itself: threading's import is ~0.7 ms of a small report
_hook_users = 0
_hook_before: list[object] = []


def _drop_stray_bytearray_line(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if kind is SystemError and str(value) == _STRAY_BYTEARRAY_LINE:
        if getattr(sys, "last_value", None) is value:  # PyErr_Print kept it for pdb.pm(): not ours to keep
            for name in ("last_type", "last_value", "last_traceback", "last_exc"):
                vars(sys).pop(name, None)
        return
    previous = _hook_before[0] if _hook_before else sys.__excepthook__
    previous(kind, value, traceback)  # type: ignore[operator]


@contextmanager
def _stray_bytearray_line_dropped() -> Iterator[None]:
    """`_drop_stray_bytearray_line` as sys.excepthook while any thread loads a pickle."""
    global _hook_users
    with _hook_lock:
        if _hook_users == 0:
            _hook_before[:] = [sys.excepthook]
            sys.excepthook = _drop_stray_bytearray_line
        _hook_users += 1
    try:
        yield
    finally:
        with _hook_lock:
            _hook_users -= 1
            if _hook_users == 0 and sys.excepthook is _drop_stray_bytearray_line:
                sys.excepthook = _hook_before[0]  # type: ignore[assignment]


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
            with collector_paused(), _stray_bytearray_line_dropped():
                return _DataOnlyUnpickler(stream).load()
        except _RefusedGlobal as exc:
            raise KvtraceError(
                f"{name}: refused to load: the pickle asks to import {exc.module}.{exc.name}; "
                "only plain data (dicts, lists, numbers, strings) is accepted because a pickle can run code"
            ) from None
        except EOFError as exc:
            raise KvtraceError(f"{name}: truncated pickle: the data ends early") from exc
        except MemoryError:  # a damaged or made-up length (a 1 TiB bytearray in 18 bytes), or a huge dump
            raise KvtraceError(
                f"{name}: cannot load: it needs more memory than this machine has "
                "(a damaged or made-up size, or a dump too large for it)"
            ) from None
        except _DECODE_ERRORS as exc:
            if "truncated" in str(exc):
                raise KvtraceError(f"{name}: truncated pickle: the data ends early") from exc
            raise KvtraceError(f"{name}: corrupt or not a pickle ({type(exc).__name__}: {exc})") from exc
