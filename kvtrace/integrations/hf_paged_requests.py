"""The requests of transformers' continuous batching that leave the pool between steps, and the one writer
of their lines in engine_requests.jsonl: those `OffloadingManager` takes out (vLLM's "preempted", to the
CPU or recomputed) and those transformers fails (`finished`, reason `error`, with their error).

Split from hf_paged.py (the hooks and the pool's life); the requests a step schedules, resumes or finishes
are logged by hf_paged_steps.py through `_log_request` here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtrace.json_writes import JsonlAppender

_EMPTIED = ("preempted", "finished")


class PagedRequests:
    """Offloaded and failed requests, and the request log (a mixin of `PagedAttentionHooks`)."""

    recording: Any
    failure: dict[str, Any] | None
    preemptions: int
    failed_requests: int
    aborted_requests: int
    _closed: bool
    _request_log: JsonlAppender | None
    _step_preempted: list[str]
    _prefix_lookup: dict[str, tuple[int, int]]
    _held: dict[str, int]
    _states: dict[str, Any]
    _dropped: dict[str, tuple[int, bool]]
    _failed_ids: set[str]
    _waited: set[str]
    _stop_failed: list[str]
    _failed_alone: list[tuple[str, str]]
    _failing_all: bool
    _offload_free: int | None

    if TYPE_CHECKING:

        def _timed(self, work: Any, *args: Any) -> None: ...

        def _blocks_of(self, request_id: str) -> int: ...

        def _free_blocks(self) -> int: ...

    def _around_offload(self, manager: Any, offload: Any) -> bool:
        scheduler = manager.scheduler
        before = {
            rid: (self._blocks_of(rid), state.current_len())
            for rid, state in scheduler.active_requests.items()
        }
        self._timed(self._pool_before_offload)
        result = bool(offload(manager))
        self._timed(self._log_offloaded, scheduler, before)
        return result

    def _pool_before_offload(self) -> None:
        """The pool as full as the scheduler found it when it offloads: what it offloads for. Once
        `prepare_next_batch` returns, the victims' blocks are free again, so the step being scheduled keeps
        the lower free count (`blocks_used_in_step`), as vLLM's step keeps the pool it preempted for."""
        free = self._free_blocks()
        if self._offload_free is None or free < self._offload_free:
            self._offload_free = free

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

    def _request_waiting(self, state: Any) -> None:
        """The scheduler took a new request in (`add_waiting_request`), holding nothing yet: its `waiting`
        line, as vLLM's, with its `max_new_tokens` as `max_tokens`. transformers takes new requests in while
        it prepares a batch, so the line carries the number of the step being prepared (1 for those queued
        before the first step; vLLM's say 0). Without it a request still queued when the run
        stopped had no line, and `diagnose` priced one cancelled in the queue at its prompt only. The same
        call puts back a request the scheduler took out of the pool (a new state under the same id after a
        soft reset): that one already has its lines."""
        request_id = str(state.request_id)
        if request_id in self._waited:
            return
        self._waited.add(request_id)
        max_tokens = getattr(state, "max_new_tokens", None)
        extra = {"max_tokens": max_tokens} if isinstance(max_tokens, int) else {}
        self._log_request(state, "waiting", 0, **extra)

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

    def _requests_cancelled(self, states: Any) -> None:
        """The scheduler dropped these requests for `cancel_request` (a client gone), running or waiting,
        and freed their blocks, as the next batch was prepared: each leaves the engine (`finished`, reason
        `abort`, vLLM's word for a request aborted before its end) with the tokens it had generated. Without
        this line a running one left as a completed one does, and a waiting one left no line at all."""
        for state in states:
            request_id = str(state.request_id)
            if request_id in self._failed_ids:
                continue
            self.aborted_requests += 1
            self._held.pop(request_id, None)
            self._dropped.pop(request_id, None)
            self._states.pop(request_id, None)
            self._prefix_lookup.pop(request_id, None)
            self._log_request(state, "finished", 0, finish_reason="abort")

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
