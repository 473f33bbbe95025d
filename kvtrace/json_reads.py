"""One JSON file read whole, with every way it can fail said in one line naming the file (the manifest, an
engine's file, a model's config.json). Standard library only: the analyzers read through it too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtrace.errors import KvtraceError, refuse_special_file, too_long_integer


def read_json_file(path: Path, damaged: str, encoding: str = "utf-8") -> Any:
    """The file's JSON value. `damaged` names what a file that does not parse is ("corrupt manifest"), said
    with why: the decoder's message, CPython's limit on an integer's digits, or nesting past the C decoder's
    depth. A pipe or device is refused before it is opened (reading one may never end)."""
    refuse_special_file(path)
    try:
        return json.loads(path.read_text(encoding=encoding))
    except OSError as exc:  # missing, a folder of that name, no permission
        raise KvtraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KvtraceError(f"{path}: {damaged} ({exc})") from None
    except ValueError:  # not a JSONDecodeError: CPython's limit on the digits of an int
        raise KvtraceError(f"{path}: {damaged} (it holds {too_long_integer()})") from None
    except RecursionError:
        raise KvtraceError(f"{path}: {damaged} (nested too deeply)") from None
