"""transformers' continuous batching (`generate_batch`, `init_continuous_batching`): its paged KV pool,
written as the engine files kvtrace writes for vLLM (docs/format.md, "vLLM runs"), under the engine name
`transformers-cb`.

Continuous batching bypasses transformers' `Cache` classes: a `PagedAttentionCache` allocates one flat uint8
`cache_tensor` at start (two trash sectors, then the data sectors), cut into blocks of `page_size` tokens of
every layer's K and V, and a scheduler admits requests while blocks are free. `PagedAttentionHooks.install`
wraps, on the classes (the objects are made inside `generate_batch`, on its generation thread), and puts back
on uninstall:

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

Figures vLLM has and this engine lacks are null or absent, never borrowed.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import weakref
from collections import deque
from typing import Any

from kvtrace import format as fmt
from kvtrace.integrations.hf_paged_pool import ENGINE_NAME, pool_document
from kvtrace.integrations.vllm import after_import
from kvtrace.integrations.vllm_engine import _Patches, flush_when_due
from kvtrace.json_writes import JsonlAppender, write_json_atomic

CB_CACHE_ID = fmt.CB_CACHE_ID  # the `cache` id of the pool's KV events (vLLM's is fmt.VLLM_CACHE_ID)
_EMPTIED = ("preempted", "finished")


_API = "transformers.generation.continuous_batching.continuous_api"
# What `pool_document` and the per-step figures read on a PagedAttentionCache: one flat pool cut into sectors,
# with an allocator per attention type. Instance attributes, so tested on the pool once it is made.
_POOL_FIELDS = ("cache_tensor", "cache_allocators", "pool", "num_sectors", "bytes_per_sector")


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


class PagedAttentionHooks:
    """Records the first `PagedAttentionCache` made while installed into the active `Recording`."""

    def __init__(self, recording: Any) -> None:
        self.recording = recording
        self._patches = _Patches()
        self._finder: Any = None
        self._closed = False
        # The recorded pool, weakly: the user's program frees it when generate_batch returns (a strong
        # reference kept its tensor alive until the block ended).
        self._cache_ref: weakref.ref[Any] | None = None
        self.document: dict[str, Any] = {}
        self._bytes_per_block = 0
        self._reserved = 0
        self._steps: JsonlAppender | None = None
        self._request_log: JsonlAppender | None = None
        # Steps scheduled and not updated yet, oldest first: (step, phase, tokens scheduled, preempted ids,
        # free blocks once the step's were allocated, when its scheduling began). One at a time in sync mode;
        # async batching schedules batch N+1 before it updates batch N.
        self._open: deque[tuple[int, str, int, list[str], int, int]] = deque()
        self._step_preempted: list[str] = []  # taken out while the next step is being scheduled
        self._prefix_evicted = 0
        # request id -> (hit tokens, prompt tokens) of its last prefix lookup: a waiting request is looked up
        # at every scheduling attempt, so a lookup counts once, in the step that schedules the request
        self._prefix_lookup: dict[str, tuple[int, int]] = {}
        self._prefix = [0, 0, 0, 0]  # this step's hits, queries, then those of resumed requests
        self._held: dict[str, int] = {}  # request id -> blocks last logged (not finished)
        self._states: dict[str, Any] = {}  # request id -> its RequestState (a soft reset makes a new one)
        self._dropped: dict[str, tuple[int, bool]] = {}  # offloaded, not back yet: (tokens, to the CPU)
        self.engine_steps = 0
        self.preemptions = 0
        self.prefix_evicted_blocks = 0
        self.overhead_ns = 0
        self._flushed_ns = 0
        self.ignored_pools = 0
        self._layout_said = False  # the warning for a pool whose layout kvtrace does not read, given once
        # Why transformers stopped the run, when it did: engine.json's and the manifest's `failure`
        self.failure: dict[str, Any] | None = None
        self._warnings: list[str] = []  # what leaves the engine files incomplete: the manifest's `warnings`
        # Requests transformers failed: those its loop's stop failed (the run's `failure`), and those it
        # refused on its own while the loop went on, with their errors (said in `warnings`)
        self.failed_requests = 0
        self._failed_ids: set[str] = set()
        self._stop_failed: list[str] = []
        self._failed_alone: list[tuple[str, str]] = []
        self._failing_all = False  # inside fail_all_requests: its requests fail with the run

    # -- lifecycle ---------------------------------------------------------------------------------------
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

        patches = self._patches
        patches.set(cache_cls, "__init__", init_hook)
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
        for log in (self._steps, self._request_log):
            if log is not None:
                log.close()

    @property
    def cache(self) -> Any:
        """The recorded pool while it lives; None before it is made and once it is freed."""
        return self._cache_ref() if self._cache_ref is not None else None

    @property
    def warnings(self) -> list[str]:
        """The manifest's `warnings` from this pool: what leaves the engine files incomplete, and the requests
        transformers failed on their own while the run went on (the block ends `ok` all the same)."""
        said = list(self._warnings)
        if self._failed_alone:
            count = len(self._failed_alone)
            named = "; ".join(
                f"{rid} ({error if len(error) <= 150 else error[:147].rstrip() + '...'})"
                for rid, error in self._failed_alone[:5]
            )
            more = f"; and {count - 5} more" if count > 5 else ""
            said.append(
                f"continuous batching: {count} request(s) failed on their own and the run went on "
                f"(transformers returned them with their error; engine_requests.jsonl lists each): "
                f"{named}{more}"[:700]
            )
        return said

    @property
    def unread_pool(self) -> bool:
        """Whether a pool of a layout kvtrace does not read was made in the block (said in `warnings`)."""
        return self._layout_said

    @property
    def owns_steps(self) -> bool:
        """Whether a pool is recorded: its engine steps are then the run's steps."""
        return self._cache_ref is not None

    @property
    def in_step(self) -> bool:
        """Between a batch's scheduling and its update: the model's forward there is this engine step. (A
        planned decode step reads these two fields inline, `kvtrace.planned_steps`: keep them alike.)"""
        return bool(self._open) and not self._closed

    def summary(self) -> dict[str, Any] | None:
        """The manifest's `engine` entry; None when no pool was made in the block."""
        if self._cache_ref is None:
            return None
        return {
            "name": ENGINE_NAME,
            "version": self.document.get("version"),
            "process": "inproc",
            "status": self.document.get("status", "ok"),
            **({"failure": self.failure} if self.failure is not None else {}),
            "failed_requests": self.failed_requests,
            "num_blocks": self.document.get("num_blocks"),
            "kv_cache_bytes": self.document.get("kv_cache_bytes"),
            "engine_steps": self.engine_steps,
            "preemptions": self.preemptions,
            "prefix_evicted_blocks": self.prefix_evicted_blocks,
            "overhead_ns": self.overhead_ns,
        }

    def _timed(self, work: Any, *args: Any) -> None:
        """Bookkeeping on the generation thread, timed. A failure here must not fail the user's requests
        (transformers fails every request on an exception in its loop): it stops the recording of the pool
        and says so in the manifest's notes."""
        started = time.thread_time_ns()
        try:
            work(*args)
        except Exception as exc:
            self._closed = True
            self._warnings.append(
                f"continuous batching: recording stopped at step {self.recording.tracker.step} "
                f"({type(exc).__name__}: {exc}); the engine files end there"[:500]
            )
        finally:
            self.overhead_ns += time.thread_time_ns() - started

    # -- the pool ------------------------------------------------------------------------------------------
    def _on_pool(self, cache: Any) -> None:
        if not all(hasattr(cache, name) for name in _POOL_FIELDS):
            # An older pool layout (transformers 5.17: per-layer key_cache/value_cache tensors and a
            # BlockManager): said plainly, and the pool left unclaimed so that no hook reads it, rather
            # than an AttributeError from `pool_document` and an engine entry of null figures
            if not self._layout_said:
                self._layout_said = True
                self._warnings.append(
                    "continuous batching: this transformers' PagedAttentionCache is not one flat "
                    "`cache_tensor` pool with `cache_allocators` (per-layer key_cache/value_cache instead), "
                    "a layout kvtrace does not read: the pool's KV, engine steps and requests are not "
                    "recorded"
                )
            return
        if self._cache_ref is not None:  # a second pool (another generate_batch): the run keeps the first
            self.ignored_pools += 1
            if self.ignored_pools == 1:
                self._warnings.append(
                    "a second continuous-batching pool (another generate_batch) is left out: the engine "
                    "files record the first only (one generate_batch per record())"
                )
            return
        self._cache_ref = weakref.ref(cache, self._pool_freed)
        rec = self.recording
        self.document = pool_document(cache, rec.model)
        self._bytes_per_block = self.document["bytes_per_block"]
        self._reserved = self.document["blocks_reserved"]
        write_json_atomic(rec.path / fmt.ENGINE, self.document)
        self._steps = JsonlAppender(rec.path / fmt.ENGINE_STEPS)
        self._request_log = JsonlAppender(rec.path / fmt.ENGINE_REQUESTS)
        tracker = rec.tracker
        with tracker.lock:  # the recorder's writer thread takes the tracker's lines meanwhile
            tracker.drain()
            self._log_pool_locked(tracker)
        rec._flush()

    def _pool_freed(self, _ref: Any) -> None:
        """The manager is gone with its pool: the request states it left (failed, cancelled) go too."""
        self._states.clear()
        self._prefix_lookup.clear()

    def _log_pool_locked(self, tracker: Any) -> None:
        """A `created` event per layer and kind, each naming the one storage: a replay counts it once.
        A layer's K (V) is one page per block, so its view is strided: `shape` is the logical one."""
        doc = self.document
        capacity = doc["num_blocks"] * doc["block_size"]
        t_ns = self.recording._clock()
        for layer in doc["layers"]:
            if "bytes" not in layer:  # several attention types: no per-layer view to name
                continue
            half = layer["bytes"] // 2
            page = half // doc["num_blocks"]  # one K (or V) page; K first in the layer's part of a block
            for kv, offset in (("k", 0), ("v", page)):
                view = {
                    "storage_addr": layer["storage_addr"],
                    "storage_bytes": doc["kv_cache_bytes"],
                    "view_offset": layer["view_offset"] + offset,
                    "shape": [doc["num_blocks"], *layer["shape"][2:]],
                    "bytes": half,
                    "dtype": layer["dtype"],
                    "device": doc["storage"][0]["device"],
                }
                tracker.pool_view_created(t_ns, layer["layer"], kv, view, capacity, CB_CACHE_ID, ENGINE_NAME)
        tracker.watch_pool(self.cache.cache_tensor.untyped_storage(), 0, "k", CB_CACHE_ID)

    def _cached_blocks(self, cache: Any) -> int:
        """Blocks no request holds but prefix sharing keeps for their content (given back under pressure)."""
        held = sum(len(a.ledger.cached_blocks) * a.bytes_per_block for a in cache.cache_allocators.values())
        return held // self._bytes_per_block if self._bytes_per_block else 0

    def _blocks_of(self, request_id: str) -> int:
        """Whole-model blocks a request's block tables hold (exact with one attention type)."""
        held = sum(
            len(a.block_table.get(request_id, ())) * a.bytes_per_block
            for a in self.cache.cache_allocators.values()
        )
        return math.ceil(held / self._bytes_per_block) if self._bytes_per_block else 0

    def _free_blocks(self) -> int:
        """Free blocks as the scheduler can use them: free sectors, free blocks in allocated sectors, and the
        blocks kept for prefix sharing (the scheduler evicts them before it offloads a request)."""
        cache = self.cache
        pool = cache.pool
        free = pool.num_free_sectors * cache.bytes_per_sector
        for allocator in cache.cache_allocators.values():
            free += pool.count_free_blocks(allocator.index) * allocator.bytes_per_block
        return free // self._bytes_per_block + self._cached_blocks(cache)

    # -- per step ------------------------------------------------------------------------------------------
    def _around_prepare(self, proc: Any, prepare: Any) -> bool:
        rec = self.recording
        tracker = rec.tracker
        tracker.step += 1  # a preemption while scheduling belongs to the step being scheduled
        began = rec._clock()  # the step sample's `started_ns`
        ranges = rec._ranges
        if ranges is not None and ranges.active:
            ranges.push(f"kvtrace/engine step {tracker.step}")
        scheduled = False
        try:
            scheduled = bool(prepare(proc))
        except Exception as exc:
            self._timed(self._schedule_failed, proc, tracker.step, exc)
            raise
        finally:
            if not scheduled:
                tracker.step -= 1
                if ranges is not None and ranges.active:
                    ranges.pop()
        if scheduled:
            self._timed(self._log_scheduled, proc, tracker.step, began)
        return scheduled

    def _step_failed(self) -> None:
        """The forward raised: transformers fails the requests and stops, `update_batch` never runs. The
        step's range is closed here, on the thread that opened it (torch refuses to close it from another)."""
        step = self._open.pop()[0]
        ranges = self.recording._ranges
        if ranges is not None and ranges.active:
            ranges.pop()
        self._warnings.append(
            f"continuous batching: engine step {step} failed in its forward; the figures end there"
        )

    def _schedule_failed(self, proc: Any, step: int, exc: Exception) -> None:
        """`prepare_next_batch` raised: with no block free and no request to offload, transformers' scheduler
        places none ("No requests can be scheduled and no requests can be offloaded.") and the loop fails
        every request. The step that could not be scheduled is no step (no line, as vLLM's); the most a
        request needed for its next tokens (a waiting one: its whole prompt), against the usable blocks, is
        what `diagnose` reports."""
        scheduler = proc.scheduler
        block_size = int(self.document["block_size"])
        needed: dict[str, int] = {}
        for request_id, state in [*scheduler.active_requests.items(), *scheduler.waiting_requests.items()]:
            tokens = int(state.current_len()) + len(getattr(state, "tokens_to_process", ()) or ())
            tokens = max(tokens, len(getattr(state, "initial_tokens", ()) or ()))
            needed[str(request_id)] = math.ceil(tokens / block_size)
        largest = max(needed, key=lambda rid: needed[rid]) if needed else None
        usable = int(self.document["usable_blocks"])
        self.failure = {
            "step": step,
            "reason": "no_blocks" if largest is not None and needed[largest] > usable else "error",
            "error": f"{type(exc).__name__}: {exc}"[:300],
            "blocks_needed": needed[largest] if largest is not None else None,
            "request": largest,
            "usable_blocks": usable,
            "requests": list(needed),
        }
        most = f"; request {largest} needed {needed[largest]} blocks" if largest is not None else ""
        self._warnings.append(
            f"continuous batching: the run failed at engine step {step}: its scheduler could place no "
            f"request in the pool of {usable} usable blocks{most} ({type(exc).__name__}: {exc})"[:500]
        )

    def _request_failed(self, proc: Any, state: Any, error: Exception) -> None:
        """transformers failed this request and dropped it: it leaves the engine (`finished`, reason `error`,
        vLLM's word for a request an engine error ended) with the tokens it had generated and the error. One
        its loop's stop fails (inside `fail_all_requests`, or waiting in the input queue once the loop is
        hard-stopping) is logged at the step that could not be scheduled (after that step's preemptions),
        else the step that raised; one refused on its own (the loop goes on) at the step being scheduled."""
        request_id = str(state.request_id)
        if request_id in self._failed_ids:
            return
        self._failed_ids.add(request_id)
        self.failed_requests += 1
        with_run = self._failing_all or _hard_stopping(proc)
        self._held.pop(request_id, None)
        self._dropped.pop(request_id, None)
        self._states.pop(request_id, None)
        self._prefix_lookup.pop(request_id, None)
        text = f"{type(error).__name__}: {error}"[:300]
        step = {"step": self.failure["step"]} if with_run and self.failure is not None else {}
        self._log_request(state, "finished", 0, finish_reason="error", error=text, **step)
        if with_run:
            self._stop_failed.append(request_id)
        else:
            self._failed_alone.append((request_id, text))

    def _run_failed(self, error: Exception) -> None:
        """transformers' loop stopped on an error and failed every request left: the run's `failure`. A
        normal end goes through `fail_all_requests` too, with no request left: nothing failed then."""
        failed, self._stop_failed = self._stop_failed, []
        if not failed:
            return
        if self.failure is None:  # the forward raised (`_step_failed` said which step), or a hard stop
            step = self.recording.tracker.step
            text = f"{type(error).__name__}: {error}"[:300]
            self.failure = {"step": step, "reason": "error", "error": text}
            named = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
            self._warnings.append(
                f"continuous batching: transformers stopped the run at engine step {step} ({text}) and "
                f"failed {len(failed)} request(s) ({named}), with the tokens each had generated"[:500]
            )
        self.failure["requests"] = failed
        self.document["status"] = "failed"
        self.document["failure"] = self.failure
        write_json_atomic(self.recording.path / fmt.ENGINE, self.document)
        assert self._request_log is not None
        self._request_log.flush()

    def _log_scheduled(self, proc: Any, step: int, began: int) -> None:
        """Right after scheduling: this step's blocks are allocated and `current_len()` counts its tokens.
        The pool's free blocks now are the step's low point: `update_batch` frees the blocks of the requests
        that finish in the step before the step's line is written (a max_new_tokens=1 request held none
        then). A few counters, no pass over the blocks."""
        batch = list(getattr(proc.inputs_and_outputs, "requests_in_batch", ()) or ())
        tokens = sum(int(getattr(f, "query_length", 0) or 0) for f in batch)
        if not tokens:
            tokens = sum(len(f.state.tokens_to_process) for f in batch)
        phase = "prefill" if tokens > len(batch) else "decode"
        self.recording.tracker.phase = phase
        self._open.append((step, phase, tokens, self._step_preempted, self._free_blocks(), began))
        self._step_preempted = []
        for future in batch:
            state = future.state
            request_id = state.request_id
            self._states[request_id] = state
            blocks = self._blocks_of(request_id)
            hits, queries = self._prefix_lookup.pop(request_id, (0, 0))
            if request_id in self._dropped:
                tokens, to_cpu = self._dropped.pop(request_id)
                self._prefix[2] += hits
                self._prefix[3] += queries
                # A soft reset makes a new request whose prompt is all it must process again (its first
                # offload's tokens, even when offloaded again mid-recompute), less what prefix sharing kept.
                redo = len(getattr(state, "initial_tokens", ()) or ()) or tokens
                recomputed = 0 if to_cpu else max(0, redo - hits)
                self._log_request(state, "resumed", blocks, recomputed_tokens=recomputed)
            elif request_id not in self._held:
                self._prefix[0] += hits
                self._prefix[1] += queries
                self._log_request(state, "scheduled", blocks)
            elif blocks != self._held[request_id]:
                self._log_request(state, "blocks", blocks)
            self._held[request_id] = blocks

    def _around_offload(self, manager: Any, offload: Any) -> bool:
        scheduler = manager.scheduler
        before = {
            rid: (self._blocks_of(rid), state.current_len())
            for rid, state in scheduler.active_requests.items()
        }
        result = bool(offload(manager))
        self._timed(self._log_offloaded, scheduler, before)
        return result

    def _log_offloaded(self, scheduler: Any, before: dict[str, tuple[int, int]]) -> None:
        for request_id, (blocks, tokens) in before.items():
            if request_id in scheduler.active_requests or request_id not in scheduler.waiting_requests:
                continue
            state = scheduler.waiting_requests[request_id]  # the same object, or a soft reset's new one
            to_cpu = bool(getattr(state, "is_cpu_offloaded", False))
            self._states[request_id] = state
            self.preemptions += 1
            self._step_preempted.append(request_id)
            self._dropped[request_id] = (tokens, to_cpu)
            self._held[request_id] = 0
            self._log_request(
                state,
                "preempted",
                0,
                dropped_blocks=blocks,
                dropped_tokens=tokens,
                offloaded_to="cpu" if to_cpu else "recompute",
            )

    def _after_step(self, proc: Any) -> None:
        rec = self.recording
        scheduler = proc.scheduler
        for request_id in list(self._held):
            if request_id in scheduler.active_requests or request_id in scheduler.waiting_requests:
                continue
            state = self._states.pop(request_id)
            del self._held[request_id]
            self._dropped.pop(request_id, None)
            self._log_request(state, "finished", 0)
        step, phase, tokens, preempted, scheduled_free, began = self._open.popleft()
        evicted, self._prefix_evicted = self._prefix_evicted, 0
        self.prefix_evicted_blocks += evicted
        hits, queries, resumed_hits, resumed_queries = self._prefix
        self._prefix = [0, 0, 0, 0]
        total = self.document["num_blocks"]
        free = self._free_blocks()
        t_ns = rec._clock()
        assert self._steps is not None
        self._steps.append(
            {
                "step": step,
                "t_ns": t_ns,
                "phase": phase,
                "blocks_total": total,
                "blocks_used": total - free - self._reserved,
                "blocks_used_in_step": total - min(free, scheduled_free) - self._reserved,
                "blocks_free": free,
                "blocks_cached": self._cached_blocks(self.cache),
                "blocks_reserved": self._reserved,
                "running": len(scheduler.active_requests),
                "waiting": len(scheduler.waiting_requests),
                "tokens_scheduled": tokens,
                "preempted": preempted,
                "prefix_evicted_blocks": evicted,
                "prefix_hits": hits,
                "prefix_queries": queries,
                "prefix_preempted_hits": resumed_hits,
                "prefix_preempted_queries": resumed_queries,
            }
        )
        self.engine_steps += 1  # counted with its line: the reader checks the count against the log
        ranges = rec._ranges
        if ranges is not None and ranges.active:
            ranges.pop()
        rec._sample(phase, started_ns=began)
        self._flushed_ns = flush_when_due(self._flushed_ns, t_ns, rec, self._steps, self._request_log)

    def _log_request(self, state: Any, event: str, blocks: int, **extra: Any) -> None:
        if self._closed or self._request_log is None:
            return
        # A soft reset folds the tokens generated so far into the prompt; `_true_initial_tokens` keeps it.
        prompt = int(getattr(state, "_true_initial_tokens", 0) or len(state.initial_tokens))
        total = len(state.initial_tokens) + len(state.generated_tokens)
        record: dict[str, Any] = {
            "t_ns": self.recording._clock(),
            "step": self.recording.tracker.step,
            "request_id": state.request_id,
            "event": event,
            "blocks": blocks,
            "tokens": 0 if event in _EMPTIED else int(state.current_len()),
            "prompt_tokens": prompt,
            "output_tokens": total - prompt,
        }
        record.update(extra)
        self._request_log.append(record)


def _hard_stopping(proc: Any) -> bool:
    """Whether the processor's loop is stopping hard (an error in it, or the user's hard stop): transformers
    then fails the requests still in its input queue, then every request left, with the one error."""
    status = getattr(proc, "background_thread_status", None)
    hard = getattr(type(status), "HARD_STOP", None)
    local = getattr(status, "local_status", None)
    return isinstance(hard, int) and isinstance(local, int) and local >= hard
