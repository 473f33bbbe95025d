"""Why a vLLM engine ran out of KV memory, priced in vLLM's own knobs. Pure: reads the engine files only.

Two cases: a refused start (analyzers.planning.vllm_refused) and a run that preempted (here).

* **A run that preempted** (`diagnose_preemptions`). vLLM preempts a running request when it cannot allocate
  the next block for a running request. The model used here, stated in the output: a request never holds more
  than `cdiv(prompt + output tokens - 1, block_size)` blocks (its final length: the last sampled token is
  never fed back, so it gets no KV; a request preempted and resumed needs the same), at most `max_num_seqs`
  requests run at once, and the pool keeps one block aside (vLLM's null block). So if the usable blocks cover
  the sum of the largest final demands of as many requests as can run together (`max_num_seqs`, and no more
  than were ever in the engine at once: running + waiting, so requests of successive `generate()` calls are
  not counted together), no allocation can fail, whatever the admission order, and nothing is preempted. A
  request aborted before it was scheduled counts too (a larger pool admits it, and it grows until the abort):
  at its prompt + `max_tokens` - 1 tokens (its `waiting` line's), or, in runs that did not log them, at its
  prompt only, and then no remedy is said to fit. One aborted while it ran counts at that whole ask too, not
  at the length the abort cut it at (with a larger pool it is preempted less and runs further before the same
  abort). One the run never finished (it stopped short: killed, interrupted) counts at that whole ask too,
  the most it may reach, where its line has it (analyzers.planning.unfinished_asks); else at the length it
  had reached, and where any is so analyzers.planning.engine_run_diagnosis says no remedy is known to fit.
  vLLM's parallel sampling (`n > 1`) runs a prompt's samples as requests of one prompt which, under
  prefix caching, share its full blocks (all but a last partial block, and the block of its last token when
  that one ends a block: vLLM recomputes it): where each sample took its whole prompt in one step, as a
  prompt within the step's token budget does, or every sample but the first found them all cached (a
  chunked prompt's, its `cached_tokens`), those blocks count once a prompt (the largest sample holds
  them), and the run's prefix-cache hits are the samples' own. Other prefix sharing (prompts with a common
  prefix) only lowers the real demand: the figure is an upper bound, exact (one block less preempts) for
  equal requests admitted together that share no blocks, and a remedy it finds short is said to be unknown,
  not refused, when the run shared blocks so, or when the demand on the recorded schedule (below) fits it. A
  pool sized by `num_gpu_blocks_override` is grown by that knob. From it: the blocks and bytes of KV memory to
  add, the largest max_num_seqs that avoids every preemption in the present pool, and whether fp8 KV (1 byte
  an element: twice the blocks for bf16 in the same memory) would. Where the run shared blocks so, that
  max_num_seqs is a lower bound (sure to avoid them, a larger one may too: the engine files count blocks per
  request, not which are shared, so the shared ones cannot be counted once), said `[?]`. The demand on the
  recorded schedule (requests in flight per step, each at the length it had reached) is reported beside it.
  Last, as the costliest change, more GPUs (analyzers.planning.vllm_preempt_parallel): the smallest
  tensor_parallel_size and pipeline_parallel_size whose workers hold those blocks in the same KV memory
  each, a block being fewer KV heads' or layers' pages there.

  Against a memory budget (analyzers.planning.engine_budget), a remedy fits only if its pool does too: the
  pool is held at the peak, so the peak moves by what the pool grows or shrinks (peak = other_bytes + pool),
  and a pool over `room_bytes` takes it over the budget. Where the pool that avoids every preemption does
  not fit, the largest pool that does is priced with the max_num_seqs that avoids them in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from analyzers.engine import (
    EngineRun,
    HeldRequest,
    RequestEvent,
    blocks_for,
    engine_figures,
    held_at,
)
from analyzers.engine_stages import pipeline_note, pipeline_size, widest_stage
from analyzers.planning.engine_budget import EngineBudget
from analyzers.planning.unfinished_asks import asked_tokens, in_engine_at_end, unfinished_asks
from analyzers.planning.vllm_plan import kv_dtype_bytes, readable_bytes
from analyzers.planning.vllm_pool_demand import NULL_BLOCKS, PoolDemand
from analyzers.planning.vllm_preempt_parallel import WorkerPool, parallel_remedies
from analyzers.planning.vllm_refused import (
    RefusedDiagnosis,
    VllmRemedy,
    diagnose_refused,
    host_refuses_fp8,
    refused_start,
)
from analyzers.planning.vllm_samples import SharedSamples, parallel_samples, samples_note
from analyzers.planning.vllm_specs import (
    KvGroups,
    engine_kv_groups,
    kv_groups,
    max_concurrent_batches,
    sliding_blocks,
    sliding_blocks_held,
    sliding_peak_blocks,
)
from analyzers.units import a_or_an

__all__ = [
    "NULL_BLOCKS",
    "PreemptionDiagnosis",
    "RefusedDiagnosis",
    "VllmRemedy",
    "asked_demand_blocks",
    "diagnose_engine",
    "diagnose_preemptions",
    "diagnose_refused",
    "lookahead_of",
    "request_kv_tokens",
]

_WRITING = ("scheduled", "blocks", "resumed")  # events logged as a step is scheduled, `tokens` its KV


@dataclass(frozen=True)
class PreemptionDiagnosis:
    path: str
    num_blocks: int
    usable_blocks: int
    block_size: int
    bytes_per_block: int
    kv_cache_bytes: int
    preemptions: int
    preempted_tokens: int
    recomputed_tokens: int
    first_preemption_step: int
    held_at_first: tuple[HeldRequest, ...]
    requests: int
    max_num_seqs: int | None
    final_demand_blocks: dict[str, int]
    demand_bound_blocks: int  # the sum of the max_num_seqs largest final demands
    recorded_peak_demand_blocks: int
    recorded_peak_demand_step: int | None
    blocks_needed: int  # demand bound + the null block
    extra_blocks: int
    kv_cache_memory_bytes_needed: int
    extra_bytes: int
    max_num_seqs_without_preemption: int
    max_num_seqs_lower_bound: bool  # the run shared blocks: a larger max_num_seqs may avoid them too
    fp8_blocks: int | None
    remedies: tuple[VllmRemedy, ...]
    model: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    kind: str = "preemption"
    # requests a run that stopped short left in the engine (analyzers.planning.engine_run_diagnosis): counted
    # at the lengths they had reached, so the demand above is a lower bound where not 0, unless every one is
    # counted at its max_tokens (`asked_requests`)
    unfinished_requests: int = 0
    # requests that never finished, each counted at the most its max_tokens lets it reach (prompt +
    # max_tokens - 1 tokens: analyzers.planning.unfinished_asks) rather than the length it had reached; 0
    # where none was left or one's max_tokens is unknown
    asked_requests: int = 0
    # of `held_at_first`'s blocks, those listed again: a prompt's blocks, held once, in each of its samples
    # (vLLM's parallel sampling under prefix caching); the pool held their sum less these
    held_listed_again_blocks: int = 0
    # what a pool must hold for the requests, and how sure that is (`PoolDemand`: the bound, the recorded
    # schedule's demand, blocks shared between requests), for a pool priced elsewhere (engine_budget)
    pool_demand: PoolDemand | None = None


def request_kv_tokens(e: RequestEvent, lookahead: int = 0, max_model_len: int | None = None) -> int:
    """KV tokens a request needs at this event. A finished request's last sampled token was never fed
    back, so it never got KV: prompt + output - 1. Before that, every sampled token is computed in the
    next step, and the event's blocks are allocated for prompt + output; under async scheduling (vLLM's
    default on GPUs) for one more, the token of the batch in flight, not sampled yet but given its slot:
    the event's `tokens` (vLLM's computed tokens, this step's included) count it. A drafter that writes
    KV (a draft model, an EAGLE head) gets `lookahead` slots past those (engine.json's
    `num_lookahead_tokens`), up to max_model_len: vLLM's `allocate_slots`. A prompt longer than the step's
    token budget (chunked prefill), or a resumed request's recompute, is written over several steps: until
    its last chunk the event's blocks hold only the tokens computed so far, its `tokens`."""
    if e.event == "finished" and e.output_tokens > 0:
        return e.prompt_tokens + e.output_tokens - 1
    tokens = max(e.prompt_tokens + e.output_tokens, e.tokens)
    if e.event in _WRITING and 0 < e.tokens < e.prompt_tokens + e.output_tokens:
        tokens = e.tokens
    if lookahead > 0:
        return max(tokens, min(tokens + lookahead, max_model_len or tokens + lookahead))
    return tokens


