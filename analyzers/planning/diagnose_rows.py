"""Which of a diagnosis's live allocations beside the KV shrink with the batch: the activations a smaller
batch frees besides its KV (analyzers.planning.diagnose_remedies' batch remedy). Pure, torch-free.

The allocator events carry sizes, not shapes, and the report attributes only KV and weights. A tensor
whose first dimension is the batch is `rows x (a model width) x positions x element bytes`: the logits
(`vocab_size`, float32 or the model's dtype: generate keeps several copies at a decode step), the hidden
states, attention's queries and its K and V expanded to the query heads (`heads x head_dim`, over the
cache's positions), and the int64 token ids, attention mask and positions (a width of 1). An allocation of
such a size is counted as the batch's; any other (the MLP's intermediate width the run's geometry does not
give, scalars) is counted as fixed, and so is any of a size a vocabulary-long vector has (the logits
processors' arange and masks, whatever the batch), so that the figure is at most what a smaller batch
frees; where a batch-first tensor has that size too (at batch 2 the float32 logits), one allocation of it
is the vector's and the others the batch's. A fixed allocation that happens to have a batch-first size
would be counted too: the widths are the model's own and the positions at most the cache's, which keeps
that rare.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["beside_at_rows", "fixed_sizes", "fixed_vector_bytes", "row_activation_bytes", "row_units"]

_FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_INT64_BYTES = 8  # token ids, attention masks, position ids


def fixed_sizes(geometry: dict[str, Any] | None) -> set[int]:
    """Sizes that do not follow the rows: a vector over the vocabulary, of any dtype (generate's logits
    processors make an int64 `arange` of it and boolean masks, at every step). A batch-first tensor of that
    size (at batch 2, the float32 logits are as large) is then counted as fixed too."""
    vocab = (geometry or {}).get("vocab_size")
    return {vocab * size for size in (1, 2, 4, 8)} if isinstance(vocab, int) and vocab > 0 else set()


def row_units(geometry: dict[str, Any] | None) -> set[int]:
    """Bytes of one position of one row of each batch-first tensor the model makes: its widths (vocabulary,
    hidden size, query heads' and KV heads' head_dim) at float32 (logits are upcast) and at its own dtype,
    and an int64. Empty without the widths."""
    geometry = geometry or {}
    head_dim, heads, kv_heads = (
        geometry.get(key) for key in ("head_dim", "num_attention_heads", "num_kv_heads")
    )
    widths = [geometry.get("vocab_size"), geometry.get("hidden_size")]
    if isinstance(head_dim, int):
        widths += [heads * head_dim if isinstance(heads, int) else None]
        widths += [kv_heads * head_dim if isinstance(kv_heads, int) else None]
    element_bytes = {4, _FLOAT_BYTES.get(str(geometry.get("dtype")), 4)}
    units = {
        width * size for width in widths if isinstance(width, int) and width > 0 for size in element_bytes
    }
    return units | {_INT64_BYTES} if units else set()


def row_activation_bytes(
    sizes: Iterable[int], rows: int, units: set[int], positions: int, fixed: set[int] | None = None
) -> int:
    """Bytes of the allocations among `sizes` that are `rows` x a unit of `units` x 1 to `positions`
    positions, and not of a size in `fixed`: those a smaller batch shrinks in proportion.

    Where a size is both (at batch 2 the float32 logits are as long as an int64 vector over the
    vocabulary), one allocation of it is counted as fixed and the others as the batch's: the logits
    processors make one such vector at a step, generate keeps several copies of the logits."""
    return _split(sizes, rows, units, positions, fixed or set())[0]


def fixed_vector_bytes(
    sizes: Iterable[int], rows: int, units: set[int], positions: int, fixed: set[int] | None = None
) -> int:
    """Bytes of the allocations among `sizes` taken as the vocabulary-long vectors of `fixed`, which no
    smaller batch frees (`row_activation_bytes` counts the rest of a size both can be)."""
    return _split(sizes, max(rows, 1), units, max(positions, 1), fixed or set())[1]


def beside_at_rows(beside: int, row_bytes: int, run_rows: int, rows: int) -> int:
    """What a decode step's end holds beside the weights and KV at `rows`, fewer than the run's `run_rows`:
    the run's most (`beside`), its batch-first `row_bytes` freed in proportion, the rest (the logits
    processors' vectors over the vocabulary) kept: `kvtrace plan --from-run` and `kvtrace diagnose`'s batch
    remedy price a step's end at fewer rows than a run that peaked at its prefill with it
    (analyzers.planning.decode_step_end)."""
    return beside - round(min(row_bytes, beside) * (run_rows - rows) / run_rows)


def _split(
    sizes: Iterable[int], rows: int, units: set[int], positions: int, fixed: set[int]
) -> tuple[int, int]:
    """(bytes that follow the rows, bytes of the fixed sizes) among `sizes`."""
    if rows < 1 or positions < 1:
        return 0, 0
    follow, still, fixed_seen = 0, 0, set()
    for nbytes in sizes:
        if nbytes <= 0:
            continue
        batch_first = bool(units) and nbytes % rows == 0 and _is_row(nbytes // rows, units, positions)
        if nbytes in fixed and (not batch_first or nbytes not in fixed_seen):
            fixed_seen.add(nbytes)
            still += nbytes
        elif batch_first:
            follow += nbytes
    return follow, still


def _is_row(per_row: int, units: set[int], positions: int) -> bool:
    """Whether one row's bytes are a unit of `units` x 1 to `positions` positions."""
    return any(per_row % unit == 0 and per_row // unit <= positions for unit in units)
