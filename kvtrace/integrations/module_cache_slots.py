"""What one module cache slot is: the attribute names that hold a KV cache, how a module's names pair into
K/V caches, which layer a module is, and which dim of a slot's tensor holds positions (its layout).

Why apart from `kvtrace.integrations.module_caches`: these decide what a slot is, once, at discovery (and a
guessed layout at each scan, `_seq_dim`); `ModuleCaches` there scans the slots and logs what changed.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtrace.format import MODULE_CACHE_ID
from kvtrace.kv_slots import dead_ref

# Attribute names that hold a KV cache, mapped to K or V. Extend by passing `cache_attrs=` to `record()`,
# where a name may map to ("k", "bhsd") to say its layout too.
DEFAULT_CACHE_ATTRS: dict[str, str] = {
    "cache_k": "k",
    "cache_v": "v",
    "k_cache": "k",
    "v_cache": "v",
    "key_cache": "k",
    "value_cache": "v",
}

# A tracked tensor's layout names its log part, so the analyzers (no torch) know which dim holds tokens:
# "tracked" for Hugging Face's [batch, kv_heads, seq, head_dim], "tracked_bshd" for Meta's and
# flash-attn's [batch, seq, kv_heads, head_dim] (the layout module `buffer`s have).
TRACK_LAYOUTS: dict[str, str] = {"bhsd": "tracked", "bshd": "tracked_bshd"}

# A module cache's layout names its log part as a tracked tensor's does: "buffer" for [batch, seq, kv_heads,
# head_dim] (Meta's, and any cache whose layout nothing tells), "buffer_bhsd" for [batch, kv_heads, seq,
# head_dim].
MODULE_LAYOUTS: dict[str, str] = {"bshd": "buffer", "bhsd": "buffer_bhsd"}

# Pairs of names whose code has one layout, where a module holds both: gpt-fast's KVCache.
CONVENTION_LAYOUTS: dict[frozenset[str], str] = {frozenset(("k_cache", "v_cache")): "bhsd"}

# Where models keep their KV heads count: Meta's and gpt-fast's attention (`n_local_kv_heads`, `n_kv_heads`),
# Meta's ModelArgs, transformers' configs.
_KV_HEADS_ATTRS = ("n_local_kv_heads", "n_kv_heads", "num_key_value_heads", "num_kv_heads")
_CONFIG_ATTRS = ("config", "params", "args")

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_KV_WORDS = frozenset(("k", "v", "key", "value", "keys", "values"))


@dataclass(eq=False)
class _Owner:
    # Weakly: a cache module the model drops (gpt-fast's `setup_caches()` called again) must die, and free
    # its buffers, as it would unrecorded
    module_ref: weakref.ref[torch.nn.Module]
    attr: str
    kv: str
    layer: int
    # Its KV log `cache`: 1000 + its K/V pair's rank among its layer's (`pair_cache_attrs`; MODULE_CACHE_IDS)
    cache: int = MODULE_CACHE_ID
    layout: str = ""  # "bhsd" | "bshd"; "" until the first tensor decides (`module_cache_layout`)
    # Its layout Meta's by default, nothing having told it: its sequence dim unknown but where it changes
    # between scans (`_Extent.see`)
    guessed: bool = False
    shape: tuple[int, ...] = ()  # its tensor's shape at the last scan
    heads: tuple[int, ...] = ()  # the KV heads counts its model and modules say, nearest first
    # The other slots of its layer and cache (`Releases.released`): where one holds a new tensor beside its
    # still-alive old storage when this one's storage is released, the layer made its new storages before
    # letting the old ones go
    siblings: tuple[_Owner, ...] = ()
    after: int = 0  # the index in `ModuleCaches.owners` of the first slot past its module's
    later_pairs: tuple[_Owner, ...] = ()  # the slots of its module's K/V pairs ranked after its own
    seen: Callable[[], Any] = dead_ref  # the tensor last logged, weakly
    version: int = -1  # its `_version` at the last scan (-1: unreadable, an inference tensor)
    watch: weakref.ref[Any] | None = None  # its storage, weakly, with `Releases.released` as the callback
    addr: int = 0  # that storage's address

    def rebound(self) -> bool:
        """Whether the attribute holds a tensor other than the one last logged (made since)."""
        module = self.module_ref()
        if module is None:
            return False
        tensor = getattr(module, self.attr, None)
        return isinstance(tensor, torch.Tensor) and tensor is not self.seen()

    def cleared(self) -> bool:
        """Whether the attribute holds no tensor now (set to None, deleted), its module alive."""
        module = self.module_ref()
        return module is not None and not isinstance(getattr(module, self.attr, None), torch.Tensor)

    def rebound_beside_old(self) -> bool:
        """Whether the attribute holds a new tensor while the storage last logged is still alive apart
        from it (kept in a local, or by the torch.cat still running): both were held at once."""
        if not self.rebound() or self.watch is None:
            return False
        old = self.watch()
        tensor = self.tensor()
        if old is None or not isinstance(tensor, torch.Tensor):
            return False
        return _storage_addr(tensor) != int(old.data_ptr())

    def tensor(self) -> Any:
        """What the attribute holds now; None once its module is gone."""
        module = self.module_ref()
        return None if module is None else getattr(module, self.attr, None)


@dataclass(eq=False)
class _Extent:
    """What one scan saw of a module cache's tensors (K and V), to bound the tokens its forward said."""

    positions: int | None = None  # the fewest positions along a tensor's sequence dim (None: not 4-D)
    unchanged: bool = True  # every tensor the one last scanned, its version readable and unmoved
    made: bool = True  # every tensor new since the last scan, never written in place (version 0)

    def see(self, owner: _Owner, tensor: torch.Tensor) -> None:
        """Add `owner`'s `tensor`, and remember its version for the next scan: one read per slot."""
        shape = tuple(tensor.shape)
        seq_dim = _seq_dim(owner, shape)
        owner.shape = shape
        if seq_dim is not None:
            seq = shape[seq_dim]
            self.positions = seq if self.positions is None else min(self.positions, seq)
        try:
            version = tensor._version
        except RuntimeError:  # an inference tensor: its in-place writes are invisible
            version = -1
        same = tensor is owner.seen()
        self.unchanged &= same and version >= 0 and version == owner.version
        self.made &= not same and version == 0
        owner.version = version


