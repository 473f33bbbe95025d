"""`kvtrace.record()`: one context manager that captures a run into a run directory.

While the block runs, an active `Recording` collects (KV tracker, cache hooks, profiler, NVTX, CUDA
history); when it ends, every hook is undone in `finally`, every file is closed complete, and the manifest
says how the run ended. The exception, if any, propagates unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import os
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from kvtrace import format as fmt
from kvtrace.call_masks import CallMasks
from kvtrace.cuda_snapshots import CudaSnapshots
from kvtrace.distributed import BackendWatch, rank_facts, run_path
from kvtrace.errors import KvtraceError, RecordingError, unnamed_path
from kvtrace.forward_inputs import ForwardSignature
from kvtrace.forward_steps import ForwardSteps
from kvtrace.geometry import model_cross_attention_layers, model_geometry
from kvtrace.integrations.hf_caches import HfCacheHooks
from kvtrace.integrations.hf_decode_plan import DecodePlan
from kvtrace.integrations.hf_generate import GenerateCalls
from kvtrace.integrations.hf_paged import PagedAttentionHooks
from kvtrace.integrations.model_discovery import ModelDiscovery
from kvtrace.integrations.module_caches import ModuleCaches
from kvtrace.integrations.vllm import is_vllm_object
from kvtrace.json_writes import JsonlAppender, write_json_atomic
from kvtrace.kv_tracker import KvTracker
from kvtrace.memory_samples import MemorySampler
from kvtrace.model_forward import ForwardWrap, SubmoduleCall
from kvtrace.model_weights import ModelWeights
from kvtrace.options import RecordOptions
from kvtrace.profiler_trace import kineto_quiet, make_profiler
from kvtrace.run_folder import clear_run_folder, make_run_folder, recorded_files, written_at_start
from kvtrace.run_lock import RunLock, lock_for_recording
from kvtrace.run_logs import RunLogs
from kvtrace.run_manifest import RunManifest, device_of, write_model_config
from kvtrace.run_removal import check_run_removal
from kvtrace.run_writer import RunWriter
from kvtrace.step_ranges import StepRanges
from kvtrace.term_signal import Terminated, TermSignal

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
    recording._term.restore()  # the child's SIGTERM is its own: the parent's run is not the child's to end
    recording._flush_lock = threading.Lock()
    recording._manifest_lock = threading.Lock()
    recording._manifest_ending = True  # the parent's manifest is the parent's to write
    recording._run_lock.forget()
    tracker = getattr(recording, "tracker", None)
    if tracker is not None:
        tracker.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Recording(ForwardSteps, RunLogs, RunManifest):
    """The active recording. Created by `record()`; use it as a context manager."""

    def __init__(
        self, out_dir: str | os.PathLike[str], model: Any = None, options: RecordOptions | None = None
    ):
        if not isinstance(out_dir, str | os.PathLike):
            raise RecordingError(f"record(): the run folder must be a path, got {type(out_dir).__name__}")
        unnamed = unnamed_path(out_dir)  # "" would record into the current folder
        if unnamed is not None:
            raise RecordingError(f"record(): {unnamed}")
        self.path = Path(out_dir)
        # model="auto" (`kvtrace run`): the first model whose generate() runs in the block (ModelDiscovery)
        self._discover = isinstance(model, str) and model == "auto"
        self._discovery: ModelDiscovery | None = None
        self._backend_watch: BackendWatch | None = None  # a rank recording before its group is joined
        if self._discover:
            model = None
        if model is not None and not isinstance(model, torch.nn.Module) and not is_vllm_object(model):
            # Checked before anything is written: a half-made run would block the retry.
            raise RecordingError(
                f'record(model=...): a torch.nn.Module (or a vllm.LLM, or "auto") is needed, got '
                f"{type(model).__name__}"
            )
        self.model = _uncompiled(model)
        # A vllm.LLM is recorded through its engine core (integrations/vllm_engine.py), not as a module;
        # with no model at all, a vLLM start refused inside the block still leaves its figures.
        self._vllm_llm: Any = None
        self._vllm: Any = None
        self._paged: PagedAttentionHooks | None = None  # transformers' continuous batching (generate_batch)
        self.vllm_process = "inproc"
        self.vllm_watch = True
        # model="auto": the class of a vllm.LLM found at its first call but not followed (its engine core in
        # another process: the plugin's to record)
        self.engine_not_followed: str | None = None
        # SIGTERM ends the block as a Ctrl-C would (`term_signal`); not in a process whose signals are an
        # engine's own (vLLM's engine core, recorded by its plugin), whose SIGTERM must do what vLLM says
        self.takes_sigterm = True
        # In such a process, the engine's stop signal as it came, ("SIGINT", unix ns), noted by the plugin: an
        # exception after it (vLLM's worker died of the terminal's Ctrl-C under a step) ends the run
        # `interrupted` by that signal, not `exception`
        self.stop_signal: tuple[str, int] | None = None
        # Whether the block's end, once the run is written, kills the process with the SIGTERM it took;
        # `kvtrace run` sets False to say where the run is first, then calls `die_if_sigterm()`
        self.dies_of_sigterm = True
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
        self._events: JsonlAppender | None = None
        self._samples: JsonlAppender | None = None
        self._engine_logs: tuple[JsonlAppender, ...] = ()  # an engine's step and request logs, if any
        self._forward: ForwardWrap | None = None
        self._weights: ModelWeights | None = None  # weights.jsonl, and the storages `model.to()` replaces
        self._profiler: Any = None
        self._ranges: StepRanges | None = None
        self._hf: HfCacheHooks | None = None
        self._calls: GenerateCalls | None = None  # the model's generate() calls: each one's first forward
        self._modules: ModuleCaches | None = None
        self._signature = ForwardSignature()  # where the model's forward takes Meta's `start_pos`
        self._module_tokens_unknown = 0  # steps that wrote a module cache without saying where
        self._snapshots: CudaSnapshots | None = None
        self._manifest: dict[str, Any] = {}
        self._made = False  # this start wrote the first manifest: a failed start removes what it wrote
        self._decode_index = 0
        # When the open step's forward began (the run's clock): its end sample's `started_ns`
        self._step_began_ns = 0
        self._attention_modules: list[Any] = []
        self._step_open = False
        self._prefill_left = 0  # prompt positions a chunked prefill has still to write (one step for all)
        self._prefill_continues = False  # the open step is a chunked prefill's, ended by its last chunk
        # whether autograd recorded the forward that ends the step, from its output (`autograd_kept`); None:
        # no output seen (a step ended otherwise), the grad mode then says
        self._output_grad: bool | None = None
        self._prompt_end: int | None = None  # where the running generate() call's prompt ends in its cache
        self._call_length: tuple[int, int | None] | None = None  # its max_length and max_new_tokens
        self._call_masks = CallMasks()  # each generate() call's prefill step and attention_mask, weakly
        self._model_caches: set[int] = set()  # the HF caches the model's own forwards were given
        self._caches_in_generate: set[int] = set()  # HF caches first seen inside its generate() (drafts)
        # HF caches first updated in a forward of one of the model's submodules called directly (model.model)
        self._submodule_caches: dict[int, SubmoduleCall] = {}
        # HF caches first used on another thread than the one entering the block: torch.profiler records
        # that thread's memory events only, so another model's there has no allocation in its trace
        self._caches_elsewhere: set[int] = set()
        # (cache, new tokens, updates seen, deferred, cache empty before it) of the running forward
        self._step_cache: tuple[Any, ...] | None = None
        # Light mode with no NVTX tool listening: a forward's layer updates may be compared once, at its end
        # (`HfCacheHooks.defer`); `_defer_step` is decided at each prefill (`_cache_hooked`).
        self._may_defer = False
        self._defer_step: bool | None = None  # None until the first forward with a cache
        self._profiler_on = bool(self.options.profiler)
        self._thread = threading.get_ident()  # the one torch.profiler records (the thread entering the block)
        self._forwards_elsewhere = 0  # forwards on other threads (generate() beside a TextIteratorStreamer)
        self._step_thread = 0  # the thread whose forward opened the open step
        # Forwards running beside the open step on other threads (generate() called from several threads at
        # once): thread -> [forwards of the model in progress there, weak reference to the first one's cache]
        self._beside: dict[int, list[Any]] = {}
        self._forwards_beside = 0  # forwards that began beside an open step (a warning)
        # After a deferred step, the plan for its cache: the next forward may be its next decode step, which
        # `_decode_step` takes on a short path (`kvtrace.integrations.hf_decode_plan`); `_planned`: the
        # forward it took
        self._decode_next: DecodePlan | None = None
        self._planned: DecodePlan | None = None
        self._last_plan: DecodePlan | None = None  # the plan last made, kept while its cache's steps go on
        self._ended_mid_forward = False  # the block ended inside a step of another thread's forward
        self._raised_step: int | None = None  # the last step whose forward raised
        # The logs reach their files from a writer thread every 0.1 s (and at the end of the block), so a
        # decode step neither formats nor writes them (issue 11); `_flush` may run on either thread.
        self._writer: RunWriter | None = None
        self._flush_lock = threading.Lock()
        # Around a manifest written while the block runs (`_write_calls_begun`, on the model's threads)
        self._manifest_lock = threading.Lock()
        self._manifest_ending = False
        self._calls_unwritten = False
        self._write_error: str | None = None  # the first failed write, named by file: the run is incomplete
        self._trace_error: str | None = None  # the profiler's trace not written first (the logs went on)
        self._trace_unwritten = False  # the profiler's trace not written, first or after a log
        self.event_count = 0  # KV lines written
        self.events_lost = 0  # KV lines made after a failed write, dropped
        self._sampler: MemorySampler | None = None
        self._run_lock = RunLock(self.path)
        self._term = TermSignal()

    @property
    def vllm_llm(self) -> Any:
        """The vLLM `LLM` the run follows (given to record(), or found by model="auto"); None otherwise."""
        return self._vllm_llm

    @property
    def sigterm_received(self) -> bool:
        """Whether a SIGTERM came during the block: the run says so; the process dies of it."""
        return self._term.received_ns is not None

    def die_if_sigterm(self) -> None:
        """Die of the SIGTERM the block took, as the process would have: where `dies_of_sigterm` is False,
        called once the caller has said what it must (the block's own end does it otherwise)."""
        self._term.die_if_received()

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
            self._unmake()
            self._run_lock.release()
            with _ACTIVE_LOCK:
                _ACTIVE = None
            raise
        if self.takes_sigterm:
            self._term.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _ACTIVE
        self._term.finishing()
        try:
            self._finish(exc)
        finally:
            self._run_lock.release()
            with _ACTIVE_LOCK:
                _ACTIVE = None
            self._term.restore()
            if self.dies_of_sigterm:
                self._term.die_if_received()

    def _start(self) -> None:
        facts = rank_facts()  # in a process group of several ranks, each records into out_dir/rank-<r>
        self.path = run_path(self.path, facts, self.options.overwrite)
        existed = make_run_folder(self.path)
        # Before looking at what the folder holds: another recording may be replacing it right now.
        self._run_lock = lock_for_recording(self.path)
        clear_run_folder(self.path, existed, self.options.overwrite)
        manifest_path = self.path / fmt.MANIFEST
        self._manifest = self._initial_manifest()
        if self._discover:  # `kvtrace run`: readers advise what a script's user can do, not record(model=)
            self._manifest["model_auto"] = True
        self._manifest.update(facts or {})
        if facts is not None and facts.get("backend") is None:  # the launcher's rank: no group joined yet
            self._backend_watch = BackendWatch()
            self._backend_watch.install()
        with written_at_start(manifest_path):  # with room for the final manifest, should the disk fill
            write_json_atomic(manifest_path, self._manifest, reserve=fmt.MANIFEST_RESERVE_BYTES)
        self._made = True
        self._write_model_config()
        with written_at_start(self.path / fmt.KV_EVENTS):
            self._events = JsonlAppender(self.path / fmt.KV_EVENTS)
        with written_at_start(self.path / fmt.MEMORY_SAMPLES):
            self._samples = JsonlAppender(self.path / fmt.MEMORY_SAMPLES)
        tracker = KvTracker(self._clock, on_evict=self._on_evict)
        self.tracker = tracker
        self._ranges = StepRanges(self.options.nvtx, self.options.profiler)
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
        self._modules = ModuleCaches(tracker, self.options.cache_attrs)
        if self.model is not None:
            self._hook_model()
        if self._discover:
            self._discovery = ModelDiscovery(self._attach_model, self._attach_engine)
            self._discovery.install()
        self._modules.scan("track")
        self._snapshots = CudaSnapshots(self.path / fmt.SNAPSHOT_DIR, self.options.max_snapshot_entries)
        if self.options.snapshots:
            self._manifest["snapshots"] = self._snapshots.start()
        else:
            self._manifest["snapshots"] = {"status": "absent", "reason": "snapshots=False"}
        if self._manifest["snapshots"]["status"] == "absent" and self.options.snapshots:
            self.notes.append(f"snapshots: {self._manifest['snapshots']['reason']}")
        if self.options.profiler and not self._discover:
            self._start_profiler()
        model_device = device_of(self.model)
        cuda_index: int | None = None
        if model_device is not None and model_device.type == "cuda":
            cuda_index = model_device.index or 0
        elif self.model is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_index = torch.cuda.current_device()
        # The sampler's 100 ms cadence counts on the samples' own clock (`t_ns`), read once per sample.
        self._sampler = MemorySampler(cuda_index, clock=self._clock_s)
        self._manifest["monitors"] = {
            "cpu_percent": "process CPU time (user + system) / wall time since the last sample; 100 = a core",
            "nvml": self._sampler.nvml_status,
        }
        self._sample("start")
        self._flush()
        # From here the writer thread reads the host's figures every 100 ms; steps sample the allocator's.
        self._sampler.host_elsewhere = True
        self._writer = RunWriter(self._flush, self._sample_host)
        self._writer.start()

    def _write_model_config(self) -> None:
        """model_config.json, for `plan --from-run` (none without a model); a note when it is not written."""
        if self.model is None:
            return
        config_note = write_model_config(self.path, self.model)
        if config_note is not None:
            self.notes.append(config_note)

    def _start_profiler(self) -> None:
        self._profiler = make_profiler(self.path / fmt.PROFILER_DIR, self.options, self._trace_failed)
        with kineto_quiet():
            self._profiler.__enter__()

    def _hook_model(self) -> None:
        """Everything that follows `self.model`: its config, module caches, weights, forward and generate()
        calls. At the block's start, or at the first generate() of a model `record(model="auto")` found."""
        model = self.model
        tracker = self.tracker
        if self._hf is not None:
            self._hf.on_first_layer = None  # the model's forwards are the steps
            assert self._ranges is not None
            self._may_defer = not self.options.profiler and not self._ranges.active
        assert self._modules is not None
        modules = self._modules
        modules.discover(model)
        self._signature = ForwardSignature.of(model)
        self._weights = ModelWeights(
            model, self.path / fmt.WEIGHTS, self._clock, lambda: tracker.step, modules.weight_exclusions
        )
        with written_at_start(self._weights.path):
            self._weights.write_start()
        # Around the model's `_apply` (`model.to(dtype)`, `.half()`, `.cuda()`): the storages it replaces
        self._weights.install()
        # Around `model.forward` itself, which Meta's Llama3.generate calls directly (no forward hook
        # fires there); eager even when torch.compile traces the model's __call__.
        self._forward = ForwardWrap(model, self._pre_forward, self._post_forward)
        self._forward.install()
        if GenerateCalls.available(model):
            self._calls = GenerateCalls(model)
            self._calls.install()
            if self._hf is not None:
                self._hf.beam_search = self._calls.beam_search
                self._hf.in_call = self._calls.in_call
        if self._hf is not None:
            self._hf.on_new_cache = self._cache_made
            self._hf.cross_layers = model_cross_attention_layers(model)
        # HF attention modules carry `layer_idx`; eviction libraries hang their masks on them.
        self._attention_modules = [m for m in model.modules() if hasattr(m, "layer_idx")]

    def _attach_model(self, model: Any) -> None:
        """`record(model="auto")` (`kvtrace run`): the first model whose generate() runs in the block is the
        run's model from there, as if passed to record(). Forwards before it were steps of their own. Never
        fails the user's call: what goes wrong is a note."""
        if self.model is not None or self._vllm_llm is not None or self._ended_mid_forward:
            return
        try:
            self._hook_found_model(model)
        except Exception as exc:
            self.notes.append(
                f"the model found at its first generate() was not hooked: {type(exc).__name__}: {exc}"
            )

    def _attach_engine(self, llm: Any) -> None:
        """`record(model="auto")`: the first vLLM `LLM` whose generate() or chat() runs in the block, followed
        from there as `record(model=llm)` would (its engine built already, its pool allocated). A multiprocess
        engine is the plugin's to record: a note says how."""
        from kvtrace.integrations.vllm import engine_core_of
        from kvtrace.integrations.vllm_engine import VllmRecording

        if self.model is not None or self._vllm_llm is not None:
            return
        try:
            engine_core_of(llm)
        except KvtraceError as exc:
            self.engine_not_followed = type(llm).__name__
            self.notes.append(f"{fmt.ENGINE_NOT_FOLLOWED_NOTE}{exc}")
            return
        try:
            for hooks in (self._vllm, self._paged):  # the refusal watch, transformers' pool: not this run's
                if hooks is not None:
                    hooks.uninstall()
            self._paged = None
            self._vllm_llm = llm
            self._vllm = VllmRecording(self, llm, self.vllm_process)
            self._vllm.install()
            self._start_profiler_at_call("vLLM engine's first call")
            step = self.tracker.step + 1
            self.notes.append(f"vLLM engine found at its first call (record(model='auto')), from step {step}")
        except Exception as exc:
            self.notes.append(f"the vLLM engine found was not followed: {type(exc).__name__}: {exc}")

    def _start_profiler_at_call(self, call: str) -> None:
        """torch.profiler from the found model's first call, on the thread that entered the block only: kineto
        must stop on the thread it started on, and the block ends on its own (a generate() on a thread beside
        a TextIteratorStreamer, profiled from there, killed the process with SIGSEGV at the block's end).
        On another thread the run is what record(model=...) gives there: the KV log's and weights' figures,
        the trace having none of that thread's memory events anyway."""
        if not self.options.profiler or self._profiler is not None:
            return
        if threading.get_ident() != self._thread:
            self.notes.append(
                f"profiler not started: the {call} ran on another thread than the one that entered "
                "record(), and torch.profiler must start and stop on one thread; memory figures are the KV "
                "log's and the weights'"
            )
            return
        self._start_profiler()

    def _hook_found_model(self, model: Any) -> None:
        if self._step_open and self._step_thread == threading.get_ident():
            self._end_step()  # a step begun by a layer update (no model): the model's forwards take over
        self.model = _uncompiled(model)
        self._write_model_config()
        self._hook_model()
        self._start_profiler_at_call("model's first generate()")  # as record(model=...) around it
        # Where a record(model=...) around the call would have taken its "start" sample: compare's tokens/s
        # count from here, not from the script's start (its imports and model loading)
        self._manifest["model_found_ns"] = self._clock()
        self._manifest["model"] = model_geometry(self.model, self.notes)
        self._manifest["device"] = self._device_facts()
        self.notes.append(
            f"model found at its first generate() call (record(model='auto')): "
            f"{type(self.model).__name__}, from step {self.tracker.step + 1}"
        )
        with self._manifest_lock, contextlib.suppress(OSError):  # a killed run's manifest names its model too
            # at the start's reserved size, kept for the final manifest on a full disk
            write_json_atomic(self.path / fmt.MANIFEST, self._manifest, reserve=fmt.MANIFEST_RESERVE_BYTES)

    def _unmake(self) -> None:
        """After a start that failed once its first manifest was written (a full disk): the files it wrote
        go, as when that first write fails, so that the half-made run is neither read as one whose process
        died (a manifest still "running") nor refuses the retry as a run already there. Only the names
        the format owns, which this start found absent or removed; the folder and the user's files stay."""
        for appender in (self._events, self._samples):
            if appender is not None:
                with contextlib.suppress(OSError):
                    appender.close()
        if not self._made:
            return
        with contextlib.suppress(RecordingError):  # what cannot go stays: the start's own error is said
            check_run_removal(self.path).remove(best_effort=True)

    def _finish(self, exc: BaseException | None) -> None:
        # Whatever is raised while the block ends (Ctrl-C while the profiler writes its trace, a hook that
        # fails to come off), every hook still comes off and the final manifest is written; what was raised
        # is then raised again (a Ctrl-C before the block's own exception, which otherwise goes on).
        raised: list[BaseException] = []
        oom_snapshot: Any = None
        self._end_calls_written()
        try:
            self._stop_writer()
            if self._ranges is not None:
                self._ranges.close_all()
            # A generate() left running on another thread (beside a TextIteratorStreamer) may be inside a
            # forward: its step is logged as far as it got, and a late end of it must log nothing more.
            if self._beside or (self._step_open and self._step_thread != threading.get_ident()):
                self._ended_mid_forward = True
            with contextlib.suppress(Exception):
                self._settle_deferred()
                if self._prefill_continues:  # generate() raised between two chunks of its prefill
                    self._prefill_continues = False
                    self._end_step()
                if self._ended_mid_forward:
                    self._step_open = False
                    self._beside.clear()
                if self._hf is not None:
                    self._hf.scan_all(forget=False)  # a cache dropped by now is freed in phase "end"
                if self._modules is not None:
                    self._modules.rediscover()  # caches made after the last generation's first step
                    if self._modules.scan("track"):
                        self._module_tokens_unknown += 1  # written outside any forward kvtrace saw
            if self._weights is not None:
                self._weights.finish()  # changes no `model.to()` made, storages released since
                if self._weights.changes:  # the model as it ended (a `.to(torch.bfloat16)`: its dtype)
                    self._manifest["model"] = model_geometry(self.model, self.notes)
            if exc is not None and self._snapshots is not None and _is_oom(exc):
                oom_snapshot = self._snapshots.dump("oom.pickle")
            # On disk before the profiler writes its trace (seconds on a long run): a process killed then
            # (a timeout, a scheduler's SIGTERM) keeps every step it ran, not those of the last flush only.
            self._flush()
            self._note_terminating()
        except BaseException as error:
            raised.append(error)
        raised.extend(self._teardown(block_raised=exc is not None))
        for step in (self._close_logs, self._complete_manifest):
            try:
                step()
            except BaseException as error:
                raised.append(error)
        ended = _ended(exc, raised)
        if self._term.received_ns is not None:  # the process dies of it once this manifest is written
            ended["signal"] = "SIGTERM"
            ended["signal_t_ns"] = self._term.received_ns
        elif self.stop_signal is not None and ended["status"] == "exception":  # what raised, kept
            ended["status"] = "interrupted"
            ended["signal"], ended["signal_t_ns"] = self.stop_signal
        if oom_snapshot is not None:
            ended["oom_snapshot"] = oom_snapshot
        ended["t_ns"] = self._clock()
        if self._write_error is not None:  # a log lost lines: readers refuse the run
            ended["write_error"] = self._trace_error or self._write_error  # the first file not written
            ended["kv_events_lost"] = self.events_lost
        elif self._trace_error is not None:  # the logs are whole: readers read the run without its trace
            ended["trace_error"] = self._trace_error
        self._manifest["ended"] = ended
        self._write_manifest()
        interrupt = next((error for error in raised if not isinstance(error, Exception)), None)
        if interrupt is not None:
            raise interrupt
        if exc is not None:
            return
        if raised:
            raise raised[0]
        if self._write_error is not None:
            first = self._trace_error or self._write_error
            raise RecordingError(f"{first}: the run is incomplete", exit_code=1)
        if self._trace_error is not None:
            raise RecordingError(
                f"{self._trace_error}: the run has no profiler trace (its KV log and samples are whole)",
                exit_code=1,
            )

    def _note_terminating(self) -> None:
        """After a SIGTERM, before the profiler writes its trace (seconds on a long run, where a scheduler's
        grace period may end in SIGKILL): a manifest that says the process was told to stop, so that a run
        killed then is not read as one that died of no known cause (the kernel's OOM killer, perhaps)."""
        if self._term.received_ns is None:
            return
        ended = {"status": "running", "signal": "SIGTERM", "signal_t_ns": self._term.received_ns}
        with contextlib.suppress(OSError):  # a full disk: the final manifest's own fallbacks follow
            # at the start's reserved size: the final manifest is written over it if the disk fills meanwhile
            manifest = {**self._manifest, "ended": ended}
            write_json_atomic(self.path / fmt.MANIFEST, manifest, reserve=fmt.MANIFEST_RESERVE_BYTES)

    def _close_logs(self) -> None:
        """The exit snapshot and last samples; the caches the block dropped logged as freed; logs closed."""
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
            self.notes.append(f"profiler trace not written: {self._trace_error}")

    def _complete_manifest(self) -> None:
        # After `_close_logs`, the block's last measurement: reading the calls' masks (a reduction and a
        # device sync each) falls in nothing the run measures
        calls = self._call_masks.manifest_calls()
        if calls:
            self._manifest["generate_calls"] = calls
        if self._backend_watch is not None and self._backend_watch.backend is not None:
            self._manifest["backend"] = self._backend_watch.backend  # joined after the recording started
        self._manifest["files"] = recorded_files(self.path)
        self._manifest["kv_events"] = self.event_count
        # As `kv_events`: the lines that reached each log whole, which readers check a finished run's files by
        if self._samples is not None:
            self._manifest["memory_samples_lines"] = self._samples.lines
        if self._weights is not None:
            self._manifest["weights_lines"] = self._weights.lines
        self._manifest.update(self._caches_and_threads())
        if self._discover and self._profiler_on and self.model is None and self._vllm_llm is None:
            # The report says the trace is missing; this says why, where no profiler=False was given
            self.notes.append(
                "no profiler trace: record(model='auto') (kvtrace run) starts torch.profiler at the model's "
                "first generate(), and the block called none: pass the model, record(model=model), to "
                "profile forwards of your own"
            )
        started = self._vllm.unfollowed_starts() if self._vllm is not None else []
        if started and self._vllm_llm is None and self.engine_not_followed is None and not self._discover:
            # record(dir) alone follows no engine: without this the run reads as one that held no KV
            self.notes.append(
                f"{fmt.ENGINE_NOT_RECORDED_NOTE}a vLLM {started[0]} started in the block, which record(dir) "
                "without model= does not follow (it records a refused start only)"
            )
        self._manifest["notes"] = self.notes
        self._manifest["warnings"] = self._warnings()
        engine = self._vllm.summary() if self._vllm is not None else None
        if engine is None and self._paged is not None:
            engine = self._paged.summary()
        if engine is not None:
            self._manifest["engine"] = engine

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.stop()
        if self._sampler is not None:
            self._sampler.host_elsewhere = False
        if writer.error is not None:
            self.notes.append(f"writer thread failed: {type(writer.error).__name__}: {writer.error}")

    def _teardown(self, block_raised: bool = False) -> list[BaseException]:
        """Undo every hook; safe to call twice and after a partial start. Each one comes off whatever the
        others raise (a Ctrl-C while the profiler writes its trace): what was raised is returned.
        `block_raised`: the block's own exception goes on, and no error of kvtrace's names the trace."""
        raised: list[BaseException] = []
        try:
            self._stop_writer()
        except BaseException as error:
            raised.append(error)
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            try:
                # kineto's line on a trace it could not write says what the block's RecordingError says
                with kineto_quiet(lambda: self._trace_unwritten and not block_raised):
                    profiler.__exit__(None, None, None)
            except BaseException as error:  # the trace is lost, the run is not
                raised.append(error)
                why = str(error)
                if not isinstance(error, Exception):
                    why = f"the block's end was interrupted ({type(error).__name__})"
                    why += " while torch.profiler wrote it"
                self.notes.append(f"profiler trace not written: {why}")
        # generate()'s wrappers come off in the reverse of their order on: the calls' over the discovery's
        hooked = (self._forward, self._weights, self._vllm, self._paged, self._hf, self._calls)
        for hooks in (*hooked, self._discovery, self._backend_watch):
            if hooks is not None:
                try:
                    hooks.uninstall()
                except BaseException as error:
                    raised.append(error)
                    self.notes.append(
                        f"{type(hooks).__name__} not uninstalled: {type(error).__name__}: {error}"
                    )
        if self._snapshots is not None and self._snapshots.active and self._events is None:
            try:
                self._snapshots.stop()
            except BaseException as error:
                raised.append(error)
        return raised


def _ended(exc: BaseException | None, raised: list[BaseException]) -> dict[str, Any]:
    """The manifest's `ended`: how the block ended, or else what ending it raised; `interrupted` when
    either was a Ctrl-C or a SIGTERM (`Terminated`)."""
    first = exc if exc is not None else (raised[0] if raised else None)
    if first is None:
        return {"status": "ok"}
    ended: dict[str, Any] = {
        "status": "exception",
        "type": type(first).__name__,
        "message": str(first)[:2000],
    }
    if any(isinstance(error, (KeyboardInterrupt, Terminated)) for error in (first, *raised)):
        ended["status"] = "interrupted"
    return ended


_OOM_TYPES = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
)


