"""What `kvtrace report` imports before it reads a byte, in a fresh interpreter as a user runs it.

numpy is imported at first use in analyzer commands (`kvtrace.commands.lazy_numpy`): a trace without
memory events never loads it, and every output is the same as with numpy imported up front.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces"
RANK0 = REAL / "chrome" / "rank0.json.gz"  # 26 MB of JSON, step ranges, no memory events
SNAPSHOT = REAL / "snapshots" / "oom_snapshot.pickle"
WORKER0 = REAL / "chrome" / "worker0.1623143089861.pt.trace.json.gz"  # 12,838 memory events
SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _cli(argv: list[str], preload_numpy: bool) -> tuple[str, dict[str, object]]:
    """Run `kvtrace.cli.main(argv)` in a fresh interpreter: (stdout, what was imported after it)."""
    code = (
        "import io, json, sys, contextlib\n"
        + ("import numpy\n" if preload_numpy else "")
        + "from kvtrace.cli import main\n"
        + "out = io.StringIO()\n"
        + "with contextlib.redirect_stdout(out):\n"
        + f"    rc = main({argv!r})\n"
        + "np = sys.modules.get('numpy')\n"
        + "print(out.getvalue())\n"
        + "print(json.dumps({'rc': rc, 'numpy': None if np is None else type(np).__name__,"
        + " 'commands': sorted(m for m in sys.modules if m.startswith('kvtrace.commands.')),"
        + " 'heavy': sorted(m for m in ('torch', 'pyarrow', 'duckdb', 'vllm') if m in sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    text, _, last = done.stdout.rstrip("\n").rpartition("\n")
    return text, json.loads(last)


@pytest.mark.skipif(not RANK0.exists(), reason="shared/real_traces not present")
def test_trace_without_memory_events_never_loads_numpy() -> None:
    # GIVEN a real 26 MB GPU trace with step ranges and no memory events
    # WHEN `kvtrace report --json` reads it in a fresh interpreter
    lazy_out, lazy = _cli(["report", "--json", str(RANK0)], preload_numpy=False)
    eager_out, eager = _cli(["report", "--json", str(RANK0)], preload_numpy=True)
    # THEN numpy was never imported, only the report command's module was, and the JSON is the same
    assert lazy["rc"] == eager["rc"] == 0
    assert lazy["numpy"] is None
    assert lazy["commands"] == [
        "kvtrace.commands.base",
        "kvtrace.commands.lazy_numpy",
        "kvtrace.commands.output",
        "kvtrace.commands.progress",  # the reading commands' bar, a few lines of its own
        "kvtrace.commands.report",
    ]
    assert lazy_out == eager_out
    assert json.loads(lazy_out)["source"]["kind"] == "chrome_trace"


@pytest.mark.skipif(not (SNAPSHOT.exists() and WORKER0.exists()), reason="shared/real_traces not present")
@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--json", str(WORKER0)],
        ["report", str(WORKER0)],
        ["diagnose", "--json", str(SNAPSHOT)],
        ["report", "--json", "--no-export", str(SAMPLES / "vllm_preempt")],
        ["diagnose", str(SAMPLES / "vllm_preempt")],
        ["compare", str(SAMPLES / "dynamic_b2"), str(SAMPLES / "static_b2")],
        ["plan", "--from-run", str(SAMPLES / "dynamic_b2"), "--batch", "4", "--context", "300", "--json"],
    ],
    ids=["worker0", "worker0-text", "diagnose-snapshot", "vllm-run", "diagnose-vllm", "compare", "plan-run"],
)
def test_inputs_that_need_numpy_load_it_and_report_the_same(argv: list[str]) -> None:
    # GIVEN real inputs whose reading needs arrays: a trace with 12,838 memory events, a snapshot's diagnosis,
    # runs (a small snapshot's report needs none: tests/integration/test_snapshot_plain_report.py)
    # WHEN they are reported with numpy imported at first use, and with numpy imported up front
    lazy_out, lazy = _cli(argv, preload_numpy=False)
    eager_out, eager = _cli(argv, preload_numpy=True)
    # THEN the stand-in was replaced by numpy itself and the output is byte for byte the same
    assert lazy["rc"] == eager["rc"] == 0
    assert lazy["numpy"] == "module"
    assert lazy_out == eager_out and lazy_out.strip()
    # and nothing that imports numpy's submodules from C came in while the stand-in was bound
    assert lazy["heavy"] == []


def test_a_plan_of_a_preset_never_loads_numpy() -> None:
    # GIVEN a plan from a preset, arithmetic alone
    argv = ["plan", "--preset", "llama-3-8b", "--batch", "1,8", "--context", "8192", "--gpu-memory", "80GiB"]
    # WHEN it runs in a fresh interpreter, with numpy imported at first use and up front
    lazy_out, lazy = _cli([*argv, "--json"], preload_numpy=False)
    eager_out, eager = _cli([*argv, "--json"], preload_numpy=True)
    # THEN numpy was never imported (its 50-60 ms were most of the command's time) and the plan is the same
    assert lazy["rc"] == eager["rc"] == 0
    assert lazy["numpy"] is None
    assert lazy_out == eager_out and json.loads(lazy_out)


def test_stand_in_becomes_numpy_at_first_use() -> None:
    # GIVEN a fresh interpreter WHEN numpy is imported inside the deferring block and then used
    code = (
        "import sys\n"
        "from kvtrace.commands.lazy_numpy import numpy_at_first_use\n"
        "with numpy_at_first_use():\n"
        "    import numpy as np\n"
        "    before = 'numpy._core' in sys.modules\n"
        "    total = int(np.arange(10).sum())\n"
        "real = sys.modules['numpy']\n"
        "same = np.ndarray is real.ndarray and np.__version__ == real.__version__\n"
        "print(before, total, same, type(real).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # THEN nothing of numpy was loaded before the first attribute read, and after it the names are numpy's
    assert done.stdout.split() == ["False", "45", "True", "module"]
