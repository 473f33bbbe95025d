"""One engine step of transformers' continuous batching, from its scheduling to its update: the step's line
in engine_steps.jsonl, the requests it schedules or resumes and those it finishes, and the run's `failure`
in engine.json when a step cannot be scheduled or its forward raises.

Split from hf_paged.py (the hooks and the pool's life) so that what one step writes reads in one place;
requests taken out of the pool or failed are hf_paged_requests.py's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kvtrace import format as fmt
from kvtrace.integrations.vllm_engine import flush_when_due
from kvtrace.json_writes import write_json_atomic

if TYPE_CHECKING:
    from collections import deque

    from kvtrace.json_writes import JsonlAppender


class PagedSteps:
    """The engine steps (a mixin of `PagedAttentionHooks`, whose state it shares)."""

    recording: Any
    document: dict[str, Any]
    failure: dict[str, Any] | None
    engine_steps: int
    prefix_evicted_blocks: int
    _steps: JsonlAppender | None
    _request_log: JsonlAppender | None
    _open: deque[tuple[int, str, int, list[str], int, int]]
    _step_preempted: list[str]
    _prefix_evicted: int
    _prefix_lookup: dict[str, tuple[int, int]]
    _prefix: list[int]
    _held: dict[str, int]
    _states: dict[str, Any]
    _dropped: dict[str, tuple[int, bool]]
    _reserved: int
    _flushed_ns: int
    _warnings: list[str]
    _stop_failed: list[str]
    _offload_free: int | None

    if TYPE_CHECKING:

        @property
        def cache(self) -> Any: ...

        def _timed(self, work: Any, *args: Any) -> None: ...

        def _cached_blocks(self, cache: Any) -> int: ...

        def _blocks_of(self, request_id: str) -> int: ...

        def _free_blocks(self) -> int: ...

        def _log_request(self, state: Any, event: str, blocks: int, **extra: Any) -> None: ...

    def _around_prepare(self, proc: Any, prepare: Any) -> bool:
        rec = self.recording
        tracker = rec.tracker
        tracker.step += 1  # a preemption while scheduling belongs to the step being scheduled
        began = rec._clock()  # the step sample's `started_ns`
        ranges = rec._ranges
        if ranges is not None and ranges.active:
            ranges.push(f"kvtrace/engine step {tracker.step}")
        scheduled = False
        self._offload_free = None  # the pool's low point while this step is scheduled, if it offloads
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

    def _log_scheduled(self, proc: Any, step: int, began: int) -> None:
        """Right after scheduling: this step's blocks are allocated and `current_len()` counts its tokens.
        The pool's free blocks now are the step's low point (or fewer, as the scheduler found them when it
        offloaded a request for this step): `update_batch` frees the blocks of the requests that finish in the
        step before the step's line is written (a max_new_tokens=1 request held none then). The step is a
        prefill when it writes some request's prompt positions (`_writes_prompt`). A few counters, no pass
        over the blocks."""
        batch = list(getattr(proc.inputs_and_outputs, "requests_in_batch", ()) or ())
        computed = [_query_tokens(f) for f in batch]
        tokens = sum(computed)
        prefill = any(_writes_prompt(f, q) for f, q in zip(batch, computed, strict=True))
        phase = "prefill" if prefill else "decode"
        self.recording.tracker.phase = phase
        free = self._free_blocks()
        if self._offload_free is not None:
            free = min(free, self._offload_free)
        self._offload_free = None
        self._open.append((step, phase, tokens, self._step_preempted, free, began))
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
                # Its last token, sampled but never fed, had no KV: computed now, it is no recompute (vLLM's
                # `recomputed_tokens` count the KV dropped alike).
                initial = len(getattr(state, "initial_tokens", ()) or ())
                redo = initial - 1 if initial else tokens
                recomputed = 0 if to_cpu else max(0, redo - hits)
                self._log_request(state, "resumed", blocks, recomputed_tokens=recomputed)
            elif request_id not in self._held:
                self._prefix[0] += hits
                self._prefix[1] += queries
                self._log_request(state, "scheduled", blocks)
            elif blocks != self._held[request_id]:
                self._log_request(state, "blocks", blocks)
            self._held[request_id] = blocks

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
        self._flushed_ns = flush_when_due(self._flushed_ns, t_ns, rec)

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
        self.recording._flush()  # with the failed requests' lines (under its lock, as the writer thread's)


def _query_tokens(future: Any) -> int:
    """The tokens the batch computes for this request: its `query_length`, else the tokens queued."""
    query = int(getattr(future, "query_length", 0) or 0)
    return query or len(getattr(future.state, "tokens_to_process", ()) or ())


def _writes_prompt(future: Any, query: int) -> bool:
    """Whether the batch writes some of this request's prompt positions: the tokens in its KV before the
    batch (`position_offset`, advanced by the batch's query once it is prepared) are fewer than its prompt's.
    So a chunk of a long prompt is a prefill, its last chunk of 1 token included (with the other requests
    decoding, "more tokens than requests" called that step a decode), and so is a request resumed by a
    recompute (a soft reset makes the tokens generated before it part of its prompt), and one whose prefix
    was found in shared blocks. A request restored from the CPU has its KV copied back: its next token is
    a decode."""
    state = future.state
    prompt = len(getattr(state, "initial_tokens", ()) or ())
    return int(state.position_offset) - query < prompt
