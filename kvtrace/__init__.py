"""kvtrace: where an LLM's GPU memory goes during inference, and how much of it is the KV cache.

Importing `kvtrace` is cheap: `record` and `track` load torch only when first used, so the format module
(`kvtrace.format`) and the CLI stay light enough for the torch-free analyzers.
"""

from __future__ import annotations

# Not `typing.TYPE_CHECKING`: `typing` is 3 ms of import, and this module runs before the `kvtrace` command's
# entry point can catch a Ctrl-C (kvtrace/entry_point.py). mypy reads any `TYPE_CHECKING` as true.
TYPE_CHECKING = False

__version__ = "0.1.0"
__all__ = [
    "RecordOptions",
    "Recording",
    "RecordingError",
    "Tables",
    "__version__",
    "load_tables",
    "record",
    "track",
]

if TYPE_CHECKING:
    from typing import Any

    from analyzers.load import Tables, load_tables
    from kvtrace.errors import RecordingError
    from kvtrace.options import RecordOptions
    from kvtrace.recorder import Recording, record, track

_LAZY = {
    "record": "kvtrace.recorder",
    "track": "kvtrace.recorder",
    "Recording": "kvtrace.recorder",
    "RecordOptions": "kvtrace.options",
    "RecordingError": "kvtrace.errors",  # torch-free: catching it loads nothing heavy
    # The notebook API lives with the analyzers (pyarrow, no torch): imported only when used.
    "load_tables": "analyzers.load",
    "Tables": "analyzers.load",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'kvtrace' has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        from kvtrace.errors import missing_dependency

        needs = missing_dependency(exc)
        if needs is None:
            raise
        # The laptop install (`pip install .`) has the analyzers only: say which extra brings the rest
        raise ModuleNotFoundError(f"kvtrace.{name} {needs}", name=exc.name) from None
    value = getattr(module, name)
    globals()[name] = value
    return value
