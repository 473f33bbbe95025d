"""Whether a vLLM pool of some number of blocks avoids every preemption of a recorded run. Pure.

The run's demand (analyzers.planning.vllm_diagnose) is the sum of the largest final demands of the requests
that can run together: an upper bound, exact for equal requests admitted together that share no blocks. A
pool that holds it beside vLLM's null block avoids every preemption whatever the admission order. A pool
short of it is no refusal where the run shared blocks between requests (the bound counts a shared block once
per request), nor where it holds what this run's own schedule asked at most (`recorded_peak`): those are
unknown, "rerun to know". Asked of the fp8 pool and of the pools more GPUs give each worker
(analyzers.planning.vllm_preempt_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NULL_BLOCKS", "PoolDemand"]

NULL_BLOCKS = 1  # vLLM's BlockPool keeps block 0 as the "null block"; requests never get it


@dataclass(frozen=True)
class PoolDemand:
    """What a pool must hold for the run's requests, and how sure that figure is."""

    bound: int  # blocks the requests that can run together need at most (demand_bound_blocks)
    recorded_peak: int  # what they needed together on the recorded schedule, had none been preempted
    shared: bool  # the run shared blocks between requests (or may have): the bound counts them again

    @property
    def needed(self) -> int:
        """The pool's blocks that avoid every preemption: the bound and the null block."""
        return self.bound + NULL_BLOCKS

    def holds(self, blocks: int) -> bool:
        return blocks - NULL_BLOCKS >= self.bound

    def verdict(self, blocks: int, rerun: str) -> tuple[bool | None, str]:
        """(fits, what a pool of `blocks` does, a clause after "which"); `rerun`: the setting to rerun
        with where it cannot be told ("fp8", "tensor_parallel_size=2")."""
        if self.holds(blocks):
            return True, "avoids every preemption."
        worst = f"the {self.needed:,}-block worst case"
        if self.shared:  # the worst case counts shared blocks once per request: unknown, not refused
            return None, (
                f"is still short of {worst}. The run shared blocks between requests (prefix caching): rerun "
                f"with {rerun} to know."
            )
        if blocks - NULL_BLOCKS >= self.recorded_peak:
            # the worst case is an upper bound (the largest requests all running at once): short of it is no
            # refusal where this run's own schedule never asked for more than the pool holds
            # Not "likely": the recorded schedule is the preempting pool's, and a larger pool admits more
            # requests at once (a walkthrough's fp8 pool of 8 blocks, over the 6 recorded, preempted 4 times)
            return None, (
                f"is enough for the {self.recorded_peak:,} blocks this run's requests needed together at "
                f"most on its recorded schedule (had none been preempted) but short of {worst}, an upper "
                "bound: a larger pool admits more requests at once, so it may or may not avoid them; rerun "
                f"with {rerun} to know."
            )
        return False, (
            f"is short of the {self.recorded_peak:,} blocks this run's requests needed together (had none "
            f"been preempted) and of {worst}: it likely still preempts."
        )
