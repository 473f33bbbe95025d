"""What one step of transformers' continuous batching says in engine_steps.jsonl: the pool it held (as full as
the scheduler found it when it offloaded a request for the step) and its phase (a prefill exactly when it
writes some request's prompt positions, a chunked prompt's last chunk of 1 token included).

A real `generate_batch` on a tiny random Llama 3 (2 layers, 2 KV heads, head_dim 16, float32) with blocks of
4 tokens. Expected figures come from the arithmetic of prompts, blocks and the token budget, and from
transformers' own block tables read as its offloading manager is called (spied on, not through kvtrace)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import offloading_manager

import kvtrace
from kvtrace.cli import main
from tests.cb_versions import SECTOR_POOL

pytestmark = SECTOR_POOL

LAYERS, KV_HEADS, PAGE = 2, 2, 4


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _generate(
    run: Path, model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, **batching: int
) -> None:
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    config = ContinuousBatchingConfig(page_size=PAGE, **batching)
    with kvtrace.record(run, model=model, profiler=False):
        model.generate_batch(prompts, generation_config=generation, continuous_batching_config=config)


def test_a_step_that_offloads_holds_the_pool_the_scheduler_offloaded_for(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN two 6-token prompts generating 10 tokens each in 7 usable blocks of 4 tokens: both hold 3 blocks
    # and need a 4th at the same step (position 12), one block is free: the first gets it (7 of 7 held), the
    # second starves and the scheduler offloads it (its 3 blocks free again before the step's forward)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    usable = 7
    assert sum(math.ceil((len(p) + 10 - 1) / PAGE) for p in prompts) > usable
    # AND the blocks transformers' block tables hold each time its offloading manager is called, with the
    # requests that call took out of the active ones
    offloads: list[tuple[int, set[str]]] = []
    offload = offloading_manager.OffloadingManager.offload_requests

    def spied(manager: Any) -> bool:
        tables = [t for a in manager.cache.cache_allocators.values() for t in a.block_table.values()]
        held = sum(len(t) for t in tables)  # one attention type: whole-model blocks
        active = set(manager.scheduler.active_requests)
        result = offload(manager)
        offloads.append((held, active - set(manager.scheduler.active_requests)))
        return bool(result)

    monkeypatch.setattr(offloading_manager.OffloadingManager, "offload_requests", spied)
    run = tmp_path / "run"

    # WHEN it is recorded
    _generate(run, cb_model, prompts, 10, num_blocks=usable, max_batch_tokens=64)

    # THEN the one offload that took a request out found every usable block held
    taken = [(held, ids) for held, ids in offloads if ids]
    assert [held for held, _ in taken] == [usable]
    steps = _lines(run / "engine_steps.jsonl")
    assert usable == steps[0]["blocks_total"] - steps[0]["blocks_reserved"]
    offloaded = [s for s in steps if s["preempted"]]
    assert [set(s["preempted"]) for s in offloaded] == [ids for _, ids in taken]
    # AND that step's line says so (it read 4: the request left, once the scheduler had freed the victim's)
    assert [s["blocks_used_in_step"] for s in offloaded] == [usable]
    # AND the report's peak is the full pool, at that step (it said 6 of 7, the most held before it)
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    engine = json.loads(capsys.readouterr().out)["engine"]
    assert (engine["peak_blocks_used"], engine["peak_step"]) == (usable, offloaded[0]["step"])
    assert main(["report", str(run), "--no-export"]) == 0
    assert f"peak {usable} of {usable} usable blocks used (100%" in capsys.readouterr().out

    # AND the phases: the first step prefills both prompts, the offloaded request's return recomputes (a soft
    # reset: its prompt and generated tokens written again), every other step decodes
    requests = _lines(run / "engine_requests.jsonl")
    recomputed = {r["step"] for r in requests if r["event"] == "resumed" and r["recomputed_tokens"] > 0}
    assert recomputed
    assert [s["step"] for s in steps if s["phase"] == "prefill"] == sorted({1} | recomputed)


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        # 9 tokens, a budget of 8: the prompt's 9th token is written alone, at step 2
        ((9,), ["prefill", "prefill", "decode", "decode"]),
        # 17 tokens: 8, 8, then the last one at step 3
        ((17,), ["prefill", "prefill", "prefill", "decode", "decode"]),
        # 3 tokens and 6: step 1 writes the 3 and 5 of the 6; step 2 the first request's decode beside the
        # second's last prompt token (2 tokens for 2 requests); step 3 both decode
        ((3, 6), ["prefill", "prefill", "decode", "decode"]),
    ],
)
def test_a_step_is_a_prefill_when_it_writes_prompt_tokens(
    tmp_path: Path, cb_model: torch.nn.Module, lengths: tuple[int, ...], expected: list[str]
) -> None:
    # GIVEN prompts longer than the step's token budget (8), chunked by the scheduler, generating 3 tokens
    prompts = [list(range(10 + 30 * i, 10 + 30 * i + n)) for i, n in enumerate(lengths)]
    run = tmp_path / "run"

    # WHEN it is recorded
    _generate(run, cb_model, prompts, 3, num_blocks=32, max_batch_tokens=8)

    # THEN each step that writes a prompt token is a prefill, the last chunk of 1 token included (it said
    # decode: no more tokens than requests), and the others decode
    steps = _lines(run / "engine_steps.jsonl")
    assert [s["phase"] for s in steps] == expected
    assert sum(s["tokens_scheduled"] for s in steps) == sum(lengths) + len(lengths) * (3 - 1)
    # AND the kvtrace step of each engine step carries that phase
    samples = {s["step"]: s["phase"] for s in _lines(run / "memory_samples.jsonl") if "started_ns" in s}
    assert [samples[s["step"]] for s in steps] == expected
