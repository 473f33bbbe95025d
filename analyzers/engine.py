"""A serving engine's paged KV pool, read from a run: engine.json, engine_steps.jsonl, engine_requests.jsonl.

vLLM allocates its KV cache once, as a pool of fixed-size blocks shared by every request; kvtrace's vLLM
integration writes three files next to the usual run files (docs/format.md, "vLLM runs"), and so does its
integration of transformers' continuous batching (engine `transformers-cb`, same files). This module
holds them as one typed, immutable result (`EngineRun`, read by `analyzers.readers.engine_files`) and derives
the figures every renderer and the diagnosis use (`EngineFigures`). Stdlib and numpy only: no torch, no vllm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "COMPLETED_REASONS",
    "ENGINE",
    "ENGINE_REQUESTS",
    "ENGINE_STEPS",
    "PREFIX_FIELDS",
    "EngineFigures",
    "EngineInfo",
    "EngineRun",
    "EngineSteps",
    "HeldRequest",
    "RequestEvent",
    "aborted_requests_unknown",
    "blocks_for",
    "cache_dtype_name",
    "draft_kv_layers",
    "engine_figures",
    "failed_requests_unknown",
    "held_at",
    "kv_dtype_name",
    "model_geometry",
    "sampled_prompts",
]

# The names kvtrace.format gives these files (the contract with the recorder, docs/format.md).
ENGINE = "engine.json"
ENGINE_STEPS = "engine_steps.jsonl"
ENGINE_REQUESTS = "engine_requests.jsonl"
# engine_steps.jsonl's prefix-cache counts (tokens): null where nobody counted them
PREFIX_FIELDS = ("prefix_hits", "prefix_queries", "prefix_preempted_hits", "prefix_preempted_queries")

# "waiting": vLLM's scheduler took the request in (add_request), holding nothing yet; runs recorded before
# kvtrace logged it have none, so a request that never ran had no line, or only its "finished" one
REQUEST_EVENTS = ("waiting", "scheduled", "blocks", "preempted", "resumed", "finished")
_EMPTIED = ("preempted", "finished")  # request events after which it holds no KV
# vLLM's finish reasons of a request that ran to its end (its stop condition, its length, a repeated pattern)
COMPLETED_REASONS = ("stop", "length", "repetition")


@dataclass(frozen=True)
class EngineInfo:
    """engine.json: what the engine is and how its pool was sized. `refused` is set for a refused start."""

    name: str
    version: str
    status: str  # "ok" | "refused_start" | "failed" (transformers' continuous batching stopped on an error)
    process: str
    model: dict[str, Any]
    config: dict[str, Any]
    num_blocks: int | None
    block_size: int | None
    bytes_per_block: int | None  # all layers, K and V, one block
    kv_cache_bytes: int | None  # the pool's storage, counted once
    kv_dtype: str
    layout: str
    layers: tuple[dict[str, Any], ...]
    storage: tuple[dict[str, Any], ...]
    memory_profile: dict[str, Any]
    refused: dict[str, Any] | None
    blocks_reserved: int = 1  # blocks never given to a request: vLLM's null block; HF CB's trash sectors
    bytes_per_sector: int | None = None  # HF CB: its pool grows by sectors (vLLM: absent)
    # HF CB, status "failed": engine.json's `failure` (step, reason, error, blocks_needed, usable_blocks,
    # requests)
    failure: dict[str, Any] | None = None
    # HF CB: engine.json says engine_requests.jsonl has a `finished` line (reason "error") for every request
    # transformers fails, written with the pool: a run without one failed none, even one whose process died
    failed_requests_logged: bool = False
    # HF CB: engine.json says engine_requests.jsonl has a `finished` line (reason "abort") for every request
    # transformers' scheduler dropped for `cancel_request`: the log then counts the aborted ones
    aborted_requests_logged: bool = False
    # vLLM: who counted the steps' prefix-cache hits, "vllm" (its stats on) or "kvtrace" (off); None in runs
    # recorded before engine.json said so
    prefix_stats: str | None = None
    # vLLM under pipeline parallelism: each stage's `layers`, `kv_cache_bytes`, `weights_bytes` and
    # `buffers_bytes` (analyzers.engine_stages); () otherwise, and in runs recorded before kvtrace kept them
    pipeline_stages: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class EngineSteps:
    """engine_steps.jsonl as columns (one row per engine step); `preempted` lists request ids per row."""

    columns: dict[str, np.ndarray]
    preempted: tuple[tuple[str, ...], ...]
    # Whether the log says what each step held while it ran (`blocks_used_in_step`); runs recorded before
    # kvtrace wrote it read that column as `blocks_used`, the pool after the step.
    in_step: bool = False
    # Whether every step says its prefix-cache hits: a null one (vLLM's stats off where kvtrace could not
    # count them) reads as 0 in the columns, and the run's hits are unknown.
    prefix_known: bool = True

    def __len__(self) -> int:
        return len(self.preempted)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def blocks_held(self) -> np.ndarray:
        """Blocks requests held in each step: while it ran where the log says, else after it. After a step,
        the requests that finished in it (every `max_tokens=1` one) hold none, though the step used them."""
        return np.maximum(self.columns["blocks_used"], self.columns["blocks_used_in_step"])


@dataclass(frozen=True)
class RequestEvent:
    """One line of engine_requests.jsonl: the request's blocks and KV tokens after the event."""

    t_ns: int
    step: int
    request_id: str
    event: str
    blocks: int
    tokens: int
    prompt_tokens: int
    output_tokens: int
    dropped_blocks: int = 0
    dropped_tokens: int = 0
    recomputed_tokens: int = 0
    finish_reason: str | None = None  # on "finished": vLLM's (stop, length, abort, ...); None: not recorded
    error: str | None = None  # on "finished", reason "error", where recorded: the exception that failed it
    max_tokens: int | None = None  # on "waiting": the most tokens it may generate (vLLM's max_tokens)
    # on "scheduled" (vLLM): its prompt tokens found in the prefix cache when admitted; None: not recorded
    cached_tokens: int | None = None