def lookahead_of(config: dict[str, Any]) -> tuple[int, int | None]:
    """(the drafter's lookahead slots, max_model_len) from engine.json's config, for `request_kv_tokens`."""
    lookahead = config.get("num_lookahead_tokens")
    max_len = config.get("max_model_len")
    return (
        lookahead if isinstance(lookahead, int) and lookahead > 0 else 0,
        max_len if isinstance(max_len, int) and max_len > 0 else None,
    )


@dataclass(frozen=True)
class _RequestBlocks:
    """How many pool blocks a request holds at a length: full attention keeps every token's block, a
    sliding group (analyzers.planning.vllm_specs) frees those before its window."""

    block: int
    groups: KvGroups
    # slots a step holds past the tokens computed before it (the batch in flight under async scheduling, the
    # drafts, the lookahead): a sliding layer frees the blocks before the window of those computed only
    lag: int
    admission: int  # vLLM's cap on a sliding group's blocks a request, its window and a batch in flight

    def final(self, prompt: int, tokens: int) -> int:
        """The most blocks a request of `prompt` tokens grown to `tokens` KV tokens held, never preempted."""
        blocks = self.groups.full_groups * blocks_for(tokens, self.block)
        if self.groups.sliding_groups:
            assert self.groups.window is not None
            blocks += self.groups.sliding_groups * sliding_peak_blocks(
                prompt, tokens, self.groups.window, self.block, self.lag, self.admission
            )
        return blocks

    def at(self, prompt: int, tokens: int) -> int:
        """Blocks held at `tokens` KV tokens (the prompt's prefill bounded by the admission cap)."""
        blocks = self.groups.full_groups * blocks_for(tokens, self.block)
        if self.groups.sliding_groups:
            assert self.groups.window is not None
            held = (
                min(blocks_for(tokens, self.block), self.admission)
                if tokens <= prompt
                else sliding_blocks_held(tokens, self.groups.window, self.block, self.lag)
            )
            blocks += self.groups.sliding_groups * held
        return blocks


