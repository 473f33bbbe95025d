"""Where the recorded model's `generate()` calls begin, so that each call's first forward is its prefill.

A cache reused across `generate()` calls (a chat's next turn) is not empty when the next call begins: its
first forward writes the new prompt tokens, several per row, on top of what the cache holds. So do the
verification forwards of assisted and prompt-lookup decoding, which are decode steps (each writes its draft
tokens and keeps those accepted). The cache's state and the forward's input cannot tell the two apart
(both start at the cache's length and feed several positions); the call can: a call's first forward writes
its prompt. `GenerateCalls.install` wraps `GenerationMixin.generate` on the class (models whose own
`generate` calls `super().generate()` reach it too) and `uninstall` puts it back. Only the outermost call
on the recorded model counts: an assistant model's `generate()` runs inside the model's own.

A chunked prefill (`prefill_chunk_size`) writes the prompt over several forwards: the call's prompt length
(`prompt`) lets the recorder keep them in one prefill step, as they yield one token between them.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any


class GenerateCalls:
    """Counts the recorded model's `generate()` calls in progress; `began()` says, once per call, that the
    forward about to run is the call's first."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._mixin: Any = None
        self._original: Any = None
        self._lock = threading.Lock()
        self._depth = 0  # generate() calls on the model in progress, nested ones included
        self._pending = False  # the outermost call began and none of its forwards has run yet
        self.prompt: int | None = None  # the outermost call's input positions per row (`_prompt_length`)
        self.cache_passed = False  # the outermost call was given a cache (else generate() makes an empty one)
        self._here = threading.local()  # `depth`: the model's calls in progress on this thread

    @staticmethod
    def available(model: Any) -> bool:
        """Whether `model` has transformers' `generate()` (a model of the library has loaded it already)."""
        utils = sys.modules.get("transformers.generation.utils")
        mixin = getattr(utils, "GenerationMixin", None)
        return mixin is not None and isinstance(model, mixin)

    def install(self) -> None:
        from transformers.generation.utils import GenerationMixin

        original = GenerationMixin.__dict__["generate"]
        self._mixin, self._original = GenerationMixin, original
        calls = self

        @functools.wraps(original)
        def generate(model: Any, *args: Any, **kwargs: Any) -> Any:
            if model is not calls.model:  # another model's (an assistant's), or a copy's
                return original(model, *args, **kwargs)
            passed = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
            calls._enter(_prompt_length(model, args, kwargs), passed)
            try:
                return original(model, *args, **kwargs)
            finally:
                calls._exit()

        GenerationMixin.generate = generate  # type: ignore[method-assign]

    def uninstall(self) -> None:
        if self._mixin is not None:
            self._mixin.generate = self._original
        self._mixin = self._original = None

    def _enter(self, prompt: int | None, cache_passed: bool) -> None:
        self._here.depth = getattr(self._here, "depth", 0) + 1
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._pending = True
                self.prompt, self.cache_passed = prompt, cache_passed

    def _exit(self) -> None:
        self._here.depth -= 1
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._pending = False  # a call whose forwards kvtrace did not see (continuous batching)

    def in_call(self) -> bool:
        return self._depth > 0

    def in_call_here(self) -> bool:
        """Whether one of the model's `generate()` calls is in progress on the calling thread: an assistant's
        draft cache is made inside it, another model's cache outside (before, after, on another thread)."""
        return getattr(self._here, "depth", 0) > 0

    def began(self) -> bool:
        """Whether a call began since the last forward: True once, for its first forward."""
        if not self._pending:
            return False
        with self._lock:
            pending, self._pending = self._pending, False
        return pending


def _prompt_length(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The positions per row a `generate()` call's cache holds once its prompt is written: its input's
    length (a shape, read without a sync), which includes what a cache passed in holds already (else the
    call passed its new tokens only, which the recorder tells by the cache's count). None for
    encoder-decoder models (the input is the encoder's), or when the call does not show its input."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    fed = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if fed is None:
        fed = kwargs.get("inputs_embeds")
    shape = getattr(fed, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None