@dataclass(frozen=True)
class EngineRun:
    path: str
    info: EngineInfo
    steps: EngineSteps
    requests: tuple[RequestEvent, ...]
    # The note on a request log that is missing (or empty) though the run had requests: every figure read
    # from it is unknown, not 0 (analyzers.readers.engine_files); None where the log is there
    requests_missing: str | None = None


@dataclass(frozen=True)
class EngineFigures:
    """What the report says about the pool. Counts come from the per-request log (one line per
    preemption); the per-step lists are the fallback when a run has no request log."""

    name: str
    version: str
    status: str
    num_blocks: int | None
    block_size: int | None
    bytes_per_block: int | None
    kv_cache_bytes: int | None
    kv_dtype: str
    steps: int
    peak_blocks_used: int
    peak_step: int | None
    preemptions: int
    preempted_tokens: int
    preempted_blocks: int
    recomputed_tokens: int
    prefix_cache_evicted_blocks: int
    requests: int
    first_preemption_step: int | None
    preemptions_by_request: dict[str, int] = field(default_factory=dict)
    # vLLM's own prefix-cache counters (kvtrace's count of them with vLLM's stats off), summed over steps;
    # None: unknown (a step could not count them)
    prefix_hit_tokens: int | None = 0
    prefix_query_tokens: int | None = 0
    blocks_reserved: int = 1  # engine.json's, 1 (vLLM's null block) when absent
    # Requests that ended, by vLLM's finish reason ("length", "abort", ...): {} when no "finished" event
    # says (runs recorded before kvtrace logged it, transformers' continuous batching).
    finish_reasons: dict[str, int] = field(default_factory=dict)
    requests_aborted: int | None = None  # finish reason "abort"; None when the log does not say
    # Requests that ran to their end: vLLM's completed reasons, or no reason (transformers' continuous
    # batching says none but `error`); the report's "(6 completed, 2 failed)"
    requests_completed: int = 0
    # (request id, its error or None) of each request that finished with reason "error", in log order
    failed_requests: tuple[tuple[str, str | None], ...] = ()
    peak_in_step: bool = False  # the peak counts what steps held while they ran (else: after each step)
    # vLLM's parallel sampling (`n > 1`): the prompts the caller sent, each of the `requests` above one
    # sample; None where no request was a sample of another's prompt (then every request is a prompt)
    prompts: int | None = None
    prompts_sampled: int = 0  # of `prompts`, those sampled n > 1 times
    samples_per_prompt: tuple[int, ...] = ()  # the distinct n of the sampled prompts, ascending
    # False where the request log is missing though the run had requests (`EngineRun.requests_missing`):
    # `requests`, the tokens dropped and recomputed read 0 but are unknown
    requests_known: bool = True


