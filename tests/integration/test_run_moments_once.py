"""A report's prefill windows and prefill split (analyzers.planning.run_moments) are found once and shared:
`kvtrace plan --from-run` read the windows in four figures and its diagnosis's, and split the prefill for
its diagnosis and again for its peak (seven passes over the main device's events for a run's windows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analyzers.planning.run_moments import prefill_split, prefill_windows
from analyzers.report import build_report
from kvtrace.llama import build_model
from tests.tiny import record_generate, tiny_size

ROWS, PROMPT, NEW = 2, 20, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's greedy generate() on a dynamic cache, 2 rows of 20 tokens, 16 new."""
    found = tmp_path_factory.mktemp("run_moments_once") / "dynamic"
    record_generate(build_model(tiny_size(2)).eval(), found, ROWS, PROMPT, NEW, "dynamic")
    return found


def test_windows_and_split_are_found_once_a_report(run: Path) -> None:
    # GIVEN the run's report
    source, report = build_report(run, timelines=True)
    # WHEN its prefill windows and split are asked for twice
    windows = prefill_windows(source, report)
    split = prefill_split(source, report, ROWS, PROMPT, PROMPT + NEW)
    # THEN the same ones come back, the windows read-only (every caller shares them): one prefill step
    assert len(windows) == 1 and not windows[0].flags.writeable
    assert prefill_windows(source, report) is windows
    assert split is not None and split.windows == windows
    assert prefill_split(source, report, ROWS, PROMPT, PROMPT + NEW) is split
    # another call's split is its own
    assert prefill_split(source, report, ROWS, PROMPT, None) is not split
    # and another report of the run finds its own, equal
    source2, report2 = build_report(run, timelines=True)
    again = prefill_windows(source2, report2)
    assert again is not windows and all(np.array_equal(a, b) for a, b in zip(again, windows, strict=True))
