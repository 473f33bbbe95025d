"""kvtrace's vLLM general plugin (entry point group `vllm.general_plugins`): records multiprocess engines.

vLLM calls `register()` in every process it starts (the front end, the engine core, workers). Without
`KVTRACE_DIR` in the environment it returns at once and changes nothing. With it, it patches, in this
process only:

- `EngineCore.step` and `EngineCore.step_with_batch_queue` (class attributes): the first step of an engine
  core opens a kvtrace run at `$KVTRACE_DIR` and installs the same hooks as the in-process recorder;
  every step is then recorded;
- `EngineCore.shutdown`: finishes the run (manifest `ended`) before the engine tears down; an `atexit`
  handler does it if shutdown never comes;
- `EngineCoreProc._send_engine_dead`: an engine core dying of an exception finishes its run (`exception`)
  before vLLM tells the front end, whose shutdown SIGTERMs this process as soon as it hears: vLLM has put
  SIGTERM back to its default action by then, so the process dies before `shutdown` or `atexit` runs;
- `EngineCoreProc.run_busy_loop` (and the data-parallel one): the loop ends on a stop signal (SystemExit)
  once the requests are aborted; the run is finished there, while vLLM's handlers still take SIGTERM. In
  `EngineCore.shutdown` it was too late for Ctrl-C on `vllm serve`: the engine core's SIGINT ends its
  loop, vLLM puts SIGTERM back to its default action, and the front end's SIGTERM, which its own SIGINT
  sends a moment later, killed it before the run was closed;
- vLLM's KV-memory check (`kv_cache_utils._check_enough_kv_cache_memory`): a refused start leaves a run
  whose engine.json has status `refused_start`;
- in the front end, `CoreEngineProcManager.shutdown`: `vllm serve` stopped by SIGINT or SIGTERM (with
  `--shutdown-timeout 0`, the default) aborts its requests and SIGTERMs then SIGKILLs the engine core at
  once, mostly before its loop has ended: the run stayed `running`, read as a process that died. The
  engine core gets `SHUTDOWN_GRACE_S` to exit on its own instead, as vLLM gives its processes when no
  timeout is set (the run is closed in well under a second; vLLM's worker teardown takes longer), and
  more while it still holds its run open: a step in flight ends first (`vllm_shutdown`).

Modules not imported yet are patched when they are imported (a `sys.meta_path` finder), so registering
early costs nothing. Options: `KVTRACE_PROFILER=1` runs torch.profiler too (off by default: a server runs
for hours), `KVTRACE_OVERWRITE=1` replaces a run already in `$KVTRACE_DIR`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ENV_DIR = "KVTRACE_DIR"
ENV_OVERWRITE = "KVTRACE_OVERWRITE"
_ENGINE_CORE_MODULE = "vllm.v1.engine.core"
_ENGINE_UTILS_MODULE = "vllm.v1.engine.utils"
_STATE: dict[str, Any] = {}
_log = logging.getLogger("kvtrace.vllm")


def register() -> None:
    """vLLM's entry point: nothing at all without KVTRACE_DIR."""
    if not os.environ.get(ENV_DIR) or _STATE.get("registered"):
        return
    _STATE["registered"] = True
    from kvtrace.integrations.vllm import RefusalWatch, after_import

    watch = RefusalWatch(_on_refused)
    watch.install()
    _STATE["watch"] = watch
    after_import(_ENGINE_CORE_MODULE, _patch_engine_core)
    after_import(_ENGINE_UTILS_MODULE, _patch_shutdown_grace)


def _process_label() -> str:
    return "engine_core" if multiprocessing.parent_process() is not None else "inproc"