@dataclass(frozen=True)
class HeldRequest:
    """A request's share of the pool at one moment."""

    request_id: str
    blocks: int
    tokens: int
    prompt_tokens: int
    output_tokens: int
    as_of_step: int

    @property
    def in_flight(self) -> int:
        """KV tokens beyond prompt + output: under async scheduling the token of the batch in flight, whose
        slot is taken before it is sampled."""
        return max(0, self.tokens - self.prompt_tokens - self.output_tokens)


# engine.json's model keys that the manifest's `model` names alike; its `num_params` is `parameters`
_GEOMETRY_KEYS = (
    "class",
    "model_type",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "dtype",
)


def draft_kv_layers(model: Any) -> int:
    """engine.json's `model.draft_kv_layers`: the pool's layers that a speculative drafter (a draft model,
    an EAGLE or MTP head) owns; 0 without one, and in runs recorded before kvtrace kept it."""
    drafted = model.get("draft_kv_layers") if isinstance(model, dict) else None
    return drafted if isinstance(drafted, int) and not isinstance(drafted, bool) and drafted > 0 else 0


def model_geometry(model: Any) -> dict[str, Any] | None:
    """engine.json's `model` in the manifest's `model` keys, for the report's geometry and the runs table:
    a vLLM run's manifest has no model of its own (the recorder never sees the engine's model object).
    `class` and `model_type` only from runs recorded since kvtrace wrote them. None when engine.json has no
    model (an older or damaged file)."""
    if not isinstance(model, dict):
        return None
    geometry = {key: model[key] for key in _GEOMETRY_KEYS if model.get(key) is not None}
    if model.get("num_params") is not None:
        geometry["parameters"] = model["num_params"]
    return geometry or None


def engine_figures(run: EngineRun) -> EngineFigures:
    info, steps = run.info, run.steps
    used = steps.blocks_held()
    peak_i = int(np.argmax(used)) if len(steps) else -1
    preempt_events = [e for e in run.requests if e.event == "preempted"]
    by_request: dict[str, int] = {}
    first: int | None
    if preempt_events:
        for e in preempt_events:
            by_request[e.request_id] = by_request.get(e.request_id, 0) + 1
        first = min(e.step for e in preempt_events)
    else:
        for ids in steps.preempted:
            for rid in ids:
                by_request[rid] = by_request.get(rid, 0) + 1
        first_rows = [int(steps["step"][i]) for i, ids in enumerate(steps.preempted) if ids]
        first = first_rows[0] if first_rows else None
    finish_reasons: dict[str, int] = {}
    completed = 0
    failed: list[tuple[str, str | None]] = []
    for e in run.requests:
        if e.event != "finished":
            continue
        if e.finish_reason is not None:
            finish_reasons[e.finish_reason] = finish_reasons.get(e.finish_reason, 0) + 1
        if e.finish_reason is None or e.finish_reason in COMPLETED_REASONS:
            completed += 1
        elif e.finish_reason == "error":
            failed.append((e.request_id, e.error))
    return EngineFigures(
        name=info.name,
        version=info.version,
        status=info.status,
        num_blocks=info.num_blocks,
        block_size=info.block_size,
        bytes_per_block=info.bytes_per_block,
        kv_cache_bytes=info.kv_cache_bytes,
        kv_dtype=kv_dtype_name(info),
        steps=len(steps),
        peak_blocks_used=int(used[peak_i]) if peak_i >= 0 else 0,
        peak_step=int(steps["step"][peak_i]) if peak_i >= 0 else None,
        preemptions=sum(by_request.values()),
        preempted_tokens=sum(e.dropped_tokens for e in preempt_events),
        preempted_blocks=sum(e.dropped_blocks for e in preempt_events),
        recomputed_tokens=sum(e.recomputed_tokens for e in run.requests if e.event == "resumed"),
        prefix_cache_evicted_blocks=int(steps["prefix_evicted_blocks"].sum()),
        requests=len({e.request_id for e in run.requests}),
        first_preemption_step=first,
        preemptions_by_request=by_request,
        prefix_hit_tokens=int(steps["prefix_hits"].sum()) if steps.prefix_known else None,
        prefix_query_tokens=int(steps["prefix_queries"].sum()) if steps.prefix_known else None,
        blocks_reserved=info.blocks_reserved,
        finish_reasons=finish_reasons,
        requests_aborted=(
            None
            if info.status == "refused_start" or _aborted_unknown(info, finish_reasons, run.requests)
            else finish_reasons.get("abort", 0)
        ),
        requests_completed=completed,
        failed_requests=tuple(failed),
        peak_in_step=steps.in_step,
        **_prompt_figures(run.requests),
        requests_known=run.requests_missing is None,
    )


