"""What `PagedAttentionHooks` installs on transformers' continuous-batching classes, and takes off again.

The objects are made inside `generate_batch`, on its generation thread, so the wrappers go on the classes;
each one hands its object to the hooks only when it is the recorded pool's (or its processor's, its
offloading manager's) and the recording is not closed. `install` wraps, and `uninstall` puts back:

- `PagedAttentionCache.__init__`: the pool's figures (engine.json) and one `created` KV event per layer and
  kind, all views of the one storage (a replay counts it once: KV peak = the tensor's bytes);
- `ContinuousBatchProcessor.prepare_next_batch` (schedule + block allocation; a step when it returns True)
  and `update_batch` (after the forward; requests finish there): one engine step = one kvtrace step;
- `OffloadingManager.offload_requests`: the requests it takes out of the pool (to the CPU swap pool, or a
  soft reset that recomputes them), vLLM's "preempted";
- `ContinuousBatchProcessor._handle_request_error`: every request transformers fails, `finished` with
  `finish_reason` `error` and the error: one it refuses on its own while the loop goes on (a logits-processor
  argument it cannot apply), or those it fails when its loop stops on an error;
- `ContinuousBatchProcessor.fail_all_requests`: that stop (a forward that raised, or a scheduler that could
  place no request in the pool), the run's `failure`;
- `PagedAttentionCache.evict_cached_blocks` and `search_prefix_match`: prefix-sharing blocks given back
  under pressure, and prefix hits.

Split from hf_paged.py so that the surface kvtrace touches in transformers, and what a version change there
breaks, reads in one place.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

from kvtrace.integrations.vllm import after_import

if TYPE_CHECKING:
    from collections import deque

    from kvtrace.integrations.vllm_engine import _Patches
    from kvtrace.json_writes import JsonlAppender

_API = "transformers.generation.continuous_batching.continuous_api"
_SCHEDULER = "transformers.generation.continuous_batching.scheduler"  # imported by `_API`


def _modules() -> tuple[Any, Any, Any] | None:
    """transformers' continuous-batching modules (imported by then); None when this version differs."""
    try:
        from transformers.generation.continuous_batching import cache, continuous_api, offloading_manager
    except Exception:
        return None
    needed = (
        (cache, "PagedAttentionCache", ("__init__", "search_prefix_match")),
        (
            continuous_api,
            "ContinuousBatchProcessor",
            (
                "prepare_next_batch",
                "update_batch",
                "_generation_step",
                "fail_all_requests",
                "_handle_request_error",
            ),
        ),
        (offloading_manager, "OffloadingManager", ("offload_requests",)),
    )
    for module, name, methods in needed:
        cls = getattr(module, name, None)
        if cls is None or not all(hasattr(cls, method) for method in methods):
            return None
    return cache, continuous_api, offloading_manager


