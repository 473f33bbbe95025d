"""What a model's forward arguments say about its KV cache, read without a device sync.

At each forward the recorder needs to know whether its cache is empty (a prefill; a `generate()` call's first
forward is one too, which `kvtrace.integrations.hf_generate` tells) or holds tokens (a decode step), how
many tokens it appends per row, and, for caches it cannot ask (Meta's preallocated `cache_k`/`cache_v`),
where it writes. The cache's own state comes first; the arguments' shapes only when nothing else says.
Nothing here reads a tensor's values: shapes and Python ints only.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvtrace.integrations.hf_caches import HfCacheHooks

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class ForwardSignature:
    """Where a model's forward takes Meta's arguments: `forward(tokens, start_pos)`, `tokens` being
    [batch, seq] ids (or [batch, seq, hidden] states) and `start_pos` the int position its cache writes
    from. Read once per recording, from the signature: the names say what the arguments are, and where no
    parameter is named `start_pos`, an int passed as the second positional argument (`model(ids, pos)`) is
    the position, as `is_prefill` reads it (a tensor there, gpt-fast's `input_pos`, says nothing)."""

    first: str | None = None  # the first positional parameter's name
    start_pos_at: int | None = None  # `start_pos`'s index among the positional parameters
    takes_start_pos: bool = False
    second: str | None = None  # the second positional parameter's name, read where none is `start_pos`

    @classmethod
    def of(cls, model: Any) -> ForwardSignature:
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (AttributeError, TypeError, ValueError):
            return cls()
        positional = [p.name for p in params if p.kind in _POSITIONAL]
        return cls(
            first=positional[0] if positional else None,
            start_pos_at=positional.index("start_pos") if "start_pos" in positional else None,
            takes_start_pos=any(p.name == "start_pos" for p in params),
            second=positional[1] if len(positional) > 1 else None,
        )

    def start_pos(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        """The forward's `start_pos` (else its second positional argument) when it is an int; else None."""
        if self.takes_start_pos:
            at = self.start_pos_at
            value = kwargs.get("start_pos", args[at] if at is not None and len(args) > at else None)
        elif self.second is not None:
            value = args[1] if len(args) > 1 else kwargs.get(self.second)
        else:
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def progress(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """(tokens per row, rows) a forward leaves in a cache it writes from `start_pos` on: `start_pos` plus
        its input's length, over its input's rows (Meta's `cache_k[:bsz, start_pos : start_pos + seqlen]`).
        None when the forward does not say."""
        start_pos = self.start_pos(args, kwargs)
        if start_pos is None:
            return None
        fed = self._fed(args, kwargs)
        if fed is None:
            return None
        return start_pos + int(fed.shape[1]), int(fed.shape[0])

    def rows(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """The rows of the forward's input ([batch, seq] ids or [batch, seq, hidden] states), whose rows its
        cache is written for, also where it does not say where (gpt-fast's `forward(idx, input_pos)`); 0
        when its first argument is no such tensor."""
        fed = self._fed(args, kwargs)
        return 0 if fed is None else int(fed.shape[0])

    def _fed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The forward's first argument where it is a tensor of at least 2 dims; else None."""
        fed = args[0] if args else kwargs.get(self.first) if self.first else None
        return fed if isinstance(fed, torch.Tensor) and fed.dim() >= 2 else None


def new_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Tokens a forward appends to each row of its cache: the length of its input ids (or embeddings)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        shape = ids.shape  # one read (not `dim()` too): this runs at every step, cold (issue 11)
        if len(shape) >= 2:
            return int(shape[1])
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 3:
        return int(embeds.shape[1])
    return 0


def is_prefill(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cache: Any,
    hooks: HfCacheHooks | None = None,
    held: int | None = None,
) -> bool:
    """Prefill when the cache the forward writes is empty: an HF cache passed in, or `held`, the tokens the
    model's own caches hold before it (Meta's `start_pos`, tracked tensors) when known. Without either, the
    arguments: `start_pos == 0`, then the positions fed ([batch, seq] ids, [batch, seq, hidden] embeddings
    or hidden states: axis 1, never the hidden size) more than one."""
    if cache is not None and hooks is not None:
        known = hooks.held_tokens(cache)  # the recorder's own count: a static cache's is a tensor (a sync)
        if known is not None:
            return known == 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        with contextlib.suppress(Exception):
            return int(cache.get_seq_length()) == 0
    if held is not None:
        return held == 0
    start_pos = kwargs.get("start_pos", args[1] if len(args) > 1 and isinstance(args[1], int) else None)
    if isinstance(start_pos, int):
        return start_pos == 0
    if cache is None and "past_key_values" in kwargs:
        return True
    fed = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(fed, torch.Tensor):
        fed = kwargs.get("inputs_embeds")
    return isinstance(fed, torch.Tensor) and fed.dim() >= 2 and fed.shape[1] > 1
