"""`FrameTable` finds a stack seen before by the identity of its frame dicts (what a dump's pickle memo
shares), by comparing it with the stacks of its shape (torch 2.0's blocks, each with its own dicts), or by
its key; whichever way, a stack's id and text are those of its (file, line, name) frames."""

from __future__ import annotations

import copy
from typing import Any

from analyzers.readers.snapshot_entries import FrameTable


def _frame(file: str, line: Any, name: str, **extra: Any) -> dict[str, Any]:
    return {"filename": file, "line": line, "name": name, **extra}


def _reference(stacks: list[Any]) -> tuple[list[int], list[str]]:
    """Ids in order of first sight of each (file, line, name) sequence, and each one's text; -1 for none."""
    ids: dict[tuple[Any, ...], int] = {}
    found = []
    for frames in stacks:
        if not frames:
            found.append(-1)
            continue
        key = tuple((f.get("filename", "?"), f.get("line", 0), f.get("name", "?")) for f in frames)
        found.append(ids.setdefault(key, len(ids)))
    texts = ["\n".join(f"{file}:{line}:{name}" for file, line, name in key) for key in ids]
    return found, texts


def test_stacks_found_by_identity_shape_or_key_get_the_ids_of_their_frames() -> None:
    # GIVEN stacks as real dumps write them: shared frame dicts (one list per call site, and new lists of the
    # same dicts), torch 2.0's own dicts per block (equal copies), stacks of one outline or one shape that
    # differ inside, equal frames with an extra key, frames missing a key, and no stack at all
    shared = [_frame(f"/src/m{i}.py", 10 + i, f"f{i}") for i in range(12)]
    middle = [_frame("/src/x.py", 5, "inner"), _frame("/src/y.py", 6, "other")]
    site = [*shared[:5], middle[0], *shared[5:]]  # 13 frames: the outline reads 0, 3, 6, 9 and 12
    stacks: list[Any] = [
        site,
        site,  # the same list
        list(site),  # a new list of the same dicts
        [*shared[:5], middle[1], *shared[5:]],  # the same outline, another frame inside
        copy.deepcopy(site),  # torch 2.0: equal dicts of its own
        copy.deepcopy(site),
        [dict(f, line=f["line"] + 100) if i == 3 else dict(f) for i, f in enumerate(site)],  # the same shape
        [dict(f, column=1) for f in site],  # equal frames, one more key
        [{"name": "only"}, _frame("/src/z.py", 1, "z")],  # a frame missing its file and line
        [],
        None,
        copy.deepcopy(site[:3]),
        site[:3],
    ]
    # WHEN one table interns them in turn
    table = FrameTable()
    found = [table.intern(frames) for frames in stacks]
    # THEN each gets the id and text of its frames' (file, line, name), counted apart
    expected_ids, expected_texts = _reference(stacks)
    assert found == expected_ids
    assert table.texts == expected_texts
    assert len(table.texts) == 5  # the site, the other inside frame, the other line, the short one, site[:3]
