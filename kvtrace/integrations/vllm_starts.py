"""vLLM engines built inside `record(dir)` with no model: noticed, so that the run says that an engine
started and was not followed, rather than reading as a run that held no KV at all (docs/vllm.md, "Limits").

`vllm.LLM.__init__` is wrapped while installed, now if `vllm.entrypoints.llm` is imported, else when it is.
The construction runs in the recording's process whether the engine core runs there or in a process of its
own, so both are seen; a start vLLM refused raises out of `__init__` and is the refusal watch's to record.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any

__all__ = ["EngineStarts"]

_LLM_MODULE = "vllm.entrypoints.llm"


class EngineStarts:
    """The class names of the `LLM`s whose construction returned while installed, in `started`."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._cls: Any = None
        self._original: Any = None
        self._wrapper: Any = None
        self._finder: Any = None

    def install(self) -> None:
        from kvtrace.integrations.model_discovery import importable

        # vLLM's import takes seconds: a process that cannot import it is not watched for it
        if _LLM_MODULE in sys.modules or importable("vllm"):
            from kvtrace.integrations.vllm import after_import

            self._finder = after_import(_LLM_MODULE, self._patch)

    def uninstall(self) -> None:
        if self._finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self._finder)
            self._finder = None
        if self._cls is not None and self._cls.__dict__.get("__init__") is self._wrapper:
            self._cls.__init__ = self._original
        self._cls = self._original = self._wrapper = None

    def _patch(self, module: Any) -> None:
        cls = getattr(module, "LLM", None)
        if cls is None or self._cls is not None or "__init__" not in cls.__dict__:
            return
        original, started = cls.__dict__["__init__"], self.started

        @functools.wraps(original)
        def __init__(llm: Any, *args: Any, **kwargs: Any) -> None:
            original(llm, *args, **kwargs)
            started.append(type(llm).__name__)

        self._cls, self._original, self._wrapper = cls, original, __init__
        cls.__init__ = __init__
