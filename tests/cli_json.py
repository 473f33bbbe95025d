"""The CLI's `--json` output in a test: the command run in-process, its stdout parsed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtrace.cli import main


def cli_json(argv: list[str], capsys: Any) -> dict[str, Any]:
    """`kvtrace <argv>` (which must print JSON), parsed; its stderr is the failure message."""
    main(argv)
    captured = capsys.readouterr()
    assert captured.out, captured.err
    return json.loads(captured.out)


def report_json(run: Path, capsys: Any) -> dict[str, Any]:
    """`kvtrace report RUN --json`, leaving the run's files as they are (no export into it)."""
    return cli_json(["report", str(run), "--json", "--no-export", "-q"], capsys)


def plan_json(run: Path, capsys: Any, *flags: str) -> dict[str, Any]:
    """`kvtrace plan --from-run RUN [flags] --json`."""
    return cli_json(["plan", "--from-run", str(run), *flags, "--json"], capsys)
