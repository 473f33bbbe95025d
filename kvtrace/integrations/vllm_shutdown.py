"""The front end's side of closing the engine core's run when `vllm serve` stops (`--shutdown-timeout 0`,
vLLM's default): vLLM SIGTERMs its engine core and SIGKILLs it at once, mostly before the engine core has
closed its run at `$KVTRACE_DIR`, which then reads as a process that died.

The engine core closes its run as its loop ends on the signal, in well under a second, unless a step is in
flight: its main thread waits for the step first. After Ctrl-C that step ends only once vLLM's worker, which
the terminal's SIGINT reached too, has exited (vLLM's executor then cancels it), and on a loaded machine
the worker's exit took 9-11 s (2 cores at a load of 7-9). A fixed grace (5 s, what vLLM gives its
processes when no timeout is set) ran out first: the engine core was SIGKILLed in its step and the run
stayed `running`.

So the wait ends on the event it is for: the engine core gets `SHUTDOWN_GRACE_S` to exit on its own, as
before, and past that as long as it still holds its run open (the run's lock, `kvtrace.run_lock`), up to
vLLM's own bound on a step (`VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`, 300 s by default: a step that takes
longer raises in the engine core, which then closes its run as it dies of it), and at most `STEP_WAIT_S`
(a minute: a step that long is hung, and Ctrl-C should not hold the user for vLLM's five). Torch-free
and vLLM-free: vLLM's objects are passed in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from kvtrace.format import rank_dirs
from kvtrace.run_lock import holder

__all__ = ["SHUTDOWN_GRACE_S", "STEP_TIMEOUT_S", "STEP_WAIT_S", "run_holders", "stop_engine_cores"]

# What vLLM's process manager waits for its processes when given no timeout (`vllm.v1.utils.shutdown`)
SHUTDOWN_GRACE_S = 5.0
# vLLM's default bound on a step's wait for its workers (`VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`)
STEP_TIMEOUT_S = 300.0
# The longest a stop waits past its grace for a step in flight: a slow step (9-11 s measured on a loaded
# host, a long prefill) ends within it; one that does not is hung, and a user who pressed Ctrl-C is not
# held five minutes for it (the run is then left as a process that died, which `kvtrace report` says)
STEP_WAIT_S = 60.0
_POLL_S = 0.1
# Under vLLM's logger: its handlers show the line beside the server's own shutdown lines, where a user looks
_log = logging.getLogger("vllm.kvtrace")


def run_holders(run_dir: Path) -> set[str]:
    """The pids of the recordings that hold a run open at `run_dir` (a run, or a group's rank runs)."""
    folders = [run_dir, *(folder for _, folder in rank_dirs(run_dir))]
    return {pid for pid in map(holder, folders) if pid}


def stop_engine_cores(
    procs: Sequence[BaseProcess],
    run_dir: Path,
    grace_s: float = SHUTDOWN_GRACE_S,
    limit_s: float = STEP_WAIT_S + SHUTDOWN_GRACE_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """SIGTERM the engine core processes, as vLLM's shutdown does, and wait for them to exit: `grace_s` at
    least, past that while one of them still holds its run at `run_dir` open, never past `limit_s`. What is
    still alive then is vLLM's to kill."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    start = clock()
    said = False
    while True:
        alive = [proc for proc in procs if proc.is_alive()]
        waited = clock() - start
        if not alive or waited >= limit_s:
            return
        if waited >= grace_s:
            holding = sorted(run_holders(run_dir) & {str(proc.pid) for proc in alive})
            if not holding:
                return
            if not said:  # a warning: without it a Ctrl-C that takes this long reads as a hung server
                _log.warning(
                    "kvtrace: the engine core (pid %s) has not closed its run at %s yet (its step in flight "
                    "ends first); waiting for it, at most %.0f s more",
                    ", ".join(holding),
                    run_dir,
                    limit_s - waited,
                )
                said = True
        ended = connection.wait([proc.sentinel for proc in alive], timeout=_POLL_S)
        for proc in alive:
            if proc.sentinel in ended:
                # Its sentinel closes a moment before it can be reaped: `is_alive` would still say so, and
                # each look come at once
                proc.join()
