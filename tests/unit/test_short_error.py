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


def test_printable_escapes_control_characters_only() -> None:
    from kvtrace.errors import printable

    assert printable("runs/a\nb/x\x1b[31m\x7f\x85") == "runs/a\\nb/x\\x1b[31m\\x7f\\x85"
    assert printable("plain run é/ü 中") == "plain run é/ü 中"


def test_shown_integer_gives_a_huge_one_by_its_length() -> None:
    from kvtrace.errors import shown_integer

    assert shown_integer(2**64) == "18446744073709551616"
    assert shown_integer(10**400) == "100000… (401 digits)"
    assert shown_integer(-(10**30)) == "-100000… (31 digits)"
    assert shown_integer(2**20_000) == "2**20,000 or more"  # str() refuses more than 4,300 digits
