"""Run Python code under a real NVTX tool, so tests can see NVTX events without a GPU or Nsight.

``nvtx_logger.c`` (next to this file) is an NVTX injection library that writes each event as one line
``kind<TAB>domain<TAB>message`` to the file named by ``KVTRACE_NVTX_LOG``. NVTX loads a tool only
from ``NVTX_INJECTION64_PATH`` at a process's first NVTX call, so the code under test always runs
in a fresh interpreter.

    events = run_with_tool("from kvtrace.nvtx_ranges import NvtxRanges; ...", tmp_path)
    assert range_events(events) == [("push", "kvtrace", "prefill"), ("pop", "kvtrace", ""), ...]

Event kinds: ``domain`` (domain created; message ""), ``register`` (string registered), ``push``,
``pop`` (message ""), ``start``, ``end`` (message of the range it ends), ``mark``, ``category``
(message ``"<id>=<name>"``). The default NVTX domain is ``""``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "RANGE_KINDS",
    "TOOL_SOURCE",
    "ToolRun",
    "build_tool",
    "nvtx_logger_tool",
    "parse_log",
    "range_events",
    "run_script_with_tool",
    "run_with_tool",
]

TOOL_SOURCE = Path(__file__).resolve().with_name("nvtx_logger.c")
REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL_NAME = "libkvtrace_nvtx_logger.so"
RANGE_KINDS = frozenset({"push", "pop", "start", "end", "mark"})

Event = tuple[str, str, str]


@dataclass(frozen=True, kw_only=True)
class ToolRun:
    """One finished subprocess run under the logger tool."""

    events: list[Event]
    returncode: int
    stdout: str
    stderr: str


def build_tool(tmp_dir: Path) -> Path:
    """Compile the logger into ``tmp_dir`` (once per directory) and return the library's path.

    Skips the calling test when no C compiler is on PATH; a compile error fails it.
    """
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        pytest.skip("no C compiler (gcc/cc) on PATH: cannot build the NVTX logger tool")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    library = tmp_dir / TOOL_NAME
    if library.exists() and library.stat().st_mtime >= TOOL_SOURCE.stat().st_mtime:
        return library
    flags = ["-shared", "-fPIC", "-O2", "-Wall"]
    command = [compiler, *flags, "-o", str(library), str(TOOL_SOURCE), "-lpthread"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the NVTX logger failed: {' '.join(command)}\n{result.stderr}")
    return library


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    out: list[str] = []
    chars = iter(field)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, "\\")
        out.append({"t": "\t", "n": "\n"}.get(escaped, escaped))
    return "".join(out)


def parse_log(path: Path) -> list[Event]:
    """Read a logger file into ``(kind, domain, message)`` tuples, in the order they were written.

    A last line without its newline (the process died mid-write) is dropped.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    events: list[Event] = []
    for line in lines[:-1]:  # after the final "\n" comes "" or a torn line
        kind, domain, message = line.split("\t", 2)
        events.append((_unescape(kind), _unescape(domain), _unescape(message)))
    return events


def range_events(events: list[Event], domain: str | None = "kvtrace") -> list[Event]:
    """Keep only push/pop/start/end/mark events, of one domain unless ``domain`` is None."""
    return [e for e in events if e[0] in RANGE_KINDS and (domain is None or e[1] == domain)]


def run_script_with_tool(
    script: str,
    tmp_path: Path,
    *,
    tool: Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> ToolRun:
    """Run ``python -c script`` with the logger attached; return its events, exit code and output.

    The repository root goes first on PYTHONPATH so the script imports this checkout's ``kvtrace``.
    Each call logs to a fresh file in ``tmp_path``.
    """
    tmp_path = Path(tmp_path)
    library = tool if tool is not None else build_tool(tmp_path)
    log_fd, log_name = tempfile.mkstemp(prefix="nvtx_events_", suffix=".log", dir=tmp_path)
    os.close(log_fd)
    env = dict(os.environ)
    env.pop("NVTX_DISABLE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["NVTX_INJECTION64_PATH"] = str(library)
    env["KVTRACE_NVTX_LOG"] = log_name
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout_s,
        check=False,
    )
    return ToolRun(
        events=parse_log(Path(log_name)),
        returncode=result.returncode,
        stdout=result.stdout,
        stderr=result.stderr,
    )


def run_with_tool(script: str, tmp_path: Path, *, tool: Path | None = None) -> list[Event]:
    """Run ``python -c script`` under the logger and return its ``(kind, domain, message)`` events.

    Fails the test, showing the script's stderr, if the script exits non-zero; use
    :func:`run_script_with_tool` to inspect a run that is meant to fail.
    """
    run = run_script_with_tool(script, tmp_path, tool=tool)
    if run.returncode != 0:
        pytest.fail(f"script exited with {run.returncode}\n--- stderr ---\n{run.stderr}", pytrace=False)
    return run.events


@pytest.fixture(scope="session")
def nvtx_logger_tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled logger library, built once per test session (pass it as ``tool=``)."""
    return build_tool(tmp_path_factory.mktemp("nvtx_tool"))