def _open_run() -> Any:
    from kvtrace.options import RecordOptions
    from kvtrace.recorder import Recording, RecordingError

    options = RecordOptions(
        profiler=os.environ.get("KVTRACE_PROFILER") == "1",
        overwrite=os.environ.get(ENV_OVERWRITE) == "1",
    )
    recording = Recording(os.environ[ENV_DIR], options=options)
    recording.vllm_watch = False  # this plugin's own watch reports refusals
    recording.takes_sigterm = False  # the engine core's SIGTERM is vLLM's: it shuts the engine down
    recording.vllm_process = _process_label()
    try:
        recording.__enter__()
    except RecordingError as exc:  # said in this process's terms: an environment variable, not an argument
        raise RecordingError(str(exc).replace("pass overwrite=True", f"set {ENV_OVERWRITE}=1")) from None
    return recording


def _patch_engine_core(module: Any) -> None:
    cls = module.EngineCore
    if cls.__dict__.get("_kvtrace_patched"):
        return
    cls._kvtrace_patched = True
    for name in ("step", "step_with_batch_queue"):
        setattr(cls, name, _wrap_step(getattr(cls, name)))
    original_shutdown = cls.shutdown

    def shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        finish(self)  # while the scheduler and the executor still exist
        return original_shutdown(self, *args, **kwargs)

    cls.shutdown = shutdown
    proc_cls: Any = getattr(module, "EngineCoreProc", None)
    original_send_dead = getattr(proc_cls, "_send_engine_dead", None)
    if original_send_dead is not None:

        def send_engine_dead(self: Any, *args: Any, **kwargs: Any) -> Any:
            # Called in run_engine_core's `except Exception`: the exception the engine core dies of
            finish(self, sys.exc_info()[1])
            return original_send_dead(self, *args, **kwargs)

        proc_cls._send_engine_dead = send_engine_dead
    for loop_cls in (proc_cls, getattr(module, "DPEngineCoreProc", None)):
        if loop_cls is not None and "run_busy_loop" in loop_cls.__dict__:
            loop_cls.run_busy_loop = _finish_at_loop_exit(loop_cls.__dict__["run_busy_loop"])


