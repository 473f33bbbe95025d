"""The indefinite article before a figure is the one said aloud: "an 8-token prompt", "a 96.00 MiB device"."""

from __future__ import annotations

import pytest

from analyzers.units import a_or_an
from kvtrace.cli import main


@pytest.mark.parametrize(
    ("figure", "said"),
    [
        ("8-token", "an 8-token"),  # eight
        ("80.00 GiB", "an 80.00 GiB"),  # eighty
        ("800 B", "an 800 B"),  # eight hundred
        ("8,190-token", "an 8,190-token"),  # eight thousand
        ("11.00 KiB", "an 11.00 KiB"),  # eleven
        ("11,264 B", "an 11,264 B"),  # eleven thousand
        ("18 KiB", "an 18 KiB"),  # eighteen
        ("110 B", "a 110 B"),  # one hundred
        ("180 B", "a 180 B"),
        ("1,800 B", "a 1,800 B"),  # one thousand
        ("96.00 MiB", "a 96.00 MiB"),
        ("0 B", "a 0 B"),
        ("-8 B", "a -8 B"),  # minus
    ],
)
def test_a_or_an(figure: str, said: str) -> None:
    assert a_or_an(figure) == said


def test_a_plan_of_a_ten_token_context_says_an_eight_token_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    # 10 tokens at the worst case: a prompt of 8 and the new tokens (before: "a 8-token prompt")
    assert main(["plan", "--preset", "llama-3-8b", "--context", "10"]) == 0
    # (the KV's worst case: the peak is the prefill of the longest, 9 tokens, which the plan says too)
    assert "10 tokens: an 8-token prompt (the KV's worst case" in capsys.readouterr().out
