"""The reading commands draw a progress bar on a terminal while a big input (over 20 MB) is read, as
`report` and `export` did: `diagnose` and `compare` read for as long and drew none (a 1M-event trace: ~10 s
of silence). Never into a pipe, never under -q."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.analyzer_speed import write_synthetic_trace
from tests.terminal import stderr_on_a_terminal

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def big_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kineto-layout trace of 60,000 CUDA `[memory]` events, ~21.8 MB: over the bar's 20 MB."""
    path = tmp_path_factory.mktemp("big") / "big.pt.trace.json"
    write_synthetic_trace(path, 60_000, use_gzip=False)
    assert path.stat().st_size > 20_000_000
    return path


def _kvtrace(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvtrace.cli", *args]


@pytest.mark.parametrize(
    "command",
    [["report", "--no-export"], ["diagnose"], ["compare"]],
    ids=["report", "diagnose", "compare"],
)
def test_a_big_input_draws_a_bar_on_a_terminal_only(big_trace: Path, command: list[str]) -> None:
    inputs = [str(big_trace)] * (2 if command[0] == "compare" else 1)

    # WHEN stderr is a terminal THEN each input read gets its bar, to 100%
    status, said = stderr_on_a_terminal(_kvtrace(*command, *inputs), ENV)
    assert status == 0, said
    bars = [line for line in said.replace("\r", "\n").splitlines() if line.startswith("reading big.pt.trace")]
    assert bars and "100%" in bars[-1], said
    if command[0] == "compare":  # one bar per input, each drawn to its end
        assert said.count("100%") >= 2, said

    # ... and -q leaves it out, as does a pipe
    status, said = stderr_on_a_terminal(_kvtrace(*command, "-q", *inputs), ENV)
    assert status == 0 and "reading" not in said, said
    piped = subprocess.run(_kvtrace(*command, *inputs), capture_output=True, text=True, env=ENV, timeout=300)
    assert piped.returncode == 0 and "reading" not in piped.stderr, piped.stderr


def test_demo_draws_a_bar_over_its_decoding_steps_on_a_terminal_only(tmp_path: Path) -> None:
    # GIVEN the demo, whose default run decodes for about a minute on a CPU with nothing on the screen
    def demo(out: str, *flags: str) -> list[str]:
        return _kvtrace(
            "demo",
            "--size",
            "tiny",
            "--batch",
            "1",
            "--new-tokens",
            "3",
            "--no-profiler",
            "--no-report",
            "-o",
            str(tmp_path / out),
            *flags,
        )

    # WHEN stderr is a terminal THEN a bar counts generate()'s 3 decoding steps to the end, the prompt no step
    status, said = stderr_on_a_terminal(demo("tty"), ENV)
    assert status == 0, said
    bars = [line for line in said.replace("\r", "\n").splitlines() if line.startswith("generate:")]
    assert bars and "3/3" in bars[-1] and all("/3 " in bar for bar in bars), said

    # ... and -q leaves it out, as does a pipe
    status, said = stderr_on_a_terminal(demo("quiet", "-q"), ENV)
    assert status == 0 and "generate:" not in said, said
    piped = subprocess.run(demo("piped"), capture_output=True, text=True, env=ENV, timeout=300)
    assert piped.returncode == 0 and "generate:" not in piped.stderr, piped.stderr


def test_plan_from_a_run_with_a_big_trace_draws_a_bar_on_a_terminal_only(tmp_path: Path) -> None:
    # GIVEN a recorded run whose profiler trace is over the bar's 20 MB (0.41 MB a step at batch 1)
    run = tmp_path / "run"
    recorded = subprocess.run(
        _kvtrace(
            "demo", "--size", "tiny", "--batch", "1", "--new-tokens", "56", "--no-report", "-o", str(run)
        ),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert recorded.returncode == 0, recorded.stderr
    assert sum(trace.stat().st_size for trace in (run / "profiler").iterdir()) > 20_000_000

    # WHEN plan --from-run reads it on a terminal THEN its trace gets report's bar, to 100% (none before)
    status, said = stderr_on_a_terminal(_kvtrace("plan", "--from-run", str(run)), ENV)
    assert status == 0, said
    bars = [line for line in said.replace("\r", "\n").splitlines() if line.startswith("reading run")]
    assert bars and "100%" in bars[-1], said

    # ... and -q leaves it out, as does a pipe
    status, said = stderr_on_a_terminal(_kvtrace("plan", "--from-run", str(run), "-q"), ENV)
    assert status == 0 and "reading" not in said, said
    piped = subprocess.run(_kvtrace("plan", "--from-run", str(run)), capture_output=True, text=True, env=ENV)
    assert piped.returncode == 0 and "reading" not in piped.stderr, piped.stderr