def sampled_prompts(requests: tuple[RequestEvent, ...]) -> dict[str, tuple[str, ...]]:
    """vLLM's parallel sampling (`SamplingParams(n > 1)`): parent request id -> its samples' request ids.
    vLLM's front end fans such a request out into n requests of one prompt, which the engine core (and so
    the log) sees apart, named `{index}_{parent id}` (vllm.v1.engine.parallel_sampling): a parent is taken
    where indexes 0..n-1 of one parent id, n >= 2, all have the same prompt length, so that an id of the
    caller's own that merely holds a `_` is no sample."""
    children: dict[str, dict[int, int]] = {}  # parent id -> index -> prompt tokens
    for e in requests:
        index, sep, parent = e.request_id.partition("_")
        if sep and parent and index.isdigit() and str(int(index)) == index:
            children.setdefault(parent, {})[int(index)] = e.prompt_tokens
    return {
        parent: tuple(f"{i}_{parent}" for i in range(len(by_index)))
        for parent, by_index in children.items()
        if len(by_index) >= 2
        and set(by_index) == set(range(len(by_index)))
        and len(set(by_index.values())) == 1
    }


def _prompt_figures(requests: tuple[RequestEvent, ...]) -> dict[str, Any]:
    """`EngineFigures.prompts` and `samples_per_prompt`: the requests a caller sent, where vLLM ran some as
    several samples (each a request of the log, as vLLM's own request counters count them)."""
    groups = sampled_prompts(requests)
    if not groups:
        return {}
    ids = {e.request_id for e in requests}
    samples = sum(len(children) for children in groups.values())
    return {
        "prompts": len(ids) - samples + len(groups),
        "prompts_sampled": len(groups),
        "samples_per_prompt": tuple(sorted({len(children) for children in groups.values()})),
    }


def failed_requests_unknown(fig: EngineFigures, run: EngineRun, manifest: dict[str, Any]) -> str | None:
    """Why engine_requests.jsonl cannot count the requests the engine failed, or None when it can: the count
    is then `fig.failed_requests`, as the report's "(0 completed, 1 failed)" and diagnose's. The manifest's
    `engine` is written at the block's end only, so a run whose process died has none: engine.json, written
    with the pool, says whether the log names every failed request (`failed_requests_logged`), else the log
    decides."""
    if fig.name != "transformers-cb":
        if not fig.finish_reasons and any(e.event == "finished" for e in run.requests):
            return "its finished requests carry no finish reason (recorded before kvtrace logged vLLM's)"
        return None
    engine = manifest.get("engine")
    if isinstance(engine, dict) and "failed_requests" in engine:
        return None
    if run.info.failed_requests_logged:  # a line per failed request: none named is none failed
        return None
    # A failed request's line carries its `error` since kvtrace logs every request transformers fails; before,
    # only those of a stopped run had a line, and none its error
    if any(e.finish_reason == "error" and e.error is not None for e in run.requests if e.event == "finished"):
        return None
    if engine is None and (manifest.get("ended") or {}).get("status") == "running":
        return (
            "the run never finished, so its manifest does not count them, and its engine.json does not say "
            "that engine_requests.jsonl names every request transformers failed (no failed_requests_logged: "
            "recorded before kvtrace wrote it): that the log names none failed does not say none failed"
        )
    return (
        "the run was recorded before kvtrace logged every request transformers failed (no failed_requests "
        "in its manifest's engine, no error on a failed request in engine_requests.jsonl)"
    )