def _request_blocks(run: EngineRun, block: int) -> _RequestBlocks:
    """The run's per-request block arithmetic, from the groups its engine.json records."""
    groups, in_flight = engine_kv_groups(run.info.model, run.info.config)
    if groups.kind == "full" or not groups.layers_per_group:
        return _RequestBlocks(block, kv_groups(1, 0, None), 0, 0)
    max_len = int(run.info.config.get("max_model_len") or 0) or 2**62
    config = run.info.config
    drafts, lookahead = (
        extra if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0 else 0
        for extra in (config.get("num_speculative_tokens"), config.get("num_lookahead_tokens"))
    )
    # vLLM frees a sliding group's blocks before the window of the tokens computed BEFORE a step less those
    # in flight (`allocate_slots`), then gives the step's slots: its token, up to num_speculative_tokens
    # drafts and a drafter's lookahead. Those slots sit past the window too (an EAGLE head on a hybrid Llama:
    # 4 blocks a sliding group, not 3), and under async scheduling so does the batch in flight, a token and
    # its drafts a request
    in_flight_batches = max_concurrent_batches(bool(config.get("async_scheduling"))) - 1
    lag = in_flight_batches * (1 + drafts) + drafts + lookahead
    assert groups.window is not None
    return _RequestBlocks(block, groups, lag, sliding_blocks(groups.window, block, in_flight, max_len))


def _final_demand(
    run: EngineRun, sizes: _RequestBlocks, asks: dict[str, RequestEvent] | None = None
) -> tuple[dict[str, int], tuple[str, ...]]:
    """Blocks each request needs at its final length: prompt + output - 1 tokens (at least what it held);
    one aborted while it ran, at its whole ask (prompt + max_tokens - 1, its `waiting` line's) where the log
    has it, not the length the abort cut it at. A request never scheduled (its `waiting` line, or a
    `finished` one before any other: aborted while it waited) held nothing here, but a larger pool admits it
    (`_unscheduled_tokens`). One that never finished (the run stopped first) at its whole ask too where
    `asks` (analyzers.planning.unfinished_asks) gives every such request's `waiting` line: the most it may
    grow to. Also returns the ids of those that ended unscheduled whose length the log cannot tell (counted
    at their prompts only).
    A sliding run's logged blocks include a resumed request's prefill chunks (more than it holds at its final
    length), and in runs recorded before kvtrace left them out, vLLM's null blocks standing in for the freed
    ones: there the window's arithmetic alone says what it needs."""
    demand: dict[str, int] = {}
    waited: dict[str, RequestEvent] = {}  # never scheduled (yet): its waiting line, else its finished one
    ended: set[str] = set()
    full = not sizes.groups.sliding_groups
    max_len = int(run.info.config.get("max_model_len") or 0) or None
    slots = lookahead_of(run.info.config)
    for e in run.requests:
        if e.event == "waiting" or (e.event == "finished" and e.request_id not in demand):
            if e.event == "finished":
                ended.add(e.request_id)
            waited.setdefault(e.request_id, e)
            continue
        # a chunk's event holds part of its prompt: the prompt is needed whole
        need = sizes.final(e.prompt_tokens, max(e.prompt_tokens, request_kv_tokens(e, *slots)))
        if full:
            need = max(need, e.blocks, e.dropped_blocks)
        if e.event == "finished" and e.finish_reason == "abort" and e.request_id in waited:
            # aborted while it ran: the length it had reached was cut short by the pressure (preempted,
            # recomputed, slowed) as much as by the abort; with a larger pool it runs further before the
            # same abort, up to its whole ask, as one aborted in the queue is counted
            ask = _unscheduled_tokens(waited[e.request_id], max_len, True)
            need = max(need, sizes.final(e.prompt_tokens, ask))
        demand[e.request_id] = max(demand.get(e.request_id, 0), need)
    unbounded: list[str] = []
    for request_id, e in waited.items():
        if request_id in demand:
            continue
        tokens = _unscheduled_tokens(e, max_len, request_id in ended)
        if request_id in ended and e.max_tokens is None:
            unbounded.append(request_id)
        demand[request_id] = sizes.final(e.prompt_tokens, tokens)
    for request_id, e in (asks or {}).items():
        ask = sizes.final(e.prompt_tokens, asked_tokens(e, run.info.config))
        demand[request_id] = max(demand.get(request_id, 0), ask)
    return demand, tuple(unbounded)


