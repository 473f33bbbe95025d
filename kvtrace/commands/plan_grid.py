"""`kvtrace plan --batch 1,4,8 --context 8192,32768`: every batch beside every context, as one table.

Why: the question a user brings is rarely one point ("does batch 8 at 32k fit?") but the frontier ("which
batches fit at which contexts on this GPU?"). Each point is the plan `kvtrace plan` makes of it alone, the
same figures and verdict; the table shows each point's peak and whether it fits, and the exit status is 0
only when every point fits, as a launch script's `&&` reads it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvtrace.commands.output import print_result
from kvtrace.errors import KvtraceError

if TYPE_CHECKING:
    from analyzers.planning.plan_types import PlanResult

__all__ = ["counts", "run_grid"]

MAX_POINTS = 400  # a grid is read by a person: 20 x 20 at most


def counts(flag: str) -> Callable[[str], int | tuple[int, ...]]:
    """argparse's `type` of a flag that takes a whole number or a comma list of them ("1,4,8"): an int for
    one (as before), a tuple for a list. argparse names the `flag` in its error."""

    def parse(text: str) -> int | tuple[int, ...]:
        parts = [part.strip() for part in text.split(",") if part.strip()]  # "1,2," as sweep reads it
        try:
            values = tuple(int(part) for part in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a whole number or a comma list of them (1,4,8), not {text[:40]!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(
                f"a whole number or a comma list of them (1,4,8), not {text[:40]!r}"
            )
        if len(values) == 1:
            return values[0]
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value listed twice: {text[:40]!r}")
        return values

    return parse


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, tuple) else [value]


def run_grid(args: argparse.Namespace, one: Callable[[argparse.Namespace], PlanResult | int]) -> int:
    """Plan every (batch, context) of the lists (`one` plans one point from flags), print them as a table
    (or `--json`'s `{"grid": [...]}`, each point the plan's own JSON), and exit 0 only if every point fits."""
    from analyzers.planning.plan import to_json

    if getattr(args, "from_run", None) is not None:
        raise KvtraceError(
            "a comma list of --batch or --context plans a model, not --from-run: plan a run one point "
            "at a time"
        )
    if getattr(args, "engine", None) == "vllm":
        raise KvtraceError(
            "a comma list of --batch or --context plans transformers' caches: with --engine vllm give "
            "one of each"
        )
    batches, contexts = _listed(args.batch), _listed(args.context)
    if len(batches) * len(contexts) > MAX_POINTS:
        raise KvtraceError(
            f"--batch x --context make {len(batches) * len(contexts):,} points: at most {MAX_POINTS} in "
            "one table"
        )
    results: list[PlanResult] = []
    for batch in batches:
        for context in contexts:
            point = argparse.Namespace(**{**vars(args), "batch": batch, "context": context})
            result = one(point)
            assert not isinstance(result, int)  # vLLM's plan, which prints itself, is refused above
            results.append(result)
    print_result(
        args.json,
        lambda: {"grid": [to_json(r) for r in results]},
        lambda: grid_text(results, len(contexts)),
    )
    return 0 if all(r.fits for r in results) else 1


def grid_text(results: list[PlanResult], across: int) -> str:
    """The table: a row per batch, a column per context (`across` of them), each cell the point's peak and
    `NO` where it does not fit; the first plan's model line above it, with what was a default, and below
    it the contexts beyond the model's positions (each point's own plan notes it) and what cells count."""
    from analyzers.planning.plan_render import format_text
    from analyzers.units import human_bytes

    first = results[0]
    request = first.request
    head = format_text(first).splitlines()[0]
    gpu = human_bytes(request.gpu_memory_bytes)
    gpu += " (the default --gpu-memory)" if "gpu_memory" in request.defaults else ""
    limit = request.geometry.max_position_embeddings
    contexts = [r.request.context for r in results[:across]]
    labels = [f"{c:,}" + ("*" if limit and c > limit else "") for c in contexts]
    cells = [[_cell(r) for r in results[i : i + across]] for i in range(0, len(results), across)]
    rows = [f"{r.request.batch}" for r in results[::across]]  # the default batch where none was listed
    corner = "batch \\ context"
    width = max(len(corner), *(len(r) for r in rows))
    cols = [max(len(label), *(len(row[j]) for row in cells)) for j, label in enumerate(labels)]

    def line(first_cell: str, rest: list[str]) -> str:
        return f"  {first_cell:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(rest, cols, strict=True))

    said = "; the default, --context to change" if "context" in request.defaults else ""
    lines = [
        f"{head}, on {gpu}",
        f"peak by batch (rows) and context (columns, prompt + new tokens{said}); NO: over the GPU's memory",
        line(corner, labels),
        *(line(row, cell_row) for row, cell_row in zip(rows, cells, strict=True)),
    ]
    if any(label.endswith("*") for label in labels):
        lines.append(
            f"* beyond the {limit:,} positions {request.geometry.name} takes (max_position_embeddings): the "
            "memory figures hold and transformers runs it, but the model was not trained that long, and vLLM "
            "refuses such a max_model_len"
        )
    fitting = sum(r.fits for r in results)
    lines.append(
        f"{fitting} of {len(results)} points fit; each is the plan `kvtrace plan` makes of it alone (give "
        "one --batch and one --context for its figures, notes and what would make it fit)"
    )
    return "\n".join(lines)


def _cell(result: PlanResult) -> str:
    from analyzers.units import human_bytes

    return human_bytes(result.peak_bytes) + ("" if result.fits else " NO")
