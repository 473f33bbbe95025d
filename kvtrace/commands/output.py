"""How every subcommand prints its result and writes its HTML, so that all behave alike."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtrace.errors import KvtraceError


def print_result(as_json: bool, payload: Callable[[], Any], text: Callable[[], str]) -> None:
    """JSON on stdout for scripts (`--json`), else the human text. Both are built only when needed."""
    if as_json:
        json.dump(payload(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text())


def write_html(target: str | Path, html: str, quiet: bool = False) -> Path:
    """Write an HTML report; a failure is one line and exit status 1, never a traceback."""
    out = Path(target)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise KvtraceError(f"{out}: cannot write ({exc.strerror})", exit_code=1) from None
    if not quiet:
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out