def _running_at_most(run: EngineRun, requests: int) -> int:
    """How many of the `requests` can run together: max_num_seqs, and never more than were in the engine at
    once (running + waiting: requests of successive generate() calls are not counted together)."""
    max_seqs = run.info.config.get("max_num_seqs")
    running_at_most = min(int(max_seqs), requests) if max_seqs else requests
    if len(run.steps):
        in_engine = int((run.steps["running"] + run.steps["waiting"]).max())
        if in_engine > 0:
            running_at_most = min(running_at_most, in_engine)
    return running_at_most


def asked_demand_blocks(run: EngineRun) -> int | None:
    """The most blocks a run's requests may need at once (the worst case `diagnose_preemptions` bounds a
    pool by, the null block left out) where it stopped short before any preemption: each request left
    unfinished counted at its max_tokens (analyzers.planning.unfinished_asks), the others at their final
    lengths. An upper bound: a pool of as many usable blocks holds them whatever the admission order. None
    where one unfinished request's max_tokens is unknown, or one aborted unscheduled has none: then its
    final length is not known from the run."""
    asks = unfinished_asks(run)
    if len(asks) < in_engine_at_end(run):
        return None
    block = int(run.info.block_size or run.info.config.get("block_size") or 16)
    sizes = _request_blocks(run, block)
    demand, unbounded = _final_demand(run, sizes, asks)
    if unbounded or not demand:
        return None
    demands = parallel_samples(run, block, bool(sizes.groups.sliding_groups)).once_per_prompt(demand)
    return sum(sorted(demands, reverse=True)[: _running_at_most(run, len(demand))])


def _unscheduled_tokens(waiting: RequestEvent, max_len: int | None, ended: bool) -> int:
    """KV tokens a request never scheduled would reach once admitted. Aborted while it waited, in a rerun
    with a larger pool it is admitted and grows until the same abort: at most its `max_tokens` (its
    `waiting` line's) less the last token, which gets no KV, and no further than max_model_len. Without
    `max_tokens` (runs recorded before kvtrace logged it), and for one still waiting when the run stopped
    short (whose requests are all counted at the lengths they had reached), its prompt: what it holds at
    least once admitted."""
    if not ended or waiting.max_tokens is None or waiting.max_tokens < 1:
        return waiting.prompt_tokens
    reach = waiting.prompt_tokens + waiting.max_tokens
    if max_len is not None:
        reach = min(reach, max_len)
    return max(reach - 1, waiting.prompt_tokens)


def _recorded_demand(run: EngineRun, sizes: _RequestBlocks, samples: SharedSamples) -> tuple[int, int | None]:
    """Peak over steps of what the requests in flight (admitted, not finished) would have held had none
    been preempted, each at the length it had reached (blocks for its KV tokens so far), a prompt's blocks
    shared by its samples counted once."""
    tokens: dict[str, tuple[int, int]] = {}  # request id -> (KV tokens so far, prompt tokens)
    peak, peak_step = 0, None
    slots = lookahead_of(run.info.config)
    by_step: dict[int, list[Any]] = {}
    for e in run.requests:
        by_step.setdefault(e.step, []).append(e)
    for step in sorted(by_step):
        for e in by_step[step]:
            if e.event == "waiting" or (e.event == "finished" and e.request_id not in tokens):
                continue  # in the queue, or aborted before it was scheduled: it held nothing
            reached = max(tokens.get(e.request_id, (0, 0))[0], request_kv_tokens(e, *slots))
            tokens[e.request_id] = (reached, e.prompt_tokens)
        # a request finishing in this step still held its blocks while the step ran
        total = sum(sizes.at(prompt, reached) for reached, prompt in tokens.values())
        total -= samples.listed_again(list(tokens))
        if total > peak:
            peak, peak_step = total, step
        for e in by_step[step]:
            if e.event == "finished":
                tokens.pop(e.request_id, None)
    return peak, peak_step


