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
- vLLM's KV-memory check (`kv_cache_utils._check_enough_kv_cache_memory`): a refused start leaves a run
  whose engine.json has status `refused_start`.

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
import sys
from typing import Any

ENV_DIR = "KVTRACE_DIR"
ENV_OVERWRITE = "KVTRACE_OVERWRITE"
_ENGINE_CORE_MODULE = "vllm.v1.engine.core"
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
    state["_kvtrace_off"] = False
    atexit.register(finish, core)
    return vllm.hooks


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
