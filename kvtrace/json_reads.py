"""One JSON file read whole, or one line of a JSON-lines log, with every way it can fail said in one line
naming the file (the manifest, an engine's file, a model's config.json, a run's logs). Standard library
only: the analyzers read through it too."""

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


def read_json_line(line: str, path: Path, lineno: int, last: bool) -> dict[str, Any] | None:
    """Line `lineno` of the JSON-lines file `path`: its object, or None where it is the file's `last` line
    (no newline after it) and not JSON, cut where a killed writer stopped. Any other line that is not a
    JSON object is an error naming the file and the line."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        if last:
            return None
        raise KvtraceError(f"{path}: line {lineno} is not valid JSON") from None
    except ValueError:  # not a JSONDecodeError: CPython's limit on the digits of an int
        raise KvtraceError(f"{path}: line {lineno} holds {too_long_integer()}") from None
    except RecursionError:
        raise KvtraceError(f"{path}: line {lineno} is nested too deeply") from None
    if not isinstance(value, dict):
        raise KvtraceError(f"{path}: line {lineno} is not a JSON object")
    return value
