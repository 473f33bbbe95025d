"""`record(model="auto")`, which `kvtrace run script.py` uses: the run's model is the first one whose
transformers `generate()` is called in the block, found there, so that a script is recorded as written,
its model made inside it (as `memray run` or `nsys profile` take a program as it is).

Without a model kvtrace still logs every transformers cache, but it cannot list the weights, tell one
generate() call's steps, or plan the model again: the first generate() gives it all of them, before that
call's first forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["ModelDiscovery"]


class ModelDiscovery:
    """A wrapper around transformers' `GenerationMixin.generate` that hands the first model calling it to
    `on_found` (once), then lets the call go on through whatever `on_found` installed over it."""

    def __init__(self, on_found: Callable[[Any], None]) -> None:
        self._on_found = on_found
        self._mixin: Any = None
        self._original: Any = None
        self.found: Any = None

    def install(self) -> bool:
        """False (nothing to watch) where transformers is not installed."""
        try:
            from transformers.generation.utils import GenerationMixin
        except ImportError:
            return False
        import torch

        original = GenerationMixin.__dict__["generate"]
        self._mixin, self._original = GenerationMixin, original
        discovery = self

        @functools.wraps(original)
        def generate(model: Any, *args: Any, **kwargs: Any) -> Any:
            if discovery.found is None and isinstance(model, torch.nn.Module):
                discovery.found = model
                discovery._on_found(model)
                current = GenerationMixin.__dict__["generate"]
                if current is not generate:  # the model's own hooks (GenerateCalls) now wrap this one
                    return current(model, *args, **kwargs)
            return original(model, *args, **kwargs)

        GenerationMixin.generate = generate  # type: ignore[method-assign]
        return True

    def uninstall(self) -> None:
        """Put transformers' generate() back; after the hooks installed over this one came off."""
        if self._mixin is not None:
            self._mixin.generate = self._original
        self._mixin = self._original = None
