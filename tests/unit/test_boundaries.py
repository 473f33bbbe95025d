"""The import boundary is a tested fact: analyzers never pull torch, the recorder never pulls plotly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


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


# A fresh interpreter where the optional parts are not installed: importing one fails as pip's absence
# of it would (ModuleNotFoundError naming it), so the laptop install (`pip install .`) is what runs.
_WITHOUT = """
import sys
BLOCKED = set(sys.argv[1].split(","))

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
sys.argv = sys.argv[1:]
exec(sys.argv[1])
"""

_OPTIONAL = "torch,transformers,nvtx,pyarrow,duckdb,tensorboard,llama_models,tiktoken"


def _without(blocked: str, code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", _WITHOUT, blocked, code, *argv]
    return subprocess.run(command, capture_output=True, text=True)


_CLI = "from kvtrace.cli import main; sys.exit(main(sys.argv[2:]))"


def test_the_analyzers_run_without_any_optional_part(tmp_path: Path) -> None:
    # GIVEN a recorded run copied to a laptop with only numpy, plotly, tqdm and msgspec
    run = tmp_path / "run"
    shutil.copytree(SAMPLES / "dynamic_b2", run)
    expected = _without("", _CLI, "report", str(run), "--json", "--no-export")
    assert expected.returncode == 0, expected.stderr
    # WHEN it is reported (its exports written into it), diagnosed and planned there
    done = _without(_OPTIONAL, _CLI, "report", str(run), "--json")
    # THEN the figures are those of the full install, and both exports are written, the TensorBoard scalars
    # too (kvtrace writes event files itself), without a word on stderr
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kv"] == json.loads(expected.stdout)["kv"]
    assert done.stderr == ""
    assert (run / "kv_counters.trace.json.gz").is_file()
    assert len(list((run / "tb_scalars").glob("events.out.tfevents.*"))) == 1
    for argv in (["diagnose", str(run), "--json"], ["plan", "--preset", "llama-3-8b", "--json"]):
        done = _without(_OPTIONAL, _CLI, *argv)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)


# The README's install line: torch first, so that the extra's `torch>=2.4` is met by it. The extra alone
# takes the newest torch from PyPI, a CUDA build that brings gigabytes of CUDA libraries to a laptop.
_TORCH_FIRST = "pip install torch==2.13.0 (the CPU wheel; on a GPU, your CUDA build of torch), then "


@pytest.mark.parametrize(
    ("argv", "missing", "install"),
    [
        (["export", "RUN", "-o", "OUT"], "pyarrow", "pip install 'kvtrace[export]'"),
        (["demo", "--out", "OUT"], "torch", _TORCH_FIRST + "pip install 'kvtrace[demo]'"),
        (["sweep", "--out", "OUT"], "torch", _TORCH_FIRST + "pip install 'kvtrace[record]'"),
        (["run", "-o", "OUT", "SCRIPT"], "torch", _TORCH_FIRST + "pip install 'kvtrace[record]'"),
    ],
    ids=["export", "demo", "sweep", "run"],
)
def test_a_command_whose_part_is_not_installed_says_which_extra_brings_it(
    argv: list[str], missing: str, install: str, tmp_path: Path
) -> None:
    # GIVEN the laptop install (no torch, no pyarrow) WHEN a command that needs one of them runs
    script = tmp_path / "generate.py"
    script.write_text("print('the script ran')\n")
    paths = {"RUN": str(SAMPLES / "dynamic_b2"), "OUT": str(tmp_path / "out"), "SCRIPT": str(script)}
    done = _without(_OPTIONAL, _CLI, *(paths.get(a, a) for a in argv))
    # THEN one line names the module and what installs it, exit 1: not an "internal error" (70); torch is
    # installed before the extra, not left for the extra to fetch
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr == f"kvtrace {argv[0]}: error: needs {missing}, which is not installed here: {install}\n"
    )
    assert not (tmp_path / "out").exists()
    assert "the script ran" not in done.stdout


def test_kvtrace_record_without_torch_says_which_extra_brings_it() -> None:
    done = _without(_OPTIONAL, "import kvtrace; kvtrace.record")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "ModuleNotFoundError: kvtrace.record needs torch, which is not installed here: "
        + _TORCH_FIRST
        + "pip install 'kvtrace[record]'"
    )
