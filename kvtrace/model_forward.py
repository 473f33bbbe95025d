"""Where the recorder's steps begin and end: kvtrace's own `forward` on the model, around the model's.

Forward hooks fire only when the model is called (`model(...)`). Meta's reference `Llama3.generate` calls
`model.forward(...)` directly, so hooked, its prefill and decode steps were never seen. The `forward`
attribute is what both reach (`Module._call_impl` looks it up on the model too). Wrapping it also spares
torch's hooked call path, a few µs a forward on a nearly free model (issue 11).

The wrapper is set on the model's class and acts for that instance only (a deep copy or a pickle of the
model carries nothing of kvtrace's); a `forward` set on the instance itself (a compiled one, accelerate's
hooks) shadows the class's, so it is wrapped there instead. Either is put back at the end. The wrapper
keeps the wrapped method's signature (`functools.wraps`: `inspect.signature` follows `__wrapped__`, which
`generate()` reads to know which arguments the model takes). While torch.compile traces a module that
calls the wrapper, the wrapper runs eagerly behind `torch.compiler.disable`: the graph breaks there, and
the model's own forward below it is compiled as its own frame.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from kvtrace.integrations.hf_caches import compiling

Before = Callable[[Any, tuple[Any, ...], dict[str, Any]], None]
After = Callable[[Any, tuple[Any, ...], Any], None]


class ForwardWrap:
    """Runs `before(model, args, kwargs)` and `after(model, args, output)` around every forward of `model`;
    `after` also when the forward raises, with `output` None (as an always-called forward hook)."""

    def __init__(self, model: Any, before: Before, after: After) -> None:
        self.model = model
        self._before = before
        self._after = after
        self._wrapper: Any = None
        self._owner: Any = None  # where kvtrace's `forward` is set: the model's class, or the model itself
        self._had_own = False  # the owner held a `forward` of its own (a class's, an instance's compiled one)
        self._own: Any = None
        self.active = False

    def install(self) -> None:
        model = self.model
        if "forward" in model.__dict__:
            # A `forward` set on the instance (a compiled one, accelerate's hooks) shadows the class's
            self._wrap(model, model.forward, bound=True)
        else:
            # On the class, for this instance only: a deep copy or a pickle of the model (an assistant made
            # from it) holds nothing of kvtrace's, and other instances of the class pass straight through.
            self._wrap(type(model), type(model).forward, bound=False)

    def _wrap(self, owner: Any, inner: Callable[..., Any], bound: bool) -> None:
        model, before, after, wrap = self.model, self._before, self._after, self
        self._owner = owner
        self._had_own = "forward" in owner.__dict__
        self._own = owner.__dict__.get("forward")

        def run(*args: Any, **kwargs: Any) -> Any:
            before(model, args, kwargs)
            output = None
            try:
                output = inner(*args, **kwargs) if bound else inner(model, *args, **kwargs)
            finally:
                after(model, args, output)
            return output

        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        skipped = disable(run, recursive=False) if disable is not None else run

        if bound:

            @functools.wraps(inner)
            def forward(*args: Any, **kwargs: Any) -> Any:
                if not wrap.active:  # the block ended while someone still holds this wrapper
                    return inner(*args, **kwargs)
                if compiling():  # traced by torch.compile: run eagerly, the graph breaks here
                    return skipped(*args, **kwargs)
                return run(*args, **kwargs)

        else:

            @functools.wraps(inner)
            def forward(module: Any, *args: Any, **kwargs: Any) -> Any:
                if module is not model or not wrap.active:
                    return inner(module, *args, **kwargs)
                if compiling():
                    return skipped(*args, **kwargs)
                return run(*args, **kwargs)

        forward.kvtrace_wrapper = True  # type: ignore[attr-defined]  # what a leak check looks for
        self._wrapper = forward
        self.active = True
        owner.forward = forward

    def uninstall(self) -> None:
        """Put the `forward` kvtrace replaced back, unless other code has set another one over kvtrace's since
        (that one keeps calling kvtrace's wrapper, which now only passes the call through)."""
        self.active = False
        owner, wrapper = self._owner, self._wrapper
        if wrapper is None:
            return
        self._wrapper = self._owner = None
        if owner.__dict__.get("forward") is not wrapper:
            return
        if self._had_own:
            owner.forward = self._own
        elif isinstance(owner, type):
            delattr(owner, "forward")
        else:
            del owner.__dict__["forward"]
