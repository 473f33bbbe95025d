"""Where the recorder's steps begin and end: kvtrace's own `forward` on the model, around the model's.

Forward hooks fire only when the model is called (`model(...)`). Meta's reference `Llama3.generate` calls
`model.forward(...)` directly, so hooked, its prefill and decode steps were never seen. The `forward`
attribute is what both reach (`Module._call_impl` looks it up on the model too). Wrapping it also spares
torch's hooked call path, a few µs a forward on a nearly free model (issue 11).

The wrapper is set on the model's class and acts for that instance only (a deep copy or a pickle of the
model carries nothing of kvtrace's); a `forward` set on the instance itself (a compiled one, accelerate's
hooks) shadows the class's, so it is wrapped there instead. Either is put back at the end. The wrapper
keeps the wrapped method's signature (`functools.wraps`: `inspect.signature` follows `__wrapped__`, which
`generate()` reads to know which arguments the model takes).

Under torch.compile, kvtrace's own code must neither be traced nor break the user's graph. transformers'
compiled decoding (`CompileConfig`: generate() calls `torch.compile(model.__call__)`, by default with a
graph of the whole call, `fullgraph=True` refusing any break) is taken from outside: the model's
`get_compiled_call` returns the compiled call wrapped, the step's start and end run around it eagerly, and
inside the graph kvtrace's `forward` is a plain pass-through that dynamo inlines. A module compiled some
other way (`torch.compile(model)` called directly) reaches the wrapper from inside its graph, which then
breaks there: the start and end run eagerly behind `torch.compiler.disable`, and the model's own forward
below is compiled as its own frame.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtrace.attr_patch import AttrPatch
from kvtrace.integrations.hf_caches import compiling

Before = Callable[[Any, tuple[Any, ...], dict[str, Any]], None]
After = Callable[[Any, tuple[Any, ...], Any], None]


class _Raised:
    """The type of `RAISED`: what `after` is given as the output of a forward that raised."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RAISED"


# `after`'s output where the forward raised (an OOM, a Ctrl-C part-way through its layers): not None, which a
# forward may return, so that the step's end can say its forward never finished.
RAISED: Any = _Raised()


class ForwardWrap:
    """Runs `before(model, args, kwargs)` and `after(model, args, output)` around every forward of `model`;
    `after` also when the forward raises, with `output` `RAISED` (as an always-called forward hook)."""

    def __init__(self, model: Any, before: Before, after: After) -> None:
        self.model = model
        self._before = before
        self._after = after
        self._patches: list[AttrPatch] = []  # kvtrace's `forward` (and `get_compiled_call`), to put back
        self.active = False
        # Inside a call whose step kvtrace's compiled-call wrapper already begins and ends: pass through
        self.outer = False

    def install(self) -> None:
        model = self.model
        if "forward" in model.__dict__:
            # A `forward` set on the instance (a compiled one, accelerate's hooks) shadows the class's
            self._wrap(model, model.forward, bound=True)
        else:
            # On the class, for this instance only: a deep copy or a pickle of the model (an assistant made
            # from it) holds nothing of kvtrace's, and other instances of the class pass straight through.
            self._wrap(type(model), type(model).forward, bound=False)
        self._wrap_compiled_call()

    def _wrap(self, owner: Any, inner: Callable[..., Any], bound: bool) -> None:
        model, before, after, wrap = self.model, self._before, self._after, self
        call = inner if bound else types.MethodType(inner, model)  # bound once: a plain call per forward

        def run(*args: Any, **kwargs: Any) -> Any:
            return around(before, after, model, call, args, kwargs)

        skipped = run
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        if disable is not None:
            # Reached from inside a graph: this frame and the step's start and end run eagerly (dynamo
            # would trace into them otherwise), the model's forward below is compiled as its own frame
            before_eager, after_eager = disable(before), disable(after)

            def run_eagerly(*args: Any, **kwargs: Any) -> Any:
                return around(before_eager, after_eager, model, call, args, kwargs)

            skipped = disable(run_eagerly, recursive=False)

        if bound:

            @functools.wraps(inner)
            def forward(*args: Any, **kwargs: Any) -> Any:
                # The block ended while someone still holds this wrapper, or the step is taken outside
                if not wrap.active or wrap.outer:
                    return inner(*args, **kwargs)
                if compiling():  # traced by torch.compile: run eagerly, the graph breaks here
                    return skipped(*args, **kwargs)
                # `around`, inline: a frame and a copy of the arguments less per forward (issue 11)
                before(model, args, kwargs)
                try:
                    output = call(*args, **kwargs)
                except BaseException:
                    after(model, args, RAISED)
                    raise
                after(model, args, output)
                return output

        else:

            @functools.wraps(inner)
            def forward(module: Any, *args: Any, **kwargs: Any) -> Any:
                if module is not model or not wrap.active or wrap.outer:
                    return inner(module, *args, **kwargs)
                if compiling():
                    return skipped(*args, **kwargs)
                before(model, args, kwargs)  # `around`, inline
                try:
                    output = call(*args, **kwargs)
                except BaseException:
                    after(model, args, RAISED)
                    raise
                after(model, args, output)
                return output

        forward.kvtrace_wrapper = True  # type: ignore[attr-defined]  # what a leak check looks for
        self.active = True
        self._patches.append(AttrPatch(owner, "forward", forward))

    def _wrap_compiled_call(self) -> None:
        """transformers' compiled decoding: its compiled call, wrapped, so that the step begins and ends
        outside the graph. Set on the model's class for this instance only, as `forward` is (a copy or a
        pickle of the model holds nothing of kvtrace's); put back at the end."""
        model, before, after, wrap = self.model, self._before, self._after, self
        cls = type(model)
        original = getattr(cls, "get_compiled_call", None)
        if original is None or "get_compiled_call" in vars(model):
            return

        @functools.wraps(original)
        def get_compiled_call(module: Any, *args: Any, **kwargs: Any) -> Any:
            compiled = original(module, *args, **kwargs)
            if module is not model or not wrap.active:
                return compiled

            def call(*args: Any, **kwargs: Any) -> Any:
                if not wrap.active or wrap.outer:
                    return compiled(*args, **kwargs)
                wrap.outer = True
                try:
                    return around(before, after, model, compiled, args, kwargs)
                finally:
                    wrap.outer = False

            return call

        get_compiled_call.kvtrace_wrapper = True  # type: ignore[attr-defined]
        self._patches.append(AttrPatch(cls, "get_compiled_call", get_compiled_call))

    def uninstall(self) -> None:
        """Put back what kvtrace replaced, unless other code has set another over it since (that one keeps
        calling kvtrace's wrapper, which now only passes the call through)."""
        self.active = False
        while self._patches:
            self._patches.pop().undo()


