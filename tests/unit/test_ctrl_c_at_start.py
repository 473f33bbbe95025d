"""A Ctrl-C typed as `kvtrace` starts, while kvtrace's own modules import, is one line and exit 130: the
console script imported `kvtrace.cli` before `kvtrace.cli.main`'s try existed, and printed a
KeyboardInterrupt traceback through the imports. One that lands inside a weakref callback (importlib frees
its module locks through one) is one line and 130 too: Python only printed what the callback raised,
"Exception ignored in: <function ...>" and its traceback, and the command ran on as if no Ctrl-C had come.

Each SIGINT is a real one, sent from here as a terminal sends it, while the child is held at a real import
(an audit hook, or a weakref callback it sets off, that waits there: no timing decides where it lands).
What runs before the entry point cannot be covered, here or for users: Python's own start-up (`site`, the
editable install's finder), the console script's `import re, sys`, and the import of `kvtrace/__init__.py`
and the entry module themselves (about 1.5 ms).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Waits where it is called until the SIGINT lands (whose handler raises KeyboardInterrupt there, as a Ctrl-C
# during a slow import does); two minutes at most
_HOLD = """
import sys, time, weakref
def hold(where):
    sys.stdout.write(where + "\\n")
    sys.stdout.flush()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
"""

# Held inside the import of kvtrace.cli itself
_IN_THE_CLI_IMPORT = """
def on_import(event, args):
    if event == "import" and args[0] == "kvtrace.cli":
        hold("importing kvtrace.cli")
sys.addaudithook(on_import)
"""


def _in_a_weakref_callback(module: str) -> str:
    """Held inside a weakref callback, freed as `module` starts to import."""
    return f"""
class Held:
    pass
refs = []
def on_import(event, args):
    if event == "import" and args[0] == {module!r}:
        held = Held()
        refs.append(weakref.ref(held, lambda ref: hold("in a weakref callback")))
        del held
sys.addaudithook(on_import)
"""


def _console_script() -> str:
    """What pip's generated `kvtrace` script runs, for the entry point pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["kvtrace"]
    module, function = declared.split(":")
    return f"from {module} import {function}\nsys.exit({function}())\n"


# `python -m kvtrace` as the interpreter runs it (runpy), with the hook in place first
_PYTHON_M = "import runpy\nrunpy.run_module('kvtrace', run_name='__main__', alter_sys=True)\n"
# Past the entry point: kvtrace.cli's main, its signal handler installed
_CLI_MAIN = "from kvtrace.cli import main\nsys.exit(main())\n"


def _interrupted(code: str, tmp_path: Path) -> tuple[str, int, str, str]:
    """`kvtrace report missing_run` run by `code`, sent a SIGINT where it holds: (where it held, status,
    stderr, stdout after the line that said where)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD + code, "report", "missing_run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    try:
        held = child.stdout.readline() if child.stdout else ""
        if held:
            child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return held.rstrip("\n"), child.returncode, err, out


@pytest.mark.parametrize("started_as", ["console_script", "python_m"])
def test_ctrl_c_while_kvtrace_imports_is_one_line_and_130(started_as: str, tmp_path: Path) -> None:
    # GIVEN `kvtrace report missing_run` started as the installed command or as `python -m kvtrace`
    entry = _console_script() if started_as == "console_script" else _PYTHON_M
    # WHEN a Ctrl-C comes while it imports kvtrace.cli
    held, status, err, out = _interrupted(_IN_THE_CLI_IMPORT + entry, tmp_path)
    assert held == "importing kvtrace.cli", err
    # THEN one line and 130 (it was "Traceback (most recent call last): ... KeyboardInterrupt", and the
    # process died of SIGINT)
    assert (status, err, out) == (130, "kvtrace: interrupted\n", "")


@pytest.mark.parametrize(
    ("started_as", "module", "said"),
    [
        # as the entry point imports kvtrace.cli: the command is not known yet
        ("console_script", "kvtrace.errors", "kvtrace: interrupted\n"),
        # as kvtrace.cli's main builds the parser (its report command's modules)
        ("cli_main", "kvtrace.commands.progress", "kvtrace report: interrupted\n"),
    ],
)
def test_ctrl_c_inside_a_weakref_callback_is_one_line_and_130(
    started_as: str, module: str, said: str, tmp_path: Path
) -> None:
    entry = _console_script() if started_as == "console_script" else _CLI_MAIN
    held, status, err, out = _interrupted(_in_a_weakref_callback(module) + entry, tmp_path)
    assert held == "in a weakref callback", err
    # It printed "Exception ignored in: <function ...>" and its traceback, then reported the missing input
    # (status 2) as if no Ctrl-C had come
    assert (status, err, out) == (130, said, "")
