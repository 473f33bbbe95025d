"""When a module cache's old storage is released, relative to the new storages beside it.

The scan comes after the forward, so it sees each layer's new tensors but not when the old ones went. Each
logged storage is watched through a weak reference whose callback CPython runs at its very release
(`Releases.released`); what is bound by then tells which new storages the old one lived beside:

- a sibling slot of its layer holding its new tensor while its own old storage is alive too (the old K and
  V kept in locals until the layer returns): the layer's frees are logged after all its new storages;
- a sibling not rebound yet, but whose new tensor the running statement made already and stores next
  (`self.k_cache, self.v_cache = torch.cat(...), torch.cat(...)`, both copies made before either store):
  the same, read from the frame's bytecode (`store_verdict`), once per statement;
- later layers' slots holding their new tensors (old caches kept on a list until the step ends): this
  storage's free is logged after the new storages of the furthest of them (`Releases.holds`), unless it is
  released by its own slot's store (`store_verdict`): then those layers ran before its own (layers run in
  another order than registered, `for layer in self.layers[::-1]`), and the scan logs the layers in the
  order of their releases (`Releases.reordered`), each free after its own new storage.
"""

from __future__ import annotations

import dis
import sys
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import weakref

    from kvtrace.integrations.module_cache_slots import _Owner

# Instructions that make no tensor: between two stores, they show the second store's value made before
# the first store ran (a local, the stack reordered). Not a constant: `self.k_cache = None; self.v_cache =
# None` stores one, no tensor made before
_MAKES_NOTHING = frozenset(
    [
        "CACHE",
        "COPY",
        "DUP_TOP",
        "DUP_TOP_TWO",
        "EXTENDED_ARG",
        "LOAD_ATTR",
        "LOAD_CLOSURE",
        "LOAD_DEREF",
        "LOAD_FAST",
        "LOAD_FAST_AND_CLEAR",
        "LOAD_FAST_BORROW",
        "LOAD_FAST_BORROW_LOAD_FAST_BORROW",
        "LOAD_FAST_CHECK",
        "LOAD_FAST_LOAD_FAST",
        "LOAD_GLOBAL",
        "LOAD_NAME",
        "NOP",
        "POP_TOP",
        "ROT_FOUR",
        "ROT_THREE",
        "ROT_TWO",
        "STORE_ATTR",
        "STORE_DEREF",
        "STORE_FAST",
        "STORE_FAST_LOAD_FAST",
        "STORE_FAST_STORE_FAST",
        "STORE_NAME",
        "SWAP",
    ]
)
_FRAMES_UP = 3  # from the release to the statement storing the attribute: Module.__setattr__ between


def _store_verdict(code: CodeType, lasti: int, attr: str, sibling: str) -> bool | None:
    """None when the instruction at `lasti` is no store to `attr`; else whether a store to `sibling`
    follows with nothing between that could make a tensor (its value was made before)."""
    instructions = list(dis.get_instructions(code))
    at = next((i for i, ins in enumerate(instructions) if ins.offset == lasti), None)
    if at is None or instructions[at].opname != "STORE_ATTR" or instructions[at].argval != attr:
        return None
    for ins in instructions[at + 1 :]:
        if ins.opname == "STORE_ATTR" and ins.argval == sibling:
            return True
        if ins.opname not in _MAKES_NOTHING:
            return False
    return False


def store_verdict(
    attr: str, sibling: str, verdicts: dict[tuple[int, int, str, str], tuple[CodeType, bool | None]]
) -> bool | None:
    """None when no statement a few frames up (the release runs inside its store, `Module.__setattr__`
    maybe between) is storing `attr`; else whether it stores `sibling` next from a value it made already.
    Called by `Releases.released` itself: the frames counted from there. `verdicts` keeps each (code,
    offset)'s answer, by the code's id (a code object hashes its whole bytecode) beside the code itself,
    which keeps that id its own: one dict look-up per frame after the first step."""
    # the frame whose store let the storage go, or Module.__setattr__ under it
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_FRAMES_UP):
        if frame is None:
            return None
        code = frame.f_code
        key = (id(code), frame.f_lasti, attr, sibling)
        known = verdicts.get(key)
        if known is None:
            known = verdicts[key] = (code, _store_verdict(code, frame.f_lasti, attr, sibling))
        if known[1] is not None:
            return known[1]
        frame = frame.f_back
    return None


class Releases:
    """What the watched storages' releases told since the last scan, for `ModuleCaches.scan`. Shared with
    the callbacks, so emptied in place, never replaced."""

    def __init__(self) -> None:
        self.late: set[tuple[int, int]] = set()  # (cache, layer)s whose frees come after all their new ones
        # id(owner) -> (owner, the (cache, layer) of the furthest later slot holding its new tensor by then)
        self.holds: dict[int, tuple[_Owner, tuple[int, int]]] = {}
        self.owners: list[_Owner] = []
        # The owners whose logged storage was released, in the order released (`ModuleCaches._run_order`)
        self.gone: list[_Owner] = []
        self.reordered = False  # a slot released by its own store after a later-registered one was rebound
        self._rebound = (0, 0)  # [start, end) of `owners` seen rebound since the last scan (they stay so)
        self._verdicts: dict[tuple[int, int, str, str], tuple[CodeType, bool | None]] = {}

    def clear(self) -> None:
        self.late.clear()
        self.holds.clear()
        self.gone.clear()
        self.reordered = False
        self._rebound = (0, 0)

    def released(self, owner: _Owner, ref: weakref.ref[Any]) -> None:
        """Run by CPython as the storage `owner` last logged is released. Not where a sibling's old storage
        went first (V rebound, then K, each directly: old V was freed before K's cat), nor for a storage
        released as its own slot is rebound and nothing else new is bound: its free is logged right after
        its new one. Nor where its slot now holds no tensor (`self.k_cache = None`, `del self.k_cache`: the
        attribute's new value is in place before the old one is dropped): a cache let go, not regrown, its
        free logged where it happened, before anything made since."""
        if owner.watch is not ref:  # a storage the owner no longer watches
            return
        owner.watch = None
        self.gone.append(owner)
        if owner.cleared():
            return
        for other in owner.siblings:
            if other.rebound_beside_old() or (
                other.watch is not None
                and not other.rebound()
                and store_verdict(owner.attr, other.attr, self._verdicts) is True
            ):
                self.late.add((owner.cache, owner.layer))
                break
        # Later slots holding their new tensors (each one identity test: the first not rebound ends it)
        start = owner.after
        begin, end = self._rebound
        index = end if begin <= start <= end else start
        owners = self.owners
        while index < len(owners) and owners[index].rebound():
            index += 1
        self._rebound = (begin, index) if begin <= start <= end else (start, index)
        # Released by its own store (`self.k_cache = ...`) while a slot registered later holds its new tensor
        # already: that one ran first (layers run in another order than registered, a module's second
        # K/V pair grown first), its new storages made before this one's, not beside an old one kept
        # until the step ends. The scan then logs in the order of the releases (`ModuleCaches._run_order`).
        ahead = index > start or any(other.rebound() for other in owner.later_pairs)
        if ahead and store_verdict(owner.attr, "", self._verdicts) is not None:
            self.reordered = True
        elif index > start:
            last = owners[index - 1]
            self.holds[id(owner)] = (owner, (last.cache, last.layer))
