"""Which frames of an allocation's stack say where it came from.

A snapshot recorded with C++ frames (`_record_memory_history(stacks="all")`, torch >= 2.1) starts every
stack with the same frames: the unwinder that took the stack (`torch::unwind::unwind`,
`CapturedTraceback::gather`, `gather_with_cpp`), then the caching allocator and the dispatcher. Grouped and
shown as they are, every stack looks alike. torch's own viewer (`_frame_filter` in
`torch/cuda/_memory_viz.py`) leaves out the unwinder's, the interpreter's and the dispatcher's frames;
`kept_frames` leaves out the same ones. `heading` then picks the frames a stack is known by.
"""

from __future__ import annotations

import re

__all__ = ["heading", "kept_frames"]

# Frames of the unwinder, the process and the interpreter, by function name (any name holding one of
# these), and of the dispatcher's generated code and CPython's sources, by file: memory_viz's lists.
_NOT_THE_CALLER_IN_NAME = (
    "unwind::unwind",
    "CapturedTraceback::gather",
    "gather_with_cpp",
    "_start",
    "__libc_start_main",
    "PyEval_",
    "PyObject_",
    "PyFunction_",
)
_NOT_THE_CALLER_IN_FILE = (
    "core/boxing",
    "/Register",
    "/Redispatch",
    "pythonrun.c",
    "Modules/main.c",
    "Objects/call.c",
    "Objects/methodobject.c",
    "pycore_ceval.h",
    "ceval.c",
    "cpython/abstract.h",
)
_FRAME = re.compile(r"(.*?):(\d+):(.*)")  # "file:line:name"; C++ names hold "::", files "D:\"
# What a C++-only stack is known by: ATen's operator entry points (the op that asked for the memory) and
# autograd's generated backward functions (the forward op it differentiates).
_OPERATOR_PREFIXES = ("at::_ops::", "torch::autograd::generated::")


def _file_and_name(frame: str) -> tuple[str, str]:
    parsed = _FRAME.fullmatch(frame)
    return (parsed.group(1), parsed.group(3)) if parsed else ("", frame)


def _keeps(frame: str) -> bool:
    filename, name = _file_and_name(frame)
    return not any(part in name for part in _NOT_THE_CALLER_IN_NAME) and not any(
        part in filename for part in _NOT_THE_CALLER_IN_FILE
    )


def kept_frames(stack: str) -> list[str]:
    """The frames of a stack text (one "file:line:name" per line, innermost first) that memory_viz shows;
    all of them when it would show none (a stack is never left empty)."""
    frames = stack.splitlines()
    return [frame for frame in frames if _keeps(frame)] or frames


def heading(frames: list[str]) -> list[str]:
    """The frames a stack is known by, innermost first: its Python frames (the program's own code) when it
    has any; else, for a C++-only stack (the autograd engine's thread), its ATen operators and backward
    functions; else all of them."""
    python = [frame for frame in frames if _file_and_name(frame)[0].endswith(".py")]
    operators = [frame for frame in frames if _file_and_name(frame)[1].startswith(_OPERATOR_PREFIXES)]
    return python or operators or frames
