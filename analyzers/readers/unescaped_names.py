"""Read the events whose name Kineto wrote with unescaped double quotes. Pure, torch-free.

Kineto's Chrome trace writer prints an event's name between quotes without JSON escaping: it turns "\\"
into "/", drops new lines and replaces a name holding other unprintable characters by "unknown", but leaves
'"' as it is (libkineto `output_json.cpp`, `sanitizeStrForJSON`; torch 2.13 still does). A Python frame
whose file or function name holds a quote (code compiled from a string under such a file name, as
optimum-quanto's does) in a `with_stack=True` trace, or a `record_function` label holding one, makes that
event, and so the whole file, invalid JSON.

The repair is tried only on an event that fails to decode, and only on a name line of Kineto's layout,
where the value runs from `"name": "` to the line's fixed ending and holds no backslash: escaping each of
its quotes then gives back the name exactly. A valid event is never touched, so a valid trace reads the same.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

__all__ = ["merge_unescaped_names", "repair_event", "unescaped_names_note"]

# A name line of Kineto's layouts: one field a line (torch 2.13: `    "name": "...",`) or, in older traces,
# `    "ph": "X", "cat": "...", "name": "...", "pid": 1, "tid": 2,`. The value holds a quote (else the line
# is valid) and no backslash (Kineto writes none, so an escaped quote is no repair's business).
_NAME_LINE = re.compile(
    r'^(    (?:"ph": "X", "cat": "[^"\\\n]*", )?"name": ")'  # the line up to the name's value
    r'([^\\\n]*"[^\\\n]*)'  # the value: a quote, no backslash, no new line
    r'(",(?: "pid": -?\d+, "tid": -?\d+,)?)$',  # the line's fixed ending
    re.MULTILINE,
)


def repair_event(text: str) -> tuple[Any, list[str]] | None:
    """The decoded event of `text` (one whole Kineto-layout event that did not decode) with the quotes of
    its name lines escaped, and the names so repaired; None when it has no such line or still fails."""
    names: list[str] = []

    def escape(match: re.Match[str]) -> str:
        names.append(match[2])
        return match[1] + match[2].replace('"', '\\"') + match[3]

    repaired = _NAME_LINE.sub(escape, text)
    if not names:
        return None
    try:
        return json.loads(repaired), names
    except (ValueError, RecursionError):  # other damage too: the caller reports the original error
        return None


def merge_unescaped_names(meta: dict[str, Any], names: Counter[str]) -> None:
    """Add one reading pass's repaired names to `meta["unescaped_names"]` (name -> events). Two passes over
    one file (memory events, then stacks) may decode the same event: per name, the larger count is kept."""
    if not names:
        return
    kept: dict[str, int] = meta.setdefault("unescaped_names", {})
    for name, count in names.items():
        kept[name] = max(kept.get(name, 0), count)


def unescaped_names_note(names: dict[str, int], what: str = "") -> str:
    """The note on the events read with repaired names: how many, why, and the first name."""
    total = sum(names.values())
    first = min(names)
    shown = first if len(first) <= 80 else f"{first[:77]}..."
    others = f" and {len(names) - 1} other name{'s' * (len(names) > 2)}" if len(names) > 1 else ""
    return (
        f"{what}{total} event{'s' * (total != 1)} whose name holds a double quote that torch's trace "
        f"exporter did not escape (invalid JSON), e.g. {shown}{others}: read with the quotes escaped"
    )
