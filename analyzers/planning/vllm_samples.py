"""vLLM's parallel sampling (`SamplingParams(n > 1)`) in a preemption diagnosis: a prompt's samples are
requests of their own in the engine's log, which under prefix caching share the prompt's full blocks, so the
demand counts those blocks once a prompt, not once a sample (analyzers.planning.vllm_diagnose)."""

from __future__ import annotations

from dataclasses import dataclass

from analyzers.engine import EngineRun, RequestEvent, sampled_prompts

__all__ = ["SharedSamples", "parallel_samples", "samples_note"]


@dataclass(frozen=True)
class SharedSamples:
    """vLLM's parallel sampling under prefix caching: which requests are samples of one prompt, and the
    blocks of that prompt they share (its full blocks less the last token's: a sample's prefix-cache hit
    stops one token short of its prompt, vLLM's `max_cache_hit_length`)."""

    parent_of: dict[str, str]  # sample's request id -> its parent's
    shared_blocks: dict[str, int]  # parent id -> blocks its samples share

    def samples_of(self) -> dict[str, int]:
        """Parent id -> how many samples it had."""
        counts: dict[str, int] = {}
        for parent in self.parent_of.values():
            counts[parent] = counts.get(parent, 0) + 1
        return counts

    def shared_tokens(self, block: int) -> int:
        """Prefix-cache hits the samples make when admitted: every sample but the first finds them."""
        return sum((n - 1) * self.shared_blocks[p] * block for p, n in self.samples_of().items())

    def listed_again(self, request_ids: list[str]) -> int:
        """Blocks that a list of these requests, each with its own blocks, counts more than once: a prompt's
        shared blocks in each of its samples but one."""
        listed: dict[str, int] = {}
        for request_id in request_ids:
            parent = self.parent_of.get(request_id)
            if parent is not None:
                listed[parent] = listed.get(parent, 0) + 1
        return sum((n - 1) * self.shared_blocks[parent] for parent, n in listed.items())

    def once_per_prompt(self, demand: dict[str, int]) -> list[int]:
        """Each request's demand with its prompt's shared blocks counted once: the largest sample of each
        prompt holds them, the others their own blocks only. The m largest of these are the most m requests
        can hold together (a set without a prompt's largest sample counts its shared blocks on another)."""
        lead: dict[str, str] = {}
        for request_id, parent in self.parent_of.items():
            if request_id in demand and (parent not in lead or demand[request_id] > demand[lead[parent]]):
                lead[parent] = request_id
        return [
            need - self.shared_blocks[self.parent_of[rid]]
            if rid in self.parent_of and lead[self.parent_of[rid]] != rid
            else need
            for rid, need in demand.items()
        ]


def parallel_samples(run: EngineRun, block: int, sliding: bool) -> SharedSamples:
    """The run's parallel samples whose prompt blocks were shared: prefix caching on, full attention only
    (a sliding group frees a prompt's blocks as each sample's window moves), and either each sample given
    its whole prompt the step it was admitted, or, a prompt split by the step's token budget (chunked
    prefill), every sample but the first admitted found all those blocks in the prefix cache (its
    `cached_tokens`): one admitted between the first's chunks finds only the blocks written so far and
    computes the later ones again, its own. Runs recorded before kvtrace logged the hits count a chunked
    prompt's blocks once per sample, an upper bound. `sliding`: the model has sliding layers."""
    if not run.info.config.get("enable_prefix_caching") or sliding:
        return SharedSamples({}, {})
    first: dict[str, RequestEvent] = {}
    for e in run.requests:
        if e.event in ("scheduled", "resumed"):
            first.setdefault(e.request_id, e)
    order = {request_id: i for i, request_id in enumerate(first)}  # admission order
    parent_of: dict[str, str] = {}
    shared: dict[str, int] = {}
    for parent, children in sampled_prompts(run.requests).items():
        admitted = sorted((first[c] for c in children if c in first), key=lambda e: order[e.request_id])
        if not admitted:
            continue
        blocks = (admitted[0].prompt_tokens - 1) // block
        if blocks <= 0:
            continue
        chunked = any(e.tokens < e.prompt_tokens for e in admitted)
        if chunked and not all(
            e.event == "scheduled" and e.cached_tokens is not None and e.cached_tokens >= blocks * block
            for e in admitted[1:]
        ):
            continue
        shared[parent] = blocks
        parent_of.update(dict.fromkeys(children, parent))
    return SharedSamples(parent_of, shared)


def samples_note(samples: SharedSamples, block: int, requests: int) -> str:
    """What parallel sampling did to the count: the caller's prompts, and the blocks their samples shared."""
    children = samples.samples_of()
    prompts = len(children)
    n = "/".join(str(count) for count in sorted(set(children.values())))
    shared = sum(samples.shared_blocks.values())
    some = "the" if len(samples.parent_of) == requests else f"{len(samples.parent_of)} of the"
    plural = "s" if prompts != 1 else ""
    return (
        f"{some} {requests} requests are {prompts} prompt{plural} sampled n={n} (vLLM's parallel sampling "
        "runs each sample as a request): through prefix caching a prompt's samples share its full blocks "
        f"({shared:,} over the {prompts} prompt{plural}, {shared * block:,} tokens), counted once a prompt "
        "in the demand, where the blocks listed per request count them in each sample"
    )
