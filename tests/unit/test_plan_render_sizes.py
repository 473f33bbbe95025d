"""The plan's table writes a size under 1 KiB in bytes, as the other commands do ("0 B", not "0.00 KiB")."""

from __future__ import annotations

from typing import Any

from kvtrace.cli import main


def test_a_zero_reserve_reads_0_b(capsys: Any) -> None:
    # GIVEN a plan with no reserve; WHEN planned
    assert main(["plan", "--preset", "llama-3.1-8b", "--gpu-memory", "24GiB", "--reserve", "0"]) in (0, 1)
    lines = capsys.readouterr().out.splitlines()
    # THEN its reserve row says 0 B
    (reserve,) = [line.split() for line in lines if line.strip().startswith("reserve")]
    assert reserve == ["reserve", "0", "B"]
