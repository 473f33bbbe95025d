"""The text layouts of a `[memory]` event that `MemoryRunReader` reads without a JSON decoder.

Kineto writes every memory event with one `fprintf` format (two of them over torch's history). A tool that
re-indents a trace (`json.dumps(indent=4)`, jq) writes the same keys in the same order, with other
whitespace. So a layout is a template: the event's text with "%s" where each number goes. Kineto's two are
written out here; any other is learned from one event of the file (`learn_layout`) and accepted only if it
decodes, numbers aside, to the same object as one of Kineto's: same keys (in any order), same strings, each
number where Kineto puts one. Text that is such a template with JSON numbers put in therefore decodes to
exactly what `json` would give, which is what lets the reader skip the decoder.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["KINETO_JOINER", "KINETO_LAYOUTS", "Layout", "learn_layout"]

# One event as Kineto writes it, "%s" where a number goes. Neither layout has a digit, '.' or '-' outside
# its numbers, which is what lets `translate` + `split` find them.
_NEW_LAYOUT = (
    '{\n    "ph": "i",\n    \n    "cat": "cpu_instant_event",\n    "s": "t",\n    "name": "[memory]",\n'
    '    "pid": %s,\n    "tid": %s,\n    "ts": %s\n    ,\n    "args": {\n'
    '      "Total Reserved": %s, "Total Allocated": %s, "Bytes": %s, "Device Id": %s, "Device Type": %s,'
    ' "Addr": %s, "finished": true, "Ev Idx": %s\n    }\n  }'
)
_NEW_FIELDS = "pid tid ts reserved allocated bytes device_id device_type addr ev_idx"
_OLD_LAYOUT = (  # before 2022: no Addr, no totals
    '{\n    "ph": "i", "s": "t", "name": "[memory]",\n    "pid": %s, "tid": %s,\n    "ts": %s,\n'
    '    "args": {\n      "Device Type": %s, "Device Id": %s, "Bytes": %s\n    }\n  }'
)
_OLD_FIELDS = "pid tid ts device_type device_id bytes"
KINETO_JOINER = ",\n  "  # between one event's "}" and the next one's "{"
# Where the template has a number: a maximal run of the characters `MemoryRunReader` keeps as tokens.
_NUMBER_RUN = re.compile(r"[0-9.\-]+")
_FINISHED = re.compile(r'"finished"[ \t\n\r]*:[ \t\n\r]*true')
_FINISHED_FALSE = re.compile(r'("finished"[ \t\n\r]*:[ \t\n\r]*)false')
# Stand-ins put where a learned template has numbers: distinct ints, none of which a layout's text holds.
_SENTINEL = 10**15


class Layout:
    """One memory event's text with "%s" for its numbers (`fields` names them in order), and `joiner`, the
    text between two such events in a run."""

    def __init__(self, template: str, fields: list[str], joiner: str) -> None:
        self.template = template
        self.joiner = joiner
        self.head = template[: template.index("%s")]
        self.fields = fields
        self.width = len(fields)
        # "finished" is true or false and read by nobody: a run is matched with every false made true.
        finished = _FINISHED.search(template)
        self.finished_true = finished.group() if finished else ""
        self.finished_false = self.finished_true[: -len("true")] + "false" if finished else ""
        # Every field but ts is converted with int(), so none is left unchecked; unused ones are dropped.
        self.int_fields = [(index, field) for index, field in enumerate(fields) if field != "ts"]

    def index(self, field: str) -> int:
        return self.fields.index(field)


KINETO_LAYOUTS = (
    Layout(_NEW_LAYOUT, _NEW_FIELDS.split(), KINETO_JOINER),
    Layout(_OLD_LAYOUT, _OLD_FIELDS.split(), KINETO_JOINER),
)


def _filled(template: str) -> Any:
    """`template` decoded with the sentinels in place of its numbers (None if it is no JSON)."""
    count = template.count("%s")
    try:
        return json.loads(template % tuple(range(_SENTINEL, _SENTINEL + count)))
    except (TypeError, ValueError, RecursionError):  # a stray "%", not JSON
        return None


def _shape(layout: Layout) -> Any:
    """Kineto's event as an object whose numbers are their fields' names in 1-tuples (which no JSON value is,
    so a name is never taken for a string of the event)."""

    def named(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: named(item) for key, item in value.items()}
        return (layout.fields[value - _SENTINEL],) if type(value) is int else value

    return named(_filled(layout.template))


_SHAPES = [(_shape(layout), layout.width) for layout in KINETO_LAYOUTS]


def _fields_of(decoded: Any, shape: Any, fields: list[str | None]) -> bool:
    """Whether `decoded` is `shape` with a sentinel (an int) wherever a field name is; fills `fields`."""
    if isinstance(shape, dict):
        return (
            isinstance(decoded, dict)
            and decoded.keys() == shape.keys()
            and all(_fields_of(decoded[key], shape[key], fields) for key in shape)
        )
    if isinstance(shape, tuple):  # a number's place in Kineto's layout
        index = decoded - _SENTINEL if type(decoded) is int else -1
        if not 0 <= index < len(fields) or fields[index] is not None:
            return False
        fields[index] = shape[0]
        return True
    return type(decoded) is type(shape) and decoded == shape


def learn_layout(event: str, joiner: str) -> Layout | None:
    """The layout of `event` (one memory event's text, "finished" as written) if it is one of Kineto's
    objects in other whitespace or key order; None otherwise (a string with an escape, a number in another
    form, another key: the JSON decoder reads such events)."""
    if "%" in event:
        return None
    template = _NUMBER_RUN.sub("%s", _FINISHED_FALSE.sub(r"\1true", event))
    decoded = _filled(template)
    count = template.count("%s")
    for shape, width in _SHAPES:
        fields: list[str | None] = [None] * count
        if count == width and _fields_of(decoded, shape, fields):
            named = [field for field in fields if field is not None]
            if len(named) == width:  # else a duplicate key hid a number
                return Layout(template, named, joiner)
    return None