class PagedWrappers:
    """Install and uninstall (a mixin of `PagedAttentionHooks`, whose state it shares)."""

    recording: Any
    _patches: _Patches
    _finder: Any
    _closed: bool
    _steps: JsonlAppender | None
    _request_log: JsonlAppender | None
    _open: deque[tuple[int, str, int, list[str], int, int]]
    _failing_all: bool
    cancels_followed: bool
    _prefix_evicted: int
    _prefix_lookup: dict[str, tuple[int, int]]

    if TYPE_CHECKING:

        @property
        def cache(self) -> Any: ...

        def _timed(self, work: Any, *args: Any) -> None: ...

        def _on_pool(self, cache: Any) -> None: ...

        def _cached_blocks(self, cache: Any) -> int: ...

        def _around_prepare(self, proc: Any, prepare: Any) -> bool: ...

        def _step_failed(self) -> None: ...

        def _after_step(self, proc: Any) -> None: ...

        def _run_failed(self, error: Exception) -> None: ...

        def _around_offload(self, manager: Any, offload: Any) -> bool: ...

        def _request_failed(self, proc: Any, state: Any, error: Exception) -> None: ...

        def _requests_cancelled(self, states: Any) -> None: ...

        def _request_waiting(self, state: Any) -> None: ...

    def install(self) -> None:
        """Patch now if transformers' continuous batching is imported, else as soon as it is (a model loaded
        inside the block): a run that never uses it imports nothing more."""
        self._finder = after_import(_API, self._patch)

    def _patch(self, _api: Any) -> None:
        found = _modules()
        if found is None:
            return
        cache_mod, api, offloading = found
        cache_cls, processor = cache_mod.PagedAttentionCache, api.ContinuousBatchProcessor
        manager_cls = offloading.OffloadingManager
        hooks = self
        init, search = cache_cls.__init__, cache_cls.search_prefix_match
        # transformers 5.17 has no prefix-block eviction under pressure: nothing to count there
        evict: Any = getattr(cache_cls, "evict_cached_blocks", None)
        prepare, update, forward, fail_all, request_error = (
            processor.prepare_next_batch,
            processor.update_batch,
            processor._generation_step,
            processor.fail_all_requests,
            processor._handle_request_error,
        )
        offload = manager_cls.offload_requests
        # `cancel_request` queues an id; the scheduler drops the request (waiting or running) and frees its
        # blocks in `clear_cancelled_requests`, at the next batch's preparation, and returns its state
        scheduler_cls = getattr(sys.modules.get(_SCHEDULER), "Scheduler", None)
        clear: Any = getattr(scheduler_cls, "clear_cancelled_requests", None)
        add_waiting: Any = getattr(scheduler_cls, "add_waiting_request", None)

        def init_hook(cache: Any, *args: Any, **kwargs: Any) -> None:
            init(cache, *args, **kwargs)
            hooks._timed(hooks._on_pool, cache)

        def prepare_hook(proc: Any) -> bool:
            if proc.cache is not hooks.cache or hooks._closed:
                return bool(prepare(proc))
            return hooks._around_prepare(proc, prepare)

        def forward_hook(proc: Any, model: Any) -> None:
            try:
                forward(proc, model)
            except BaseException:
                if proc.cache is hooks.cache and hooks._open and not hooks._closed:
                    hooks._step_failed()
                raise

        def update_hook(proc: Any) -> None:
            update(proc)
            if proc.cache is hooks.cache and hooks._open and not hooks._closed:
                hooks._timed(hooks._after_step, proc)

        def request_error_hook(proc: Any, error: Exception, state: Any) -> None:
            request_error(proc, error, state)  # fills the state's tokens and error, then delivers it
            if proc.cache is hooks.cache and not hooks._closed:
                hooks._timed(hooks._request_failed, proc, state, error)

        def fail_all_hook(proc: Any, error: Exception) -> None:
            ours = proc.cache is hooks.cache and not hooks._closed
            hooks._failing_all = ours
            try:
                fail_all(proc, error)  # each request through `_handle_request_error`
            finally:
                hooks._failing_all = False
            if ours:
                hooks._timed(hooks._run_failed, error)

        def offload_hook(manager: Any) -> bool:
            if manager.cache is not hooks.cache or hooks._closed:
                return bool(offload(manager))
            return hooks._around_offload(manager, offload)

        def evict_hook(cache: Any) -> bool:
            ours = cache is hooks.cache
            before = hooks._cached_blocks(cache) if ours else 0
            evicted = bool(evict(cache))
            if ours:
                hooks._prefix_evicted += max(0, before - hooks._cached_blocks(cache))
            return evicted

        def search_hook(cache: Any, request_id: str, prompt_ids: list[int]) -> int:
            hits = int(search(cache, request_id, prompt_ids))
            if cache is hooks.cache and cache.use_prefix_sharing:  # counted when the request is scheduled
                hooks._prefix_lookup[request_id] = (hits, len(prompt_ids))
            return hits

        def clear_hook(scheduler: Any) -> Any:
            cancelled = clear(scheduler)
            if getattr(scheduler, "cache", None) is hooks.cache and not hooks._closed and cancelled:
                hooks._timed(hooks._requests_cancelled, cancelled)
            return cancelled

        def add_waiting_hook(scheduler: Any, state: Any) -> None:
            add_waiting(scheduler, state)
            if getattr(scheduler, "cache", None) is hooks.cache and not hooks._closed:
                hooks._timed(hooks._request_waiting, state)

        patches = self._patches
        patches.set(cache_cls, "__init__", init_hook)
        if add_waiting is not None:
            patches.set(scheduler_cls, "add_waiting_request", add_waiting_hook)
        if clear is not None:
            patches.set(scheduler_cls, "clear_cancelled_requests", clear_hook)
            self.cancels_followed = True
        if evict is not None:
            patches.set(cache_cls, "evict_cached_blocks", evict_hook)
        patches.set(cache_cls, "search_prefix_match", search_hook)
        patches.set(processor, "prepare_next_batch", prepare_hook)
        patches.set(processor, "update_batch", update_hook)
        patches.set(processor, "_generation_step", forward_hook)
        patches.set(processor, "fail_all_requests", fail_all_hook)
        patches.set(processor, "_handle_request_error", request_error_hook)
        patches.set(manager_cls, "offload_requests", offload_hook)

    def uninstall(self) -> None:
        # A manager left running past the block may be inside a hook now: its logs are closed, not written
        self._closed = True
        if self._finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self._finder)
            self._finder = None
        self._patches.undo()
        logs = [log for log in (self._steps, self._request_log) if log is not None]
        self.recording._remove_engine_logs(*logs)
        for log in logs:
            log.close()