def _asks_note(asks: dict[str, RequestEvent], left: int) -> str:
    """Said where requests that never finished are counted at their max_tokens, not the lengths reached;
    where only some of the `left` unfinished ones say it, the others keep the lengths reached and the demand
    stays a lower bound."""
    asked = sorted({e.max_tokens or 0 for e in asks.values()})
    each = f"max_tokens={asked[0]:,}" if len(asked) == 1 else f"max_tokens {asked[0]:,} to {asked[-1]:,}"
    most = (
        "(prompt + max_tokens - 1 KV tokens, the most it may reach: it may stop earlier at an EOS or a stop "
        "string), not at the length it had reached"
    )
    if len(asks) >= left:
        return (
            f"{len(asks)} request(s) had not finished when the run stopped: each is counted at its {each} "
            f"{most}, so the demand is an upper bound"
        )
    return (
        f"{left} request(s) had not finished when the run stopped: {len(asks)} of them are counted at their "
        f"{each} {most}; the other {left - len(asks)} have no max_tokens logged (recorded before kvtrace "
        "logged it, or with no line of their own) and are counted at the lengths they had reached, so the "
        "demand is still a lower bound"
    )


def _unbounded_caveat(remedies: list[VllmRemedy], count: int) -> list[VllmRemedy]:
    """`remedies`, each that avoids every preemption said unknown: `count` requests aborted before they were
    scheduled are counted at their prompts only (their log does not say how long they would grow), and a
    larger pool admits them. A remedy found short stays short: more demand cannot make it fit."""
    caveat = (
        f" {count} request(s) aborted before they were scheduled are counted at their prompts only (the log "
        "has no max_tokens for them: recorded before kvtrace logged it), and a larger pool admits them: "
        "whether it avoids every preemption cannot be told; rerun to know."
    )
    return [replace(r, fits=None, sentence=r.sentence + caveat) if r.fits else r for r in remedies]


def _need_text(sizes: _RequestBlocks) -> str:
    """The model's per-request figure, in words: a sliding group holds its window, not every token."""
    full = f"cdiv(prompt + output tokens - 1, {sizes.block}) blocks (its last sampled token gets no KV)"
    groups = sizes.groups
    if not groups.sliding_groups:
        return full
    window = (
        f"the blocks of its last {groups.window:,} tokens, +1 where the window starts inside a block "
        f"(at most {sizes.admission} a prefill; vLLM frees the blocks before the window)"
    )
    if groups.kind == "sliding":
        return f"{window}, every layer sliding"
    return f"{groups.full_groups} x {full} and {groups.sliding_groups} x {window}"


def _drafts_text(config: dict[str, Any]) -> str:
    """Speculative decoding: a request's scheduled drafts (and a drafter's lookahead) take KV slots past the
    tokens it keeps, so its blocks can be one more than its length's; the demand takes the blocks logged."""
    method = config.get("speculative_method")
    if not method:
        return ""
    drafts = int(config.get("num_speculative_tokens") or 0)
    lookahead = int(config.get("num_lookahead_tokens") or 0)
    ahead = f", and the drafter {lookahead:,} lookahead slots besides" if lookahead else ""
    return (
        f", or the blocks it was logged holding where more: speculative decoding ({method}) gives up to "
        f"{drafts:,} draft tokens a step their slots before they are accepted{ahead}"
    )


def _per_worker(info: Any) -> str:
    """Said of a kv_cache_memory_bytes remedy where the engine has several workers: vLLM gives the setting
    to each, whose blocks hold the layers and KV heads that worker holds."""
    tp = info.config.get("tensor_parallel_size")
    tp = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1 else 1
    pp = pipeline_size(info)
    if tp * pp == 1:
        return ""
    stages = (
        f" ({pp} pipeline stages of {tp})" if tp > 1 and pp > 1 else f" ({pp} pipeline stages)" * (pp > 1)
    )
    widest = widest_stage(info)
    if widest is not None:
        block = readable_bytes(widest[1])
        priced = f"stage {widest[0]}'s worker's {block} blocks (a page of each of its layers: the most)"
    else:
        priced = f"the first worker's {readable_bytes(int(info.bytes_per_block or 0))} blocks"
    return (
        f" kv_cache_memory_bytes is per worker: each of the {tp * pp} workers{stages} is given it, the "
        f"figure priced by {priced}."
    )


def _largest_seqs(demands: list[int], usable: int) -> int:
    """Largest m such that the m largest demands fit together in `usable` blocks."""
    total, count = 0, 0
    for need in sorted(demands, reverse=True):
        if total + need > usable:
            break
        total += need
        count += 1
    return count


