"""`record(model="auto")`, which `kvtrace run script.py` uses: the run's model is the first one the script
generates with, found there, so that a script is recorded as written, its model made inside it (as
`memray run` or `nsys profile` take a program as it is): a transformers model at its first `generate()`,
or a `vllm.LLM` at its first `generate()` or `chat()`.

Without a model kvtrace still logs every transformers cache, but it cannot list the weights, tell one
generate() call's steps, follow a vLLM engine's pool, or plan the model again: the first call gives it
all of them, before that call does any work.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["ModelDiscovery", "importable"]

_VLLM_LLM_MODULE = "vllm.entrypoints.llm"
_VLLM_CALLS = ("generate", "chat")


class ModelDiscovery:
    """Wrappers around transformers' `GenerationMixin.generate` and vLLM's `LLM.generate`/`LLM.chat`
    that hand the first model (or LLM) calling one to `on_model` (or `on_engine`), once, then let the call
    go on through whatever was installed over them. vLLM is watched for its import when it is not loaded."""

    def __init__(self, on_model: Callable[[Any], None], on_engine: Callable[[Any], None]) -> None:
        self._on_model = on_model
        self._on_engine = on_engine
        self._patched: list[tuple[Any, str, Any]] = []  # (class, name, original), to put back
        self._finder: Any = None
        self.found: Any = None

    def install(self) -> None:
        with contextlib.suppress(ImportError):
            from transformers.generation.utils import GenerationMixin

            self._wrap(GenerationMixin, "generate", self._found_model)
        if _VLLM_LLM_MODULE in sys.modules or importable("vllm"):
            from kvtrace.integrations.vllm import after_import

            self._finder = after_import(_VLLM_LLM_MODULE, self._watch_vllm)

    def uninstall(self) -> None:
        """Put every wrapped method back; after the hooks installed over them came off."""
        if self._finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self._finder)
            self._finder = None
        for cls, name, original in reversed(self._patched):
            setattr(cls, name, original)
        self._patched.clear()

    def _watch_vllm(self, module: Any) -> None:
        llm_cls = getattr(module, "LLM", None)
        if llm_cls is None:
            return
        for name in _VLLM_CALLS:
            if name in llm_cls.__dict__:
                self._wrap(llm_cls, name, self._found_engine)

    def _found_model(self, obj: Any) -> bool:
        import torch

        if not isinstance(obj, torch.nn.Module):
            return False
        self._on_model(obj)
        return True

    def _found_engine(self, obj: Any) -> bool:
        self._on_engine(obj)
        return True

    def _wrap(self, cls: Any, name: str, found: Callable[[Any], bool]) -> None:
        original = cls.__dict__[name]
        self._patched.append((cls, name, original))
        discovery = self

        @functools.wraps(original)
        def call(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if discovery.found is None and found(obj):
                discovery.found = obj
                current = cls.__dict__[name]
                if current is not call:  # the model's own hooks (GenerateCalls) now wrap this one
                    return current(obj, *args, **kwargs)
            return original(obj, *args, **kwargs)

        setattr(cls, name, call)


def importable(name: str) -> bool:
    """Whether `name` could be imported, found without importing it (vLLM's import takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
