"""The hooks on a running vLLM engine core: one engine step = one kvtrace step.

`EngineHooks.install()` writes engine.json and the pool's KV events, then wraps (instance attributes
only, removed by `uninstall()`): `EngineCore.step_fn`, `Scheduler.add_request`, `Scheduler.schedule`,
`Scheduler._preempt_request`, `Scheduler.finish_requests` and `BlockPool._maybe_evict_cached_block`. After
each step it appends one line to engine_steps.jsonl and the request events of that step to
engine_requests.jsonl (docs/format.md, "vLLM runs"); a request taken in (`waiting`) or finished from outside
a step (an abort) is logged when it happens.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from operator import attrgetter
from typing import Any

from kvtrace import format as fmt
from kvtrace.integrations.vllm import (
    VLLM_CACHE_ID,
    RefusalWatch,
    engine_core_of,
    engine_document,
    write_refused,
)
from kvtrace.integrations.vllm_starts import EngineStarts
from kvtrace.json_writes import JsonlAppender, write_json_atomic

_EMPTIED = ("preempted", "finished")  # request events after which it holds no KV
_IS_NULL = attrgetter("is_null")  # vLLM's placeholder block (`BlockPool.null_block`)
_NONE, _PREFIX, _SCATTERED = 0, 1, 2  # where a group's block lists may hold null blocks
_NULL_LAYOUT = {"FullAttentionManager": _NONE, "SlidingWindowManager": _PREFIX}


def _not_null(block: Any) -> bool:
    return not block.is_null


# A step's end also writes the logs when the last write is this old: the writer thread writes them every
# 0.1 s whatever the steps do, but a step that ends after a long one (whose lines waited) then has its own
# line on disk at once, before a kill in the next. Not every step: four write(2) calls per step, each a
# millisecond on a GPU, would be most of the recorder's cost.
_FLUSH_NS = 100_000_000


def flush_when_due(last_ns: int, t_ns: int, recording: Any) -> int:
    """At most every `_FLUSH_NS`: the recording's logs, the engine's among them, reach their files (under
    the recording's flush lock: the writer thread flushes the same logs). Returns the last flush's time."""
    if t_ns - last_ns < _FLUSH_NS:
        return last_ns
    recording._flush()
    return t_ns


class _Patches:
    """Attributes set on objects, and how to put each back (an instance attribute may shadow a method)."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, bool, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> Any:
        had_own = name in vars(obj)
        original = getattr(obj, name)
        self._undo.append((obj, name, had_own, vars(obj).get(name)))
        setattr(obj, name, value)
        return original

    def undo(self) -> None:
        while self._undo:
            obj, name, had_own, own = self._undo.pop()
            with contextlib.suppress(Exception):
                if had_own:
                    setattr(obj, name, own)
                else:
                    delattr(obj, name)


class EngineHooks:
    """Records one engine core into an active `Recording` (`recording`) until `uninstall()`."""

    def __init__(self, recording: Any, core: Any, process: str = "inproc", wrap_step: bool = True) -> None:
        self.recording = recording
        self.core = core
        self.process = process
        self._wrap_step = wrap_step
        self._patches = _Patches()
        scheduler = core.scheduler
        self._scheduler = scheduler
        manager = scheduler.kv_cache_manager
        self._kv_cache_config = manager.kv_cache_config
        self._pool = manager.block_pool
        self._managers = list(manager.coordinator.single_type_managers)
        # (a group's manager, how its lists hold null blocks): full attention never skips a token, so its
        # lists hold none and their length is the count; a sliding window's hold them as a prefix (vLLM 0.32
        # pads skipped prefix-cache hits at the front and nulls [0, skipped blocks) as the window moves),
        # counted by bisection. Both O(log n) or better a request, read every step: a request at 128k tokens
        # lists 8,192 blocks of 16, ~0.2 ms to scan each. Other kinds (R-SWA's middle gap, Mamba) are scanned.
        self._block_lists = [(m, _NULL_LAYOUT.get(type(m).__name__, _SCATTERED)) for m in self._managers]
        self._requests: dict[str, Any] = scheduler.requests
        self._steps: JsonlAppender | None = None
        self._request_log: JsonlAppender | None = None
        self._sched_out: Any = None
        self._step_preempted: list[str] = []
        self._scheduled_free: int | None = None  # the pool's free blocks once this step's were allocated
        self._prefill = False  # this step writes prompt positions (see `_log_scheduled`)
        self._step_began_ns = 0  # when the running step began (the run's clock)
        self._prefix_evicted = 0
        self._held: dict[str, int] = {}  # request id -> blocks last logged (requests not finished)
        self._objects: dict[str, Any] = {}  # request id -> its Request, kept until "finished" is logged
        self._dropped: dict[str, int] = {}  # preempted, not resumed yet: request id -> tokens dropped
        # vLLM keeps no prefix-cache stats with `disable_log_stats=True` (`LLM()`'s default): kvtrace then
        # counts them as vLLM would (see `_count_admission`), None where it cannot
        self._count_prefix = not getattr(scheduler, "log_stats", True)
        self._uncountable = self._count_prefix and (
            getattr(scheduler, "connector", None) is not None  # its hits and async loads are not all seen
            or bool(getattr(scheduler, "prefix_replay_tokens", 0))  # the hit less a replayed window
        )
        # hits, queries, resumed hits, resumed queries counted since vLLM last reported its stats (see
        # `_prefix_line`): the steps' schedule() calls since the last that collected a batch's output
        self._prefix_counted = [0, 0, 0, 0]
        self._prefix_unknown = self._uncountable
        self._running_before: set[str] = set()  # requests past admission when the hooks went in
        # resumed, its recompute split over steps by the token budget: request id -> KV tokens to recompute
        self._recomputing: dict[str, int] = {}
        self.engine_steps = 0
        self.preemptions = 0
        self.prefix_evicted_blocks = 0  # in recorded steps
        self.overhead_ns = 0  # CPU time of the per-step bookkeeping (benchmarks/vllm_overhead.py)
        # The first exception a step let out, kept where no `with` block sees it (the plugin: not wrapping
        # `step_fn`): vLLM's engine-core process dies of it, and its run must end saying so, not "ok". Not
        # kept in-process, where the block's exit says it and its traceback would hold the step's frames.
        self.raised: BaseException | None = None
        self._flushed_ns = 0
        self.document: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------
    def install(self) -> None:
        rec = self.recording
        self.document, worker_facts = engine_document(self.core, self._kv_cache_config, self.process)
        # who counts the steps' prefix-cache hits: the reader tells a run counted by neither (one recorded
        # before kvtrace counted them with vLLM's stats off) from a run without hits
        self.document["prefix_stats"] = "kvtrace" if self._count_prefix else "vllm"
        write_json_atomic(rec.path / fmt.ENGINE, self.document)
        self._log_pool(worker_facts)
        self._steps = JsonlAppender(rec.path / fmt.ENGINE_STEPS)
        self._request_log = JsonlAppender(rec.path / fmt.ENGINE_REQUESTS)
        # Written with the recording's logs, by its writer thread every 0.1 s: not only at a step's end, or a
        # step that hangs before the process is killed would take the lines of the steps before it along
        rec._add_engine_logs(self._steps, self._request_log)
        patches = self._patches
        self._add = patches.set(self._scheduler, "add_request", self._add_hook)
        self._schedule = patches.set(self._scheduler, "schedule", self._schedule_hook)
        self._preempt = patches.set(self._scheduler, "_preempt_request", self._preempt_hook)
        self._finish = patches.set(self._scheduler, "finish_requests", self._finish_hook)
        self._evict = patches.set(self._pool, "_maybe_evict_cached_block", self._evict_hook)
        if self._wrap_step:
            self._step_fn = patches.set(self.core, "step_fn", self._step_hook)
        # Requests the scheduler took in before these hooks: under the plugin, every one the engine core
        # read before its first step (which opens the run), the first request of every run at least
        for request in list(self._requests.values()):
            status = getattr(getattr(request, "status", None), "name", "")
            if status.startswith("WAITING") and not getattr(request, "num_computed_tokens", 0):
                self._log_waiting(request)
            elif status == "RUNNING":
                self._running_before.add(request.request_id)

    def uninstall(self) -> None:
        self._patches.undo()
        logs = [log for log in (self._steps, self._request_log) if log is not None]
        self.recording._remove_engine_logs(*logs)
        for log in logs:
            log.close()

    def summary(self) -> dict[str, Any]:
        """The manifest's `engine` entry."""
        return {
            "name": "vllm",
            "version": self.document.get("version"),
            "process": self.process,
            "status": self.document.get("status"),
            "num_blocks": self.document.get("num_blocks"),
            "kv_cache_bytes": self.document.get("kv_cache_bytes"),
            "engine_steps": self.engine_steps,
            # the lines that reached engine_requests.jsonl whole (its log is closed by now): readers refuse
            # a finished run whose file holds another number, as for the steps
            "engine_requests": self._request_log.lines if self._request_log is not None else 0,
            "preemptions": self.preemptions,
            "prefix_evicted_blocks": self.prefix_evicted_blocks,
            "overhead_ns": self.overhead_ns,
        }

    def _log_pool(self, worker_facts: dict[str, Any]) -> None:
        """A `created` KV event per layer and kind: views of the pool's storage, so replays count it once.
        Written from facts, not tensors, because the tensors may live in a worker process."""
        rec = self.recording
        tracker = rec.tracker
        config = self._kv_cache_config
        spec = config.kv_cache_groups[0].kv_cache_spec if config.kv_cache_groups else None
        capacity = config.num_blocks * getattr(spec, "block_size", 0)
        layers = worker_facts.get("layers", {})
        t_ns = rec._clock()
        with tracker.lock:  # the recorder's writer thread takes the tracker's lines meanwhile
            self._log_pool_locked(tracker, layers, t_ns, capacity)
        rec._flush()

    def _log_pool_locked(self, tracker: Any, layers: dict[str, Any], t_ns: int, capacity: int) -> None:
        tracker.drain()
        for entry in self.document["layers"]:
            facts = layers.get(entry["name"])
            if facts is None:
                continue
            for kv, part in facts["parts"].items():
                tracker.pool_view_created(t_ns, entry["layer"], kv, part, capacity, VLLM_CACHE_ID, "vllm")

    # -- hooks -------------------------------------------------------------------------------------------
    def _add_hook(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """`Scheduler.add_request`: a request enters the waiting queue. Logged now (`waiting`, no blocks), so
        that every request submitted has a line, one that waits until the process dies or is aborted before
        it is scheduled included, with the tokens it may grow to (`max_tokens`). A streaming session's later
        chunks reuse its id: only its first is a new request."""
        request_id = getattr(request, "request_id", None)
        new = request_id is not None and request_id not in self._requests
        result = self._add(request, *args, **kwargs)
        if new and request_id in self._requests:
            started = time.thread_time_ns()
            try:
                self._log_waiting(request)
            finally:
                self.overhead_ns += time.thread_time_ns() - started
        return result

    def _log_waiting(self, request: Any) -> None:
        extra = {}
        max_tokens = getattr(request, "max_tokens", None)
        if isinstance(max_tokens, int):
            extra["max_tokens"] = max_tokens
        self._log_request(request, "waiting", 0, **extra)

    def _schedule_hook(self, *args: Any, **kwargs: Any) -> Any:
        out = self._schedule(*args, **kwargs)
        self._sched_out = out
        started = time.thread_time_ns()
        try:
            # The step's high point: its blocks are allocated now, and a request that finishes in this step
            # frees its blocks before the step ends (after the step, a max_tokens=1 request held none).
            free = self._pool.get_num_free_blocks()
            if self._scheduled_free is None or free < self._scheduled_free:
                self._scheduled_free = free
            self._prefill = self._log_scheduled(out.num_scheduled_tokens)
        finally:
            self.overhead_ns += time.thread_time_ns() - started
        return out

    def _log_scheduled(self, scheduled: dict[str, int]) -> bool:
        """Right after scheduling: blocks are allocated for this step, `num_computed_tokens` counts the
        tokens this step computes, and a request that finishes in this step still exists. Returns whether
        the step is a prefill: it writes some request's prompt positions (a new request, a chunk of a long
        prompt) or recomputes a preempted one, in whichever step a chunk of that recompute falls (one past
        the prompt, of its output tokens, included). Not "more than one token a request": speculative
        decoding schedules each request's drafts beside its next token, every step."""
        requests = self._requests
        prefill = False
        for request_id, count in scheduled.items():
            request = requests.get(request_id)
            if request is None:
                continue
            start = request.num_computed_tokens - count  # the tokens computed before this step
            recompute_to = self._recomputing.get(request_id, 0)
            if recompute_to and request.num_computed_tokens >= recompute_to:
                del self._recomputing[request_id]  # this step's chunk ends its recompute
            if not prefill:
                prefill = (
                    request_id in self._dropped or start < request.num_prompt_tokens or start < recompute_to
                )
            blocks = self._blocks_of(request_id)
            if self._count_prefix and (
                request_id in self._dropped
                or (request_id not in self._held and request_id not in self._running_before)
            ):
                self._count_admission(request, request.num_computed_tokens - count)
            if request_id in self._dropped:
                # Under async scheduling the preemption counted the batch in flight's slots, its drafts
                # too; those vLLM rejected since were never KV to recompute. The KV kept is at most every
                # token but the last sampled (prompt + output - 1), the in-flight batch's output included.
                kept = request.num_prompt_tokens + request.num_output_tokens - 1
                dropped = min(self._dropped.pop(request_id), max(0, kept))
                hits = max(0, request.num_computed_tokens - count)  # found in the prefix cache
                self._log_request(request, "resumed", blocks, recomputed_tokens=max(0, dropped - hits))
                if request.num_computed_tokens < dropped:
                    self._recomputing[request_id] = dropped
            elif request_id not in self._held:
                # its prefix-cache hit when admitted (which of a prompt's blocks a parallel sample shares);
                # none said for a request already running when the hooks went in
                extra = {}
                if request_id not in self._running_before:
                    extra["cached_tokens"] = max(0, request.num_computed_tokens - count)
                self._log_request(request, "scheduled", blocks, **extra)
                self._objects[request_id] = request
            elif blocks != self._held[request_id]:
                self._log_request(request, "blocks", blocks)
            self._held[request_id] = blocks
        return prefill

    def _count_admission(self, request: Any, hits: int) -> None:
        """vLLM's prefix-cache stats of a request it just took from the waiting queue, new or resumed after
        a preemption (vLLM 0.32 `KVCacheManager.record_prefix_cache_stats`, called once an admission is
        allocated): queries are all its tokens then (prompt + output so far), hits the tokens found in the
        cache (`num_computed_tokens` after schedule() less those it scheduled); a request with a preemption
        behind it counts apart; one that skips the lookup (caching off, prompt logprobs) counts nothing.
        A streaming session's later chunk may be admitted without a lookup, which kvtrace cannot tell."""
        manager = self._scheduler.kv_cache_manager
        lookup = getattr(manager, "prefix_cache_lookup_enabled", None)
        if not (lookup(request) if lookup is not None else getattr(manager, "enable_caching", False)):
            return
        if getattr(request, "resumable", False):
            self._prefix_unknown = True
            return
        counted = self._prefix_counted
        part = 2 if getattr(request, "num_preemptions", 0) > 0 else 0
        counted[part] += max(0, hits)
        counted[part + 1] += request.num_tokens

    def _blocks_of(self, request_id: str) -> int:
        """Pool blocks the request holds, over its KV cache groups (each group's manager lists its own). A
        group may list vLLM's one null block in place of blocks it freed (a sliding window's before the
        window, R-SWA's gap, Mamba's retired states), keeping positions; those hold nothing of the request."""
        held = 0
        for manager, nulls in self._block_lists:
            blocks = manager.req_to_blocks.get(request_id, ())
            if nulls == _NONE:
                held += len(blocks)
            elif nulls == _PREFIX:
                held += len(blocks) - bisect.bisect_left(blocks, True, key=_not_null)
            else:
                held += len(blocks) - sum(map(_IS_NULL, blocks))
        return held

    def _preempt_hook(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        request_id = request.request_id
        blocks, tokens = self._blocks_of(request_id), request.num_computed_tokens
        # The pool as full as the scheduler found it: what it preempts for. After schedule() the victim's
        # blocks are free again, and a step that preempted may hold fewer than at this moment.
        free = self._pool.get_num_free_blocks()
        if self._scheduled_free is None or free < self._scheduled_free:
            self._scheduled_free = free
        result = self._preempt(request, *args, **kwargs)
        self.preemptions += 1
        self._step_preempted.append(request_id)
        self._dropped[request_id] = tokens
        self._recomputing.pop(request_id, None)
        self._held[request_id] = 0
        self._log_request(request, "preempted", 0, dropped_blocks=blocks, dropped_tokens=tokens)
        return result

    def _finish_hook(self, *args: Any, **kwargs: Any) -> Any:
        """`Scheduler.finish_requests`: how vLLM ends requests from outside its own stop checks (an abort:
        `abort_request`, a client gone, a reset; an error). It may run between steps, when no step follows
        to notice the request gone: log its end now, with the status vLLM just set. vLLM returns only the
        requests it ended here, so one never scheduled (aborted while it waited) is logged too, holding no
        blocks: it is a request of the run, and one that did not complete."""
        finished = self._finish(*args, **kwargs)
        started = time.thread_time_ns()
        try:
            for request in finished or ():
                if getattr(request, "request_id", None) is not None:
                    self._log_finished(request)
        finally:
            self.overhead_ns += time.thread_time_ns() - started
        return finished

    def _log_finished(self, request: Any) -> None:
        request_id = request.request_id
        self._held.pop(request_id, None)
        self._objects.pop(request_id, None)
        self._dropped.pop(request_id, None)
        self._recomputing.pop(request_id, None)
        extra = {}
        reason = _finish_reason(request)
        if reason is not None:
            extra["finish_reason"] = reason
        self._log_request(request, "finished", 0, **extra)

    def _evict_hook(self, block: Any) -> Any:
        evicted = self._evict(block)
        if evicted:
            self._prefix_evicted += 1
        return evicted

    def _step_hook(self) -> Any:
        return self.around_step(self._step_fn)

    def around_step(self, step_fn: Any) -> Any:
        rec = self.recording
        tracker = rec.tracker
        tracker.step += 1
        self._step_began_ns = rec._clock()  # the step sample's `started_ns`
        ranges = rec._ranges
        if ranges is not None:
            ranges.push(f"kvtrace/engine step {tracker.step}")
        self._sched_out = None
        self._scheduled_free = None
        evicted_before = self._prefix_evicted
        try:
            result = step_fn()
        except BaseException as exc:
            if not self._wrap_step and self.raised is None:
                self.raised = exc
            # The model's forward (or vLLM after it) raised: the step still held the blocks it scheduled, and
            # is often the run's fullest; left out, the run's peak would be the step before's, or none.
            if self._sched_out is None:
                tracker.step -= 1
            else:
                with contextlib.suppress(Exception):  # the engine's exception goes on, not one of ours
                    self._end_step(tracker.step, None, self._prefix_evicted - evicted_before, raised=True)
            raise
        finally:
            if ranges is not None:
                ranges.pop()
        if self._sched_out is None:  # nothing to schedule: not a step
            tracker.step -= 1
            return result
        self._end_step(tracker.step, result, self._prefix_evicted - evicted_before)
        return result

    def _end_step(self, step: int, result: Any, prefix_evicted: int, raised: bool = False) -> None:
        started = time.thread_time_ns()  # CPU time: what we cost, whatever else runs on the machine
        try:
            self._after_step(step, result, prefix_evicted, raised)
        finally:
            self._step_preempted = []
            self._sched_out = None
            self.overhead_ns += time.thread_time_ns() - started

    # -- per step ----------------------------------------------------------------------------------------
    def _after_step(self, step: int, result: Any, prefix_evicted: int, raised: bool = False) -> None:
        """The step's line and sample. `raised`: the step raised before it returned outputs (no tokens, no
        prefix-cache stats): the pool as it stood then, with `"raised": true`."""
        rec = self.recording
        out = self._sched_out
        # `idle`: nothing scheduled; with async scheduling, a step that only collects the batch in flight
        phase = "idle" if not out.total_num_scheduled_tokens else "prefill" if self._prefill else "decode"
        rec.tracker.phase = phase
        self.engine_steps += 1
        self.prefix_evicted_blocks += prefix_evicted
        requests = self._requests
        for request_id in list(self._held):
            request = self._objects[request_id]
            if request_id not in requests or request.is_finished():
                self._log_finished(request)
        pool = self._pool
        free = pool.get_num_free_blocks()
        cached = sum(1 for b in pool.blocks if b.ref_cnt == 0 and b.block_hash is not None and not b.is_null)
        hits, queries, preempted_hits, preempted_queries = self._prefix_line(result, raised)
        running, waiting = self._scheduler.get_request_counts()
        total = pool.num_gpu_blocks
        reserved = 1 if getattr(pool, "null_block", None) is not None else 0
        scheduled_free = free if self._scheduled_free is None else min(free, self._scheduled_free)
        t_ns = rec._clock()
        assert self._steps is not None
        line: dict[str, Any] = {
            "step": step,
            "t_ns": t_ns,
            "phase": phase,
            "blocks_total": total,
            "blocks_used": total - free - reserved,
            "blocks_used_in_step": total - scheduled_free - reserved,
            "blocks_free": free,
            "blocks_cached": cached,
            "blocks_reserved": reserved,
            "running": running,
            "waiting": waiting,
            "tokens_scheduled": out.total_num_scheduled_tokens,
            "preempted": list(self._step_preempted),
            "prefix_evicted_blocks": prefix_evicted,
            "prefix_hits": hits,
            "prefix_queries": queries,
            "prefix_preempted_hits": preempted_hits,
            "prefix_preempted_queries": preempted_queries,
        }
        if raised:
            line["raised"] = True
        self._steps.append(line)
        # Not the sample's `raised`: that one says which KV layer updates a Hugging Face forward reached
        rec._sample(phase, started_ns=self._step_began_ns)
        self._flushed_ns = flush_when_due(self._flushed_ns, t_ns, rec)

    def _prefix_line(self, result: Any, raised: bool) -> list[int | None]:
        """vLLM's own prefix-cache stats of the step (what its stat loggers read): new requests in hits and
        queries (the vllm:prefix_cache_* counters), resumed ones apart. vLLM reports them with a batch's
        output (`Scheduler.update_from_output` -> `make_stats`), every admission since the last report: in
        the step that scheduled them, or under async scheduling a step that only queued its batch
        (`step_with_batch_queue` returns no outputs) leaves them to the next that collects one. With its
        stats off, kvtrace's count of the same, reported in the same step (None: unknown); a step that
        raised reports what it counted, the run's last line."""
        outputs = result[0] if isinstance(result, tuple) and result else None
        if not self._count_prefix:
            counted = [0, 0, 0, 0]
            for output in (outputs or {}).values():
                stats = getattr(getattr(output, "scheduler_stats", None), "prefix_cache_stats", None)
                if stats is not None:
                    counted[0] += stats.hits
                    counted[1] += stats.queries
                    counted[2] += getattr(stats, "preempted_hits", 0)
                    counted[3] += getattr(stats, "preempted_queries", 0)
            return list(counted)
        if self._uncountable:
            return [None] * 4
        queued_only = isinstance(result, tuple) and bool(result) and outputs is None
        if queued_only and not raised:
            return [0, 0, 0, 0]
        line: list[int | None] = [None] * 4 if self._prefix_unknown else list(self._prefix_counted)
        self._prefix_counted = [0, 0, 0, 0]
        self._prefix_unknown = False
        return line

    def _log_request(self, request: Any, event: str, blocks: int, **extra: Any) -> None:
        assert self._request_log is not None
        record: dict[str, Any] = {
            "t_ns": self.recording._clock(),
            "step": self.recording.tracker.step,
            "request_id": request.request_id,
            "event": event,
            "blocks": blocks,
            "tokens": 0 if event in _EMPTIED else request.num_computed_tokens,
            "prompt_tokens": request.num_prompt_tokens,
            "output_tokens": request.num_output_tokens,
        }
        record.update(extra)
        self._request_log.append(record)


def _finish_reason(request: Any) -> str | None:
    """How vLLM says the request ended, as its outputs' `finish_reason` does: `stop`, `length`, `abort`,
    `error`, `repetition` (vLLM's `FinishReason` of the request's status). None when vLLM does not say."""
    with contextlib.suppress(Exception):
        reason = request.get_finished_reason()
        if reason is not None:
            return str(reason)
    return None


class VllmRecording:
    """What a `Recording` holds for vLLM: the hooks on an engine core (given an LLM or the core itself), or,
    with neither, a watch that turns a start refused inside the block into a `refused_start` run."""

    def __init__(
        self,
        recording: Any,
        llm: Any = None,
        process: str = "inproc",
        core: Any = None,
        wrap_step: bool = True,
        watch: bool | None = None,
    ) -> None:
        self.recording = recording
        self.process = process
        self.refused: dict[str, Any] | None = None
        if core is None and llm is not None:
            core = engine_core_of(llm)
        self.hooks = EngineHooks(recording, core, process, wrap_step) if core is not None else None
        use_watch = core is None if watch is None else watch
        self.watch = RefusalWatch(self.on_refused) if use_watch else None
        # beside the watch: an LLM that starts fine, which this recording does not follow
        self.starts = EngineStarts() if use_watch else None

    def install(self) -> None:
        if self.hooks is not None:
            self.hooks.install()
        if self.watch is not None:
            self.watch.install()
        if self.starts is not None:
            self.starts.install()

    def uninstall(self) -> None:
        if self.hooks is not None:
            self.hooks.uninstall()
        if self.watch is not None:
            self.watch.uninstall()
        if self.starts is not None:
            self.starts.uninstall()

    def unfollowed_starts(self) -> list[str]:
        """The class names of the LLMs that started while watched (none for a recording of an engine)."""
        return list(self.starts.started) if self.starts is not None and self.hooks is None else []

    def on_refused(self, refused: dict[str, Any], vllm_config: Any) -> None:
        self.refused = dict(refused)
        write_refused(self.recording.path, self.process, refused, vllm_config)

    def summary(self) -> dict[str, Any] | None:
        if self.hooks is not None:
            return self.hooks.summary()
        if self.refused is not None:
            return {"name": "vllm", "process": self.process, "status": "refused_start"}
        return None