def split_cache_attrs(cache_attrs: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """`record(cache_attrs=...)` as (name -> "k"/"v", name -> the layout said): a name maps to "k" or "v",
    or to ("k", "bhsd") / ("v", "bshd") where the user says the layout."""
    kinds: dict[str, str] = {}
    layouts: dict[str, str] = {}
    for attr, said in cache_attrs.items():
        if isinstance(said, str):
            kinds[attr] = said
        else:
            kinds[attr], layouts[attr] = said
    return kinds, layouts


def kv_heads_hints(model: torch.nn.Module, name: str) -> tuple[int, ...]:
    """The KV heads counts said on the modules from `name` up to `model`, then on the model's config
    (`config`, Meta's `params`): a 4-D cache whose dim 1 or 2 (not both) is that count has its heads there."""
    modules = [model]
    for part in name.split(".") if name else ():
        child = getattr(modules[-1], part, None)
        if not isinstance(child, torch.nn.Module):
            break
        modules.append(child)
    holders: list[Any] = modules[::-1]
    holders += [getattr(model, attr, None) for attr in _CONFIG_ATTRS]
    hints: list[int] = []
    for holder in holders:
        for attr in _KV_HEADS_ATTRS:
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                hints.append(value)
    return tuple(hints)


def _seq_dim(owner: _Owner, shape: tuple[int, ...]) -> int | None:
    """The dim of a 4-D `shape` that holds `owner`'s positions, where known: its layout's when something
    told it; for a guessed one, the one of dims 1 and 2 that changed since the last scan (a cache grown by
    torch.cat), its heads never changing. None otherwise: a guess read as positions would take a
    [batch, kv_heads, seq, head_dim] cache's heads for its tokens."""
    if len(shape) != 4:
        return None
    if not owner.guessed:
        return 2 if owner.layout == "bhsd" else 1
    last = owner.shape
    if len(last) != 4 or last[0] != shape[0] or last[3] != shape[3]:
        return None
    if (last[1] != shape[1]) == (last[2] != shape[2]):
        return None
    return 1 if last[1] != shape[1] else 2


def module_cache_layout(
    owner: _Owner, module: torch.nn.Module, shape: tuple[int, ...], said: str | None
) -> str | None:
    """The layout of `owner`'s cache: the user's (`cache_attrs`); else the dim, 1 or 2, that the model's KV
    heads count matches alone; else its names' convention (`CONVENTION_LAYOUTS`: both names on the module);
    else None: nothing tells, and the cache is read as Meta's [batch, seq, kv_heads, head_dim], as module
    caches always were, its positions unknown."""
    if said is not None:
        return said
    if len(shape) == 4 and shape[1] != shape[2]:
        for heads in owner.heads:
            if (shape[1] == heads) != (shape[2] == heads):
                return "bhsd" if shape[1] == heads else "bshd"
    for names, layout in CONVENTION_LAYOUTS.items():
        if owner.attr in names and all(
            isinstance(getattr(module, other, None), torch.Tensor) for other in names
        ):
            return layout
    return None


def _storage_addr(tensor: torch.Tensor) -> int:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # meta or fake tensors
        return 0


def module_pattern(name: str) -> str:
    """`layers.3.cross_attn` -> `layers.*.cross_attn`: the path of a layer's module, whatever the layer."""
    match = _LAYER_NUMBER.search(name)
    return name if match is None else f"{name[: match.start(1)]}*{name[match.end(1) :]}"


def _attr_stem(attr: str) -> str:
    """`k_cache_local` -> `cache_local`: the name without its K or V word, shared by a pair's two names."""
    return "_".join(word for word in attr.split("_") if word.lower() not in _KV_WORDS)


def pair_cache_attrs(held: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """A module's cache attributes (name, "k"/"v", in `cache_attrs`' order) as K/V pairs, each pair a cache
    of its own: a module may hold two (`k_cache`/`v_cache` beside `k_cache_local`/`v_cache_local`), whose
    tensors would overwrite each other's in one slot. A K pairs with the V named as it is but for its K/V
    word, else with the next V left; one left alone is a cache of its own."""
    keys = [attr for attr, kv in held if kv == "k"]
    values = [attr for attr, kv in held if kv != "k"]
    pairs: list[list[str]] = []
    for key in list(keys):
        twin = next((v for v in values if _attr_stem(v) == _attr_stem(key)), None)
        if twin is not None:
            pairs.append([key, twin])
            keys.remove(key)
            values.remove(twin)
    pairs += [[key, value] for key, value in zip(keys, values, strict=False)]
    pairs += [[attr] for attr in keys[len(values) :] + values[len(keys) :]]
    kinds = dict(held)
    order = {attr: index for index, (attr, _) in enumerate(held)}
    pairs.sort(key=lambda pair: min(order[attr] for attr in pair))
    return [[(attr, kinds[attr]) for attr in pair] for pair in pairs]


def layer_from_name(name: str, fallback: int) -> int:
    """`layers.3.attention` -> 3; modules without a number keep their discovery order."""
    match = _LAYER_NUMBER.search(name)
    return int(match.group(1)) if match else fallback
