"""One helper cuts a failed request's error for the sentences that quote it: the manifest's warning
(kvtrace.integrations.hf_paged) and `diagnose`'s sentence (kvtrace.commands.diagnose) each had their own
copy of the same arithmetic, which could drift apart. Expected texts are written out by hand."""

from __future__ import annotations

import kvtrace.commands.diagnose as diagnose_command
import kvtrace.integrations.hf_paged as hf_paged
from kvtrace.errors import short_error


def test_an_error_up_to_150_characters_is_kept_whole() -> None:
    assert short_error("x" * 150) == "x" * 150
    assert short_error("ValueError: bad") == "ValueError: bad"


def test_a_longer_error_is_cut_to_150_with_its_trailing_space_dropped() -> None:
    assert short_error("x" * 151) == "x" * 147 + "..."
    said = short_error("a" * 146 + " " + "b" * 10)  # the 147th character a space: dropped before "..."
    assert said == "a" * 146 + "..." and len(said) == 149
    assert short_error("abcdefghij", limit=8) == "abcde..."


def test_the_warning_and_diagnose_share_it() -> None:
    assert diagnose_command.short_error is short_error
    assert hf_paged.short_error is short_error
    assert not hasattr(diagnose_command, "_cut")
