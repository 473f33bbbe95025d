"""The import boundary is a tested fact: analyzers never pull torch, the recorder never pulls plotly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "statement",
    [
        "import analyzers",
        "import analyzers.report, analyzers.render.html, analyzers.render.text, analyzers.planning.plan",
        "import kvtrace.format",
        "import kvtrace.cli; kvtrace.cli.build_parser()",
    ],
)
def test_analyzer_side_never_imports_torch(statement: str) -> None:
    # GIVEN a fresh interpreter WHEN the analyzer side is imported THEN torch is absent
    assert "torch" not in _modules_after(statement)


def test_recording_error_is_caught_from_the_package_top_without_torch() -> None:
    # GIVEN a fresh interpreter WHEN the user names kvtrace.RecordingError (an `except` clause does)
    loaded = _modules_after("import kvtrace; kvtrace.RecordingError")
    # THEN it is there, and naming it loads neither torch nor the recorder
    assert "kvtrace.errors" in loaded
    assert "torch" not in loaded and "kvtrace.recorder" not in loaded


def test_recorder_never_imports_plotly() -> None:
    loaded = _modules_after("import kvtrace.recorder, kvtrace.commands.demo")
    assert "torch" in loaded  # the recorder really is loaded
    assert "plotly" not in loaded
    assert not any(name.startswith("analyzers") for name in loaded)
