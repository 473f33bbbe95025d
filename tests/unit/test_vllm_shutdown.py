"""`vllm serve`'s stop with the plugin (`kvtrace.integrations.vllm_shutdown`): the server waits for its engine
core as long as the engine core holds its run open, not a fixed time. Real processes stand in for engine
cores: each takes SIGTERM as vLLM's engine core does (noted, then it goes on) and holds a real run lock."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from kvtrace.integrations.vllm_shutdown import stop_engine_cores
from kvtrace.run_lock import RunLock, holder

LINGER_S = 60.0  # an engine core's teardown after its run is closed: the test ends it


def _engine_core(run_dir: str | None, ready: Event, hold_s: float, takes_sigterm: bool) -> None:
    """Take SIGTERM and go on (or die of it), hold a run at `run_dir` open for `hold_s` (a step in flight,
    then the run's end), close it, then linger as vLLM's teardown does."""
    if takes_sigterm:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    lock = RunLock(Path(run_dir)) if run_dir is not None else None
    if lock is not None:
        lock.acquire()
    ready.set()
    time.sleep(hold_s)
    if lock is not None:
        lock.release()
    time.sleep(LINGER_S)


StartEngineCore = Callable[..., BaseProcess]


@pytest.fixture
def start_engine_core() -> Iterator[StartEngineCore]:
    context = multiprocessing.get_context("spawn")
    started: list[BaseProcess] = []

    def start(run_dir: Path | None, hold_s: float, takes_sigterm: bool = True) -> BaseProcess:
        ready = context.Event()
        where = str(run_dir) if run_dir is not None else None
        proc = context.Process(target=_engine_core, args=(where, ready, hold_s, takes_sigterm))
        proc.start()
        started.append(proc)
        assert ready.wait(60), "the stand-in engine core never started"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.join()


class Ticks:
    """A clock that moves one second a look: the wait's bounds are counted, not timed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_waits_past_the_grace_until_the_run_is_closed(
    start_engine_core: StartEngineCore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN an engine core that goes on holding its run open for 1.5 s (its step in flight)
    run_dir = tmp_path / "serve"
    run_dir.mkdir()
    proc = start_engine_core(run_dir, 1.5)
    assert holder(run_dir) == str(proc.pid)
    # WHEN the server stops it with no grace beyond the first look, and a bound it never reaches
    clock = Ticks()
    with caplog.at_level(logging.WARNING, logger="vllm.kvtrace"):
        stop_engine_cores([proc], run_dir, grace_s=0.0, limit_s=1000.0, clock=clock)
    # THEN it waited for the run to close, and no longer: the engine core lives on in its teardown
    assert holder(run_dir) is None and clock.now < 1000.0
    assert proc.is_alive()
    # ... having said once whom it waits for (a Ctrl-C that takes this long reads as a hung server)
    waits = [r.getMessage() for r in caplog.records if "has not closed its run" in r.getMessage()]
    assert waits == [
        f"kvtrace: the engine core (pid {proc.pid}) has not closed its run at {run_dir} yet (its step in "
        "flight ends first); waiting for it, at most 999 s more"  # its clock: 1 s a look
    ]


def test_an_engine_core_with_no_run_open_gets_the_grace_alone(
    start_engine_core: StartEngineCore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN an engine core that takes the SIGTERM and holds no run (closed already, or never opened)
    proc = start_engine_core(None, 0.0)
    # WHEN the server stops it with a grace of 3 ticks of its clock
    clock = Ticks()
    with caplog.at_level(logging.WARNING, logger="vllm.kvtrace"):
        stop_engine_cores([proc], tmp_path, grace_s=3.0, limit_s=50.0, clock=clock)
    # THEN the wait ended at the grace (its start, then a look at 1, 2 and 3 ticks), not at the bound: the
    # process is vLLM's to kill, and nothing was said
    assert clock.now == 4.0
    assert proc.is_alive()
    assert not [r for r in caplog.records if "has not closed its run" in r.getMessage()]


def test_a_run_held_past_the_bound_is_left_to_vllm(
    start_engine_core: StartEngineCore, tmp_path: Path
) -> None:
    # GIVEN an engine core whose run stays open (a step that never ends)
    run_dir = tmp_path / "serve"
    run_dir.mkdir()
    proc = start_engine_core(run_dir, LINGER_S)
    # WHEN the server stops it, bounded at 5 ticks of its clock (vLLM's bound on a step, in the plugin)
    stop_engine_cores([proc], run_dir, grace_s=1.0, limit_s=5.0, clock=Ticks())
    # THEN the wait gave up at the bound, the run still open: vLLM's shutdown kills what is left
    assert holder(run_dir) == str(proc.pid)
    assert proc.is_alive()


def test_an_engine_core_that_exits_ends_the_wait(start_engine_core: StartEngineCore, tmp_path: Path) -> None:
    # GIVEN an engine core holding its run that dies of the SIGTERM (its default action, as vLLM puts back
    # once the engine core's loop has ended)
    run_dir = tmp_path / "serve"
    run_dir.mkdir()
    proc = start_engine_core(run_dir, LINGER_S, takes_sigterm=False)
    # WHEN the server stops it, with a grace as long as its bound
    clock = Ticks()
    stop_engine_cores([proc], run_dir, grace_s=50.0, limit_s=50.0, clock=clock)
    # THEN it returned once the process was gone (its lock with it), long before either
    assert clock.now < 50.0
    assert not proc.is_alive() and proc.exitcode == -signal.SIGTERM
    assert holder(run_dir) is None