def _finish_at_loop_exit(original: Any) -> Any:
    def run_busy_loop(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except SystemExit:  # a stop signal, its requests aborted: before vLLM restores SIGTERM's default
            finish(self)
            raise

    run_busy_loop.__wrapped__ = original  # type: ignore[attr-defined]
    return run_busy_loop


def _patch_shutdown_grace(module: Any) -> None:
    """The front end's side of closing the run: the engine core gets the time it takes to close its run
    (`vllm_shutdown.stop_engine_cores`) before vLLM's shutdown kills what is left."""
    cls = getattr(module, "CoreEngineProcManager", None)
    if cls is None or cls.__dict__.get("_kvtrace_patched"):
        return
    cls._kvtrace_patched = True
    original = cls.shutdown

    def shutdown(self: Any, timeout: float | None = None) -> Any:
        if self.__dict__.get("_kvtrace_stopping"):
            # Another thread's call while the first waits (vLLM's liveness monitor, as the engine core
            # exits): vLLM's own shutdown would SIGKILL it within 5 s, its run perhaps still open
            return None
        finalizer = getattr(self, "_finalizer", None)
        # `--shutdown-timeout 0` (vLLM's default): requests aborted, the engine core SIGKILLed at once
        if (
            timeout == 0
            and getattr(self, "_request_shutdown_timeout", None) == 0
            and getattr(finalizer, "alive", False)  # not shut down already
        ):
            self.__dict__["_kvtrace_stopping"] = True
            stopped = getattr(self, "manager_stopped", None)
            if stopped is not None:
                stopped.set()  # as vLLM's shutdown does first: an engine core's exit is no failure now
            _stop_engine_cores(module, self.processes)
        return original(self, timeout)

    shutdown.__wrapped__ = original  # type: ignore[attr-defined]
    cls.shutdown = shutdown


def _stop_engine_cores(module: Any, processes: list[Any]) -> None:
    """SIGTERM the engine cores and wait while they close their runs, vLLM's own grace at least (ROCm:
    15 s), at most vLLM's bound on a step or a minute past the grace; never fails vLLM's shutdown."""
    from kvtrace.integrations.vllm_shutdown import (
        SHUTDOWN_GRACE_S,
        STEP_TIMEOUT_S,
        STEP_WAIT_S,
        stop_engine_cores,
    )

    try:
        vllm_grace = module.get_engine_process_shutdown_timeout(0, 0) or 0  # ROCm: 15 s, else 0
        step_timeout = getattr(getattr(module, "envs", None), "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", None)
        grace = max(SHUTDOWN_GRACE_S, vllm_grace)
        step_s = float(step_timeout if step_timeout is not None else STEP_TIMEOUT_S)
        limit = grace + min(step_s, STEP_WAIT_S)
        _log.info(
            "kvtrace: the engine core has %.0f s to exit, more while its run at $%s is open", grace, ENV_DIR
        )
        stop_engine_cores(processes, Path(os.environ[ENV_DIR]), grace, limit)
    except Exception as exc:  # vLLM's shutdown goes on: it SIGKILLs what is left
        _log.warning("kvtrace: not waiting for the engine core to close its run: %s", exc)


def _wrap_step(original: Any) -> Any:
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        hooks = _hooks_for(self)
        if hooks is None:
            return original(self, *args, **kwargs)
        return hooks.around_step(lambda: original(self, *args, **kwargs))

    step.__wrapped__ = original  # type: ignore[attr-defined]
    return step


def _hooks_for(core: Any) -> Any:
    state = core.__dict__
    hooks = state.get("_kvtrace_hooks")
    if hooks is not None or state.get("_kvtrace_off"):
        return hooks
    state["_kvtrace_off"] = True  # one try per engine; the engine must never fail because of us
    try:
        from kvtrace.integrations.vllm_engine import VllmRecording

        recording = _open_run()
        try:
            vllm = VllmRecording(recording, core=core, process=recording.vllm_process, wrap_step=False)
            recording._vllm = vllm
            vllm.install()
        except BaseException:
            recording.__exit__(None, None, None)
            raise
    except Exception as exc:
        _log.warning("kvtrace: not recording this vLLM engine: %s", exc)
        return None
    state["_kvtrace_hooks"] = vllm.hooks
    state["_kvtrace_recording"] = recording
    if recording.vllm_process == "engine_core":
        _note_stop_signals(recording)
    state["_kvtrace_off"] = False
    atexit.register(finish, core)
    return vllm.hooks


def _note_stop_signals(recording: Any) -> None:
    """The engine core's SIGINT and SIGTERM handlers (vLLM's, which begin its shutdown) wrapped to note the
    first signal on the recording before they run: a Ctrl-C reaches vLLM's workers too, and one that dies
    under a step makes that step raise (`RuntimeError: cancelled`), which is the stop, not an engine error.
    Only on the main thread (the engine core's loop), where vLLM set its handlers; nothing else changes."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if not callable(handler):
            continue

        def noted(number: int, frame: Any, _handler: Any = handler) -> Any:
            if recording.stop_signal is None:
                recording.stop_signal = (signal.Signals(number).name, time.time_ns())
            return _handler(number, frame)

        signal.signal(signum, noted)


def finish(core: Any, error: BaseException | None = None) -> None:
    """Close the engine core's run (idempotent): hooks undone, files complete, manifest `ended`: `exception`
    where a step raised (vLLM's engine core dies of it) or `error` is the one the engine core dies of, else
    `ok`."""
    recording = core.__dict__.pop("_kvtrace_recording", None)
    hooks = core.__dict__.pop("_kvtrace_hooks", None)
    if recording is not None:
        core.__dict__["_kvtrace_off"] = True
        raised = getattr(hooks, "raised", None) or error
        with contextlib.suppress(Exception):
            recording.__exit__(type(raised) if raised is not None else None, raised, None)


def _on_refused(refused: dict[str, Any], vllm_config: Any) -> None:
    from kvtrace.integrations.vllm_engine import VllmRecording

    recording = _open_run()
    vllm = VllmRecording(recording, process=recording.vllm_process, watch=False)
    recording._vllm = vllm
    try:
        vllm.on_refused(refused, vllm_config)
    finally:
        error = ValueError(str(refused.get("message", "")))
        recording.__exit__(ValueError, error, None)
