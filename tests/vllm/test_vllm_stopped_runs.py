"""vLLM runs that stopped before their end, recorded in-process in a fresh interpreter (tests/vllm/scripts):

* the model raises in the second engine step (the first decode): that step is recorded, with the blocks it
  had allocated, so the report's and the diagnosis' peak is what the request events show; recorded by the
  plugin in vLLM's engine-core process, which dies of it, the run ends as `exception` too, even where the
  front end's shutdown kills that process before vLLM shuts the engine down;
* the process is SIGKILLed in the 30th step of a workload that preempts (from step 26): `kvtrace diagnose`
  says the process died, in the report's words, and counts each request cut short at its max_tokens (its
  `waiting` line's), the most it may reach: the remedies that hold that demand are said to fit, and vLLM,
  rerun to completion with them, preempts nothing (with the pool the lengths reached asked for, it does).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.cli import main
from tests.vllm.workload import (
    BLOCK_BYTES,
    BLOCK_SIZE,
    NEW_TOKENS,
    POOL_BYTES,
    PROMPT_TOKENS,
    REQUESTS,
    ROOT,
    make_llm,
    metric,
    run_script,
    run_workload,
)

KILLED_AT = 30  # the step whose forward kills the process: the workload first preempts at step 26
STALL_S = 60  # longer than the front end takes to SIGTERM a dead engine core (its SIGTERM ends the stall)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_step_whose_forward_raised_is_recorded(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 4 requests of one full block of prompt each, whose model raises in its 2nd forward (step 2)
    run_dir = tmp_path / "raised"
    argv = ("raise_record", str(tiny_model_dir), str(run_dir), "2")
    raised = run_script(*argv, kvtrace_dir=None, multiprocess=False)
    assert raised == {"type": "RuntimeError", "message": "forward 2 failed"}
    # In step 2 each request computes its 33rd token: cdiv(33, 32) = 2 blocks each
    held_in_step_2 = 4 * _cdiv(BLOCK_SIZE + 1, BLOCK_SIZE)
    requests = _jsonl(run_dir / fmt.ENGINE_REQUESTS)
    last_blocks: dict[str, int] = {}
    for event in requests:
        if event["step"] <= 2:
            last_blocks[event["request_id"]] = event["blocks"]
    assert sum(last_blocks.values()) == held_in_step_2 == 8
    # THEN the step that raised is in engine_steps.jsonl, said so, with the pool as it stood
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[1]["raised"] is True and "raised" not in steps[0]
    assert steps[1]["blocks_used_in_step"] == steps[1]["blocks_used"] == held_in_step_2
    assert steps[1]["running"] == 4 and steps[1]["tokens_scheduled"] == 4
    manifest = json.loads((run_dir / fmt.MANIFEST).read_text())
    assert manifest["ended"]["status"] == "exception" and manifest["ended"]["type"] == "RuntimeError"
    assert manifest["engine"]["engine_steps"] == 2
    # AND the report and the diagnosis give the peak the request events show
    report = _cli_json(capsys, "report", str(run_dir), "--no-export", "-q")
    assert (report["engine"]["peak_blocks_used"], report["engine"]["peak_step"]) == (held_in_step_2, 2)
    assert report["engine"]["steps"] == 2
    diagnosis = _cli_json(capsys, "diagnose", str(run_dir))
    assert (diagnosis["peak_blocks_used"], diagnosis["peak_step"]) == (held_in_step_2, 2)
    assert diagnosis["notes"] == [
        "the recorded block raised RuntimeError: forward 2 failed: the figures cover the run up to then"
    ]


def test_step_that_raised_in_the_engine_core_process_ends_the_run_as_raised(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN the same workload in a multiprocess engine, recorded by the plugin, the worker's model raising
    # in its 2nd forward: the engine core dies of it. vLLM tells the front end so, puts SIGTERM back to its
    # default action, then shuts the engine down; the front end's shutdown SIGTERMs the core as soon as it
    # hears. Here the core stalls between the two (as a loaded machine's may), so that SIGTERM kills it
    # there, every time: the run must have ended before vLLM told the front end
    run_dir = tmp_path / "raised-mp"
    argv = ("raise_plugin", str(tiny_model_dir), "2", str(STALL_S))
    front = run_script(*argv, kvtrace_dir=run_dir, multiprocess=True)
    assert front["type"] == "EngineDeadError"
    # THEN the run says the block raised, with the worker's error, not "ok"
    manifest = json.loads((run_dir / fmt.MANIFEST).read_text())
    ended = manifest["ended"]
    assert ended["status"] == "exception" and ended["type"] == "RuntimeError"
    assert "forward 2 failed" in ended["message"]
    # AND its step 2 is recorded as the one that raised, holding what the request events say (requests
    # reach a multiprocess engine one by one: how many step 1 took depends on timing)
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    assert [s["step"] for s in steps] == [1, 2] and manifest["engine"]["engine_steps"] == 2
    assert steps[1]["raised"] is True
    held: dict[str, int] = {}
    for event in _jsonl(run_dir / fmt.ENGINE_REQUESTS):
        if event["event"] != "finished":  # an abort as the engine went down would say 0
            held[event["request_id"]] = event["blocks"]
    assert steps[1]["blocks_used_in_step"] == sum(held.values()) > steps[0]["blocks_used_in_step"]


def _killed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, killed_at: int) -> Path:
    """The workload recorded until its process SIGKILLs itself in step `killed_at`'s forward."""
    run_dir = tmp_path_factory.mktemp("vllm-killed") / "run"
    _kill_record(tiny_model_dir, run_dir, killed_at)
    return run_dir


