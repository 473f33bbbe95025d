"""`kvtrace.record()`: one context manager that captures a run into a run directory.

While the block runs, an active `Recording` collects (KV tracker, cache hooks, profiler, NVTX, CUDA
history); when it ends, every hook is undone in `finally`, every file is closed complete, and the manifest
says how the run ended. The exception, if any, propagates unchanged.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from kvtrace import format as fmt
from kvtrace.cuda_snapshots import CudaSnapshots
from kvtrace.distributed import local_tensor, rank_facts, run_path
from kvtrace.errors import KvtraceError, RecordingError
from kvtrace.forward_inputs import ForwardSignature, is_prefill, new_tokens
from kvtrace.geometry import model_geometry
from kvtrace.integrations.hf_caches import HfCacheHooks
from kvtrace.integrations.hf_generate import GenerateCalls
from kvtrace.integrations.hf_paged import PagedAttentionHooks
from kvtrace.integrations.module_caches import ModuleCaches
from kvtrace.integrations.vllm import is_vllm_object
from kvtrace.kv_tracker import KvTracker
from kvtrace.memory_samples import MemorySampler
from kvtrace.model_forward import ForwardWrap
from kvtrace.options import RecordOptions
from kvtrace.profiler_trace import trace_handler
from kvtrace.run_lock import RunFolderBusy, RunLock
from kvtrace.run_writer import RunWriter

_ACTIVE_LOCK = threading.Lock()
_ACTIVE: Recording | None = None


def _after_fork_in_child() -> None:
    """A process forked inside a recording (a DataLoader worker, multiprocessing) inherits its hooks but not
    its writer thread, and perhaps a lock that thread held: fresh locks, no writer. Its events are the
    child's own and are not written (the parent's run is the parent's)."""
    recording = _ACTIVE
    if recording is None:
        return
    recording._writer = None
    recording._flush_lock = threading.Lock()
    recording._run_lock.forget()
    tracker = getattr(recording, "tracker", None)
    if tracker is not None:
        tracker.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# A C++ record_function context (torch >= 2.2); older torch goes through the dispatcher op.
_FAST_RECORD_FUNCTION: Any = getattr(getattr(torch._C, "_profiler", None), "_RecordFunctionFast", None)


class _Ranges:
    """NVTX ranges and, while the profiler runs, `record_function` ranges of the same names."""

    def __init__(self, use_nvtx: bool, use_record_function: bool) -> None:
        self._nvtx: Any = None
        if use_nvtx:
            from kvtrace.nvtx_ranges import NvtxRanges  # a no-op without the nvtx package or a tool

            ranges = NvtxRanges("kvtrace")
            self._nvtx = ranges if ranges.enabled else None
        self._use_rf = use_record_function
        # Nobody listening (no NVTX tool, no profiler): callers skip push/pop altogether.
        self.active = self._nvtx is not None or use_record_function
        self.nvtx: Any = self._nvtx
        # One stack per thread: NVTX and record_function ranges are per thread, and torch refuses to close
        # a range from another thread than the one that opened it (continuous batching's generation thread).
        self._stacks: dict[int, list[Any]] = {}

    def push(self, name: str) -> None:
        if self._nvtx is not None:
            self._nvtx.push(name)
        handle: Any = None
        if self._use_rf:
            if _FAST_RECORD_FUNCTION is not None:
                # ~1 µs per range against ~30 µs through the dispatcher op (torch 2.13, CPU)
                handle = _FAST_RECORD_FUNCTION(name)
                handle.__enter__()
            else:
                handle = torch.ops.profiler._record_function_enter_new(name, None)
        self._stacks.setdefault(threading.get_ident(), []).append(handle)

    def pop(self) -> None:
        stack = self._stacks.get(threading.get_ident())
        if not stack:
            return
        handle = stack.pop()
        if handle is not None:
            if _FAST_RECORD_FUNCTION is not None:
                handle.__exit__(None, None, None)
            else:
                torch.ops.profiler._record_function_exit._RecordFunction(handle)
        if self._nvtx is not None:
            self._nvtx.pop()

    def mark(self, name: str) -> None:
        if self._nvtx is not None:
            self._nvtx.mark(name)

    def close_all(self) -> None:
        """Balance what an exception left open on this thread; another thread's open ranges (a generation
        thread still running, or one whose step failed) cannot be closed from here and are forgotten."""
        own = self._stacks.pop(threading.get_ident(), [])
        self._stacks.clear()
        self._stacks[threading.get_ident()] = own
        while own:
            self.pop()