def aborted_requests_unknown(fig: EngineFigures, run: EngineRun) -> str | None:
    """Why engine_requests.jsonl cannot count the requests the engine aborted, or None when it can: the count
    is then `fig.requests_aborted` (`fig.finish_reasons`' "abort", 0 where none), the report's "(6 completed,
    2 aborted)"."""
    return _aborted_unknown(run.info, fig.finish_reasons, run.requests)


def _aborted_unknown(
    info: EngineInfo, finish_reasons: dict[str, int], requests: tuple[RequestEvent, ...]
) -> str | None:
    """`aborted_requests_unknown` from the figures it needs, so `engine_figures` and compare say one count. A
    vLLM log without a `finished` line (a run killed before any request ended) counts 0 aborted: a request
    vLLM aborts is logged as it happens."""
    if info.name == "transformers-cb":
        if info.aborted_requests_logged:  # a line per cancelled request: none named is none aborted
            return None
        # before, its cancel_request emptied the request from the scheduler as a finished one does
        return (
            "the run was recorded before kvtrace logged the requests transformers' continuous batching "
            "cancelled (cancel_request; no aborted_requests_logged in its engine.json): they read as "
            "completed ones"
        )
    if not finish_reasons and any(e.event == "finished" for e in requests):
        return "its finished requests carry no finish reason (recorded before kvtrace logged vLLM's)"
    return None


def kv_dtype_name(info: EngineInfo) -> str:
    """The KV element type as the run asked for it: vLLM keeps an fp8 pool in uint8 tensors, so engine.json's
    `kv_dtype` says uint8; the config's `kv_cache_dtype` names the format (fp8, fp8_e4m3, fp8_e5m2)."""
    return cache_dtype_name(info.kv_dtype, info.config)


def cache_dtype_name(storage_dtype: str, config: Any) -> str:
    """`kv_dtype_name` from engine.json's raw fields: its `kv_dtype` (the pool tensors' element type) and
    its `config` (a dict, or anything else when damaged)."""
    asked = config.get("kv_cache_dtype") if isinstance(config, dict) else None
    return asked if isinstance(asked, str) and asked.startswith("fp8") else storage_dtype