def _kill_record(
    tiny_model_dir: Path, run_dir: Path, killed_at: int, *hang: str, mode: str = "kill_record"
) -> None:
    """Record the workload into `run_dir` in a child process that SIGKILLs itself in step `killed_at`'s
    forward (after hanging that many seconds there, `hang`); `mode` "term_record": SIGTERMs itself."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("KVTRACE_DIR", None)
    argv = [mode, str(tiny_model_dir), str(run_dir), str(killed_at), *hang]
    done = subprocess.run(
        [sys.executable, "-m", "tests.vllm.scripts", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    killed_by = -signal.SIGTERM if mode == "term_record" else -signal.SIGKILL
    assert done.returncode == killed_by, (
        f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )


@pytest.fixture(scope="module")
def killed_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workload recorded until its process SIGKILLs itself in step KILLED_AT's forward."""
    return _killed(tiny_model_dir, tmp_path_factory, KILLED_AT)


def test_killed_run_is_said_to_have_died(killed_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a run killed in step 30: its manifest still says running, its files end at step 29
    manifest = json.loads((killed_run / fmt.MANIFEST).read_text())
    assert manifest["ended"] == {"status": "running"}
    steps = _jsonl(killed_run / fmt.ENGINE_STEPS)
    assert [s["step"] for s in steps] == list(range(1, KILLED_AT))
    requests = _jsonl(killed_run / fmt.ENGINE_REQUESTS)
    assert not [e for e in requests if e["event"] == "finished"]  # 48 new tokens each: none got there
    preempted = [e for e in requests if e["event"] == "preempted"]
    assert preempted and min(e["step"] for e in preempted) == 26
    # WHEN it is diagnosed, and reported
    diagnosis = _cli_json(capsys, "diagnose", str(killed_run))
    report = _cli_json(capsys, "report", str(killed_run), "--no-export", "-q")
    # THEN the diagnosis says the process died, in the report's words (as a Hugging Face run's)
    died = "the run never finished (the process died): read up to its last flushed step"
    assert died in report["notes"]
    # (after the note that the unfinished requests are counted at their max_tokens, and that a larger pool
    # admits more at once: 7 x 3 ran at step 21's peak, 8 x 3 at most)
    asked = (
        f"{REQUESTS} request(s) had not finished when the run stopped: each is counted at its "
        f"max_tokens={NEW_TOKENS} (prompt + max_tokens - 1 KV tokens, the most it may reach: it may stop "
        "earlier at an EOS or a stop string), not at the length it had reached, so the demand is an upper "
        "bound"
    )
    schedule = (
        "on the recorded schedule the demand peaked at 21 blocks; a larger pool admits more requests at "
        "once, so the suggestion covers the worst case of 24"
    )
    assert diagnosis["kind"] == "preemption" and diagnosis["notes"] == [asked, schedule, died]
    # AND the pool it prices is what the whole workload needs: 8 x cdiv(40 + 48 - 1, 32) + the null block,
    # every request counted at its max_tokens though still in the engine, so that remedy fits
    whole_run_blocks = REQUESTS * _cdiv(PROMPT_TOKENS + NEW_TOKENS - 1, BLOCK_SIZE) + 1
    assert diagnosis["blocks_needed"] == whole_run_blocks == 25
    assert diagnosis["kv_cache_bytes"] == POOL_BYTES
    remedies = {r["knob"]: r for r in diagnosis["remedies"]}
    assert remedies["kv_cache_memory_bytes"]["fits"] is True
    assert not [r for r in diagnosis["remedies"] if "cannot be told" in r["sentence"]]
    # AND the text says so too, the note last
    assert main(["diagnose", str(killed_run)]) == 0
    text = capsys.readouterr().out
    assert "[fits] kv_cache_memory_bytes=" in text and text.rstrip().endswith(f"note: {died}")


def test_killed_run_counts_its_unfinished_requests_at_their_max_tokens(
    killed_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run killed in step 30, every request unfinished: 7 ran (the 8th waited from the start), and
    # those preempted at step 26 had 40 + 25 tokens, whose next one needs a 3rd block: each of the 7 reached
    # 3; the 8th, still queued, its prompt's cdiv(40, 32) = 2: 23 at the lengths reached
    requests = _jsonl(killed_run / fmt.ENGINE_REQUESTS)
    ran = {e["request_id"] for e in requests if e["event"] != "waiting"}
    preempted = [e for e in requests if e["event"] == "preempted"]
    blocks_each = {_cdiv(e["prompt_tokens"] + e["output_tokens"], BLOCK_SIZE) for e in preempted}
    assert (len(ran), blocks_each) == (REQUESTS - 1, {3})
    peaked = len(ran) * 3
    assert peaked + _cdiv(PROMPT_TOKENS, BLOCK_SIZE) == 23
    # each waiting line says max_tokens 48: the most a request may reach is cdiv(40 + 48 - 1, 32) = 3 blocks
    asked = {e["request_id"]: e["max_tokens"] for e in requests if e["event"] == "waiting"}
    assert len(asked) == REQUESTS and set(asked.values()) == {NEW_TOKENS}
    at_most = REQUESTS * _cdiv(PROMPT_TOKENS + NEW_TOKENS - 1, BLOCK_SIZE)
    assert at_most == 24
    # WHEN it is diagnosed
    diagnosis = _cli_json(capsys, "diagnose", str(killed_run))
    assert main(["diagnose", str(killed_run)]) == 0
    text = capsys.readouterr().out
    # THEN the JSON gives the requests left unfinished, as transformers' diagnosis does, each counted at its
    # max_tokens (were 23 blocks "at least")
    assert diagnosis["unfinished_requests"] == diagnosis["asked_requests"] == REQUESTS
    assert (diagnosis["demand_bound_blocks"], diagnosis["blocks_needed"]) == (at_most, at_most + 1)
    # AND the text says how they were counted, no "at least"
    assert (
        f"  demand if nothing were preempted: {at_most} blocks (+1 null = {at_most + 1}), counting the "
        f"{REQUESTS} unfinished request(s) at their max_tokens; on the recorded schedule it peaked at "
        f"{peaked}\n"
    ) in text
    assert "at least" not in text


def test_remedies_said_to_fit_on_a_killed_run_avoid_every_preemption_when_run_to_completion(
    killed_run: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the remedies said to fit on the run killed in step 30: the pool of 8 x 3 blocks + the null one,
    # and max_num_seqs 15 // 3 = 5 in the present pool
    diagnosis = _cli_json(capsys, "diagnose", str(killed_run))
    remedies = {r["knob"]: r for r in diagnosis["remedies"]}
    pool, seqs = remedies["kv_cache_memory_bytes"], remedies["max_num_seqs"]
    assert (pool["fits"], pool["setting"]) == (True, 25 * BLOCK_BYTES)
    usable = POOL_BYTES // BLOCK_BYTES - 1
    assert (seqs["fits"], seqs["setting"]) == (True, usable // 3) and usable // 3 == 5
    # WHEN vLLM runs the whole workload with each, and with the pool the lengths reached asked for (23 + 1)
    preemptions: dict[str, float] = {}
    for name, settings in {
        "pool": {"kv_cache_memory_bytes": pool["setting"]},
        "max_num_seqs": {"max_num_seqs": seqs["setting"]},
        "lengths reached": {"kv_cache_memory_bytes": 24 * BLOCK_BYTES},
    }.items():
        llm = make_llm(tiny_model_dir, **settings)
        outputs = run_workload(llm)
        assert [len(o.outputs[0].token_ids) for o in outputs] == [NEW_TOKENS] * REQUESTS
        preemptions[name] = metric(llm, "vllm:num_preemptions")
        del llm
        gc.collect()  # before the next engine starts, not while it runs
    # THEN neither remedy preempts, and the pool of the lengths reached still does
    assert preemptions["pool"] == preemptions["max_num_seqs"] == 0
    assert preemptions["lengths reached"] > 0


def test_killed_run_counts_the_request_still_queued(
    killed_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run killed in step 30: its last step line has 8 requests in the engine, one never scheduled
    last = _jsonl(killed_run / fmt.ENGINE_STEPS)[-1]
    assert last["running"] + last["waiting"] == REQUESTS
    requests = _jsonl(killed_run / fmt.ENGINE_REQUESTS)
    # every request submitted has a line from when vLLM's scheduler took it in: holding nothing, with its
    # prompt and the tokens it may generate (the queued one had no line at all)
    waiting = [e for e in requests if e["event"] == "waiting"]
    assert len({e["request_id"] for e in waiting}) == len(waiting) == REQUESTS
    assert {(e["blocks"], e["tokens"], e["prompt_tokens"], e["max_tokens"]) for e in waiting} == {
        (0, 0, PROMPT_TOKENS, NEW_TOKENS)
    }
    scheduled = {e["request_id"] for e in requests if e["event"] == "scheduled"}
    assert len(scheduled) == REQUESTS - 1
    # WHEN reported, compared, exported and diagnosed
    report = _cli_json(capsys, "report", str(killed_run), "--no-export", "-q")["engine"]
    compared = _cli_json(capsys, "compare", str(killed_run), str(killed_run))["runs"][0]["engine"]
    diagnosis = _cli_json(capsys, "diagnose", str(killed_run))
    assert main(["diagnose", str(killed_run)]) == 0
    text = capsys.readouterr().out
    # THEN each counts the 8 requests (were 7: the queued one had no line), none of them aborted: the report
    # says 0 as compare does (was null beside compare's 0)
    assert (report["requests"], report["requests_aborted"]) == (REQUESTS, 0)
    assert (compared["requests"], compared["aborted_requests"]) == (REQUESTS, 0)
    assert (diagnosis["requests"], diagnosis["unfinished_requests"]) == (REQUESTS, REQUESTS)
    assert len(diagnosis["final_demand_blocks"]) == REQUESTS
    assert f"at most {REQUESTS} run together (max_num_seqs {REQUESTS}, {REQUESTS} requests)" in text
    # AND the queued request is never counted as held: the steps' demand peaked at the 7 that ran, 7 x 3
    assert diagnosis["recorded_peak_demand_blocks"] == (REQUESTS - 1) * 3
    assert all(h["request_id"] in scheduled for h in diagnosis["held_at_first"])
    # AND the export has its rows: 8 distinct requests
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = killed_run.parent / "export"
    assert main(["export", str(killed_run), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    table = pq.read_table(out / "engine_requests")
    assert len(set(table.column("request_id").to_pylist())) == REQUESTS


KILLED_EARLY_AT = 10  # a step before the workload's first preemption (26)


def test_run_killed_before_preempting_does_not_say_nothing_ran_out(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the workload killed in step 10, before it first preempts: its files end at step 9, no request
    # preempted or finished (48 new tokens each), so all 8 were still in the engine
    run = _killed(tiny_model_dir, tmp_path_factory, KILLED_EARLY_AT)
    steps = _jsonl(run / fmt.ENGINE_STEPS)
    assert [s["step"] for s in steps] == list(range(1, KILLED_EARLY_AT))
    requests = _jsonl(run / fmt.ENGINE_REQUESTS)
    assert not [e for e in requests if e["event"] in ("preempted", "finished")]
    peak = max(s["blocks_used_in_step"] for s in steps)
    peak_step = next(s["step"] for s in steps if s["blocks_used_in_step"] == peak)
    usable = json.loads((run / fmt.ENGINE).read_text())["num_blocks"] - 1  # less vLLM's null block
    assert usable == POOL_BYTES // BLOCK_BYTES - 1 == 15
    # WHEN it is diagnosed
    diagnosis = _cli_json(capsys, "diagnose", str(run))
    assert main(["diagnose", str(run)]) == 0
    text = capsys.readouterr().out
    # THEN it preempted nothing before it stopped, with its requests unfinished, so "nothing ran out" is
    # said neither in the JSON nor in the text; each counted at its max_tokens (cdiv(40 + 48 - 1, 32) = 3
    # blocks), all 8 at once need 24, more than the 15 usable: vLLM may preempt (it does, from step 26)
    worst = REQUESTS * _cdiv(PROMPT_TOKENS + NEW_TOKENS - 1, BLOCK_SIZE)
    assert worst == 24
    assert (diagnosis["kind"], diagnosis["unfinished_requests"]) == ("no_preemption", REQUESTS)
    assert (diagnosis["peak_blocks_used"], diagnosis["peak_step"]) == (peak, peak_step)
    assert diagnosis["asked_demand_blocks"] == worst
    sentence = (
        f"vLLM started normally and preempted nothing before the run stopped, with {REQUESTS} request(s) "
        f"unfinished (its process died); counted at their max_tokens, its requests need at most {worst} "
        f"blocks at once, more than the {usable} usable blocks: vLLM may preempt before they finish (a pool "
        f"of {worst + 1} blocks, with vLLM's null block, holds them). "
        f"Peak {peak} blocks used ({100 * peak / usable:.0f}% of the {usable} usable) at step {peak_step}; "
        "the pool is allocated at start, so context and batch do not change its size (size one: kvtrace plan "
        f"--engine vllm --from-run {run})."
    )
    assert diagnosis["sentence"] == sentence
    assert "nothing ran out" not in text
    died = "the run never finished (the process died): read up to its last flushed step"
    assert text.splitlines() == [f"kvtrace diagnose: {run}: {sentence}", f"  note: {died}"]


def test_run_killed_before_preempting_says_a_pool_that_holds_every_max_tokens_suffices(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the workload in a pool of 25 blocks (24 usable: its 8 requests at cdiv(40 + 48 - 1, 32) = 3
    # blocks each), killed in step 10
    worst = REQUESTS * _cdiv(PROMPT_TOKENS + NEW_TOKENS - 1, BLOCK_SIZE)
    pool = (worst + 1) * BLOCK_BYTES
    run = tmp_path_factory.mktemp("vllm-killed-held") / "run"
    _kill_record(tiny_model_dir, run, KILLED_EARLY_AT, str(pool), mode="kill_record_pool")
    assert json.loads((run / fmt.ENGINE).read_text())["num_blocks"] == worst + 1
    requests = _jsonl(run / fmt.ENGINE_REQUESTS)
    assert not [e for e in requests if e["event"] in ("preempted", "finished")]
    assert {e["max_tokens"] for e in requests if e["event"] == "waiting"} == {NEW_TOKENS}
    # WHEN it is diagnosed
    diagnosis = _cli_json(capsys, "diagnose", str(run))
    # THEN the worst case of its requests at their max_tokens fits its usable blocks: the pool suffices
    assert (diagnosis["kind"], diagnosis["asked_demand_blocks"]) == ("no_preemption", worst)
    assert diagnosis["sentence"].startswith(
        f"vLLM started normally and preempted nothing before the run stopped, with {REQUESTS} request(s) "
        f"unfinished (its process died); counted at their max_tokens, its requests need at most {worst} "
        f"blocks at once, which the {worst} usable blocks hold: the pool suffices, and none would have been "
        "preempted had it run to its end. Peak "
    )


HUNG_AT = 26  # the step whose scheduling first preempts: its forward hangs, then the process is killed


def test_a_run_killed_in_a_hanging_step_keeps_the_lines_made_before_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN the workload recorded until step 26's forward hangs 0.5 s and the process is SIGKILLed there:
    # step 26's scheduling preempted, and no step ended after it (whose end would have written the logs)
    run_dir = tmp_path / "run"
    _kill_record(tiny_model_dir, run_dir, HUNG_AT, "0.5")
    # THEN the writer thread wrote every step that ended, and the preemptions of step 26's scheduling
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    assert [s["step"] for s in steps] == list(range(1, HUNG_AT))
    requests = _jsonl(run_dir / fmt.ENGINE_REQUESTS)
    preempted = [e for e in requests if e["event"] == "preempted"]
    assert preempted and {e["step"] for e in preempted} == {HUNG_AT}
    assert max(e["step"] for e in requests) == HUNG_AT


def test_a_sigterm_ends_the_run_with_its_last_step_and_says_so(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the workload recorded in-process until a SIGTERM (a scheduler's time limit) in step 30's forward
    run_dir = tmp_path / "terminated"
    _kill_record(tiny_model_dir, run_dir, KILLED_AT, mode="term_record")

    # THEN the process died of it (above), after the run's end was written: interrupted by SIGTERM, the
    # step it came in recorded as the one that raised, with the pool as it stood
    ended = json.loads((run_dir / fmt.MANIFEST).read_text())["ended"]
    assert (ended["status"], ended["type"], ended["signal"]) == ("interrupted", "Terminated", "SIGTERM")
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    assert [s["step"] for s in steps] == list(range(1, KILLED_AT + 1)) and steps[-1]["raised"] is True
    assert steps[-1]["running"] + steps[-1]["waiting"] == REQUESTS

    # AND diagnose says a SIGTERM stopped it, with every request unfinished (each counted at its max_tokens:
    # the whole workload's 8 x 3 blocks), not a death
    diagnosis = _cli_json(capsys, "diagnose", str(run_dir))
    stopped = (
        "the recorded block was stopped by SIGTERM (a scheduler's time limit, `docker stop`, `timeout` or "
        "`kill`): the figures cover the run up to then"
    )
    assert diagnosis["notes"][-1] == stopped
    assert diagnosis["unfinished_requests"] == diagnosis["asked_requests"] == REQUESTS
    assert diagnosis["demand_bound_blocks"] == REQUESTS * _cdiv(PROMPT_TOKENS + NEW_TOKENS - 1, BLOCK_SIZE)
    assert {r["knob"]: r["fits"] for r in diagnosis["remedies"]}["kv_cache_memory_bytes"] is True
    report = _cli_json(capsys, "report", str(run_dir), "--no-export", "-q")
    assert stopped in report["notes"]