class Recording:
    """The active recording. Created by `record()`; use it as a context manager."""

    def __init__(
        self, out_dir: str | os.PathLike[str], model: Any = None, options: RecordOptions | None = None
    ):
        if not isinstance(out_dir, str | os.PathLike):
            raise RecordingError(f"record(): the run folder must be a path, got {type(out_dir).__name__}")
        self.path = Path(out_dir)
        if model is not None and not isinstance(model, torch.nn.Module) and not is_vllm_object(model):
            # Checked before anything is written: a half-made run would block the retry.
            raise RecordingError(
                f"record(model=...): a torch.nn.Module (or a vllm.LLM) is needed, got {type(model).__name__}"
            )
        self.model = _uncompiled(model)
        # A vllm.LLM is recorded through its engine core (integrations/vllm_engine.py), not as a module;
        # with no model at all, a vLLM start refused inside the block still leaves its figures.
        self._vllm_llm: Any = None
        self._vllm: Any = None
        self._paged: PagedAttentionHooks | None = None  # transformers' continuous batching (generate_batch)
        self.vllm_process = "inproc"
        self.vllm_watch = True
        if is_vllm_object(model):
            from kvtrace.integrations.vllm import engine_core_of

            try:  # refused here, before a file is written: a half-made run would block the retry
                engine_core_of(model)
            except KvtraceError as exc:
                raise RecordingError(str(exc)) from None
            self._vllm_llm, self.model = model, None
        self.options = options or RecordOptions()
        self.notes: list[str] = []
        self._clock = self.options.clock
        self._events: fmt.JsonlAppender | None = None
        self._samples: fmt.JsonlAppender | None = None
        self._forward: ForwardWrap | None = None
        self._profiler: Any = None
        self._ranges: _Ranges | None = None
        self._hf: HfCacheHooks | None = None
        self._calls: GenerateCalls | None = None  # the model's generate() calls: each one's first forward
        self._modules: ModuleCaches | None = None
        self._signature = ForwardSignature()  # where the model's forward takes Meta's `start_pos`
        self._module_tokens_unknown = 0  # steps that wrote a module cache without saying where
        self._snapshots: CudaSnapshots | None = None
        self._manifest: dict[str, Any] = {}
        self._decode_index = 0
        self._attention_modules: list[Any] = []
        self._submodules: list[Any] = []  # the model's modules but itself (its hooks run outside its forward)
        self._step_open = False
        self._prefill_left = 0  # prompt positions a chunked prefill has still to write (one step for all)
        self._prefill_continues = False  # the open step is a chunked prefill's, ended by its last chunk
        self._prompt_end: int | None = None  # where the running generate() call's prompt ends in its cache
        self._model_caches: set[int] = set()  # the HF caches the model's own forwards were given
        # (cache, new tokens, updates seen, deferred, cache empty before it) of the running forward
        self._step_cache: tuple[Any, ...] | None = None
        # Light mode with no NVTX tool listening: a forward's layer updates may be compared once, at its end
        # (`HfCacheHooks.defer`); `_defer_step` is decided at each prefill (`_cache_hooked`).
        self._may_defer = False
        self._defer_step: bool | None = None  # None until the first forward with a cache
        self._profiler_on = bool(self.options.profiler)
        self._thread = threading.get_ident()  # the one torch.profiler records (the thread entering the block)
        self._forwards_elsewhere = 0  # forwards on other threads (generate() beside a TextIteratorStreamer)
        # The logs reach their files from a writer thread every 0.1 s (and at the end of the block), so a
        # decode step neither formats nor writes them (issue 11); `_flush` may run on either thread.
        self._writer: RunWriter | None = None
        self._flush_lock = threading.Lock()
        self._write_error: str | None = None  # the first failed write, named by file: the run is incomplete
        self._trace_error: str | None = None  # the profiler's trace not written (the logs went on)
        self.event_count = 0  # KV lines written
        self.events_lost = 0  # KV lines made after a failed write, dropped
        self._sampler: MemorySampler | None = None
        self._run_lock = RunLock(self.path)

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Recording:
        global _ACTIVE
        with _ACTIVE_LOCK:
            if _ACTIVE is not None:
                raise RecordingError(
                    f"kvtrace.record({str(self.path)!r}) inside the recording of {str(_ACTIVE.path)!r}: "
                    "recordings cannot be nested or run concurrently"
                )
            _ACTIVE = self
        try:
            self._start()
        except BaseException:
            self._teardown()
            self._run_lock.release()
            with _ACTIVE_LOCK:
                _ACTIVE = None
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _ACTIVE
        try:
            self._finish(exc)
        finally:
            self._run_lock.release()
            with _ACTIVE_LOCK:
                _ACTIVE = None

    def _start(self) -> None:
        facts = rank_facts()  # in a process group of several ranks, each records into out_dir/rank-<r>
        self.path = run_path(self.path, facts, self.options.overwrite)
        existed = self.path.is_dir()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, a read-only or missing parent, a full disk
            why = exc.strerror or str(exc)
            if self.path.exists() and not self.path.is_dir():
                why = "a file of that name is there, not a folder"
            message = f"{self.path}: cannot create the run folder ({why})"
            raise RecordingError(message, exit_code=1) from None
        # Before looking at what the folder holds: another recording may be replacing it right now.
        self._run_lock = RunLock(self.path)
        try:
            self._run_lock.acquire()
        except RunFolderBusy as busy:
            holder = f"pid {busy.pid}" if busy.pid else "pid unknown"
            raise RecordingError(
                f"{self.path}: another recording is writing this folder ({holder})", exit_code=1
            ) from None
        except OSError as exc:
            message = f"{self.path / fmt.LOCK_FILE}: cannot write ({exc.strerror or exc})"
            raise RecordingError(message, exit_code=1) from None
        manifest_path = self.path / fmt.MANIFEST
        replacing = manifest_path.exists()
        if replacing and not self.options.overwrite:
            raise RecordingError(
                f"{self.path}: already holds a kvtrace run (pass overwrite=True to replace it)"
            )
        owned = (fmt.KV_EVENTS, fmt.WEIGHTS, fmt.MEMORY_SAMPLES, *fmt.ENGINE_FILES, *fmt.DERIVED_FILES)
        owned_dirs = (fmt.PROFILER_DIR, fmt.SNAPSHOT_DIR, *fmt.DERIVED_DIRS)
        if not replacing and existed:
            # Not a run: whatever is here is the user's. A run would write over these names, so refuse.
            clashes = [name for name in (*owned, *owned_dirs) if (self.path / name).exists()]
            if clashes:
                raise RecordingError(
                    f"{self.path}: not a kvtrace run, but it holds {', '.join(clashes)}, which a run writes: "
                    "record into a new or empty folder"
                )
        # Replacing a run: its old files go, so that no reader mixes two recordings (an old trace in
        # profiler/ would otherwise sit beside the new one). Only names the format owns are touched.
        for name in owned if replacing else ():
            (self.path / name).unlink(missing_ok=True)
        for folder in owned_dirs if replacing else ():
            if (self.path / folder).is_dir():
                shutil.rmtree(self.path / folder)
        self._manifest = self._initial_manifest()
        self._manifest.update(facts or {})
        try:  # with room for the final manifest, should the disk be full by then
            fmt.write_json_atomic(manifest_path, self._manifest, reserve=fmt.MANIFEST_RESERVE_BYTES)
        except OSError as exc:
            raise RecordingError(
                f"{manifest_path}: cannot write ({exc.strerror or exc})", exit_code=1
            ) from None
        self._events = fmt.JsonlAppender(self.path / fmt.KV_EVENTS)
        self._samples = fmt.JsonlAppender(self.path / fmt.MEMORY_SAMPLES)
        tracker = KvTracker(self._clock, on_evict=self._on_evict)
        self.tracker = tracker
        self._ranges = _Ranges(self.options.nvtx, self.options.profiler)
        if self._vllm_llm is not None or (self.model is None and self.vllm_watch):
            from kvtrace.integrations.vllm_engine import VllmRecording

            self._vllm = VllmRecording(self, self._vllm_llm, self.vllm_process)
            self._vllm.install()
        if self._vllm_llm is None:
            self._paged = PagedAttentionHooks(self)
            self._paged.install()
        if HfCacheHooks.available():
            # A range per layer update in NVTX only (Nsight's view, ~0.5 us with a tool, nothing without);
            # in the profiler they cost more than the bookkeeping itself with stacks on (issue 11), so the
            # trace keeps step and eviction ranges.
            nvtx = self._ranges.nvtx
            if nvtx is not None:
                self._hf = HfCacheHooks(tracker, nvtx.push, nvtx.pop)
            else:
                self._hf = HfCacheHooks(tracker)
            if self.model is None:
                self._hf.on_first_layer = self._auto_step
            self._hf.install()
            self._may_defer = self.model is not None and not self.options.profiler and not self._ranges.active
        self._modules = ModuleCaches(tracker, self.options.cache_attrs)
        if self.model is not None:
            self._modules.discover(self.model)
            self._signature = ForwardSignature.of(self.model)
            self._write_weights(self._modules.weight_exclusions())
            # Around `model.forward` itself, which Meta's Llama3.generate calls directly (no forward hook
            # fires there); eager even when torch.compile traces the model's __call__.
            self._forward = ForwardWrap(self.model, self._pre_forward, self._post_forward)
            self._forward.install()
            if GenerateCalls.available(self.model):
                self._calls = GenerateCalls(self.model)
                self._calls.install()
        self._modules.scan("track")
        if self.model is not None:
            # HF attention modules carry `layer_idx`; eviction libraries hang their masks on them.
            self._attention_modules = [m for m in self.model.modules() if hasattr(m, "layer_idx")]
            self._submodules = [m for m in self.model.modules() if m is not self.model]
        self._snapshots = CudaSnapshots(self.path / fmt.SNAPSHOT_DIR, self.options.max_snapshot_entries)
        if self.options.snapshots:
            self._manifest["snapshots"] = self._snapshots.start()
        else:
            self._manifest["snapshots"] = {"status": "absent", "reason": "snapshots=False"}
        if self._manifest["snapshots"]["status"] == "absent" and self.options.snapshots:
            self.notes.append(f"snapshots: {self._manifest['snapshots']['reason']}")
        if self.options.profiler:
            self._profiler = self._make_profiler()
            with _kineto_quiet():
                self._profiler.__enter__()
        model_device = _model_device(self.model)
        cuda_index: int | None = None
        if model_device is not None and model_device.type == "cuda":
            cuda_index = model_device.index or 0
        elif self.model is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_index = torch.cuda.current_device()
        # The sampler's 20 ms cadence counts on the samples' own clock (`t_ns`), read once per sample.
        self._sampler = MemorySampler(cuda_index, clock=self._clock_s)
        self._manifest["monitors"] = {
            "cpu_percent": "process CPU time (user + system) / wall time since the last sample; 100 = a core",
            "nvml": self._sampler.nvml_status,
        }
        self._sample("start")
        self._flush()
        # From here the writer thread reads the host's figures every 20 ms; steps sample the allocator's.
        self._sampler.host_elsewhere = True
        self._writer = RunWriter(self._flush, self._sample_host)
        self._writer.start()

    def _finish(self, exc: BaseException | None) -> None:
        self._stop_writer()
        ended: dict[str, Any] = {"status": "ok"}
        if exc is not None:
            ended = {"status": "exception", "type": type(exc).__name__, "message": str(exc)[:2000]}
            if isinstance(exc, KeyboardInterrupt):
                ended["status"] = "interrupted"
        try:
            if self._ranges is not None:
                self._ranges.close_all()
            with contextlib.suppress(Exception):
                self._settle_deferred()
                if self._prefill_continues:  # generate() raised between two chunks of its prefill
                    self._prefill_continues = False
                    self._end_step()
                if self._hf is not None:
                    self._hf.scan_all(forget=False)  # a cache dropped by now is freed in phase "end"
                if self._modules is not None and self._modules.scan("track"):
                    self._module_tokens_unknown += 1  # written outside any forward kvtrace saw
            if exc is not None and self._snapshots is not None and _is_oom(exc):
                ended["oom_snapshot"] = self._snapshots.dump("oom.pickle")
        finally:
            self._teardown()
        if self._snapshots is not None and self._snapshots.active:
            self._manifest["snapshots"]["exit"] = self._snapshots.dump("exit.pickle")
            self._snapshots.stop()
        self._sample("end")
        if self._sampler is not None:
            self._manifest.setdefault("monitors", {})["nvml"] = self._sampler.nvml_status
            self._sampler.close()
        # Storages still held by the caller's cache stay alive; those the block dropped are logged as freed,
        # in phase "end", so that analyzers can tell the cache's final state from its teardown.
        self.tracker.phase = "end"
        self.tracker.release_all()
        self.tracker.poll_frees()
        if self.tracker.pending_frees():
            # A young-generation pass frees caches caught in short-lived cycles; a full collection cost
            # 0.3-0.5 s per record() (benchmarks/recorder_overhead.py) for storages the caller still holds.
            gc.collect(0)
            self.tracker.poll_frees()
        self._flush()
        self.tracker.close()
        for appender in (self._events, self._samples):
            if appender is not None:
                try:
                    appender.close()
                except OSError as error:
                    self._write_failed(appender, error)
        if self._trace_error is not None:
            self._write_error = self._trace_error
        ended["t_ns"] = self._clock()
        self._manifest["ended"] = ended
        self._manifest["files"] = sorted(
            str(p.relative_to(self.path))
            for p in self.path.rglob("*")
            if p.is_file() and p.suffix != ".tmp" and p.name != fmt.LOCK_FILE
        )
        self._manifest["kv_events"] = self.event_count
        if self._model_caches:
            self._manifest["model_caches"] = sorted(self._model_caches)
        if self._write_error is not None:
            ended["write_error"] = self._write_error
            ended["kv_events_lost"] = self.events_lost
        self._manifest["notes"] = self.notes
        self._manifest["warnings"] = self._warnings()
        engine = self._vllm.summary() if self._vllm is not None else None
        if engine is None and self._paged is not None:
            engine = self._paged.summary()
        if engine is not None:
            self._manifest["engine"] = engine
        self._write_manifest()
        if self._write_error is not None and exc is None:
            raise RecordingError(f"{self._write_error}: the run is incomplete", exit_code=1)

    def _write_manifest(self) -> None:
        """The final manifest; on a full disk (no room for the atomic write's new file), over the blocks
        the first one reserved, saying that the run failed to write: readers then refuse it in one line,
        instead of taking it for a run whose process died."""
        path = self.path / fmt.MANIFEST
        try:
            fmt.write_json_atomic(path, self._manifest)
            return
        except OSError as error:
            if self._write_error is None:
                self._write_error = f"{path}: cannot write ({error.strerror or error})"
        ended = self._manifest["ended"]
        ended["write_error"] = self._write_error
        ended["kv_events_lost"] = self.events_lost
        with contextlib.suppress(OSError):  # else it stays "running", as if the process died
            fmt.write_json_in_place(path, self._manifest)

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.stop()
        if self._sampler is not None:
            self._sampler.host_elsewhere = False
        if writer.error is not None:
            self.notes.append(f"writer thread failed: {type(writer.error).__name__}: {writer.error}")

    def _teardown(self) -> None:
        """Undo every hook; safe to call twice and after a partial start."""
        self._stop_writer()
        errors: list[BaseException] = []
        if self._profiler is not None:
            try:
                with _kineto_quiet():
                    self._profiler.__exit__(None, None, None)
            except Exception as exc:  # the trace is lost, the run is not
                errors.append(exc)
                self.notes.append(f"profiler trace not written: {exc}")
            self._profiler = None
        if self._forward is not None:
            self._forward.uninstall()
        if self._vllm is not None:
            self._vllm.uninstall()
        if self._paged is not None:
            self._paged.uninstall()
        if self._hf is not None:
            self._hf.uninstall()
        if self._calls is not None:
            self._calls.uninstall()
        if self._snapshots is not None and self._snapshots.active and self._events is None:
            self._snapshots.stop()

    def _warnings(self) -> list[str]:
        """What makes the run's figures incomplete, for reports to say (`notes` say what was not recorded)."""
        warnings = []
        steps = self.tracker.step
        paged = self._paged is not None and self._paged.owns_steps  # its pool is logged, its steps counted
        if steps and not self.event_count and self.model is not None and not paged:
            warnings.append(
                f"no KV cache update was seen in {steps} forward passes: use_cache=False, or a cache kvtrace "
                "does not follow (it follows transformers' Cache classes, and continuous batching's "
                "PagedAttentionCache when it is made inside the block: start the manager there; custom "
                "caches are not: name them with record(cache_attrs=...) or kvtrace.track())"
            )
        updated = self._hf.updates_seen if self._hf is not None else 0
        if not steps and updated and self.model is not None and not paged:
            warnings.append(
                f"the KV cache was updated at layer 0 {updated} times, but never in a forward of the model "
                f"passed to record() ({type(self.model).__name__}): another model generated, so the log has "
                "no steps, and per-step figures and tokens/s are left out"
            )
        if self._module_tokens_unknown and self._modules is not None:
            names = ", ".join(sorted({owner.attr for owner in self._modules.owners}))
            warnings.append(
                f"the model's own KV buffers ({names}) were written {self._module_tokens_unknown} times "
                "without saying where: kvtrace reads the tokens they hold from a forward's int `start_pos` "
                "and its input's length (Meta's reference Llama), so their token counts are unknown (logged "
                "as 0), and tokens held, generated tokens and tokens/s are left out"
            )
        if self._hf is not None and self._hf.unexplained:
            warnings.append(self._hf.unexplained)
        if self._paged is not None:
            warnings.extend(self._paged.warnings)
        if self._forwards_elsewhere and self.options.profiler:
            warnings.append(
                f"{self._forwards_elsewhere} of {steps} forward passes ran on another thread than the one "
                "that entered record(): torch.profiler records memory events of its own thread only, so the "
                "trace misses theirs (the KV log has them all)"
            )
        return warnings

    # -- steps -------------------------------------------------------------------------------------
    def _pre_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._paged is not None and self._paged.in_step:  # a continuous-batching step is the step
            if self._profiler_on and threading.get_ident() != self._thread:
                self._forwards_elsewhere += 1
            return
        hf = self._hf
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")
        continued = self._prefill_continues
        if continued:  # the next chunk of a chunked prefill, left open by the last forward's end
            self._prefill_continues = False
            if self._calls is None or not self._calls.in_call():  # its generate() call ended in between
                self._end_step()
                continued = False
        if self._step_open and not continued and self._stale(cache):
            # The last forward's end hook never ran (torch skips always-called hooks on a KeyboardInterrupt):
            # its step ends here, and this forward starts its own.
            self._settle_deferred()
            self._end_step()
        elif self._step_cache is not None and self._step_cache[3]:
            self._settle_deferred()  # a forward in a forward: the outer one's layers so far
        # The model's forward called again inside itself: part of the outer step
        nested = self._step_open and not continued
        modules = self._modules
        # What the model's own caches hold before this forward, without reading a tensor: Meta's
        # `start_pos`, else the tracked tensors' last logged tokens
        held = self._signature.start_pos(args, kwargs)
        if held is None and modules is not None:
            held = modules.held_tokens()
        empty = is_prefill(args, kwargs, cache, hf, held)
        # A generate() call's first forward writes its prompt, also on a cache reused from an earlier call
        # (several tokens per row on a cache that holds some, as assisted decoding's later forwards do)
        began = not nested and self._calls is not None and self._calls.began()
        prefill = empty or began
        self._begin_step(prefill)
        if nested:
            return
        if began:
            self._prompt_start(cache, args, kwargs)
        elif continued:
            self._prefill_left = max(self._prefill_left - new_tokens(args, kwargs), 0)
        if modules is not None and modules.owners:
            modules.progress = self._signature.progress(args, kwargs)
        if self._profiler_on and threading.get_ident() != self._thread:
            self._forwards_elsewhere += 1
        if hf is not None and cache is not None and isinstance(cache, hf._cache_cls):
            self._model_caches.add(hf.cache_id(cache))  # not an assistant's draft cache
            appended = new_tokens(args, kwargs)
            deferred = False
            if self._may_defer:
                if prefill or self._defer_step is None:  # eviction hooks are in place before generate()
                    self._defer_step = not self._cache_hooked()
                deferred = self._defer_step and appended > 0 and hf.defer(cache)
            # Weakly: a forward whose end hook never runs must not keep its cache alive
            self._step_cache = (_weak(cache), appended, hf.updates_seen, deferred, empty)

    def _post_forward(self, module: Any, args: Any, output: Any) -> None:
        if self._paged is not None and self._paged.in_step:
            return
        step_cache, self._step_cache = self._step_cache, None
        compared = None
        hf = self._hf
        if step_cache is not None and hf is not None:
            ref, new_tokens, seen, deferred, empty = step_cache
            cache = ref()
            if cache is None:
                pass  # dropped during its own forward: its storages' frees are found by the step's end
            elif deferred:  # `output` is None when the forward raised (the hook is always called)
                hf.step_end(cache, new_tokens, written=False, complete=output is not None, fresh=empty)
                compared = cache
            elif hf.updates_seen == seen and output is not None and new_tokens:
                # No update reached the wrapper: they ran in a compiled graph.
                hf.step_end(cache, new_tokens, written=True, fresh=empty)
                compared = cache
        if self._prefill_left > 0 and output is not None:
            self._prefill_continues = True  # the step ends with the prefill's last chunk
            return
        self._prefill_left = 0
        self._end_step(compared)

    def _prompt_start(self, cache: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """At a generate() call's first forward: the cache positions its prompt ends at, on an empty cache
        (`_prompt_end`, told in the prefill step's sample: what a first forward writes beyond it are draft
        tokens under verification, assisted decoding's), and the positions a chunked prefill
        (`prefill_chunk_size`) still has to write after this forward (`_prefill_left`): its chunks are one
        step, yielding one token."""
        self._prompt_end = None
        self._prefill_left = 0
        calls, hf = self._calls, self._hf
        if calls is None:
            return
        prompt = calls.prompt
        if not calls.cache_passed:
            past: int | None = 0  # generate() made the cache
        else:
            past = hf.positions_seen(cache) if hf is not None and cache is not None else None
        if prompt is None or past is None or prompt < past:
            return  # the call passed only its new tokens (the cache holds the rest), or nothing tells
        if past == 0:
            # On a cache that holds some, the input may be written whole again (prompt lookup does), so
            # where the prompt ends is known on an empty one only
            self._prompt_end = prompt
        fed = new_tokens(args, kwargs)
        if fed > 0 and past + fed < prompt:
            self._prefill_left = prompt - past - fed

    def _settle_deferred(self) -> None:
        """Log what a deferred forward changed before its end: torch skips the always-called end hook when
        a forward raises a KeyboardInterrupt (not an Exception), and a forward may run inside another."""
        pending, self._step_cache = self._step_cache, None
        if pending is not None and pending[3] and self._hf is not None:
            ref, new_tokens, _, _, empty = pending
            cache = ref()
            if cache is not None:
                self._hf.step_end(cache, new_tokens, written=False, complete=False, fresh=empty)

    def _stale(self, cache: Any) -> bool:
        """Whether the open step belongs to a forward that ended without its end hook, told from a forward
        inside a forward by the cache: the open step's cache is gone, or is not this forward's."""
        pending = self._step_cache
        if pending is None:
            return False
        held = pending[0]()
        return held is None or held is not cache

    def _cache_hooked(self) -> bool:
        """Whether code besides the cache's update may change KV tensors inside a forward: an eviction
        library (kvpress) or any forward hook on one of the model's modules (a press hooks its attention
        modules; other code may hook decoder layers), or a global one. Then each update is followed as it
        happens, which the end-of-step comparison could not tell apart from such a change."""
        if "kvpress" in sys.modules:
            return True
        module_hooks = torch.nn.modules.module
        if any(
            getattr(module_hooks, name, None)
            for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
        ):
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._submodules)

    def _auto_step(self, layer_tokens_before: int) -> None:
        """Without a model to hook, a layer-0 update starts a step."""
        if self._step_open:
            self._end_step()
        self._begin_step(layer_tokens_before == 0)

    def _begin_step(self, prefill: bool) -> None:
        tracker = self.tracker
        if self._step_open:  # a nested forward (assistant model, etc.) keeps the outer step
            return
        tracker.step += 1
        if prefill:
            tracker.phase = "prefill"
            self._decode_index = 0
            tracker.poll_frees()  # a pool freed since (generate_batch's) is gone before this cache is made
        else:
            tracker.phase = "decode"
            self._decode_index += 1
        self._step_open = True
        ranges = self._ranges
        assert ranges is not None
        if ranges.active:  # nobody listening (no NVTX tool, no profiler): no range, no name to build
            ranges.push("kvtrace/prefill" if prefill else f"kvtrace/decode {self._decode_index}")

    def _end_step(self, compared: Any = None) -> None:
        if not self._step_open:
            return
        if self._hf is not None:
            self._hf.scan_all(compared=compared)
            if self._attention_modules and "kvpress" in sys.modules:  # masks are kvpress's (AdaKV)
                self._hf.scan_masks(self._attention_modules)
        modules = self._modules
        if modules is not None and (modules.owners or modules._tracked):
            if modules.scan("track"):
                self._module_tokens_unknown += 1
            modules.progress = None  # writes seen after this forward are not its own
        self.tracker.poll_frees()
        assert self._ranges is not None
        if self._ranges.active:
            self._ranges.pop()
        self._step_open = False
        phase = self.tracker.phase
        if phase == "prefill" and self._prompt_end is not None:
            self._sample(phase, prompt_end=self._prompt_end)
        else:
            self._sample(phase)
        self._prompt_end = None

    # -- outputs -----------------------------------------------------------------------------------
    def _on_evict(self, layer: int, kv: str) -> None:
        if self._ranges is not None and self._ranges.active:
            name = f"kvtrace/evict L{layer} {kv}"
            self._ranges.push(name)  # a range per eviction, as Nsight users expect
            self._ranges.pop()

    def _flush(self) -> None:
        """Write what the tracker and the sampler hold, in one write per file; on the writer thread or
        this one. After a failed write (a full disk) nothing more is written: the lines are dropped and
        counted, and the block ends with a `RecordingError` naming the file."""
        with self._flush_lock:
            events, samples = self._events, self._samples
            if events is not None:
                # The tracker keeps its events as ready JSON lines; they reach the file in one write.
                lines = self.tracker.take_lines()
                if self._write_error is not None:
                    self.events_lost += len(lines)
                elif lines or events.buffered():
                    events.extend(lines)
                    count = events.buffered()
                    try:
                        events.flush()
                    except OSError as exc:
                        self._write_failed(events, exc)
                        self.events_lost += count
                    else:
                        self.event_count += count
            if samples is not None:
                if self._write_error is not None:
                    samples.discard()
                    return
                try:
                    samples.flush()
                except OSError as exc:
                    self._write_failed(samples, exc)

    def _write_failed(self, appender: fmt.JsonlAppender, exc: OSError) -> None:
        if self._write_error is None:
            self._write_error = f"{appender.path}: cannot write ({exc.strerror or exc})"
        appender.discard()

    def _sample(self, label: str, **extra: Any) -> None:
        if self._samples is None or self._samples._fh.closed:
            return
        if self._sampler is None:
            return
        t_ns = self._clock()
        record = self._sampler.sample(host=label in ("start", "end"), now=t_ns / 1e9)
        record.update(t_ns=t_ns, step=self.tracker.step, phase=label, **extra)
        self._samples.append_owned(record)

    def _sample_host(self) -> None:
        """On the writer thread: the host's figures (and NVML's), as a sample of phase `host`."""
        sampler, samples = self._sampler, self._samples
        if sampler is None or samples is None:
            return
        t_ns = self._clock()
        record = sampler.sample_host(now=t_ns / 1e9)
        record.update(t_ns=t_ns, step=self.tracker.step, phase="host")
        samples.append_owned(record)

    def _clock_s(self) -> float:
        return self._clock() / 1e9

    def _write_weights(self, exclude: set[int]) -> None:
        seen: set[int] = set()
        with open(self.path / fmt.WEIGHTS, "w", encoding="utf-8") as fh:
            import json

            for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
                tensor = local_tensor(tensor)  # a tensor-parallel weight (DTensor): this rank's shard
                storage = tensor.untyped_storage()
                addr = storage.data_ptr()
                if addr in seen or addr in exclude or storage.nbytes() == 0:
                    continue
                seen.add(addr)
                record = fmt.WeightRecord(
                    name=name,
                    addr=addr,
                    storage_bytes=storage.nbytes(),
                    dtype=str(tensor.dtype).removeprefix("torch."),
                    device=str(tensor.device),
                    shape=list(tensor.shape),
                )
                fh.write(json.dumps(record.__dict__, separators=(",", ":")) + "\n")

    def _make_profiler(self) -> Any:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        trace_dir = self.path / fmt.PROFILER_DIR
        return profile(
            activities=activities,
            profile_memory=self.options.profile_memory,
            record_shapes=self.options.record_shapes,
            with_stack=self.options.with_stack,
            on_trace_ready=trace_handler(trace_dir, self.options.gzip_trace, self._trace_failed),
        )

    def _trace_failed(self, message: str) -> None:
        # Not `_write_error`: the logs go on (their lines are whole without the trace), but a log that
        # fails after this is not the first file that could not be written, which the error names.
        if self._write_error is None and self._trace_error is None:
            self._trace_error = message

    def _initial_manifest(self) -> dict[str, Any]:
        from kvtrace import __version__

        try:
            import transformers

            transformers_version: str | None = transformers.__version__
        except ImportError:
            transformers_version = None
        device: dict[str, Any] = {"type": "cpu", "name": platform.processor() or platform.machine()}
        with contextlib.suppress(OSError, ValueError):
            device["total_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        model_device = _model_device(self.model)
        if model_device is not None and model_device.type == "cuda":
            props = torch.cuda.get_device_properties(model_device)
            device = {
                "type": "cuda",
                "index": model_device.index or 0,
                "name": props.name,
                "total_memory_bytes": int(props.total_memory),
            }
        anchor_ns = self._clock()
        return {
            "format": "kvtrace-run",
            "schema_version": fmt.SCHEMA_VERSION,
            "kvtrace_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers_version,
            "python_version": sys.version.split()[0],
            "platform": platform.platform(),
            "pid": os.getpid(),
            "device": device,
            "model": model_geometry(self.model),
            "clock": {
                "kind": "unix_ns",
                "anchor_unix_ns": anchor_ns,
                "anchor_perf_counter_ns": time.perf_counter_ns(),
                "profiler_alignment": "trace ts (us) + baseTimeNanoseconds/1000 = unix us = t_ns/1000",
            },
            "options": self.options.to_json(),
            "started_ns": anchor_ns,
            "ended": {"status": "running"},
        }


_OOM_TYPES = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
)


