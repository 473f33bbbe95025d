"""transformers' continuous batching in a process that dies inside an engine step: the engine logs
(engine_steps.jsonl, engine_requests.jsonl) must hold every step that ended before it, as the KV log and
memory samples do: the recorder's writer thread flushes them all every 0.1 s (docs/format.md, "Interrupted
runs"). They were flushed only at the end of a later engine step, so a step that hung before a kill took
the fast steps before it along, and `diagnose` said nothing ran out of a run that had preempted.

A real `generate_batch` on the tiny random Llama 3 (2 layers, 2 KV heads, float32) in a child process:
prompts of 6, 5 and 3 tokens, 12 new tokens each, 8 usable blocks of 4 tokens. After step s a request of
prompt p holds p + s - 1 tokens, ceil((p + s - 1) / 4) blocks: 5, 5, 6, 7, 8, 8 blocks at steps 1-6, and
step 7 would need 3 + 3 + 3 = 9 > 8, so transformers takes the newest request (req_2, 2 blocks) out of
the pool and step 7 holds 3 + 3 = 6. Step 8 is scheduled (req_0 grows to 4 blocks), then its forward hangs
for 0.5 s and the process dies (`os._exit`: no exception, no teardown). The lines of step 8's scheduling were
never written before: no step ended after them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvtrace.cli import main
from tests.cb_versions import SECTOR_POOL

pytestmark = SECTOR_POOL

PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14]]
PAGE, USABLE, MAX_NEW = 4, 8, 12
KILLED_STEP = 8

_KILLED_IN_A_HANGING_STEP = textwrap.dedent(
    f"""
    import os, sys, time
    import torch
    import transformers.generation.continuous_batching.continuous_api as ca
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2), dtype=torch.float32)
    generation_step = ca.ContinuousBatchProcessor._generation_step
    steps = []

    def step(self, model):
        steps.append(1)
        if len(steps) == 6:
            time.sleep(0.15)  # more than 0.1 s: step 6's end flushed the engine logs (the old way)
        if len(steps) == {KILLED_STEP}:
            time.sleep(0.5)  # a long forward: the writer thread flushes every 0.1 s meanwhile
            os._exit(1)
        return generation_step(self, model)

    ca.ContinuousBatchProcessor._generation_step = step
    generation = GenerationConfig(max_new_tokens={MAX_NEW}, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks={USABLE}, page_size={PAGE}, max_batch_tokens=64)
    with kvtrace.record(sys.argv[1], model=model, profiler=False):
        model.generate_batch(
            {PROMPTS}, generation_config=generation, continuous_batching_config=batching, progress_bar=False
        )
    """
)


def _blocks_at(step: int, prompts: list[int]) -> int:
    """Blocks the requests with these prompt lengths hold after `step` (p + step - 1 tokens each)."""
    return sum(math.ceil((p + step - 1) / PAGE) for p in prompts)


def test_a_process_killed_in_a_hanging_step_keeps_the_engine_lines_of_the_steps_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real continuous-batching run whose process dies inside step 8, 0.5 s after step 7 ended
    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_A_HANGING_STEP, str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert done.returncode == 1, done.stderr
    assert json.loads((run / "manifest.json").read_text())["ended"] == {"status": "running"}

    # THEN engine_steps.jsonl holds every step that ended: 1-7, with the blocks the arithmetic gives
    lengths = [len(prompt) for prompt in PROMPTS]
    expected = [_blocks_at(step, lengths) for step in range(1, KILLED_STEP - 1)]  # steps 1-6
    assert expected == [5, 5, 6, 7, 8, 8]
    assert _blocks_at(KILLED_STEP - 1, lengths) == 9 > USABLE  # step 7 cannot hold all three
    expected.append(_blocks_at(KILLED_STEP - 1, lengths[:2]))  # req_2 out: 6
    steps = [json.loads(line) for line in (run / "engine_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, KILLED_STEP))
    assert [s["blocks_used"] for s in steps] == expected
    assert [s["preempted"] for s in steps] == [[]] * 6 + [["req_2"]]
    assert (steps[-1]["running"], steps[-1]["waiting"]) == (2, 1)
    # AND engine_requests.jsonl every request event up to step 8's scheduling (before its forward hung): each
    # request queued and scheduled at step 1, a `blocks` line at each step its blocks grew, req_2 preempted
    # at step 7
    expected_events = [(KILLED_STEP - 1, "req_2", "preempted", 0)]
    for index, prompt in enumerate(lengths):
        request_id, last = f"req_{index}", KILLED_STEP if index < 2 else KILLED_STEP - 2
        # taken into the queue as step 1 was prepared, holding nothing, then scheduled in it
        expected_events.append((1, request_id, "waiting", 0))
        expected_events.append((1, request_id, "scheduled", _blocks_at(1, [prompt])))
        for step in range(2, last + 1):
            if _blocks_at(step, [prompt]) != _blocks_at(step - 1, [prompt]):
                expected_events.append((step, request_id, "blocks", _blocks_at(step, [prompt])))
    assert (KILLED_STEP, "req_0", "blocks", 4) in expected_events  # 6 + 7 = 13 tokens in step 8
    events = [json.loads(line) for line in (run / "engine_requests.jsonl").read_text().splitlines()]
    logged = [(e["step"], e["request_id"], e["event"], e["blocks"]) for e in events]
    assert sorted(logged) == sorted(expected_events)
    # AND the last step line reached the disk with the memory sample of its end, not a step later
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in samples if s["phase"] in ("prefill", "decode")) == KILLED_STEP - 1
    # AND diagnose finds the preemption the run made, not "nothing ran out"
    capsys.readouterr()
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    assert (diagnosis["preemptions"], diagnosis["first_preemption_step"]) == (1, KILLED_STEP - 1)
    assert diagnosis["peak_blocks_used"] == USABLE
