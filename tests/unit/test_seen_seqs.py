"""The KV reader's note of the seqs seen (`run_checks._SeenSeqs`): a repeated one told whatever the order,
as a set of them all tells it, while a log in order (each seq one more than the last) is held as one
range."""

from __future__ import annotations

import random

from kvtrace.run_checks import _SeenSeqs


def _repeats_by_set(seqs: list[int]) -> list[bool]:
    seen: set[int] = set()
    said = []
    for seq in seqs:
        said.append(seq in seen)
        seen.add(seq)
    return said


def test_repeats_are_told_as_a_set_tells_them() -> None:
    # GIVEN seqs in order, out of order (before the range, after a gap, filling it), negative, repeated
    shuffled = random.Random(7).choices(range(-40, 200), k=2000)
    for seqs in (
        list(range(1, 100)),
        [5, 6, 7, 3, 4, 8, 6, 2, 1, 1, 9, 12, 11, 10, 3, 13, 0, -1, -1, 14],
        [10, 8, 9, 7, 11, 7, 12, 6, 5, 6],
        shuffled,
    ):
        # WHEN each is noted in turn THEN each is a repeat exactly where a set of those before holds it
        noted = _SeenSeqs()
        assert [not noted.add(seq) for seq in seqs] == _repeats_by_set(seqs)
