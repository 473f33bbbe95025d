"""A vLLM run that stopped with requests unfinished, each counted at the most its max_tokens lets it reach
(analyzers.planning.unfinished_asks), on the hand-made engine files of tests/engine_files.py (blocks of 4
tokens, 4 usable, max_model_len 16, max_num_seqs 2) cut at step 4, where A (prompt 6) preempts B (prompt 5),
before A's `finished` line: both still in the engine, as a kill -9 leaves them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analyzers.planning.engine_run_diagnosis import explain_engine_run
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis
from analyzers.readers.engine_files import read_engine
from tests.engine_files import ENGINE_JSON, REQUESTS, STEPS, _req, write_engine_run

BLOCK, BLOCK_BYTES, MAX_MODEL_LEN = 4, 128, 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _stopped(tmp_path: Path, a_max: int | None, b_max: int, **config: Any) -> PreemptionDiagnosis:
    """The run cut after step 4, A's and B's `waiting` lines at step 0 with these max_tokens (None: none
    logged, as before kvtrace logged it), diagnosed as a run whose process died."""
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["config"].update(config)
    a_extra = {} if a_max is None else {"max_tokens": a_max}
    waiting = [
        _req(0, "A", "waiting", 0, 0, 6, 0, **a_extra),
        _req(0, "B", "waiting", 0, 0, 5, 0, max_tokens=b_max),
    ]
    cut = [e for e in REQUESTS if e["step"] <= 4 and e["event"] != "finished"]
    run = read_engine(write_engine_run(tmp_path / "run", engine, STEPS[:4], waiting + cut))
    assert run is not None
    diagnosis = explain_engine_run(run, None, stopped="died").diagnosis
    assert isinstance(diagnosis, PreemptionDiagnosis)
    assert diagnosis.unfinished_requests == 2
    return diagnosis


def test_an_unfinished_request_is_counted_at_its_max_tokens_capped_by_max_model_len(tmp_path: Path) -> None:
    # GIVEN A asking 100 new tokens, which max_model_len 16 stops at 16 tokens in all (15 with KV), and B
    # asking 4: 5 + 4 - 1 = 8 tokens
    a_blocks = _cdiv(min(6 + 100, MAX_MODEL_LEN) - 1, BLOCK)
    b_blocks = _cdiv(5 + 4 - 1, BLOCK)
    assert (a_blocks, b_blocks) == (4, 2)  # uncapped, A would be cdiv(105, 4) = 27
    # WHEN diagnosed
    diagnosis = _stopped(tmp_path, 100, 4)
    # THEN each counts at its ask (A had reached 3 blocks), the demand an upper bound: the remedies fit
    assert diagnosis.asked_requests == 2
    assert diagnosis.final_demand_blocks == {"A": a_blocks, "B": b_blocks}
    assert (diagnosis.demand_bound_blocks, diagnosis.blocks_needed) == (6, 7)
    remedies = {r.knob: r for r in diagnosis.remedies}
    assert (remedies["kv_cache_memory_bytes"].fits, remedies["kv_cache_memory_bytes"].setting) == (
        True,
        7 * BLOCK_BYTES,
    )
    assert (remedies["max_num_seqs"].fits, remedies["max_num_seqs"].setting) == (True, 1)  # 4 fits 4 usable
    assert not [r for r in diagnosis.remedies if "cannot be told" in r.sentence]


def test_an_unfinished_request_counts_the_slots_of_its_drafts(tmp_path: Path) -> None:
    # GIVEN speculative decoding of 2 draft tokens a step: vLLM gives the drafts slots past max_tokens, up
    # to max_model_len: A min(15 + 2, 16) = 16 tokens, B 8 + 2 = 10
    a_blocks = _cdiv(min(15 + 2, MAX_MODEL_LEN), BLOCK)
    b_blocks = _cdiv(8 + 2, BLOCK)
    assert (a_blocks, b_blocks) == (4, 3)
    # WHEN diagnosed
    diagnosis = _stopped(tmp_path, 100, 4, num_speculative_tokens=2, speculative_method="ngram")
    # THEN
    assert diagnosis.final_demand_blocks == {"A": a_blocks, "B": b_blocks}
    assert diagnosis.demand_bound_blocks == 7


def test_an_unfinished_request_without_max_tokens_keeps_the_lower_bound(tmp_path: Path) -> None:
    # GIVEN A's waiting line without max_tokens (recorded before kvtrace logged it)
    # WHEN diagnosed
    diagnosis = _stopped(tmp_path, None, 4)
    # THEN A counts at the length it had reached (9 tokens: 3 blocks), B at its max_tokens (5 + 4 - 1 = 8
    # tokens: 2 blocks), and with A's at least, no remedy is said to fit
    assert diagnosis.asked_requests == 1
    assert diagnosis.final_demand_blocks == {"A": 3, "B": _cdiv(5 + 4 - 1, BLOCK)} == {"A": 3, "B": 2}
    assert diagnosis.remedies and all(r.fits is not True for r in diagnosis.remedies)