def _largest_fit(seqs: int) -> str:
    """What `seqs` largest requests do in the pool, worded for one request or several."""
    return "the largest request fits" if seqs == 1 else f"the {seqs} largest requests fit together"


def _shared_caveat(remedy: VllmRemedy, lower_bound: bool) -> VllmRemedy:
    """`remedy` (a max_num_seqs that avoids every preemption), said unknown where it is only a lower bound:
    its demand counts a shared block once per request, so a larger setting may avoid them too."""
    if not lower_bound or not remedy.fits:
        return remedy
    return replace(
        remedy,
        fits=None,
        sentence=(
            f"{remedy.sentence} The run shared blocks between requests (prefix caching), counted here once "
            "per request: a larger max_num_seqs may avoid every preemption too; rerun with one to know."
        ),
    )


def _against_budget(
    remedy: VllmRemedy, pool_bytes: int, budget: EngineBudget | None, split: bool = False
) -> VllmRemedy:
    """`remedy`, marked not to fit where the pool it leaves (`pool_bytes`) takes the peak over the budget;
    `split` (more GPUs, each given that pool): unknown there, as the weights it moves off each GPU lower
    the rest of the peak by what this run cannot price."""
    if budget is None or pool_bytes <= budget.room_bytes:
        return remedy
    peak = budget.other_bytes + pool_bytes
    if split:
        if not remedy.fits:
            return remedy
        return replace(
            remedy,
            fits=None,
            sentence=(
                f"{remedy.sentence} With {a_or_an(readable_bytes(pool_bytes))} pool this GPU peaked at "
                f"{readable_bytes(peak)}, over the {readable_bytes(budget.budget_bytes)} budget: whether the "
                "weights the split moves off it bring it under cannot be told from this run; rerun to know."
            ),
        )
    room = (
        f"a pool of at most {readable_bytes(budget.room_bytes)} fits it"
        if budget.room_bytes > 0
        else "no pool fits it"
    )
    return replace(
        remedy,
        fits=False,
        sentence=(
            f"{remedy.sentence.removesuffix('.')}; but with {a_or_an(readable_bytes(pool_bytes))} pool the "
            "peak is "
            f"{readable_bytes(peak)}, {readable_bytes(peak - budget.budget_bytes)} over the "
            f"{readable_bytes(budget.budget_bytes)} budget ({room})."
        ),
    )


def _pool_within_budget(
    budget: EngineBudget,
    demand: list[int],
    num_blocks: int,
    bytes_per_block: int,
    override: Any,
    shared: bool,
    running_at_most: int,
) -> VllmRemedy | None:
    """The largest pool that fits the budget, with the max_num_seqs that avoids every preemption in it: what
    does both where the pool that avoids them all does not fit. None where that pool is the present one
    (the max_num_seqs remedy prices it). `shared`: the run shared blocks, so that max_num_seqs is a lower
    bound below `running_at_most`."""
    blocks = budget.room_bytes // bytes_per_block if bytes_per_block and budget.room_bytes > 0 else 0
    if blocks == num_blocks:
        return None
    knob = "num_gpu_blocks_override" if override else "kv_cache_memory_bytes"
    pool = blocks * bytes_per_block
    size = f"{knob}={blocks if override else pool} ({readable_bytes(pool)}: {blocks:,} blocks)"
    within = f"the most that fit the {readable_bytes(budget.budget_bytes)} budget"
    if blocks <= NULL_BLOCKS:
        left = (
            f"the {readable_bytes(budget.other_bytes)} besides the pool exceed it on their own"
            if budget.room_bytes <= 0
            else f"the {readable_bytes(budget.room_bytes)} it leaves the pool hold no usable block"
        )
        return VllmRemedy(
            f"{knob}+max_num_seqs",
            None,
            False,
            f"No {knob} within the {readable_bytes(budget.budget_bytes)} budget avoids every preemption: "
            f"{left}.",
        )
    seqs = _largest_seqs(demand, blocks - NULL_BLOCKS)
    if seqs < 1:
        return VllmRemedy(
            f"{knob}+max_num_seqs",
            None,
            False,
            f"{size}, {within}, cannot hold the largest request's {max(demand, default=0):,} blocks: no "
            "setting within the budget avoids every preemption.",
        )
    largest = _largest_fit(seqs)
    return _shared_caveat(
        VllmRemedy(
            f"{knob}+max_num_seqs",
            {knob: blocks if override else pool, "max_num_seqs": seqs},
            True,
            f"{size}, {within} (peak {readable_bytes(budget.other_bytes + pool)}), with max_num_seqs={seqs}: "
            f"{largest} in its {blocks - NULL_BLOCKS:,} usable blocks, so none is preempted (the others wait "
            "instead).",
        ),
        shared and seqs < running_at_most,
    )