def around(before: Before, after: After, model: Any, call: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """`call(*args, **kwargs)` between `before` and `after`; `after` also when it raises (output `RAISED`),
    and the exception goes on."""
    before(model, args, kwargs)
    try:
        output = call(*args, **kwargs)
    except BaseException:
        after(model, args, RAISED)
        raise
    after(model, args, output)
    return output


# The frame every `module(...)` call runs through; its locals are only `self`, `args` and `kwargs`, which the
# frame holds until it returns anyway, so reading them (Python < 3.13 copies a frame's locals into a dict
# that lives as long as the frame) keeps nothing alive longer.
_MODULE_CALL = getattr(torch.nn.Module, "_wrapped_call_impl", torch.nn.Module._call_impl).__code__


@dataclass(frozen=True)
class SubmoduleCall:
    """A submodule of the recorded model called directly (`model.model(...)`): its forwards begin no step."""

    path: str  # from the model, as Python reaches it: ".model", ".model.layers[0]"
    kind: str  # its class's name
    record_path: str | None  # the module to pass to record() for steps (its decoder); None: takes no cache


def running_submodule(model: Any) -> SubmoduleCall | None:
    """The outermost of `model`'s submodules called (`module(...)`) on this thread's stack, one called
    directly, outside the model's own forward; None when no submodule of the model runs. Walks the stack:
    for a cache first updated outside the model's steps, once per cache."""
    members = {id(module): module for module in model.modules() if module is not model}
    outermost = None
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _MODULE_CALL:
            module = frame.f_locals.get("self")
            if members.get(id(module)) is module:
                outermost = module
        frame = frame.f_back
    if outermost is None:
        return None
    paths = {id(module): _python_path(name) for name, module in model.named_modules() if name}
    decoder = _decoder(model)
    if decoder is None or not any(module is outermost for module in decoder.modules()):
        decoder = outermost
    try:
        parameters = set(inspect.signature(decoder.forward).parameters)
    except (TypeError, ValueError):  # no signature to read
        parameters = set()
    record_path = paths.get(id(decoder)) if parameters & {"past_key_values", "cache"} else None
    return SubmoduleCall(paths[id(outermost)], type(outermost).__name__, record_path)


def _decoder(model: Any) -> Any:
    """The model's decoder backbone (`get_decoder()`, transformers' `model.model`), or None."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # a model whose get_decoder does not apply (no decoder)
        return None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def _python_path(name: str) -> str:
    """`layers.0.self_attn` as Python reaches it from the model: `.layers[0].self_attn`."""
    return "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split("."))
