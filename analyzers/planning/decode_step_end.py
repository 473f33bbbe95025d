"""A decode step's end at fewer rows than a run that peaked at its prefill: what the run's decode steps held
beside their weights and KV, of it the batch-first bytes, and what a smaller batch keeps of it. Pure,
torch-free.

Fewer rows shrink a prefill's activations (the prompt's logits, attention's copies: all batch-first) more
than a step's end, whose logits processors' vectors over the vocabulary no row count changes, so a run that
peaked at its prefill can peak at a step's end at fewer rows. `kvtrace plan --from-run` (recorded_terms'
`decode_beside_fewer_rows`) and `kvtrace diagnose`'s batch remedy price that moment alike (diagnose_rows'
`beside_at_rows`), so that both name the same batch: the demo's Llama with a static cache (8 rows, padded
20-token prompt, 64 new tokens) peaks at its prefill, its 1-row recording at a step's end, 55,879,783 B,
both now price at 55,881,036; diagnose priced its prefill at 1 row, 55,172,432, and called batch 1 a fit
under 53 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from analyzers.model import OTHER
from analyzers.planning.diagnose_rows import beside_at_rows, fixed_sizes, row_activation_bytes, row_units
from analyzers.planning.diagnose_stacks import live_sizes
from analyzers.planning.run_moments import decode_beside_at, main_timeline

if TYPE_CHECKING:
    from analyzers.model import MemorySource
    from analyzers.summary import Report

__all__ = ["DecodeStepEnd", "decode_step_end", "fewer_rows_to_step_end", "row_bytes_at", "rows_within"]


@dataclass(frozen=True)
class DecodeStepEnd:
    """A run's decode steps at a step's end: the most held beside the weights and KV (`beside_bytes`), of
    it the batch-first bytes (`row_bytes`), at the run's `rows`; with the weights and the KV the run held
    at its end (`weights_bytes`, `kv_end_bytes`), so that the moment at fewer rows can be priced whole."""

    beside_bytes: int
    row_bytes: int
    rows: int
    weights_bytes: int = 0
    kv_end_bytes: int = 0

    def beside_at(self, rows: int) -> int:
        """What a step's end holds beside the weights and KV at `rows` (diagnose_rows' `beside_at_rows`)."""
        return beside_at_rows(self.beside_bytes, self.row_bytes, self.rows, rows)

    def held_at(self, rows: int) -> int:
        """The whole step's end at `rows`: the weights, the run's final KV in proportion to the rows (the
        KV is the rows times the tokens), and what is beside them (`beside_at`)."""
        return self.weights_bytes + round(self.kv_end_bytes * rows / self.rows) + self.beside_at(rows)


def decode_step_end(source: MemorySource, report: Report, rows: int | None) -> DecodeStepEnd | None:
    """The run's decode steps' most beside the weights and KV (run_moments' `decode_beside_at`), its
    batch-first bytes at `rows` rows (`row_bytes_at`), the weights then and the run's final KV; None where
    the run does not tell (no decode step after a whole prefill, no allocator events, no rows)."""
    beside, at = decode_beside_at(source, report)
    row_bytes = row_bytes_at(source, report, at, rows)
    if beside is None or at is None or row_bytes is None or not rows:
        return None
    found = main_timeline(source, report)
    weights = int(found[1].by_category["weights"][at]) if found is not None else 0
    return DecodeStepEnd(beside, row_bytes, rows, weights, report.kv.final_bytes or 0)


def row_bytes_at(source: MemorySource, report: Report, index: int | None, rows: int | None) -> int | None:
    """Of what the main device held beside its weights and KV after event `index`, the batch-first bytes
    (diagnose_rows' split, as `kvtrace diagnose` tells its moment's); None where not told."""
    main = report.main_device
    if index is None or main is None or not rows:
        return None
    dev = next((d for d in source.devices if d.device == main.device), None)
    if dev is None or dev.category is None or not bool((dev.addr >= 0).any()):
        return None
    positions = max(report.kv.tokens_held or 0, report.kv.capacity_tokens or 0) + 1
    others = live_sizes(dev, index, OTHER)
    return row_activation_bytes(
        others, rows, row_units(report.geometry), positions, fixed_sizes(report.geometry)
    )


def rows_within(end: DecodeStepEnd, moment_bytes: int, target: int, need: int) -> int:
    """The most rows, at most `target`, whose step's end fits where the moment of `moment_bytes` is `need`
    over what fits (it must fall by `need`): 0 where even 1 row's does not."""
    rows = target
    while rows >= 1 and moment_bytes - end.held_at(rows) < need:
        rows -= 1
    return rows


def fewer_rows_to_step_end(
    end: DecodeStepEnd, moment_bytes: int, batch: int, target: int, saved: int, need: int
) -> tuple[int, int]:
    """(the batch to propose, what the peak falls by at it) where the moment, a prefill of `batch` rows of
    `moment_bytes`, frees `saved` at `target` rows (`fewer_rows`, at as many bytes a row) and fewer rows
    make a step's end the larger: the most rows whose step's end fits too (`rows_within`; 0: not even 1),
    and the less the two moments fall by at it (at 1 row where none fits)."""
    rows = rows_within(end, moment_bytes, target, need)
    at = max(rows, 1)
    at_prefill = round(saved / (batch - target) * (batch - at))
    return rows, min(at_prefill, moment_bytes - end.held_at(at))