def diagnose_preemptions(run: EngineRun, budget: EngineBudget | None = None) -> PreemptionDiagnosis:
    """The run's preemptions and the settings that avoid them; with `budget` (the run's memory budget, priced
    by analyzers.planning.engine_budget), each setting also said to fit it or not (the module docstring)."""
    info = run.info
    figures = engine_figures(run)
    if figures.first_preemption_step is None:
        raise ValueError("the run has no preemption")
    block = int(info.block_size or info.config.get("block_size") or 16)
    num_blocks = int(info.num_blocks or 0)
    bytes_per_block = int(info.bytes_per_block or 0)
    kv_bytes = int(info.kv_cache_bytes or num_blocks * bytes_per_block)
    usable = num_blocks - NULL_BLOCKS
    sizes = _request_blocks(run, block)
    asks = unfinished_asks(run)
    demand, unbounded = _final_demand(run, sizes, asks)
    max_seqs = info.config.get("max_num_seqs")
    running_at_most = _running_at_most(run, len(demand))
    samples = parallel_samples(run, block, bool(sizes.groups.sliding_groups))
    demands = samples.once_per_prompt(demand)
    hit_tokens = int(run.steps["prefix_hits"].sum()) if len(run.steps) else 0
    # prefix-cache hits beyond what the samples of a prompt share: prompts with a common prefix
    shared_tokens = max(0, hit_tokens - samples.shared_tokens(block))
    # hits unknown (a step logged them null: vLLM's stats off where kvtrace could not count them): the run
    # may have shared blocks, so the remedies that a share would make unknown are said so
    shared = bool(shared_tokens) or not run.steps.prefix_known
    bound = sum(sorted(demands, reverse=True)[:running_at_most])
    recorded_peak, recorded_step = _recorded_demand(run, sizes, samples)
    needed_blocks = bound + NULL_BLOCKS
    needed_bytes = needed_blocks * bytes_per_block
    # kv_cache_memory_bytes is each worker's: under pipeline parallelism the widest stage's blocks price it
    widest = widest_stage(info)
    worker_bytes, worker_kv = (
        (needed_blocks * widest[1], widest[2]) if widest is not None else (needed_bytes, kv_bytes)
    )
    seqs = _largest_seqs(demands, usable)
    seqs_lower_bound = shared and 1 <= seqs < running_at_most
    element = kv_dtype_bytes(str(info.config.get("kv_cache_dtype") or "auto"), info.kv_dtype or "bfloat16")
    fp8_blocks = num_blocks * element if element > 1 else None
    override = info.config.get("num_gpu_blocks_override")
    grow = (
        VllmRemedy(
            "num_gpu_blocks_override",
            needed_blocks,
            True,
            f"num_gpu_blocks_override={needed_blocks} (now {override}: "
            f"{needed_blocks - num_blocks:+,} blocks, {readable_bytes(needed_bytes)} of KV) avoids every "
            "preemption of this run.",
        )
        if override
        else VllmRemedy(
            "kv_cache_memory_bytes",
            worker_bytes,
            True,
            f"kv_cache_memory_bytes={worker_bytes} ({readable_bytes(worker_bytes)}: "
            f"{needed_blocks:,} blocks, {max(needed_blocks - num_blocks, 0):,} more, "
            f"+{readable_bytes(max(worker_bytes - worker_kv, 0))}) avoids every preemption of this run."
            f"{_per_worker(info)}",
        )
    )
    remedies = [_against_budget(grow, worker_bytes if not override else needed_bytes, budget)]
    if budget is not None and not remedies[0].fits:
        within = _pool_within_budget(
            budget,
            demands,
            num_blocks,
            bytes_per_block,
            override,
            shared,
            running_at_most,
        )
        remedies += [within] if within is not None else []
    if seqs >= 1:
        now = f" (now {max_seqs})" if max_seqs else ""
        remedies.append(
            _shared_caveat(
                _against_budget(
                    VllmRemedy(
                        "max_num_seqs",
                        seqs,
                        True,
                        f"max_num_seqs={seqs}{now}: {_largest_fit(seqs)} in the "
                        f"{usable:,} usable blocks, so none is preempted (the others wait instead).",
                    ),
                    kv_bytes,
                    budget,
                ),
                seqs_lower_bound,
            )
        )
    else:
        remedies.append(
            VllmRemedy("max_num_seqs", None, False, "max_num_seqs: even one request does not fit the pool.")
        )
    demand_of_pool = PoolDemand(bound, recorded_peak, shared)
    if fp8_blocks is not None and not override:  # an override fixes the block count, whatever the dtype
        fits8, verdict = demand_of_pool.verdict(fp8_blocks, "fp8")
        fp8 = VllmRemedy(
            "kv_cache_dtype",
            "fp8",
            fits8,
            f"kv_cache_dtype='fp8' halves the bytes per block ({element} → 1 byte an element): the "
            f"same {readable_bytes(kv_bytes)} holds {fp8_blocks:,} blocks, which {verdict}",
        )
        remedies.append(host_refuses_fp8(_against_budget(fp8, kv_bytes, budget), info.config))
    # more GPUs last: the costliest change; each worker given the KV memory this run's worker had
    configured = info.config.get("kv_cache_memory_bytes")
    memory = worker_kv
    if isinstance(configured, int) and not isinstance(configured, bool) and configured > 0:
        memory = configured
    per_worker = WorkerPool(memory, widest[1] if widest is not None else bytes_per_block, block)
    remedies += [
        _against_budget(r, memory, budget, split=True)
        for r in parallel_remedies(run, sizes.groups, demand_of_pool, per_worker)
    ]
    sampled = (
        "; a prompt's blocks shared by its samples (parallel sampling, prefix caching) counted once"
        if samples.parent_of
        else ""
    )
    model = (
        f"each request needs at most {_need_text(sizes)}{_drafts_text(info.config)}; at most "
        f"{running_at_most} run together (max_num_seqs {max_seqs}, {len(demand)} requests){sampled}; "
        f"{NULL_BLOCKS} block is vLLM's null block"
    )
    notes: list[str] = []
    staged = pipeline_note(info, kv_bytes)
    if (
        staged is not None
    ):  # the pool's bytes are one stage's; its blocks, and so the remedies', every stage's
        notes.append(f"{staged}: the bytes above and in the remedies are that worker's")
    if samples.parent_of:
        notes.append(samples_note(samples, block, len(demand)))
    if not run.steps.prefix_known:
        notes.append(
            "the run's prefix-cache hits are unknown (vLLM's stats were off, and kvtrace could not count "
            "them: a KV connector, a streaming session): whether requests shared blocks is unknown, so a "
            "remedy a share would change is said [?]"
        )
    elif shared_tokens:
        notes.append(
            f"requests shared {shared_tokens:,} prefix-cached tokens ({shared_tokens // block:,} blocks): "
            "the per-request blocks count a shared block once per request, so they can add up past the pool"
        )
    if asks:
        notes.append(_asks_note(asks, in_engine_at_end(run)))
    if unbounded:
        remedies = _unbounded_caveat(remedies, len(unbounded))
    if recorded_peak and recorded_peak < bound:
        notes.append(
            f"on the recorded schedule the demand peaked at {recorded_peak:,} blocks; a larger pool admits "
            f"more requests at once, so the suggestion covers the worst case of {bound:,}"
        )
    held_first = tuple(held_at(run, figures.first_preemption_step, sizes.at))
    return PreemptionDiagnosis(
        pool_demand=demand_of_pool,
        path=run.path,
        num_blocks=num_blocks,
        usable_blocks=usable,
        block_size=block,
        bytes_per_block=bytes_per_block,
        kv_cache_bytes=kv_bytes,
        preemptions=figures.preemptions,
        preempted_tokens=figures.preempted_tokens,
        recomputed_tokens=figures.recomputed_tokens,
        first_preemption_step=figures.first_preemption_step,
        held_at_first=held_first,
        held_listed_again_blocks=samples.listed_again([h.request_id for h in held_first]),
        requests=len(demand),
        max_num_seqs=int(max_seqs) if max_seqs else None,
        final_demand_blocks=demand,
        demand_bound_blocks=bound,
        recorded_peak_demand_blocks=recorded_peak,
        recorded_peak_demand_step=recorded_step,
        blocks_needed=needed_blocks,
        extra_blocks=max(needed_blocks - num_blocks, 0),
        kv_cache_memory_bytes_needed=needed_bytes,
        extra_bytes=max(needed_bytes - kv_bytes, 0),
        max_num_seqs_without_preemption=seqs,
        max_num_seqs_lower_bound=seqs_lower_bound,
        fp8_blocks=fp8_blocks,
        remedies=tuple(remedies),
        model=model,
        notes=tuple(notes),
        asked_requests=len(asks or {}),
    )


def diagnose_engine(
    run: EngineRun, budget: EngineBudget | None = None
) -> RefusedDiagnosis | PreemptionDiagnosis | None:
    """The engine's own diagnosis, or None when there is nothing engine-specific to explain (the pool
    never preempted and the start was not refused). `budget`: the run's memory budget, which the remedies
    of a run that preempted must fit too."""
    if refused_start(run):
        return diagnose_refused(run)
    if engine_figures(run).first_preemption_step is not None:
        return diagnose_preemptions(run, budget)
    return None
