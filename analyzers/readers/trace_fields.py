"""The top-level fields of a Chrome trace that kvtrace reads; every trace reader keeps these, drops the rest.

A trace's other top-level fields (a tool's metadata, Kineto's "traceName") are read for their syntax, so a
damaged one is still reported, and then dropped: a text of millions of them would otherwise be held whole,
the names and values both (issue 11: the readers' memory is bounded by what a report needs).
"""

from __future__ import annotations

from typing import Any

# The fields `meta` carries (chrome_trace's `_META_KEYS`) and `with_stack`, which says a trace has stacks.
TOP_FIELDS = frozenset(
    {
        "schemaVersion",
        "deviceProperties",
        "distributedInfo",
        "baseTimeNanoseconds",
        "displayTimeUnit",
        "with_stack",
    }
)


def kept_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of `fields` that some part of kvtrace reads."""
    return {key: value for key, value in fields.items() if key in TOP_FIELDS}