@contextlib.contextmanager
def _kineto_quiet() -> Any:
    """Keep libkineto's `USDT: ... profiler_start/stop` lines off the user's terminal.

    They are written by C++ straight to file descriptor 2 at profiler start and stop (KINETO_LOG_LEVEL
    does not silence them on torch 2.13), so fd 2 goes to a temporary file for that moment and every
    other line is passed on to stderr unchanged.
    """
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (embedded interpreters): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(True) if not line.startswith(b"USDT:")]
            if kept:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(b"".join(kept).decode(errors="replace"))
                    sys.stderr.flush()


def _is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError from 2.5, torch.cuda.OutOfMemoryError before; the message as a last resort."""
    return isinstance(exc, _OOM_TYPES) or "out of memory" in str(exc).lower()


def _model_device(model: Any) -> torch.device | None:
    if model is None:
        return None
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None


def _uncompiled(model: Any) -> Any:
    """The module that `torch.compile(model)` wraps: its `generate()` is the module's own, which calls the
    module, never the wrapper (whose forward would see no step)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    if wrapper is not None and isinstance(model, wrapper):
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


def _weak(obj: Any) -> Callable[[], Any]:
    """A weak reference to `obj`, or a strong one where it takes none."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def record(out_dir: str | os.PathLike[str], model: Any = None, **options: Any) -> Recording:
    """Record a run into `out_dir`: `with kvtrace.record("runs/x", model=model): model.generate(...)`.

    `options` are the fields of `RecordOptions` (profiler, with_stack, nvtx, snapshots, ...).
    """
    try:
        opts = RecordOptions(**options)
    except TypeError as exc:
        raise RecordingError(f"record(): {exc}") from None
    except KvtraceError as exc:  # a value of the wrong type or range, named by the option
        raise RecordingError(str(exc)) from None
    return Recording(out_dir, model=model, options=opts)


def track(tensor: torch.Tensor, layer: int, kind: str, layout: str = "bhsd") -> None:
    """Follow a KV tensor that no known cache holds, inside an active `record()`. `layout`: "bhsd" for
    Hugging Face's [batch, kv_heads, seq, head_dim], "bshd" for [batch, seq, kv_heads, head_dim] (Meta's
    reference Llama, flash-attn): the log must say which dim holds tokens and which KV heads."""
    recording = _ACTIVE
    if recording is None or recording._modules is None:
        raise RecordingError("kvtrace.track() called outside a kvtrace.record() block")
    if not isinstance(tensor, torch.Tensor):
        raise RecordingError(f"kvtrace.track(tensor=...): a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise RecordingError(f"kvtrace.track(layer=...): a layer index (an int >= 0), got {layer!r}")
    if kind not in ("k", "v"):
        raise RecordingError(f"kvtrace.track(kind=...): 'k' or 'v', got {kind!r}")
    if layout not in ("bhsd", "bshd"):
        raise RecordingError(f"kvtrace.track(layout=...): 'bhsd' or 'bshd', got {layout!r}")
    recording._modules.track(tensor, layer, kind, layout)  # written by the writer thread within 0.1 s
