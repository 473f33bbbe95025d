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
        print(f"wrote {out} ({_binary_size(out.stat().st_size)})")
    return out


def _binary_size(nbytes: int) -> str:
    """Binary units with two decimals, as every figure kvtrace prints (analyzers.units.human_bytes; the
    recorder side may not import the analyzers)."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"
