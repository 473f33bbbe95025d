"""One method of kvtrace's set over a recorded model's, and put back when the recording ends.

kvtrace sets its `forward`, `get_compiled_call` and `_apply` on the model's class (acting for the recorded
instance only: a copy or a pickle of the model holds nothing of kvtrace's), or on the instance itself
when the instance holds its own (a compiled `forward`, accelerate's hooks), which shadows the class's.
"""

from __future__ import annotations

from typing import Any


class AttrPatch:
    """`owner.name = value` now; `undo()` puts back what was there (the owner's own, or nothing)."""

    __slots__ = ("_had_own", "_own", "name", "owner", "value")

    def __init__(self, owner: Any, name: str, value: Any) -> None:
        own = vars(owner)
        self.owner: Any = owner
        self.name = name
        self.value = value
        self._had_own = name in own
        self._own = own.get(name)
        _set(owner, name, value)

    def undo(self) -> None:
        """Put back what was there, unless other code has set another over kvtrace's since (that one keeps
        calling kvtrace's, which by then passes every call through). Safe to call twice."""
        owner, name = self.owner, self.name
        if owner is None:
            return
        self.owner = None
        if vars(owner).get(name) is not self.value:
            return
        if self._had_own:
            _set(owner, name, self._own)
        elif isinstance(owner, type):
            delattr(owner, name)
        else:
            del owner.__dict__[name]


def _set(owner: Any, name: str, value: Any) -> None:
    if isinstance(owner, type):
        setattr(owner, name, value)
    else:  # past nn.Module.__setattr__: a function is no parameter, buffer or submodule
        owner.__dict__[name] = value
