"""A vLLM run that preempts and aborts a request still queued (never scheduled), recorded in-process: the pool
`kvtrace diagnose` says avoids every preemption counts that request too, and a rerun with it preempts none.

The workload (tests/vllm/workload): 8 requests of 40 prompt + 48 new tokens in a pool of 16 blocks of 32; the
7 that fit run, the 8th waits; from step 26 the pool preempts; at step 28 requests 5, 6 and 7 are aborted,
7 still waiting. Before kvtrace logged a request taken in (`waiting`), 7's one line was its `finished` one,
the demand left it out (7 x 3 = 21 blocks, +1 null = 22), and a rerun with 22 blocks admitted it and
preempted.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from kvtrace import format as fmt
from kvtrace.cli import main
from tests.vllm.workload import (
    BLOCK_BYTES,
    BLOCK_SIZE,
    NEW_TOKENS,
    POOL_BYTES,
    PROMPT_TOKENS,
    REQUESTS,
    make_llm,
    prompts,
    sampling,
)

ABORT_AT = 28  # the engine step after which requests 5, 6 and 7 are aborted (the workload preempts from 26)
ABORTED = (5, 6, 7)
QUEUED = 7  # still waiting at ABORT_AT: 7 requests of cdiv(40, 32) = 2 prompt blocks fill 14 of 15


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record_aborting(
    model_dir: Path,
    run_dir: Path,
    abort_at: int = ABORT_AT,
    aborted: tuple[int, ...] = ABORTED,
    **overrides: Any,
) -> dict[str, Any]:
    """The workload recorded with requests `aborted` (5, 6, 7) aborted after step `abort_at`: the ids vLLM
    gave the requests and the requests its scheduler preempted, counted at vLLM's own `_preempt_request` (its
    `vllm:num_preemptions` counter stays 0 in-process without a stat logger)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    preempted: list[str] = []
    preempt = Scheduler._preempt_request

    def counted(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        preempted.append(request.request_id)
        return preempt(self, request, *args, **kwargs)

    Scheduler._preempt_request = counted  # type: ignore[method-assign]
    try:
        llm = make_llm(model_dir, **overrides)
        engine = llm.llm_engine
        with kvtrace.record(run_dir, model=llm, profiler=False):
            ids = [engine.add_request(str(i), prompt, sampling()) for i, prompt in enumerate(prompts())]
            step = 0
            while engine.has_unfinished_requests():
                engine.step()
                step += 1
                if step == abort_at:
                    engine.abort_request([str(i) for i in aborted])
        engine.engine_core.shutdown()
    finally:
        Scheduler._preempt_request = preempt  # type: ignore[method-assign]
    del llm, engine
    gc.collect()
    return {"ids": ids, "preempted": preempted}


def _diagnosis(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["diagnose", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def queued_abort(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("vllm-queued-abort") / "run"
    return {"dir": run_dir, **_record_aborting(tiny_model_dir, run_dir)}


def test_a_pool_said_to_avoid_every_preemption_does_with_a_request_aborted_in_the_queue(
    queued_abort: dict[str, Any], tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run in a 16-block pool: it preempted, and request 7 was aborted before it was ever scheduled
    run_dir, ids = queued_abort["dir"], queued_abort["ids"]
    assert queued_abort["preempted"]
    events = _jsonl(run_dir / fmt.ENGINE_REQUESTS)
    queued = [e for e in events if e["request_id"] == ids[QUEUED]]
    # its lines: taken in (with the tokens it may generate), then aborted, never holding a block
    assert [(e["event"], e["blocks"], e.get("finish_reason")) for e in queued] == [
        ("waiting", 0, None),
        ("finished", 0, "abort"),
    ]
    assert (queued[0]["prompt_tokens"], queued[0]["max_tokens"]) == (PROMPT_TOKENS, NEW_TOKENS)
    # requests 5 and 6 ran before their abort: preempted at 40 + 25 tokens, whose next needs cdiv(65, 32) = 3
    for index in (5, 6):
        (preempted,) = [e for e in events if e["request_id"] == ids[index] and e["event"] == "preempted"]
        assert _cdiv(preempted["prompt_tokens"] + preempted["output_tokens"], BLOCK_SIZE) == 3
    # WHEN it is diagnosed
    diagnosis = _diagnosis(run_dir, capsys)
    # THEN every request counts, the queued one at what it would reach once admitted: cdiv(40 + 48 - 1, 32)
    each = _cdiv(PROMPT_TOKENS + NEW_TOKENS - 1, BLOCK_SIZE)
    assert each == 3
    assert diagnosis["requests"] == len(diagnosis["final_demand_blocks"]) == REQUESTS
    assert diagnosis["final_demand_blocks"][ids[QUEUED]] == each
    assert diagnosis["final_demand_blocks"] == {request_id: each for request_id in ids}
    # 8 x 3 = 24, +1 null = 25 (was 21 and 22: the queued request left out)
    assert (diagnosis["demand_bound_blocks"], diagnosis["blocks_needed"]) == (REQUESTS * each, 25)
    grow = diagnosis["remedies"][0]
    assert (grow["knob"], grow["setting"], grow["fits"]) == ("kv_cache_memory_bytes", 25 * BLOCK_BYTES, True)
    assert diagnosis["kv_cache_bytes"] == POOL_BYTES
    # AND a rerun with that pool and the same aborts preempts none: the queued request is admitted now
    rerun = tmp_path / "rerun"
    again = _record_aborting(tiny_model_dir, rerun, kv_cache_memory_bytes=grow["setting"])
    assert json.loads((rerun / fmt.ENGINE).read_text())["num_blocks"] == 25
    rerun_events = _jsonl(rerun / fmt.ENGINE_REQUESTS)
    assert any(e["event"] == "scheduled" and e["request_id"] == again["ids"][QUEUED] for e in rerun_events)
    assert not [e for e in rerun_events if e["event"] == "preempted"]
    assert again["preempted"] == []


def test_a_request_aborted_in_the_queue_without_its_max_tokens_leaves_no_remedy_said_to_fit(
    queued_abort: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the same run as kvtrace logged it before `waiting`: the queued request's one line is its end, so
    # how long it would grow once admitted is unknown
    run_dir, ids = tmp_path / "older", queued_abort["ids"]
    run_dir.mkdir()
    for path in queued_abort["dir"].iterdir():
        if path.is_file():
            (run_dir / path.name).write_bytes(path.read_bytes())
    events = _jsonl(queued_abort["dir"] / fmt.ENGINE_REQUESTS)
    older = [e for e in events if e["event"] != "waiting"]
    (run_dir / fmt.ENGINE_REQUESTS).write_text("".join(json.dumps(e) + "\n" for e in older))
    # (nor did it count the log's lines in the manifest: this one's count is of the log with `waiting`)
    manifest = json.loads((run_dir / fmt.MANIFEST).read_text())
    del manifest["engine"]["engine_requests"]
    (run_dir / fmt.MANIFEST).write_text(json.dumps(manifest))
    # WHEN it is diagnosed
    diagnosis = _diagnosis(run_dir, capsys)
    # THEN the queued request counts at its prompt at least: cdiv(40, 32) = 2, so 7 x 3 + 2 = 23 (+1 null)
    assert diagnosis["final_demand_blocks"][ids[QUEUED]] == _cdiv(PROMPT_TOKENS, BLOCK_SIZE) == 2
    assert (diagnosis["demand_bound_blocks"], diagnosis["blocks_needed"]) == (23, 24)
    # AND no remedy is said to fit (was [fits]): each that would is unknown, saying why
    assert diagnosis["remedies"] and not [r for r in diagnosis["remedies"] if r["fits"]]
    grow = diagnosis["remedies"][0]
    assert grow["fits"] is None
    caveat = "1 request(s) aborted before they were scheduled are counted at their prompts only"
    assert caveat in grow["sentence"]
    assert main(["diagnose", str(run_dir)]) == 0
    assert "[fits]" not in capsys.readouterr().out


RUNNING_ABORT_AT = 3  # request 0 has 40 + 3 tokens then, 2 blocks of the 3 it asked for


def test_a_request_aborted_while_it_ran_counts_at_its_whole_ask(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the workload with request 0 aborted early, while it ran, and the pool still preempting the rest
    run_dir = tmp_path / "run"
    recorded = _record_aborting(tiny_model_dir, run_dir, abort_at=RUNNING_ABORT_AT, aborted=(0,))
    assert recorded["preempted"] and recorded["ids"][0] not in recorded["preempted"]
    first = [e for e in _jsonl(run_dir / fmt.ENGINE_REQUESTS) if e["request_id"] == recorded["ids"][0]]
    assert first[0]["event"] == "waiting" and first[0]["max_tokens"] == NEW_TOKENS
    assert any(e["event"] == "scheduled" for e in first)
    end = first[-1]
    assert (end["event"], end["finish_reason"]) == ("finished", "abort")
    # cut at 40 + a few tokens, whose KV fills 2 blocks, short of the 3 its whole ask takes
    reached = end["prompt_tokens"] + end["output_tokens"] - 1
    assert end["output_tokens"] < NEW_TOKENS and _cdiv(reached, BLOCK_SIZE) == 2
    # WHEN it is diagnosed (what vLLM printed while it ran set aside)
    capsys.readouterr()
    diagnosis = _diagnosis(run_dir, capsys)
    # THEN it counts at its whole ask, cdiv(40 + 48 - 1, 32) = 3 (was 2, the length the abort cut it at),
    # as every other request: 8 x 3 = 24 blocks, +1 null = 25 (was 23 and 24)
    each = _cdiv(PROMPT_TOKENS + NEW_TOKENS - 1, BLOCK_SIZE)
    assert diagnosis["final_demand_blocks"][recorded["ids"][0]] == each == 3
    assert (diagnosis["demand_bound_blocks"], diagnosis["blocks_needed"]) == (REQUESTS * each, 25)
    grow = diagnosis["remedies"][0]
    assert (grow["knob"], grow["setting"], grow["fits"]) == ("kv_cache_memory_bytes", 25 * BLOCK_BYTES, True)