def held_at(
    run: EngineRun, step: int, blocks_at: Callable[[int, int], int] | None = None
) -> list[HeldRequest]:
    """The pool when the scheduler first preempted at `step`: each request's last event before that step,
    a request preempted at `step` with what it held just before losing it, and the blocks that requests
    scheduled ahead of the preemption took in that same step (`_grown_before_preemption`). Blocks are
    exact. A request that grew shows the tokens its blocks were allocated for (this step's included).
    "blocks" events are logged only on a change, so the other requests' tokens are brought forward from
    their next event when one follows (`_tokens_at_start`); otherwise they are as of their last event
    (`as_of_step`). `blocks_at(prompt_tokens, tokens)`: the blocks a request holds at a length (a sliding
    window's fewer than its tokens' blocks), for that check; by default every token's block.
    Under speculative decoding a step computes a request's drafts beside its next token and gives back the
    rejected ones, so no step-count arithmetic tells its tokens or output between events: each request is
    as of its own events, with the output vLLM logged there."""
    state: dict[str, RequestEvent] = {}
    for e in run.requests:
        if e.step < step:
            state[e.request_id] = e
        elif e.step == step and e.event == "preempted":
            state[e.request_id] = RequestEvent(
                e.t_ns,
                e.step,
                e.request_id,
                "held",
                e.dropped_blocks,
                e.dropped_tokens,
                e.prompt_tokens,
                e.output_tokens,
            )
    grown = _grown_before_preemption(run, step, state)
    drafting = bool(run.info.config.get("num_speculative_tokens"))
    held: list[HeldRequest] = []
    for e in state.values():
        if e.request_id in grown:
            g = grown[e.request_id]
            held.append(HeldRequest(g.request_id, g.blocks, g.tokens, g.prompt_tokens, g.output_tokens, step))
            continue
        if e.event in ("finished", "preempted") or e.blocks <= 0:
            continue
        tokens, as_of = e.tokens, e.step
        if drafting:
            output = e.output_tokens
        else:
            if e.step == step - 1 and e.event in ("scheduled", "blocks", "resumed"):
                as_of = step  # logged after the step just before: what it held when this step began
            elif e.event != "held":
                found = _tokens_at_start(run, e, step, blocks_at)
                if found is not None:
                    tokens, as_of = found, step
            output = (
                tokens - e.prompt_tokens + 1
                if as_of == step and tokens >= e.prompt_tokens
                else e.output_tokens
            )
        held.append(HeldRequest(e.request_id, e.blocks, tokens, e.prompt_tokens, output, as_of))
    return sorted(held, key=lambda h: (-h.blocks, h.request_id))


def _grown_before_preemption(
    run: EngineRun, step: int, state: dict[str, RequestEvent]
) -> dict[str, RequestEvent]:
    """The "blocks" events of `step` that happened before its first preemption. vLLM's scheduler walks the
    running requests in order, allocating each its next blocks; the first that does not fit in the free
    blocks makes it preempt, so the requests before it (the log keeps the scheduler's order) had already
    taken theirs. Free blocks at the step's start: the step log's row before it (vLLM's own count, cached
    blocks included), else the usable blocks less what the requests held."""
    rows = [i for i in range(len(run.steps)) if int(run.steps["step"][i]) < step]
    if rows:
        free = int(run.steps["blocks_free"][rows[-1]])
    elif run.info.num_blocks:
        free = run.info.num_blocks - 1 - sum(e.blocks for e in state.values() if e.event not in _EMPTIED)
    else:
        return {}
    grown: dict[str, RequestEvent] = {}
    for e in run.requests:
        if e.step != step or e.event != "blocks" or e.request_id not in state:
            continue
        before = state[e.request_id]
        if before.event in _EMPTIED or before.event == "held":
            continue
        growth = e.blocks - before.blocks
        if growth > free:
            break  # this request's allocation failed: the preemption came here
        free -= growth
        grown[e.request_id] = e
    return grown


def _tokens_at_start(
    run: EngineRun, last: RequestEvent, step: int, blocks_at: Callable[[int, int], int] | None = None
) -> int | None:
    """KV tokens of a decoding request at the start of `step`, from its next event at or after `step`:
    a "blocks" event logs the tokens after its step (one token a decode step before it), a "preempted"
    event the tokens it dropped (held before its step). Kept only when the figure agrees with the blocks
    it held (`last.blocks`: by `blocks_at`, else whole blocks), and the request was not preempted in
    between."""
    block = run.info.block_size or 0
    for e in run.requests:
        if e.request_id != last.request_id or e.step < step or e.t_ns < last.t_ns:
            continue
        if e.event == "blocks" and e.tokens:
            tokens = e.tokens - (e.step - step) - 1
        elif e.event == "preempted" and e.dropped_tokens:
            tokens = e.dropped_tokens - (e.step - step)
        else:
            return None
        if blocks_at is not None:
            held = blocks_at(last.prompt_tokens, tokens)
        elif block:
            held = blocks_for(tokens, block)
        else:
            return None
        if held == last.blocks and tokens >= last.tokens:
            return tokens
        return None
    return None


def blocks_for(tokens: int, block_size: int) -> int:
    """Whole blocks that `tokens` tokens occupy (vLLM never shares a partial block between requests)."""
    return math.ceil(tokens / block_size) if tokens > 0 else 0