def _is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError from 2.5, torch.cuda.OutOfMemoryError before; the message as a last resort."""
    return isinstance(exc, _OOM_TYPES) or "out of memory" in str(exc).lower()


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


def record(out_dir: str | os.PathLike[str], model: Any = None, **options: Any) -> Recording:
    """Record a run into `out_dir`: `with kvtrace.record("runs/x", model=model): model.generate(...)`.

    `options` are the fields of `RecordOptions` (profiler, with_stack, nvtx, snapshots, ...).
    """
    known = {f.name for f in dataclasses.fields(RecordOptions)}
    unknown = sorted(name for name in options if name not in known)
    if unknown:  # said in the user's terms, not as RecordOptions.__init__()'s TypeError
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; it takes {', '.join(sorted(known))}"
        raise RecordingError(f"record(): unknown option {unknown[0]!r}{hint}")
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
    # Checked here as the readers check it: a layer past their int16 columns would make the run unreadable
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= fmt.MAX_LAYER:
        raise RecordingError(
            f"kvtrace.track(layer=...): a layer index (an int from 0 to {fmt.MAX_LAYER}), got {layer!r}"
        )
    if kind not in ("k", "v"):
        raise RecordingError(f"kvtrace.track(kind=...): 'k' or 'v', got {kind!r}")
    if layout not in ("bhsd", "bshd"):
        raise RecordingError(f"kvtrace.track(layout=...): 'bhsd' or 'bshd', got {layout!r}")
    # The readers take tokens, rows and KV heads from the layout's dims: another rank would log them wrong
    if tensor.dim() != 4:
        dims = "[batch, kv_heads, seq, head_dim]" if layout == "bhsd" else "[batch, seq, kv_heads, head_dim]"
        raise RecordingError(
            f"kvtrace.track(tensor=...): a 4-D K or V tensor {dims} (layout={layout!r}), got shape "
            f"{tuple(tensor.shape)}; an unbatched cache is tracked as tensor.unsqueeze(0)"
        )
    recording._modules.track(tensor, layer, kind, layout)  # written by the writer thread within 0.1 s
