"""Requests a run left in the engine, counted at the most they may grow to. Pure: engine files only.

A run that stopped short (killed, interrupted, still recording) leaves requests short of their final lengths,
so the lengths they had reached understate what they need. vLLM's and transformers' `waiting` lines record
each request's `max_tokens` (transformers' `max_new_tokens`): a request stops at it, or earlier at an EOS or
a stop string, and at max_model_len (vLLM's `check_stop`), and its last sampled token is never fed back, so it
never holds more KV than `min(prompt + max_tokens, max_model_len) - 1` tokens, and the drafts and lookahead
slots a step gives it past those, up to max_model_len (vLLM's scheduler caps a step's positions there, not
at max_tokens). Counted so, the demand is an upper bound again, as a finished run's is. Requests whose line
has no max_tokens (recorded before kvtrace logged it), or that are in the engine with no line, keep the
lengths they had reached: where any is left so, the demand is a lower bound, tighter by those counted whole.
"""

from __future__ import annotations

from typing import Any

from analyzers.engine import EngineRun, RequestEvent

__all__ = ["asked_tokens", "in_engine_at_end", "unfinished_asks"]


def _unfinished_ids(run: EngineRun) -> set[str]:
    """Requests whose events never say finished."""
    unfinished: set[str] = set()
    for event in run.requests:
        if event.event == "finished":
            unfinished.discard(event.request_id)
        else:
            unfinished.add(event.request_id)
    return unfinished


def in_engine_at_end(run: EngineRun) -> int:
    """Requests still in the engine at the run's last recorded step: those whose events never say finished,
    or the step's running and waiting (a request that waited from the start has no event), the more."""
    last = 0
    if len(run.steps):
        last = int(run.steps["running"][-1]) + int(run.steps["waiting"][-1])
    return max(len(_unfinished_ids(run)), last)


def unfinished_asks(run: EngineRun) -> dict[str, RequestEvent]:
    """The `waiting` line (its first: a request transformers took out of its pool is put back with what it
    has left to generate) of each request left unfinished whose line says its max_tokens: those can be
    counted at the most they may reach. The others (no max_tokens on their line, or no line at all: fewer
    than `in_engine_at_end`) are left out, to be counted at the lengths they had reached. Empty where none
    was left or none says it."""
    left = _unfinished_ids(run)
    asks: dict[str, RequestEvent] = {}
    for event in run.requests:
        if event.event == "waiting" and event.request_id in left:
            asks.setdefault(event.request_id, event)
    return {rid: e for rid, e in asks.items() if e.max_tokens is not None and e.max_tokens >= 1}


def _positive(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def asked_tokens(waiting: RequestEvent, config: dict[str, Any]) -> int:
    """The most KV tokens the request of this `waiting` line may hold: its prompt + max_tokens - 1 (the last
    sampled token gets no KV), no more than max_model_len - 1, and the slots a step gives its drafts
    (`num_speculative_tokens`) and a drafter's lookahead (`num_lookahead_tokens`) past those, up to
    max_model_len."""
    max_len = _positive(config.get("max_model_len")) or None
    reach = waiting.prompt_tokens + int(waiting.max_tokens or 0)
    if max_len is not None:
        reach = min(reach, max_len)
    tokens = max(reach - 1, waiting.prompt_tokens)
    ahead = _positive(config.get("num_speculative_tokens")) + _positive(config.get("num_lookahead_tokens"))
    if ahead:
        tokens = max(tokens, min(tokens + ahead, max_len or tokens + ahead))
    return tokens
