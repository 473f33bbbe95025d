"""docs/recording.md lists every option of `kvtrace.record()` with the default the code has."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from kvtrace.options import RecordOptions

DOC = Path(__file__).resolve().parents[2] / "docs" / "recording.md"


def test_every_record_option_is_documented_with_its_default() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", DOC.read_text(encoding="utf-8"), re.M)
    documented = dict(rows)
    # `clock` is for tests only (an injected time source), not a user's option
    fields = {f.name: f.default for f in dataclasses.fields(RecordOptions) if f.name != "clock"}
    assert documented.keys() == fields.keys()
    assert documented == {name: repr(default) for name, default in fields.items()}
