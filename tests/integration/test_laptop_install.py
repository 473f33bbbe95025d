"""The README's laptop install, run verbatim in a fresh virtual environment: a kvtrace without torch whose
report is the full install's, figure for figure. Skipped where no package index can be reached."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvtrace.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN = ROOT / "sample_traces" / "static_b2"
SNAPSHOT = ROOT.parent / "shared" / "real_traces" / "snapshots" / "oom_snapshot.pickle"


def _in_venv(venv: Path, command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`command` as a shell in the venv runs it: its `pip`, `python` and `kvtrace` first on PATH."""
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)  # the installed copy, not this checkout, is what a laptop runs
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_the_readmes_laptop_install_runs_verbatim_and_reports_as_the_full_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the README's laptop install line and a fresh venv that can reach a package index
    found = re.search(r"on a laptop, `(pip install [^`]+)`", README.read_text())
    assert found is not None, "the README names its laptop install"
    venv = tmp_path / "laptop"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    reached = _in_venv(venv, "pip install -q 'numpy>=1.24' 'plotly>=5.20' 'tqdm>=4.60'")
    if reached.returncode != 0:
        pytest.skip(f"no package index reachable here: {reached.stderr.strip()[-200:]}")
    # WHEN it runs, as written, in a copy of this folder's sources (pip builds in the tree it is given: a
    # build here would write build/ and kvtrace.egg-info beside another environment's install of it)
    source_tree = tmp_path / "kvtrace"
    source_tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source_tree / name)
    for package in ("kvtrace", "analyzers"):
        shutil.copytree(ROOT / package, source_tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    installed = _in_venv(venv, found.group(1), cwd=source_tree)
    # THEN it installs kvtrace without torch, and its report is the full install's
    assert installed.returncode == 0, installed.stderr
    assert _in_venv(venv, "python -c 'import torch'", cwd=tmp_path).returncode == 1
    for source in (RUN, SNAPSHOT):
        if not source.exists():
            continue
        laptop = _in_venv(venv, f"kvtrace report '{source}' --json --no-export", cwd=tmp_path)
        assert laptop.returncode == 0, laptop.stderr
        assert main(["report", str(source), "--json", "--no-export"]) == 0
        assert json.loads(laptop.stdout) == json.loads(capsys.readouterr().out)
